"""shardkit's decode and one-bucket PixArt batching as stages of a stock webdataset pipeline.

    stages = WebDatasetStages("/data/out", batch_size=32, real_prompt_ratio=0.5)
    dataset = wds.WebDataset(urls, shardshuffle=False).compose(stages.decode).compose(stages.batches)

``decode`` takes webdataset's raw samples (``{"__key__", "json", "latent.npy", ...}`` of bytes:
put it before any ``.decode()``) to ``DecodedSample``; ``batches`` groups them per bucket and
collates each batch with ``PixArtCollate``. Both are ``SampleDecoder`` and ``PixArtCollate`` as
the reader runs them, so a sample gets the same caption, dropout and latent noise as from
``ShardReader`` for the same seed and epoch.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Iterable, Iterator, Sequence

import torch

from ..errors import ShardFormatError, ShardkitError
from ..tario import TarSample
from .collate import PixArtCollate
from .stages import DecodedSample, SampleDecoder, full_batches
from .store import ShardStore, empty_caption, resolve_build


class WebDatasetStages:
    """The two stages over one build's declared format (the build folder or its manifest.json,
    local or a URL: only the manifest, and the empty caption for ``caption_dropout``, are read).

    Options mean what they mean for ``ShardReader``. ``drop_last`` drops each bucket's partial
    tail batch (the tails are yielded last, in bucket order, otherwise). Call ``set_epoch`` at the
    start of every epoch: caption choice, dropout and latent noise depend on (seed, epoch, key).
    """

    def __init__(self, build: str | os.PathLike, batch_size: int, *, caption_fields: Sequence[str] | None = None,
                 real_prompt_ratio: float = 1.0, caption_dropout: float = 0.0, seed: int = 0,
                 max_length: int | None = None, latent: str = "sample", scale_factor: float | None = None,
                 dtype: torch.dtype | None = None, mask_dtype: torch.dtype = torch.int16,
                 caption_padding: str = "max_length", layout: str = "tuple", drop_last: bool = False,
                 storage_options: dict[str, Any] | None = None):
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ShardkitError(f"batch_size must be a positive integer, got {batch_size!r}")
        store = ShardStore(storage_options=storage_options)
        resolved = resolve_build(build, store)
        if resolved.manifest is None:
            raise ShardkitError("WebDatasetStages reads the build's format from its manifest: pass the build folder "
                                "or its manifest.json")
        fmt = resolved.manifest.declaration()
        fields = tuple(caption_fields) if caption_fields else fmt.captions[:2]
        self.decoder = SampleDecoder(fields, real_prompt_ratio, seed, fmt, caption_dropout=caption_dropout,
                                     empty_caption=empty_caption(resolved, store) if 0 < caption_dropout <= 1 else None)
        self.collate = PixArtCollate(max_length=max_length or fmt.params["max_length"], latent=latent,
                                     scale_factor=scale_factor, dtype=dtype, mask_dtype=mask_dtype,
                                     caption_padding=caption_padding, layout=layout, seed=seed)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def decode(self, samples: Iterable[dict[str, Any]]) -> Iterator[DecodedSample]:
        """webdataset samples -> ``DecodedSample`` (a malformed sample raises ShardFormatError)."""
        epoch = self.epoch
        for index, sample in enumerate(samples):
            key = sample.get("__key__")
            members = {name: value for name, value in sample.items() if not name.startswith("__")}
            if not isinstance(key, str) or not all(isinstance(v, (bytes, bytearray, memoryview)) for v in members.values()):
                raise ShardFormatError(f"sample {key!r} is not raw webdataset members: put the decode stage before "
                                       f"any .decode() of the pipeline")
            yield self.decoder.decode(TarSample(index, key, members), "", epoch)

    def batches(self, samples: Iterable[DecodedSample]) -> Iterator[Any]:
        """Decoded samples -> collated one-bucket batches of ``batch_size``."""
        epoch = self.epoch
        buffers: dict[tuple[int, str], list[DecodedSample]] = defaultdict(list)
        for batch in full_batches(iter(samples), self.batch_size, buffers):
            yield self.collate(batch, epoch)
        if not self.drop_last:
            for group in sorted(buffers, key=lambda group: float(group[1])):
                if buffers[group]:
                    yield self.collate(buffers[group], epoch)
