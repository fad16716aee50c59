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
import dataclasses
import hashlib
import json
import logging
import math
import os
import posixpath
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import ShardkitError, ShardReadError
from .collate import CAPTION_PADDINGS, LATENT_MODES, LAYOUTS, DiffusersCollate, PixArtCollate
from .epoch import ReaderPlan, ShardInfo, ShardPiece, derive_seed, epoch_batch_count, plan_builds, split_evenly
from .stages import DecodedSample, SampleDecoder, full_batches, shuffled
from .store import BuildInfo, ReaderStats, ShardStore, empty_caption, resolve_build

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

    ``layout="diffusers"`` (the default for ``shardkit build --pipeline`` builds) gives what the
    build's diffusers pipeline computes (``families.collate.diffusers_batch``): ``latents``
    ``[B, C, h, w]`` (``latent``: sampled or the mean; ``normalize``: ``(x - shift_factor) *
    scaling_factor``), the pipeline's ``encode_prompt`` outputs under their names
    (``prompt_embeds`` at its full padded length, ``prompt_attention_mask``,
    ``pooled_prompt_embeds``, ``text_ids`` where it returns them), SDXL's ``original_size``,
    ``crop_coords_top_left`` and ``target_size`` ``[B, 2]``, ``keys`` and ``captions``. A
    ``--t5`` build reads in it as ``PixArtSigmaPipeline``'s outputs.

    Mid-epoch resume: ``state_dict()`` / ``load_state_dict()`` (small, JSON-serialisable). After
    a restart with the same world size and DataLoader workers, the reader yields exactly the
    batches the uninterrupted run would have yielded next: in one process through its own state,
    with workers through ``torchdata.stateful_dataloader.StatefulDataLoader`` (which keeps each
    worker's state). A state taken in one process per rank (``num_workers=0``) may also be loaded
    under another world size or worker count: the batches of the epoch that every old rank had
    consumed (ranks step together) are left out and the rest is split again, equally, over the
    new ranks. A state saved for another build (or a build changed since) is refused.

    Args:
        source: a build folder (local path or URL prefix), its ``manifest.json`` (path or URL),
            or a list / brace pattern of shard URLs (scanned once to count samples); with
            ``weights``, a list of such builds to mix.
        weights: mix the builds of ``source`` in these proportions: every batch comes from one
            build and one bucket, build ``b`` gives ``weights[b] / sum(weights)`` of each
            epoch's batches, and the epoch ends once the build needing the most passes has made
            one (``reader.epoch.mixed_epoch_batches``). The builds must provide the same
            features (latent channels, text-feature width and length, stored dtype).
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
        caption_dropout: probability, per sample and epoch, of swapping its caption for the
            build's stored encoding of the empty caption (prompt ``""``); needs a build that
            stores it (``shardkit build`` writes ``OUTPUT/empty_caption/t5.npy``; a ``--pipeline``
            build one file per member of a caption, so ``prompt_embeds``, the mask and the pooled
            embeddings all become the pipeline's encoding of ``""``).
        layout: ``"tuple"``, ``"dict"`` or ``"diffusers"``; default ``"diffusers"`` for a
            ``--pipeline`` build, ``"tuple"`` otherwise.
        normalize: with ``layout="diffusers"``, latents as the transformer takes them.
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

    def __init__(self, source: str | os.PathLike | Sequence[str], batch_size: int, *,
                 weights: Sequence[float] | None = None, latent: str = "sample",
                 scale_factor: float | None = None, dtype: torch.dtype | None = None,
                 mask_dtype: torch.dtype = torch.int16, max_length: int | None = None,
                 caption_padding: str = "max_length", caption_fields: Sequence[str] | None = None,
                 real_prompt_ratio: float = 1.0, layout: str | None = None, normalize: bool = False,
                 shuffle: bool = True, shuffle_buffer: int = 128, seed: int = 0,
                 caption_dropout: float = 0.0,
                 drop_last: bool | None = None, rank: int | None = None, world_size: int | None = None,
                 resampled: bool = False, batches_per_epoch: int | None = None,
                 storage_options: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                 retries: int = 3, retry_backoff: float = 1.0, timeout: float | None = 60.0,
                 on_error: str = "raise", memory_map: bool = True):
        super().__init__()
        _require(isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be a positive integer, got {batch_size!r}")
        _require(latent in LATENT_MODES, f"latent must be one of {LATENT_MODES}, got {latent!r}")
        _require(layout is None or layout in LAYOUTS, f"layout must be one of {LAYOUTS}, got {layout!r}")
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
        sources = _mixed_sources(source, weights)
        self.weights = [float(w) for w in weights] if weights is not None else None
        resolved = [resolve_build(one, self.store) for one in sources]
        self.builds = [[dataclasses.replace(shard, source=index) for shard in build.shards]
                       for index, build in enumerate(resolved)]
        self.shards = [shard for build in self.builds for shard in build]
        self.infos = [BuildInfo.from_manifest(build.manifest) if build.manifest is not None else
                      BuildInfo(None, None, (), None, None, None, None, complete=False) for build in resolved]
        _require_same_features(self.infos, [build.location for build in resolved])
        self.info = self.infos[0]
        self.store.sample_format = self.info.sample_format
        self._fingerprint = builds_fingerprint(self.builds, self.weights)
        self.max_length = max_length or self.info.max_length
        _require(self.max_length is not None and self.max_length >= 1,
                 "pass max_length (the T5 token length the trainer uses) when reading shards without their manifest")
        fields = tuple(caption_fields) if caption_fields else (self.info.caption_fields[:2] or ("prompt", "sharegpt4v"))
        _require(1 <= len(fields) <= 2, f"caption_fields takes one or two fields, got {list(fields)}")
        self.caption_fields = fields
        self.batch_size = batch_size
        self.real_prompt_ratio = real_prompt_ratio
        self.decoders = [SampleDecoder(fields, real_prompt_ratio, seed, info.sample_format, source,
                                       caption_dropout=caption_dropout,
                                       empty_caption=empty_caption(build, self.store) if 0 < caption_dropout <= 1 else None)
                         for source, (info, build) in enumerate(zip(self.infos, resolved))]
        self.decoder = self.decoders[0]
        self.layout = layout or ("diffusers" if self.info.pipeline is not None else "tuple")
        if self.layout == "diffusers":
            self.collate = diffusers_collate(self.info, latent=latent, normalize=normalize, dtype=dtype, seed=seed,
                                             max_length=max_length)
        else:
            _require(self.info.pipeline is None,
                     f"this is a {self.info.pipeline and self.info.pipeline['pipeline_class']} build: read it with "
                     f"layout='diffusers' (PixArt's tuple layout is for builds of --vae/--t5)")
            _require(not normalize, "normalize applies to layout='diffusers'; PixArt's layout takes scale_factor")
            self.collate = PixArtCollate(max_length=self.max_length, latent=latent, scale_factor=scale_factor,
                                         dtype=dtype, mask_dtype=mask_dtype, caption_padding=caption_padding,
                                         layout=self.layout, seed=seed)
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
        self._progress: dict[str, int] | None = None  # where the current iteration stands
        self._resume: dict[str, Any] | None = None  # a loaded state, used by the next iteration

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
        return epoch_batch_count(self.builds, self.weights, self.batch_size, self.keep_partial(world)) // world

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DataLoader workers may not see the process group: pin the parent's rank.
        state = self.__dict__.copy()
        state["_rank"], state["_world_size"] = self.distributed()
        return state

    def state_dict(self) -> dict[str, Any]:
        """Where this reader stands: the epoch and the batches it has yielded in it (per
        DataLoader worker when called there, as ``StatefulDataLoader`` does). JSON-serialisable."""
        if self._progress is None and self._resume is not None:
            return dict(self._resume)  # loaded and not iterated yet: still the point to resume from
        rank, world = self.distributed()
        progress = self._progress or {"epoch": self.epoch, "batches": 0, "rank": rank, "world_size": world,
                                      "worker": 0, "num_workers": 1}
        return {"format": READER_STATE_FORMAT, "version": READER_STATE_VERSION, "builds": self._fingerprint,
                "seed": self.seed, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "resampled": self.resampled, **progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``: the next iteration continues its epoch where it stood."""
        self._resume = _checked_state(state, self)
        self.epoch = self._resume["epoch"]
        self._progress = None

    def __iter__(self) -> Iterator[Any]:
        rank, world = self.distributed()
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch = self.epoch
        skip, after = self._resume_point(epoch, rank, world, worker, num_workers)
        self._progress = {"epoch": epoch, "batches": skip, "rank": rank, "world_size": world,
                          "worker": worker, "num_workers": num_workers}
        rng = random.Random(derive_seed(self.seed, epoch, rank, worker, "buffer"))
        replay = _Replay(active=skip > 0)
        if self.resampled:
            batches = self._resampled_batches(epoch, rank, worker, num_workers, rng, replay, after)
        else:
            plan = plan_builds(self.builds, self.weights, batch_size=self.batch_size, epoch=epoch, seed=self.seed,
                               shuffle=self.shuffle, rank=rank, world_size=world, worker=worker,
                               num_workers=num_workers, keep_partial=self.keep_partial(world),
                               consumed=self._consumed(after, epoch) if after else None)
            if not plan.batches and worker == 0 and rank == 0 and len(self) == 0:
                log.warning("the build has fewer batches of %d than ranks (%d): every rank yields nothing",
                            self.batch_size, world)
            batches = self._plan_batches(plan, epoch, rank, world, rng, replay)
        with contextlib.closing(batches):
            for index, batch in enumerate(batches):
                if index < skip:
                    # Replaying up to the resume point: nothing was read for these batches.
                    replay.active = index < skip - 1
                    continue
                self._progress["batches"] = index + 1
                yield self._emit(batch, epoch)

    def _resume_point(self, epoch: int, rank: int, world: int, worker: int,
                      num_workers: int) -> tuple[int, tuple[int, int] | None]:
        """(batches to pass over, (old world size, batches each old rank consumed) or None)."""
        state, self._resume = self._resume, None
        if state is None or state["epoch"] != epoch:
            return 0, None
        if (state["world_size"], state["num_workers"]) == (world, num_workers):
            if (state["rank"], state["worker"]) != (rank, worker):
                raise ShardkitError(f"the reader state was saved by rank {state['rank']} worker {state['worker']}, "
                                    f"and is loaded by rank {rank} worker {worker}; load each rank's own state")
            return state["batches"], None
        if state["num_workers"] != 1:
            raise ShardkitError(f"the reader state is one of {state['num_workers']} DataLoader workers' states of a "
                                f"world of {state['world_size']}; resume with the same world size and workers "
                                f"(StatefulDataLoader), or save the rank's state with num_workers=0 to resume "
                                f"under another world size")
        return 0, (state["world_size"], state["batches"])

    def _consumed(self, after: tuple[int, int], epoch: int) -> frozenset[tuple[str, int]]:
        """The samples every rank of the old layout had trained on: each old rank's first
        ``batches`` batches, replayed without reading a byte."""
        old_world, batches = after
        consumed = set()
        for rank in range(old_world):
            plan = plan_builds(self.builds, self.weights, batch_size=self.batch_size, epoch=epoch, seed=self.seed,
                               shuffle=self.shuffle, rank=rank, world_size=old_world, worker=0, num_workers=1,
                               keep_partial=self.keep_partial(old_world))
            rng = random.Random(derive_seed(self.seed, epoch, rank, 0, "buffer"))
            with contextlib.closing(self._plan_batches(plan, epoch, rank, old_world, rng, _Replay(True))) as replayed:
                for _, batch in zip(range(batches), replayed):
                    consumed.update((item.shard.url, item.index) for item in batch)
        return frozenset(consumed)

    # -- reading -----------------------------------------------------------------------------
    def _piece_samples(self, pieces: Iterable[ShardPiece], epoch: int, replay: "_Replay") -> Iterator[Any]:
        for piece in pieces:
            shard, start = piece.shard, piece.start
            while replay.active and start < piece.stop:
                yield _Unread(shard, start)
                start += 1
            if start < piece.stop:
                yield from self._read(shard, start, piece.stop, epoch)

    def _read(self, shard: ShardInfo, start: int, stop: int, epoch: int,
              keep: Callable[[int], bool] | None = None) -> Iterator[Any]:
        decoder = self.decoders[shard.source]

        def decode(raw):
            if keep is not None and not keep(raw.index):
                return raw.index, None
            sample = decoder.decode(raw, shard.bucket, epoch)
            return (raw.index, sample) if keep is not None else sample

        return self.store.samples(shard, start, stop, decoder.wanted(epoch), decode, self.memory_map,
                                  self.infos[shard.source].sample_format)

    def _materialize(self, batch: list[Any], epoch: int) -> list[DecodedSample]:
        """A batch with the samples passed over while replaying read now (after a resume)."""
        unread: dict[tuple[str, int], _Unread] = {(item.shard.url, item.index): item for item in batch
                                                  if isinstance(item, _Unread)}
        if not unread:
            return batch
        read: dict[tuple[str, int], DecodedSample] = {}
        by_shard: dict[str, list[_Unread]] = defaultdict(list)
        for item in unread.values():
            by_shard[item.shard.url].append(item)
        for items in by_shard.values():
            shard, wanted = items[0].shard, {item.index for item in items}
            for index, sample in self._read(shard, min(wanted), max(wanted) + 1, epoch, keep=wanted.__contains__):
                if sample is not None:
                    read[shard.url, index] = sample
        missing = [key for key in unread if key not in read]
        if missing:
            raise ShardReadError(f"cannot resume: sample {missing[0][1]} of {missing[0][0]} could not be read again "
                                 f"({'; '.join(self.stats.failed_shards[-3:]) or 'the shard ended early'})")
        return [read[item.shard.url, item.index] if isinstance(item, _Unread) else item for item in batch]

    def _emit(self, samples: list[Any], epoch: int) -> Any:
        samples = self._materialize(samples, epoch)
        self.stats.batches += 1
        self.stats.samples += len(samples)
        return self.collate(samples, epoch)

    def _plan_batches(self, plan: ReaderPlan, epoch: int, rank: int, world: int, rng: random.Random,
                      replay: "_Replay") -> Iterator[list[Any]]:
        buffers: dict[tuple[int, str], list[Any]] = defaultdict(list)
        emitted: Counter = Counter()
        last: list[Any] | None = None
        with contextlib.closing(self._piece_samples(plan.pieces, epoch, replay)) as stream:
            for last in full_batches(shuffled(stream, self.shuffle_buffer, rng), self.batch_size, buffers):
                emitted[last[0].group] += 1
                yield last

        full = plan.full_batches(self.batch_size)
        partial = plan.partial_samples(self.batch_size)
        for group in sorted(set(full) | set(partial) | set(buffers), key=lambda g: (g[0], float(g[1]))):
            rest = buffers.get(group, [])
            owed = [self.batch_size] * (full.get(group, 0) - emitted[group]) + ([partial[group]] if group in partial else [])
            if world == 1:
                # One process: nothing to keep in step; the tail is yielded as it is, if kept.
                if rest and self.keep_partial(world):
                    yield rest
                continue
            if owed == ([len(rest)] if rest else []):
                if rest:
                    yield rest
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
                yield batch

    def _resampled_batches(self, epoch: int, rank: int, worker: int, num_workers: int, rng: random.Random,
                           replay: "_Replay", after: tuple[int, int] | None) -> Iterator[list[Any]]:
        quota = None
        if self.batches_per_epoch is not None:
            # Under another layout, each rank draws what every old rank had left of its epoch.
            per_rank = self.batches_per_epoch - (after[1] if after else 0)
            _, quota = split_evenly(max(per_rank, 0), num_workers, worker)
            if quota == 0:
                return
        draws = random.Random(derive_seed(self.seed, epoch, rank, worker, "resample", *(after or ())))
        build_weights = self.weights or [1.0]
        shard_weights = [[shard.samples for shard in build] for build in self.builds]

        def endless() -> Iterator[Any]:
            failures_in_a_row = 0
            while True:
                source = draws.choices(range(len(self.builds)), build_weights)[0] if len(self.builds) > 1 else 0
                shard = draws.choices(self.builds[source], shard_weights[source])[0]
                got_any = False
                for sample in self._piece_samples([ShardPiece(shard, 0, shard.samples)], epoch, replay):
                    got_any = True
                    yield sample
                failures_in_a_row = 0 if got_any else failures_in_a_row + 1
                if failures_in_a_row > len(self.shards):
                    raise ShardReadError(f"{failures_in_a_row} shards in a row could not be read "
                                         f"({'; '.join(self.stats.failed_shards[-3:])}); fix the shards")

        done = 0
        with contextlib.closing(endless()) as stream:
            for batch in full_batches(shuffled(stream, self.shuffle_buffer, rng), self.batch_size, defaultdict(list)):
                yield batch
                done += 1
                if quota is not None and done >= quota:
                    return


READER_STATE_FORMAT = "shardkit-reader-state"
READER_STATE_VERSION = 1
_STATE_INTS = ("epoch", "batches", "rank", "world_size", "worker", "num_workers", "seed", "batch_size")


@dataclass(frozen=True)
class _Unread:
    """A sample passed over while replaying up to a resume point: read only if a batch still takes it."""

    shard: ShardInfo
    index: int

    @property
    def group(self) -> tuple[int, str]:
        return self.shard.source, self.shard.bucket


@dataclass
class _Replay:
    """Whether the sample stream passes samples over (up to a resume point) or reads them."""

    active: bool


def builds_fingerprint(builds: Sequence[Sequence[ShardInfo]], weights: Sequence[float] | None) -> str:
    """What a reader state is valid for: every shard's name, checksum, count and bucket, and the weights."""
    digest = hashlib.sha256(json.dumps(weights).encode())
    for build in builds:
        for shard in build:
            digest.update(json.dumps([posixpath.basename(shard.url), shard.sha256, shard.samples, shard.bucket]).encode())
        digest.update(b"\x1e")
    return digest.hexdigest()


def _checked_state(state: Any, reader: ShardReader) -> dict[str, Any]:
    if not isinstance(state, dict) or state.get("format") != READER_STATE_FORMAT:
        raise ShardkitError("this is not a shardkit reader state (ShardReader.state_dict())")
    if state.get("version") != READER_STATE_VERSION:
        raise ShardkitError(f"reader state version {state.get('version')!r} is not supported by this shardkit")
    for name in _STATE_INTS:
        if type(state.get(name)) is not int or state[name] < 0:
            raise ShardkitError(f"the reader state's {name!r} is not a non-negative integer")
    if not (0 <= state["rank"] < state["world_size"] and 0 <= state["worker"] < state["num_workers"]):
        raise ShardkitError("the reader state's rank or worker is outside its world size or worker count")
    if state.get("builds") != reader._fingerprint:
        raise ShardkitError("the reader state was saved for another build, or the build has changed since "
                            "(shards, checksums or mixing weights differ); start the epoch afresh")
    for name in ("seed", "batch_size", "shuffle", "resampled"):
        if state.get(name) != getattr(reader, name):
            raise ShardkitError(f"the reader state was saved with {name}={state.get(name)!r}, this reader has "
                                f"{name}={getattr(reader, name)!r}; pass the same value to resume")
    return dict(state)


def _mixed_sources(source: Any, weights: Sequence[float] | None) -> list[Any]:
    if weights is None:
        return [source]
    if isinstance(source, (str, os.PathLike)) or not isinstance(source, Sequence):
        raise ShardkitError("weights need a list of builds as source, one weight per build")
    if len(weights) != len(source) or not source:
        raise ShardkitError(f"{len(source)} builds and {len(weights)} weights: pass one weight per build")
    if any(not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ShardkitError(f"weights must be non-negative numbers, not all zero; got {list(weights)}")
    return list(source)


def _require_same_features(infos: Sequence[BuildInfo], locations: Sequence[str]) -> None:
    """Mixed builds must give batches of one shape and dtype."""
    first = infos[0]
    for info, location in zip(infos[1:], locations[1:]):
        differ = [f"{name} {getattr(first, name)} vs {getattr(info, name)}"
                  for name in ("family", "latent_channels", "caption_channels", "max_length", "store_dtype")
                  if getattr(first, name) != getattr(info, name)]
        if differ:
            raise ShardkitError(f"{location} cannot be mixed with {locations[0]}: their features differ "
                                f"({', '.join(differ)})")


def diffusers_collate(info: BuildInfo, *, latent: str, normalize: bool, dtype: torch.dtype | None, seed: int,
                      max_length: int | None) -> DiffusersCollate:
    """The diffusers layout of a build: a --pipeline build's family, or, for a build of PixArt-Σ's
    encoder pair, PixArtSigmaPipeline's outputs from its T5 rows and SDXL-VAE posterior."""
    from ..families import LatentSpec, family_by_name

    _require(info.sample_format is not None, "layout='diffusers' needs the build's manifest (pass the build folder "
                                             "or its manifest.json, not a list of shards)")
    if info.pipeline is not None:
        return DiffusersCollate(family_by_name(info.pipeline["family"]), LatentSpec(**info.pipeline["latents"]),
                                latent=latent, normalize=normalize, dtype=dtype, seed=seed)
    _require(info.scaling_factor is not None, "this build's manifest records no VAE scaling_factor; read it with "
                                              "layout='tuple'")
    params = info.sample_format.params
    spec = LatentSpec(vae_class="AutoencoderKL", stored="mean_std", latent_channels=int(params["C"]),
                      downsample=int(params["f"]), scaling_factor=float(info.scaling_factor), shift_factor=None)
    return DiffusersCollate(family_by_name("pixart-sigma"), spec, max_length=max_length or info.max_length,
                            latent=latent, normalize=normalize, dtype=dtype, seed=seed)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ShardkitError(message)
