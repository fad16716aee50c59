"""Sample stages, each usable alone: decode (tar sample -> ``DecodedSample``), shuffle (a buffer),
batch (one bucket per batch). numpy only; the collate turns a batch into tensors.

    decoder = SampleDecoder(("prompt", "sharegpt4v"), real_prompt_ratio=0.5, seed=0)
    samples = (decoder.decode(raw, bucket, epoch) for raw in store.samples(shard, want=decoder.wanted(epoch)))
    for batch in full_batches(shuffled(samples, 128, random.Random(0)), 32, defaultdict(list)):
        ...
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import ShardFormatError, ShardkitError
from ..format import (LATENT, METADATA, MICRO_CONDITIONING, SampleFormat, caption_member, check_metadata,
                      parse_metadata, read_npy)
from ..tario import TarSample
from .epoch import derive_seed


@dataclass
class DecodedSample:
    key: str
    bucket: str
    original_hw: tuple[int, int]
    moments: np.ndarray  # [2C, h, w]: the posterior mean and std, as stored
    caption_field: str  # "" for a dropped caption
    prompt: str  # "" for a dropped caption
    caption_feature: np.ndarray  # [L, D]: the valid tokens only (a pipeline build: its first member)
    source: int = 0  # which of the reader's builds it comes from
    # A pipeline build: the chosen field's members by name, plus SDXL's micro-conditioning.
    text: dict[str, np.ndarray] | None = None

    @property
    def group(self) -> tuple[int, str]:
        """What the samples of one batch share: the build and the bucket."""
        return self.source, self.bucket


def choose_caption_field(fields: Sequence[str], available: Iterable[str], real_prompt_ratio: float, draw: float) -> str:
    """PixArt-Σ's rule: the first field with probability ``real_prompt_ratio``, else the second
    where the sample has it; the first field otherwise."""
    if len(fields) > 1 and draw >= real_prompt_ratio and fields[1] in set(available):
        return fields[1]
    return fields[0]


def _uniform(seed: int) -> float:
    """A 64-bit hash's top 53 bits as a float in [0, 1): as uniform as Random(seed).random(), and
    10x cheaper than seeding a generator (draws are taken for the member filter and for decode)."""
    return (seed >> 11) * 2.0 ** -53


@dataclass
class SampleDecoder:
    """Tar samples -> ``DecodedSample``: metadata checked, the latent and the chosen caption
    field's T5 rows loaded (views of the payloads, no copy), their shapes checked against the
    metadata. The caption field is drawn per (seed, epoch, key).

    Caption dropout: with probability ``caption_dropout``, drawn per (seed, epoch, key), a
    sample's caption is the empty one: its features are ``empty_caption`` (the build's stored
    encoding of ``""``: ``[L, D]``, or a --pipeline build's members by name), its prompt and
    caption field ``""``."""

    caption_fields: tuple[str, ...]
    real_prompt_ratio: float = 1.0
    seed: int = 0
    sample_format: SampleFormat | None = None
    source: int = 0  # stamped on every sample it decodes
    caption_dropout: float = 0.0
    empty_caption: np.ndarray | dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ShardkitError(f"caption_dropout must be within [0, 1], got {self.caption_dropout}")
        pipeline = self.sample_format is not None and self.sample_format.pipeline is not None
        fits = isinstance(self.empty_caption, dict) if pipeline else \
            isinstance(self.empty_caption, np.ndarray) and self.empty_caption.ndim == 2
        if self.caption_dropout > 0 and not fits:
            raise ShardkitError("caption_dropout needs empty_caption, the encoding of the empty caption ([L, D] for "
                                "T5, the members by name for a --pipeline build)")

    def caption_draw(self, key: str, epoch: int) -> float:
        """The sample's draw for ``choose_caption_field``; with one field, or a ratio of 0 or 1,
        the draw cannot change the choice and 0.0 stands for it."""
        if len(self.caption_fields) < 2 or not 0.0 < self.real_prompt_ratio < 1.0:
            return 0.0
        return _uniform(derive_seed(self.seed, epoch, key, "caption"))

    def dropped(self, key: str, epoch: int) -> bool:
        """Whether the sample's caption is dropped this epoch."""
        return self.caption_dropout > 0 and _uniform(derive_seed(self.seed, epoch, key, "dropout")) < self.caption_dropout

    def field_members(self, field: str) -> list[str]:
        """The members holding caption field ``field``'s features (``t5_<field>.npy``, or a
        pipeline build's ``<field>.<member>.npy``), as the build declares them."""
        if self.sample_format is None:
            return [caption_member(field)]
        return [name for name, _ in self.sample_format.field_members(field)]

    def wanted(self, epoch: int) -> Callable[[str, str], bool]:
        """The members ``decode`` may use: the .json, the latent, the first caption field's T5
        rows, and the second field's only where the sample's draw may choose it; no caption rows
        for a dropped caption. The image, the .txt and the other caption fields are skipped unread."""
        first = set(self.field_members(self.caption_fields[0]))
        second = set(self.field_members(self.caption_fields[1])) if len(self.caption_fields) > 1 else set()
        ratio = self.real_prompt_ratio

        def want(key: str, suffix: str) -> bool:
            if suffix == METADATA or suffix == LATENT:
                return True
            if (suffix not in first and suffix not in second) or self.dropped(key, epoch):
                return False
            return suffix in first or self.caption_draw(key, epoch) >= ratio

        return want

    def decode(self, raw: TarSample, bucket: str, epoch: int) -> DecodedSample:
        """``bucket``: the shard's bucket ("" when unknown)."""
        meta = check_metadata(parse_metadata(raw.members.get(METADATA), raw.key), raw.key, self.sample_format)
        if bucket and meta["bucket"] != bucket:
            raise ShardFormatError(f"sample {raw.key!r} is in bucket {meta['bucket']}, its shard holds bucket {bucket}")
        if LATENT not in raw.members:
            raise ShardFormatError(f"sample {raw.key!r} has no latent.npy member")
        moments = read_npy(raw.members[LATENT], f"{raw.key}.{LATENT}")
        posterior = self.sample_format is None or self.sample_format.spec(LATENT).shape[0] == "2*C"
        if moments.ndim != 3 or (posterior and moments.shape[0] % 2) or list(moments.shape) != meta.get("latent_shape"):
            raise ShardFormatError(f"sample {raw.key!r}: latent shape {list(moments.shape)}, "
                                   f"its .json says {meta.get('latent_shape')} ([2C, h, w])")
        height, width = meta["original_hw"]
        if self.dropped(raw.key, epoch):
            feature, text = self.empty_caption, None
            if isinstance(feature, dict):
                text = {**feature, **self._micro_conditioning(meta)}
                feature = next(iter(feature.values()))
            return DecodedSample(key=raw.key, bucket=meta["bucket"], original_hw=(height, width), moments=moments,
                                 caption_field="", prompt="", caption_feature=feature, source=self.source, text=text)
        available = [name for name in meta["t5_fields"]
                     if all(member in raw.members for member in self.field_members(name))]
        chosen = choose_caption_field(self.caption_fields, available, self.real_prompt_ratio,
                                      self.caption_draw(raw.key, epoch))
        if chosen not in available:
            raise ShardFormatError(f"sample {raw.key!r} has no T5 features for caption field {chosen!r}")
        arrays = {member: read_npy(raw.members[member], f"{raw.key}.{member}") for member in self.field_members(chosen)}
        feature = next(iter(arrays.values()))
        length = meta["t5_lengths"][chosen]
        if feature.ndim != 2 or feature.shape[0] != length or length < 1:
            raise ShardFormatError(f"sample {raw.key!r}: T5 features of shape {list(feature.shape)}, "
                                   f"its .json says {length} tokens")
        text = None
        if self.sample_format is not None and self.sample_format.pipeline is not None:
            text = self._pipeline_text(raw.key, meta, chosen, arrays)
        return DecodedSample(key=raw.key, bucket=meta["bucket"], original_hw=(height, width), moments=moments,
                             caption_field=chosen, prompt=meta["captions"][chosen], caption_feature=feature,
                             source=self.source, text=text)

    def _pipeline_text(self, key: str, meta: dict, chosen: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A pipeline build's members by their family's names, each checked against its shape
        rule, plus the micro-conditioning of the metadata record."""
        fmt = self.sample_format
        bucket_hw = meta.get("bucket_hw") or (0, 0)
        text = {}
        for name, spec in fmt.field_members(chosen):
            array = arrays[name]
            bounds = fmt.shape_rule(spec, bucket_hw)
            if array.ndim != len(bounds) or not all(low <= d <= high for d, (low, high) in zip(array.shape, bounds)):
                raise ShardFormatError(f"sample {key!r}: {name} is {list(array.shape)}, the build declares "
                                       f"{list(spec.shape)}")
            text[name[len(chosen) + 1:-len(".npy")]] = array
        text.update(self._micro_conditioning(meta))
        return text

    def _micro_conditioning(self, meta: dict) -> dict[str, np.ndarray]:
        """SDXL's sizes and crop of the sample, from its metadata record (the caption does not change them)."""
        if self.sample_format is None or not self.sample_format.micro_conditioning:
            return {}
        return {name: np.asarray(meta["micro_conditioning"][name], dtype=np.int32) for name in MICRO_CONDITIONING}


def shuffled(items: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer: once ``buffer_size`` items are held, each new item replaces a random one."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def full_batches(samples: Iterator[DecodedSample], batch_size: int,
                 buffers: dict[tuple[int, str], list[DecodedSample]]) -> Iterator[list[DecodedSample]]:
    """One-bucket batches as soon as a bucket (of one build) has ``batch_size`` samples; the rest
    stay in ``buffers``, keyed by ``sample.group``."""
    for sample in samples:
        buffer = buffers[sample.group]
        buffer.append(sample)
        if len(buffer) == batch_size:
            yield list(buffer)
            buffer.clear()
