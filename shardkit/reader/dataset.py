"""``ShardReader``: a shardkit build -> the batches a PixArt-Σ training step takes.

A torch ``IterableDataset`` that yields whole batches (use it with
``DataLoader(dataset, batch_size=None)``), made of the reader's stages: the shard store
(``store``), the epoch plan (``epoch``), decode / shuffle / batch (``stages``) and the PixArt
collate (``collate``). Every sample is in at most one batch of one rank per epoch, every rank
yields the same number of batches, and a reader opens only the shards that hold its samples,
stopping once it has them. Samples are mixed in a shuffle buffer and grouped per bucket: a reader
is given a whole number of batches per bucket, so it yields exactly its share whatever order
they arrive in.

Nothing is ever unpickled: a ``.npy`` member holding Python objects is refused and no other
member is decoded. Only the members a batch uses are read: from local files (and the download
cache) the image, the ``.txt`` and the caption fields not drawn are skipped unread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections import Counter, defaultdict
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import ShardkitError, ShardReadError
from .collate import CAPTION_PADDINGS, LATENT_MODES, LAYOUTS, PixArtCollate
from .epoch import ReaderPlan, ShardPiece, batches_per_rank, derive_seed, plan_reader, split_evenly
from .stages import DecodedSample, SampleDecoder, full_batches, shuffled
from .store import BuildInfo, ReaderStats, ShardStore, resolve_build

log = logging.getLogger(__name__)


class ShardReader(IterableDataset):
    """Batches of one aspect bucket each, from a shardkit build, ready for a PixArt-Σ training step.

    Use with ``DataLoader(dataset, batch_size=None, num_workers=N)``. Each batch is, by default
    (``layout="tuple"``), PixArt's layout:

    - ``batch[0]`` latent ``[B, C, h, w]``: ``mean + std * noise`` drawn from the stored posterior
      (``latent="sample"``) or its mean (``latent="mean"``); unscaled unless ``scale_factor``;
    - ``batch[1]`` caption features ``[B, 1, max_length, D]``, padded by repeating the last valid
      row as PixArt's loader pads (``caption_padding="longest"``: to the batch's longest caption);
    - ``batch[2]`` attention mask ``[B, 1, 1, max_length]`` (``mask_dtype``, int16 by default);
    - ``batch[3]`` ``{"img_hw": float32 [B, 2] original (height, width),
      "aspect_ratio": float32 [B] bucket ratio}``.

    ``layout="dict"`` gives ``{"latent", "caption_feature", "attention_mask", "data_info",
    "keys", "prompt", "caption_field", "bucket"}``.

    Args:
        source: a build folder (local path or URL prefix), its ``manifest.json`` (path or URL),
            or a list / brace pattern of shard URLs (scanned once to count samples).
        batch_size: samples per batch.
        latent: ``"sample"`` or ``"mean"``.
        scale_factor: multiply latents by this (PixArt's train.py scales them itself).
        dtype: float dtype of latents and features; None keeps the stored dtype (fp16 by default).
        mask_dtype: dtype of the attention mask.
        max_length: token length to pad to; default the build's T5 ``max_length``.
        caption_padding: ``"max_length"`` (PixArt's layout: every batch is ``max_length`` tokens
            long; PixArt's own models need it, their caption dropout swaps in a
            ``max_length``-row null embedding) or ``"longest"``: pad to the batch's longest
            caption (at most ``max_length``), for models that take any length with an
            attention mask (diffusers' ``PixArtTransformer2DModel``): smaller batches, less to
            copy and to attend over.
        caption_fields: one or two caption fields; default the build's first two.
        real_prompt_ratio: probability of the first caption field per sample (PixArt-Σ's
            ``real_prompt_ratio``); the second field is used otherwise, where the sample has it.
        layout: ``"tuple"`` or ``"dict"``.
        shuffle: shuffle the shard order per epoch and samples through a buffer.
        shuffle_buffer: samples held by the shuffle buffer (memory: that many decoded samples).
        seed: seeds every random choice; with ``set_epoch`` the stream is reproducible. Latent
            noise and caption choice depend on (seed, epoch, sample key) only.
        drop_last: drop each bucket's partial tail batch; default drops them when training on
            several ranks and keeps them in a single process.
        rank, world_size: this process's rank; default from torch.distributed when initialised,
            else the RANK and WORLD_SIZE environment variables, else a single process.
        resampled: draw shards at random with replacement forever (weighted by sample count);
            each rank then yields ``batches_per_epoch`` batches per epoch (None: endless).
        storage_options: fsspec options for remote URLs (endpoint, credentials, ...).
        cache_dir: download remote shards once into this folder (sha256-checked) and reuse them.
        retries, retry_backoff, timeout: transient failures (connection refused or reset,
            timeouts, HTTP 5xx and 429, a remote stream cut short) are retried ``retries`` times,
            the n-th after ``retry_backoff * 2**(n-1)`` seconds times a jitter in [0.5, 1);
            permanent ones (404, 403, malformed content) are not. A remote read that stalls
            ends after ``timeout`` seconds.
        on_error: ``"raise"`` stops on an unreadable shard with a ShardReadError; ``"skip"``
            logs a warning, counts it in ``stats`` and goes on (ranks stay equal: a rank that lost
            samples repeats some to keep its batch count).
        memory_map: read the arrays of local shards (and of ``cache_dir`` copies) through a
            read-only memory map of the file, which saves copying them out of the page cache
            before they are copied into a batch. A mapped file must not be cut short or
            rewritten in place while it is read (the OS would stop the process with SIGBUS);
            shardkit's own writers replace files by renaming. Pass False for shards on
            storage that rewrites files in place.
    """

    # train_scripts/train.py reads these to know that batch[0] and batch[1] are features.
    load_vae_feat = True
    load_t5_feat = True

    def __init__(self, source: str | os.PathLike | Sequence[str], batch_size: int, *, latent: str = "sample",
                 scale_factor: float | None = None, dtype: torch.dtype | None = None,
                 mask_dtype: torch.dtype = torch.int16, max_length: int | None = None,
                 caption_padding: str = "max_length", caption_fields: Sequence[str] | None = None,
                 real_prompt_ratio: float = 1.0, layout: str = "tuple", shuffle: bool = True, shuffle_buffer: int = 128, seed: int = 0,
                 drop_last: bool | None = None, rank: int | None = None, world_size: int | None = None,
                 resampled: bool = False, batches_per_epoch: int | None = None,
                 storage_options: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                 retries: int = 3, retry_backoff: float = 1.0, timeout: float | None = 60.0,
                 on_error: str = "raise", memory_map: bool = True):
        super().__init__()
        _require(isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be a positive integer, got {batch_size!r}")
        _require(latent in LATENT_MODES, f"latent must be one of {LATENT_MODES}, got {latent!r}")
        _require(layout in LAYOUTS, f"layout must be one of {LAYOUTS}, got {layout!r}")
        _require(caption_padding in CAPTION_PADDINGS,
                 f"caption_padding must be one of {CAPTION_PADDINGS}, got {caption_padding!r}")
        _require(0.0 <= real_prompt_ratio <= 1.0, f"real_prompt_ratio must be within [0, 1], got {real_prompt_ratio}")
        _require(shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        _require((rank is None) == (world_size is None), "pass both rank and world_size, or neither")
        if world_size is not None:
            _require(world_size >= 1 and 0 <= rank < world_size, f"rank must be within [0, world_size), got {rank} of {world_size}")
        _require(batches_per_epoch is None or batches_per_epoch >= 0, "batches_per_epoch must be >= 0")
        _require(batches_per_epoch is None or resampled, "batches_per_epoch applies to resampled=True only")
        self.store = ShardStore(storage_options=storage_options, timeout=timeout, retries=retries,
                                retry_backoff=retry_backoff, cache_dir=cache_dir, on_error=on_error)
        resolved = resolve_build(source, self.store)
        self.shards = resolved.shards
        self.info = (BuildInfo.from_manifest(resolved.manifest) if resolved.manifest is not None else
                     BuildInfo(None, None, (), None, None, None, None, complete=False))
        self.store.sample_format = self.info.sample_format
        self.max_length = max_length or self.info.max_length
        _require(self.max_length is not None and self.max_length >= 1,
                 "pass max_length (the T5 token length the trainer uses) when reading shards without their manifest")
        fields = tuple(caption_fields) if caption_fields else (self.info.caption_fields[:2] or ("prompt", "sharegpt4v"))
        _require(1 <= len(fields) <= 2, f"caption_fields takes one or two fields, got {list(fields)}")
        self.caption_fields = fields
        self.batch_size = batch_size
        self.real_prompt_ratio = real_prompt_ratio
        self.decoder = SampleDecoder(fields, real_prompt_ratio, seed, self.info.sample_format)
        self.collate = PixArtCollate(max_length=self.max_length, latent=latent, scale_factor=scale_factor, dtype=dtype,
                                     mask_dtype=mask_dtype, caption_padding=caption_padding, layout=layout, seed=seed)
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.seed = seed
        self.drop_last = drop_last
        self.resampled = resampled
        self.batches_per_epoch = batches_per_epoch
        self.memory_map = memory_map
        self.epoch = 0
        self._rank = rank
        self._world_size = world_size

    # -- public ------------------------------------------------------------------------------
    @property
    def stats(self) -> ReaderStats:
        return self.store.stats

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch (before iterating the DataLoader) for a new shuffle."""
        self.epoch = int(epoch)

    def distributed(self) -> tuple[int, int]:
        """(rank, world_size) this reader splits by."""
        if self._rank is not None:
            return self._rank, self._world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        try:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        except ValueError:
            raise ShardkitError("RANK and WORLD_SIZE must be integers; pass rank= and world_size= explicitly") from None
        _require(world >= 1 and 0 <= rank < world, f"RANK {rank} is not within WORLD_SIZE {world}")
        return rank, world

    def keep_partial(self, world_size: int) -> bool:
        return (not self.drop_last) if self.drop_last is not None else world_size == 1

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the total over its DataLoader workers)."""
        if self.resampled:
            if self.batches_per_epoch is None:
                raise TypeError("a resampled ShardReader without batches_per_epoch is endless and has no length")
            return self.batches_per_epoch
        _, world = self.distributed()
        return batches_per_rank(self.shards, self.batch_size, world, self.keep_partial(world))

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DataLoader workers may not see the process group: pin the parent's rank.
        state = self.__dict__.copy()
        state["_rank"], state["_world_size"] = self.distributed()
        return state

    def __iter__(self) -> Iterator[Any]:
        rank, world = self.distributed()
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch = self.epoch
        rng = random.Random(derive_seed(self.seed, epoch, rank, worker, "buffer"))
        if self.resampled:
            yield from self._iter_resampled(epoch, rank, worker, num_workers, rng)
            return
        plan = plan_reader(self.shards, batch_size=self.batch_size, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
                           rank=rank, world_size=world, worker=worker, num_workers=num_workers,
                           keep_partial=self.keep_partial(world))
        if not plan.batches and worker == 0 and rank == 0 and len(self) == 0:
            log.warning("the build has fewer batches of %d than ranks (%d): every rank yields nothing", self.batch_size, world)
        yield from self._iter_plan(plan, epoch, rank, world, rng)

    # -- reading -----------------------------------------------------------------------------
    def _piece_samples(self, pieces: Iterable[ShardPiece], epoch: int) -> Iterator[DecodedSample]:
        want = self.decoder.wanted(epoch)
        for piece in pieces:
            shard = piece.shard
            yield from self.store.samples(shard, piece.start, piece.stop, want,
                                          lambda raw, bucket=shard.bucket: self.decoder.decode(raw, bucket, epoch),
                                          self.memory_map)

    def _emit(self, samples: list[DecodedSample], epoch: int) -> Any:
        self.stats.batches += 1
        self.stats.samples += len(samples)
        return self.collate(samples, epoch)

    def _iter_plan(self, plan: ReaderPlan, epoch: int, rank: int, world: int, rng: random.Random) -> Iterator[Any]:
        buffers: dict[str, list[DecodedSample]] = defaultdict(list)
        emitted: Counter = Counter()
        last: list[DecodedSample] | None = None
        with contextlib.closing(self._piece_samples(plan.pieces, epoch)) as stream:
            for last in full_batches(shuffled(stream, self.shuffle_buffer, rng), self.batch_size, buffers):
                emitted[last[0].bucket] += 1
                yield self._emit(last, epoch)

        full = plan.full_batches(self.batch_size)
        partial = plan.partial_samples(self.batch_size)
        for bucket in sorted(set(full) | set(partial) | set(buffers), key=float):
            rest = buffers.get(bucket, [])
            owed = [self.batch_size] * (full.get(bucket, 0) - emitted[bucket]) + ([partial[bucket]] if bucket in partial else [])
            if world == 1:
                # One process: nothing to keep in step; the tail is yielded as it is, if kept.
                if rest and self.keep_partial(world):
                    yield self._emit(rest, epoch)
                continue
            if owed == ([len(rest)] if rest else []):
                if rest:
                    yield self._emit(rest, epoch)
                continue
            # Samples were lost with a skipped shard. Every rank must step the same number of
            # times, so the batches owed are made up from samples this reader already holds.
            for size in owed:
                if rest:
                    batch = [rest[i % len(rest)] for i in range(size)]
                    rest = []
                elif last is not None:
                    batch = last
                else:
                    raise ShardReadError(f"rank {rank} read no sample this epoch (every shard it was given failed: "
                                         f"{'; '.join(self.stats.failed_shards[-3:])}); fix or rebuild those shards")
                self.stats.filled_batches += 1
                yield self._emit(batch, epoch)

    def _iter_resampled(self, epoch: int, rank: int, worker: int, num_workers: int, rng: random.Random) -> Iterator[Any]:
        quota = None
        if self.batches_per_epoch is not None:
            _, quota = split_evenly(self.batches_per_epoch, num_workers, worker)
            if quota == 0:
                return
        draws = random.Random(derive_seed(self.seed, epoch, rank, worker, "resample"))
        weights = [shard.samples for shard in self.shards]

        def endless() -> Iterator[DecodedSample]:
            failures_in_a_row = 0
            while True:
                shard = draws.choices(self.shards, weights)[0]
                got_any = False
                for sample in self._piece_samples([ShardPiece(shard, 0, shard.samples)], epoch):
                    got_any = True
                    yield sample
                failures_in_a_row = 0 if got_any else failures_in_a_row + 1
                if failures_in_a_row > len(self.shards):
                    raise ShardReadError(f"{failures_in_a_row} shards in a row could not be read "
                                         f"({'; '.join(self.stats.failed_shards[-3:])}); fix the shards")

        done = 0
        with contextlib.closing(endless()) as stream:
            for batch in full_batches(shuffled(stream, self.shuffle_buffer, rng), self.batch_size, defaultdict(list)):
                yield self._emit(batch, epoch)
                done += 1
                if quota is not None and done >= quota:
                    return


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ShardkitError(message)
