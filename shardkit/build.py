"""The pipeline: plan once -> this worker's shards -> decode workers -> per-shard batches -> VAE + T5 -> shards.

The plan (planfile.py) is computed once and written into OUTPUT before any encoding; every
worker then executes whole shards of it: a lone process all of them, rank r of a torchrun or
Slurm launch of N the shards at plan positions p with ``p % N == r``, a Ray actor those its
driver hands it (ray_engine.py). A shard's bytes depend only on its plan entry, so any worker
writes the same shard, and a build resumes with any number of workers.

Data flows one way. Decoding runs in worker threads a bounded window ahead of the
encoders; shard writing and hashing run on a writer thread, so the encoders wait on neither.
On a CPU, two batches are encoded at once (encoder streams); the writer takes their results in
batch order, so the shards do not depend on which finished first.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import errno
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .buckets import BucketTable
from .config import BuildConfig
from .distributed import RankGroup, RankInfo, finish_ranks, joined_ranks, select_cuda_device
from .encoders import (EncoderStreams, Encoders, check_encoders_match, load_encoders, non_finite_features,
                       resolve_encoder_streams)
from .errors import ShardFormatError, ShardkitError
from .format import (EMPTY_CAPTION_FOLDER, NPY_HEADER_BYTES, EmptyCaption, SampleFormat, declare_from_config,
                     json_bytes, load_empty_caption, npy_bytes)
from .images import DecodeJob, DecodeResult, SourceUnavailable, run_decode_job
from .index import INDEX_FILES
from .ledger import DONE_DIR, Ledger, record_empty, record_shard
from .lookahead import bounded_map
from .manifest import MANIFEST_NAME, Manifest, ShardEntry, read_manifest_at
from .outputlock import LOCK_FILE, lock_worker, planning
from .plan import PlannedRecord, Planner, ReadLimits, ShardPlan, Skip, check_caption_fields
from .planfile import PLAN_NAME, Batching, BuildPlan, describe_source, gather_shards, make_plan, read_plan
from .shards import Sample, ShardWriter, WrittenShard, remove_partial_shards
from .sources import iter_records, resolve_source
from .storage import RemotePath, Storage, is_url, storage_options_for

log = logging.getLogger(__name__)

# How many shard-writing steps may queue behind the encoders before they wait.
_WRITER_BACKLOG = 4
# Image lookups (size, header) in flight for an object-storage source: enough to hide ~50 ms round
# trips at thousands of records per second, few enough for any endpoint's connection pool.
_REMOTE_LOOKUP_THREADS = 32
# Captions are encoded a window of records ahead rather than per VAE batch: a VAE batch mixes short
# prompts with long sharegpt4v captions, and sorting this many T5 batches' worth of captions by
# length before cutting them into T5 batches fills the batches and keeps their padding small.
_CAPTION_WINDOW_T5_BATCHES = 4
# What a build writes at the top of OUTPUT (plan, manifest, failures, their temp files; rank parts
# of earlier versions), besides shards/ and the done records.
_BUILD_FILE = re.compile(r"^\.?(plan\.json|manifest(\.rank\d{3,})?\.json|failures(\.rank\d{3,})?\.jsonl)(\.[\w-]+)?(\.tmp)?$")


@dataclass
class BuildSummary:
    output: Path | str  # a local folder, or the URL of one in object storage
    records_read: int
    written: int
    skipped_by_reason: dict[str, int]
    per_bucket: dict[str, dict]
    bytes: int
    shards: int
    shards_reused: int  # of ``shards``, those kept from an earlier run of a resumed build
    elapsed_s: float
    rank: int = 0
    world_size: int = 1
    complete: bool = True  # False when other workers still have shards of the plan to write
    shards_written: int = 0  # by this worker
    written_this_run: int = 0  # samples, by this worker
    kept_samples: int = 0  # of ``written``, those in shards kept from an earlier run
    # Launches with a rendezvous: the complete manifest on rank 0, True on the others once rank 0
    # wrote it; None otherwise.
    merged: Manifest | bool | None = None

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    @classmethod
    def of(cls, output, manifest: Manifest, **fields) -> "BuildSummary":
        data = manifest.as_json()
        return cls(output=output, records_read=data["records"]["read"], written=data["records"]["written"],
                   skipped_by_reason=data["skipped_by_reason"], per_bucket=data["totals"]["per_bucket"],
                   bytes=data["totals"]["bytes"], shards=data["totals"]["shards"],
                   complete=manifest.status == "complete", **fields)


@dataclass
class _OpenShard:
    """The shard the main loop is filling: its plan, its writer once a sample exists, pending work."""

    plan: ShardPlan
    writer: ShardWriter | None = None
    batch: list[tuple[PlannedRecord, DecodeResult]] = field(default_factory=list)
    skips: list[dict] = field(default_factory=list)
    # Caption windows submitted and still ahead of the batches: window index -> future features.
    caption_windows: dict[int, futures.Future] = field(default_factory=dict)
    positions: dict[str, int] = field(init=False)  # record key -> index in plan.records

    def __post_init__(self) -> None:
        self.positions = {planned.key: i for i, planned in enumerate(self.plan.records)}


@dataclass
class _PendingBatch:
    """One VAE batch on its way to the writer thread; its encodings may still be running."""

    planned: list[PlannedRecord]
    images: list  # TransformedImage per planned record
    latents: futures.Future  # np.ndarray [B, 2C, h, w]
    captions: list[futures.Future]  # the caption windows that hold these records' features
    skips: list[dict]  # the shard's skips: records whose features turn out not to be finite join them


DecodedRecord = tuple[tuple[ShardPlan, PlannedRecord], DecodeResult]


def decode_jobs(shards: Iterable[ShardPlan], config: BuildConfig,
                lanczos: bool) -> Iterator[tuple[tuple[ShardPlan, PlannedRecord], DecodeJob]]:
    """Every record of the shards, in shard order, as a decode job tagged with its shard and plan."""
    limits = ReadLimits.of(config)
    for plan in shards:
        for planned in plan.records:
            record = planned.record
            job = DecodeJob(path=record.path if record.embedded else record.location, bucket=plan.bucket,
                            resize_mode=config.resize_mode, max_pixels=limits.max_pixels,
                            expected_hw=planned.expected_hw, lanczos=lanczos, max_bytes=limits.max_bytes,
                            root=limits.root_of(record), data=record.image_bytes)
            record.image_bytes = None  # the job holds them now: a shard's records need not keep every image
            yield (plan, planned), job


class ShardExecutor:
    """Decoded records of whole shards -> encoder batches -> committed shards + done records.

    Batches never span shards, and each shard is cut by the plan's ``batching`` alone, so a
    shard's bytes do not depend on which worker writes it or on what else that worker writes.
    The same executor runs in a lone process, in each rank, and in each Ray actor.
    """

    def __init__(self, config: BuildConfig, encoders: Encoders, storage: Storage, staging: Path, batching: Batching):
        self.config = config
        self.encoders = encoders
        self.storage = storage
        self.staging = staging  # where tars are written before their commit (OUTPUT itself when local)
        self.batching = batching
        self._write_failure: BaseException | None = None
        self._writers: list[ShardWriter] = []

    def execute(self, decoded: Iterable[DecodedRecord], progress: Callable[[int], None],
                on_shard: Callable[[], None] | None = None) -> int:
        """Write every shard whose records ``decoded`` brings (in shard order); returns how many.

        ``on_shard`` runs after each shard is committed and recorded (the manifest role's update).
        """
        self.on_shard = on_shard
        self._write_failure = None
        self.shards_written = 0
        self.samples_written = 0
        writer = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardkit-writer")
        self.encoder_streams = EncoderStreams(resolve_encoder_streams(self.config.encoder_streams, self.encoders.device))
        backlog: deque = deque()
        open_shard: _OpenShard | None = None
        try:
            self.encoder_streams.open()
            for (plan, planned), result in decoded:
                if open_shard is None or open_shard.plan is not plan:
                    if open_shard is not None:
                        self._close(open_shard, writer, backlog, progress)
                    open_shard = _OpenShard(plan)
                if result.unavailable:
                    raise SourceUnavailable(result.unavailable)
                if result.image is None:
                    open_shard.skips.append(Skip(planned.record.index, planned.record.path,
                                                 result.skip_reason, result.skip_detail).as_json())
                    progress(1)
                    continue
                open_shard.batch.append((planned, result))
                if len(open_shard.batch) >= self.batching.vae_batch:
                    self._flush(open_shard, writer, backlog, progress)
            if open_shard is not None:
                self._close(open_shard, writer, backlog, progress)
            while backlog:
                backlog.popleft().result()
        except BaseException as exc:
            # Let the shard being written finish or fail, drop its temporary file: OUTPUT stays resumable.
            # Batches not yet encoded are dropped first, so the writer does not wait for them.
            self.encoder_streams.close()
            writer.shutdown(wait=True, cancel_futures=True)
            for shard_writer in self._writers:
                shard_writer.abort()  # no-op for committed shards
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                where = self.storage.location if self.storage.is_local else f"the staging folder {self.staging}"
                raise ShardkitError(f"no space left on the device holding {where}; free some space (or pass "
                                    f"--staging-dir) and run the same command again to resume (completed shards "
                                    f"are kept)") from None
            if isinstance(exc, SourceUnavailable):
                raise ShardkitError(f"{exc}; check the storage endpoint and credentials, then run the same command "
                                    f"again to resume (completed shards are kept)") from None
            raise
        self.encoder_streams.close()
        writer.shutdown(wait=True)
        return self.shards_written

    def _submit(self, writer: futures.Executor, backlog: deque, fn, *args) -> None:
        backlog.append(writer.submit(self._guarded_write, fn, *args))
        while len(backlog) > _WRITER_BACKLOG:
            backlog.popleft().result()  # re-raises a writer error (e.g. disk full) here
        while backlog and backlog[0].done():
            backlog.popleft().result()

    def _flush(self, shard: _OpenShard, writer, backlog, progress) -> None:
        """Hand the shard's pending batch to the encoders, and its samples-to-be to the writer thread."""
        if not shard.batch:
            return
        planned = [p for p, _ in shard.batch]
        images = [r.image for _, r in shard.batch]
        captions = self._caption_windows(shard, planned)
        latents = self.encoder_streams.submit(self._encode_images, images)
        pending = _PendingBatch(planned=planned, images=images, latents=latents, captions=captions, skips=shard.skips)
        if shard.writer is None:
            shard.writer = ShardWriter(self.staging, shard.plan.name, self.storage)
            self._writers = [w for w in self._writers if not w.committed] + [shard.writer]
        self._submit(writer, backlog, self._write_batch, shard.plan, shard.writer, pending)
        progress(len(shard.batch))
        shard.batch = []

    def _close(self, shard: _OpenShard, writer, backlog, progress) -> None:
        self._flush(shard, writer, backlog, progress)
        self._submit(writer, backlog, self._finish_shard, shard.plan, shard.writer, shard.skips)

    def _encode_images(self, images: list) -> np.ndarray:
        return self.encoders.vae.encode(torch.from_numpy(np.stack([image.pixels for image in images])))

    def _caption_windows(self, shard: _OpenShard, planned: list[PlannedRecord]) -> list[futures.Future]:
        """The windows of the plan holding these records' captions, each submitted to the encoders
        the first time a batch needs it. Batches come in plan order, so earlier windows are let go."""
        size = self.batching.caption_window
        needed = sorted({shard.positions[p.key] // size for p in planned})
        for index in [i for i in shard.caption_windows if i < needed[0]]:
            del shard.caption_windows[index]
        for index in needed:
            if index not in shard.caption_windows:
                records = shard.plan.records[index * size:(index + 1) * size]
                shard.caption_windows[index] = self.encoder_streams.submit(
                    self.encoders.t5.encode_distinct, [r.token_ids for r in records], self.batching.t5_batch)
        return [shard.caption_windows[index] for index in needed]

    # ---- writer thread -------------------------------------------------------------------
    def _guarded_write(self, fn, *args) -> None:
        """Once one write fails, every later one is refused: a shard missing a failed batch must
        never be committed and listed as complete."""
        if self._write_failure is not None:
            raise RuntimeError("an earlier shard write failed") from self._write_failure
        try:
            fn(*args)
        except BaseException as exc:
            self._write_failure = exc
            raise

    def _write_batch(self, plan: ShardPlan, shard_writer: ShardWriter, pending: _PendingBatch) -> None:
        # Batches reach the writer in order, whichever encoder stream finished first.
        latents = pending.latents.result()
        features: dict[bytes, np.ndarray] = {}
        for window in pending.captions:
            features.update(window.result())
        for i, planned in enumerate(pending.planned):
            t5 = {name: features[ids.tobytes()] for name, ids in planned.token_ids.items()}
            bad = non_finite_features(latents[i], self._stored_text(t5))
            if bad is not None:
                # Never train on NaN: the record is skipped, with what to change.
                pending.skips.append(Skip(planned.record.index, planned.record.path, NON_FINITE_FEATURES,
                                          non_finite_detail(bad, self.encoders, self.config)).as_json())
                continue
            shard_writer.add(self._sample(plan, planned, pending.images[i], latents[i], t5))

    def _sample(self, plan: ShardPlan, planned: PlannedRecord, image, latent: np.ndarray,
                t5: dict[str, np.ndarray]) -> Sample:
        primary = self.config.captions[0]
        metadata = {
            "key": planned.key,
            "path": planned.record.path,
            "source_index": planned.record.index,
            "original_hw": list(image.original_hw),
            "resized_hw": list(image.resized_hw),
            "crop_top": image.crop_top,
            "crop_left": image.crop_left,
            "resize_mode": self.config.resize_mode,
            "bucket": plan.bucket.key,
            "bucket_hw": [plan.bucket.height, plan.bucket.width],
            "aspect_ratio": plan.bucket.ratio,
            "latent_shape": list(latent.shape),
            "captions": planned.captions,
            "t5_fields": list(t5),
            "t5_lengths": {name: self.encoders.t5.stored_length(features) for name, features in t5.items()},
            "image_ext": image.extension if self.config.keep_images else None,
        }
        family = self.encoders.family
        if family is not None and family.family.micro_conditioning:
            # SDXL's UNet takes the sizes and the crop this build made, per sample.
            metadata["micro_conditioning"] = {
                "original_size": list(image.original_hw), "crop_coords_top_left": [image.crop_top, image.crop_left],
                "target_size": [plan.bucket.height, plan.bucket.width]}
        source = planned.source_metadata  # declared in the manifest by the plan
        if source:
            metadata["source"] = source
        members = [("json", json_bytes(metadata)), ("txt", planned.captions[primary].encode("utf-8"))]
        if self.config.keep_images:
            members.append((image.extension, image.image_bytes))
        members.append(("latent.npy", npy_bytes(latent)))
        members.extend((name, npy_bytes(array)) for name, array in self._stored_text(t5).items())
        return Sample(planned.key, members)

    def _stored_text(self, t5: dict) -> dict[str, np.ndarray]:
        """Tar member name -> array, for the text features of every caption field of a sample."""
        return {name: array for field_name, features in t5.items()
                for name, array in self.encoders.t5.stored_members(field_name, features)}

    def _finish_shard(self, plan: ShardPlan, shard_writer: ShardWriter | None, shard_skips: list[dict]) -> None:
        # Decode skips are found on the main thread, non-finite ones here: source order for both.
        shard_skips = sorted(shard_skips, key=lambda skip: skip["index"])
        if shard_writer is not None and not shard_writer.samples:
            shard_writer.abort()  # every record decoded was skipped after encoding: no empty tar
            shard_writer = None
        if shard_writer is None:
            # Every record of this plan failed to decode: remember the plan as done, with its skips.
            record_empty(self.storage, plan.name, shard_skips)
        else:
            written: WrittenShard = shard_writer.commit()
            self.samples_written += written.samples
            histogram: dict[str, Counter] = {}
            written_keys = set(written.keys) if self.encoders.family is None else set()  # T5 token counts only
            for planned in plan.records:
                if planned.key in written_keys:
                    for name, ids in planned.token_ids.items():
                        histogram.setdefault(name, Counter())[str(len(ids))] += 1
            record_shard(self.storage, ShardEntry(
                path=written.path, bucket=plan.bucket.key, bucket_hw=[plan.bucket.height, plan.bucket.width],
                samples=written.samples, bytes=written.bytes, sha256=written.sha256, skipped=shard_skips,
                token_lengths={name: dict(sorted(c.items(), key=lambda kv: int(kv[0]))) for name, c in sorted(histogram.items())}))
        self.shards_written += 1
        if self.on_shard is not None:
            self.on_shard()


class BuildJob:
    """A build made ready (OUTPUT checked, encoders loaded); ``prepare_plan()`` then ``run()`` do the work.

    OUTPUT and SOURCE may be URLs (``s3://bucket/prefix``) opened with ``storage_options``
    (plus ``config.endpoint_url``). With ``ranks`` of a multi-rank launch, this process writes
    the shards of the plan that fall to its rank.
    """

    def __init__(self, source: str, output: str | Path, config: BuildConfig, overwrite: bool = False,
                 encoders: Encoders | None = None, storage_options: dict | None = None, ranks: RankInfo | None = None,
                 announce: Callable[[str], None] | None = None, device: str | None = None):
        self.config = config
        self.ranks = ranks or RankInfo()
        self.overwrite = overwrite
        announce = announce or (lambda line: None)
        self.storage = Storage.for_url(output, storage_options_for(output, config.endpoint_url, storage_options))
        self.output = self.storage.location
        self.spec = resolve_source(source, config.image_root, _source_options(source, config, storage_options),
                                   config.image_column, config.image_byte_limit())
        self.table = bucket_table(config)
        # Every mistake in the options is found before the encoders load (seconds to minutes) and
        # before OUTPUT is changed. One build at a time: this worker's lock comes first, so a second
        # build stops before it reads OUTPUT or loads an encoder; a folder made only to hold the
        # lock is removed again when this build stops before it starts.
        check_caption_fields(self.records(), config.captions, self.spec.describe())
        made_folder = _first_missing_folder(self.storage)
        self.storage.prepare()
        self.lock = lock_worker(self.storage, self.ranks)
        try:
            previous = self._check_output(overwrite)
            if encoders is not None:
                check_encoders_match(encoders, config)
            else:
                announce(f"loading encoders: {_encoders_named(config)} ...")
                encoders = load_encoders(config, device or select_cuda_device(config.device, self.ranks))
            self.encoders = encoders
            self._prepare_output(overwrite)
            self.header = self._open_manifest(previous)
        except BaseException:
            self.lock.release()
            _remove_empty_folders(self.storage, made_folder)
            raise
        self.previous = previous
        self.plan: BuildPlan | None = None
        self.shards_reused = 0
        self.kept_samples = 0

    def resume_note(self, ledger: Ledger) -> str | None:
        """What a resumed build keeps, said before it starts; None for a fresh build."""
        done = ledger.done()
        if not done:
            return None
        shards = [record["shard"] for record in done.values() if "shard" in record]
        return (f"resuming {self.output}: {len(shards)} shards ({sum(s['samples'] for s in shards)} samples) kept "
                f"from an earlier run; encoding the rest")

    def records(self):
        """SOURCE's records, read afresh."""
        return iter_records(self.spec, self.config.captions, self.config.follow_symlinks_outside_root)

    def close(self) -> None:
        """Release OUTPUT for the next build (this worker's lock); the job is not run after this."""
        self.lock.release()

    def __enter__(self) -> "BuildJob":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- OUTPUT handling -----------------------------------------------------------------
    def _check_output(self, overwrite: bool) -> Manifest | None:
        """Whether OUTPUT (prepared, and locked by this worker) can take this build, changing nothing;
        the earlier build's manifest to resume."""
        storage = self.storage
        if overwrite and self.ranks.distributed and not _rendezvous_expected():
            raise ShardkitError("--overwrite with several processes needs their rendezvous (MASTER_ADDR/MASTER_PORT, "
                                "as torchrun sets) so that rank 0 deletes before anyone writes; delete OUTPUT "
                                "first instead")
        names = storage.listdir("")
        if not any(name in (MANIFEST_NAME, PLAN_NAME) for name in names):
            foreign = [name for name in names if name not in ("shards", DONE_DIR, EMPTY_CAPTION_FOLDER)
                       and not _BUILD_FILE.match(name) and not LOCK_FILE.match(name)]
            if foreign:
                raise ShardkitError(f"OUTPUT {self.output} is not empty and holds no shardkit manifest "
                                    f"(found {', '.join(sorted(foreign)[:3])}); choose an empty folder")
        if overwrite or MANIFEST_NAME not in names:
            return None
        previous = read_manifest_at(storage, MANIFEST_NAME)
        old = BuildConfig.recorded_content(previous.config)
        new = self.config.content_fields()
        changed = [f"{k} {_option_value(old.get(k))} -> {_option_value(new.get(k))}"
                   for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if changed:
            raise ShardkitError(f"OUTPUT {self.output} was built with different options ({'; '.join(changed)}); "
                                f"use the same options to resume, or pass --overwrite to start over")
        return previous

    def _prepare_output(self, overwrite: bool) -> None:
        storage = self.storage
        if overwrite and self.ranks.rank == 0:
            self._start_over()  # the others wait for rank 0 at the plan (RankGroup.vote)
        if storage.is_local and self._cleans_up():
            remove_partial_shards(storage.root)
            for folder in (storage.root, storage.root / DONE_DIR, storage.root / EMPTY_CAPTION_FOLDER):
                for temp in folder.glob(".*.tmp"):
                    temp.unlink(missing_ok=True)

    def _cleans_up(self) -> bool:
        """Whether this process deletes what interrupted writers left (temporary shards and files).

        A lone process does; of a launch, rank 0 does when the others wait for it at the plan (a
        rendezvous), else nobody does, since another process may be writing them right now.
        """
        return not self.ranks.distributed or (self.ranks.rank == 0 and _rendezvous_expected())

    def _start_over(self) -> None:
        """--overwrite: delete the earlier build (plan, manifest, failures, done records, the empty
        caption, shards) and what `shardkit index` wrote for it."""
        for name in self.storage.listdir(""):
            if _BUILD_FILE.match(name):
                self.storage.remove(name)
        for name in (DONE_DIR, EMPTY_CAPTION_FOLDER, *INDEX_FILES):
            self.storage.remove(name)
        self.storage.remove("shards")

    def _open_manifest(self, previous: Manifest | None) -> Manifest:
        """What every manifest of this build starts from; a manifest of other encoders is refused."""
        encoders = self.encoders.identities()
        config = self.config.to_json()
        fresh = Manifest(config=config, encoders=encoders, resolution=self.config.resolution,
                         buckets=self.table.as_json(), sample_format=declare_from_config(config, encoders).as_json())
        if previous is None:
            return fresh
        for name, new in self.encoders.identities(content_only=True).items():
            old = {k: v for k, v in previous.encoders.get(name, {}).items() if k != "compute_dtype"}
            if old != new:
                raise ShardkitError(f"OUTPUT {self.output} was built with a different {name.upper()} "
                                    f"({previous.encoders.get(name, {}).get('source')}); pass --overwrite to start over")
        return fresh

    # ---- the plan ------------------------------------------------------------------------
    def prepare_plan(self, group: RankGroup | None = None) -> BuildPlan:
        """The plan in OUTPUT, checked against SOURCE and the config; made and written first if there is none.

        With a rendezvous, rank 0 plans (or checks) first and the others wait for it, so that a
        launch plans once; without one, each process plans alone (the same plan) if there is none.
        """
        if group is not None and self.ranks.rank != 0:
            if not group.vote(True):
                raise ShardkitError(f"{self.ranks.describe()}: rank 0 could not prepare the plan (see its error)")
            plan = self._read_or_make_plan(rendezvous=True)  # rank 0 planned: only checked here
        else:
            with planning(self.storage, self.lock.launch):
                plan = self._read_or_make_plan(rendezvous=group is not None)
        if group is not None and self.ranks.rank == 0 and not group.vote(True):
            raise ShardkitError(f"{self.ranks.describe()}: another rank failed before the build began (see its error)")
        self.plan = plan
        return plan

    def _read_or_make_plan(self, rendezvous: bool) -> BuildPlan:
        plan = read_plan(self.storage)
        if plan is not None:
            plan.config = BuildConfig.recorded_content(plan.config)
            # One pass over SOURCE (no image looked up or decoded): the plan must be of this source.
            expected = self._new_plan(describe_source(self.records()), [], [])
            refusal = plan.refusal(expected, self.storage.url_of(PLAN_NAME), self.spec.describe())
            if refusal is not None:
                raise ShardkitError(refusal)
        # Before the plan: a plan in OUTPUT means its empty caption was stored by the same encoders.
        self.header.sample_format = self._with_empty_caption(plan is not None, rendezvous).as_json()
        if plan is None:
            start = time.perf_counter()
            plan = make_plan(self.records(), self._planner(lookup_threads=True),
                             self.config.content_fields(), self._encoder_identities(), self._batching())
            log.info("planned %d records into %d shards in %.1fs", plan.source["records"], len(plan.shards),
                     time.perf_counter() - start)
            self.storage.write_atomic(PLAN_NAME, plan.to_bytes())
        return plan

    def _with_empty_caption(self, planned: bool, rendezvous: bool) -> SampleFormat:
        """The declaration plus the empty caption's encoding, stored once in OUTPUT: T5's rows, or
        each member a caption of the pipeline has.

        Whoever plans (rank 0 of a rendezvous, the Ray driver, a lone process) stores it before
        the plan. Once planned it is kept while it is whole, so it stays byte-identical however
        often and with however many workers the build resumes; a missing or damaged one is
        encoded and stored again. Ranks that waited for rank 0 take what it stored.
        """
        declared = self.header.declaration()
        names = list(declared.empty_caption_specs)
        if planned:
            follows_rank0 = rendezvous and self.ranks.rank != 0
            kept = {name: self._stored_empty_caption(name, declared, follows_rank0) for name in names}
            if all(entry is not None for entry in kept.values()):
                return replace(declared, empty_captions=kept)
        if self.encoders.family is None:
            text = self.encoders.t5
            encoded = {"t5": text.encode([np.asarray(text.tokenize(""), dtype=np.int32)], 1)[0]}
        else:
            encoded = dict(self.encoders.family.encode_captions([""], 1)[0])
        entries = {}
        for name in names:
            if not np.isfinite(encoded[name]).all():
                raise ShardkitError(non_finite_detail(f"the empty caption's {name} encoding", self.encoders,
                                                      self.config))
            payload = npy_bytes(encoded[name])
            entries[name] = EmptyCaption.of(name, payload)
            self.storage.write_atomic(entries[name].path, payload)
        return replace(declared, empty_captions=entries)

    def _stored_empty_caption(self, name: str, declared: SampleFormat, follows_rank0: bool) -> EmptyCaption | None:
        """The stored empty caption ``name`` when it is whole, checked against the earlier
        manifest's declaration (its sha256) when there is one, else against the build's caption
        shape; None when it must be encoded again. Ranks that follow rank 0 check the file rank 0
        just stored."""
        try:
            listed = None if follows_rank0 or self.previous is None else \
                self.previous.declaration().empty_captions.get(name)
        except ShardkitError:
            listed = None
        path = f"{EMPTY_CAPTION_FOLDER}/{name}.npy"
        itemsize = np.dtype(declared.store_dtype).itemsize
        if listed is not None:
            limit = listed.max_bytes
        else:  # caption members do not depend on the bucket
            bounds = declared.shape_rule(declared.empty_caption_specs[name], (0, 0))
            limit = NPY_HEADER_BYTES + itemsize * math.prod(high for _, high in bounds)
        try:
            size = self.storage.size(path)
            if size is None:
                if listed is not None:
                    log.warning("%s is missing; encoding it again", path)
                return None
            if size > limit:
                raise ShardFormatError(f"it is {size} bytes, more than its shape needs")
            payload = self.storage.read_bytes(path)
            entry = listed if listed is not None else EmptyCaption.of(name, payload)
            load_empty_caption(entry, payload, declared)
            return entry
        except (OSError, ShardFormatError) as exc:
            log.warning("%s is missing or damaged (%s); encoding it again", path, exc)
            return None

    def _new_plan(self, source: dict, shards: list, skipped: list) -> BuildPlan:
        return BuildPlan(source=source, config=self.config.content_fields(), encoders=self._encoder_identities(),
                         batching=self._batching(), shards=shards, skipped=skipped)

    def _encoder_identities(self) -> dict:
        return self.encoders.identities(content_only=True)

    def _batching(self) -> Batching:
        return Batching(vae_batch=self.config.batch_size, caption_window=caption_window_size(self.config),
                        t5_batch=self.config.t5_batch_size)

    def _planner(self, lookup_threads: bool = False) -> Planner:
        text = self.encoders.t5
        return Planner(self.config, self.table, text.tokenize, self.encoders.vae.feature_shape, text.hidden_size,
                       lookup_threads=self._lookup_threads() if lookup_threads else 0,
                       caption_bytes=text.caption_bytes if self.encoders.family is not None else None)

    def _lookup_threads(self) -> int:
        """Threads that look images up ahead of the planner: each lookup in object storage is a
        round trip (tens of ms), so one at a time would starve the encoders; local lookups are
        cheap and run inline."""
        return _REMOTE_LOOKUP_THREADS if isinstance(self.spec.image_root, RemotePath) else 0

    def ledger(self) -> Ledger:
        return Ledger(self.storage, self.plan, self.table, self.header)

    def pending(self, ledger: Ledger) -> list[int]:
        """Plan positions of the shards this worker writes: not done, and its by the claim rule."""
        done = ledger.done()
        self.shards_reused = len(done)
        self.kept_samples = sum(record["shard"]["samples"] for record in done.values() if "shard" in record)
        return [position for position in range(len(self.plan.shards))
                if position not in done and position % self.ranks.world_size == self.ranks.rank]

    def pending_records(self) -> int:
        """Records this worker will write or skip (the progress bar's total)."""
        return sum(len(self.plan.shards[p].records) for p in self.pending(self.ledger()))

    def shards_of(self, positions: list[int]) -> Iterator[ShardPlan]:
        """The shards at ``positions``, their records read again from SOURCE."""
        return gather_shards(self.records(), self.plan, positions, self.table, self._planner().replan,
                             self.config.gather_memory, self.config.staging_dir)

    # ---- the pipeline --------------------------------------------------------------------
    def run(self, progress: Callable[[int], None], group: RankGroup | None = None) -> BuildSummary:
        start = time.perf_counter()
        if self.plan is None:
            self.prepare_plan(group)
        ledger = self.ledger()
        positions = self.pending(ledger)
        if self.ranks.rank == 0:
            ledger.publish()  # a manifest from the start: what is done, and the build's config and encoders
        with staging_folder(self.storage, self.config) as staging:
            executor = ShardExecutor(self.config, self.encoders, self.storage, staging, self.plan.batching)
            pool = self._decode_executor()
            try:
                window = max(2 * self.config.batch_size, 4 * max(self.config.workers, 1))
                jobs = decode_jobs(self.shards_of(positions), self.config, self.table.uses_lanczos)
                # The manifest role (rank 0, a lone process) rewrites the manifest after each shard.
                written = executor.execute(bounded_map(run_decode_job, jobs, pool, window), progress,
                                           ledger.publish if self.ranks.rank == 0 else None)
            finally:
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
        manifest = ledger.publish()  # the last worker to finish writes the complete manifest
        return BuildSummary.of(self.output, manifest, shards_reused=self.shards_reused, shards_written=written,
                               written_this_run=executor.samples_written, kept_samples=self.kept_samples,
                               elapsed_s=time.perf_counter() - start, rank=self.ranks.rank,
                               world_size=self.ranks.world_size)

    def _decode_executor(self) -> futures.ThreadPoolExecutor | None:
        if self.config.workers == 0:
            return None
        # Threads, not processes: PIL releases the GIL while decoding and resizing, and threads
        # cost no start-up and no copying of image bytes and pixels between processes
        # (measured in BENCHMARKS.md: host CPU per sample drops by a third).
        return futures.ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="shardkit-decode")


@contextlib.contextmanager
def staging_folder(storage: Storage, config: BuildConfig) -> Iterator[Path]:
    """Where shards are written before their commit: OUTPUT itself when it is a local folder
    (commit = rename), else a private local folder (commit = one upload per shard)."""
    if storage.is_local:
        yield storage.root
        return
    staging = Path(tempfile.mkdtemp(prefix="shardkit-staging-", dir=config.staging_dir))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _rendezvous_expected() -> bool:
    return "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ


def _option_value(value) -> str:
    """An option as the user would write it: lists comma-joined, strings bare, None as 'unset'."""
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


NON_FINITE_FEATURES = "non_finite_features"


def non_finite_detail(what: str, encoders: Encoders, config: BuildConfig) -> str:
    """One line: what was not finite, how it was computed, and what to change."""
    computed = (f"VAE {encoders.vae.compute_dtype_name}, {encoders.text_role.upper()} "
                f"{str(encoders.t5.dtype).replace('torch.', '')}")
    return (f"{what} has NaN or infinite values (computed in {computed}, stored as {config.store_dtype}); "
            f"rebuild with --dtype fp32 (or bf16), or --store-dtype fp32 if the values exceed fp16's range")


def bucket_table(config: BuildConfig) -> BucketTable:
    """The build's bucket table; a pipeline's family first checks that --resolution fits it
    (every bucket divisible by its VAE downsampling x patching), in one line if not."""
    if config.pipeline:
        from .families import family_for, read_model_index

        return family_for(read_model_index(config.pipeline)).bucket_table(config.resolution)
    return BucketTable(config.resolution)


def _encoders_named(config: BuildConfig) -> str:
    return f"pipeline {config.pipeline}" if config.pipeline else f"VAE {config.vae}, T5 {config.t5}"


def caption_window_size(config: BuildConfig) -> int:
    """Records per caption window: a few T5 batches' worth of captions, at least one VAE batch."""
    return max(config.batch_size, _CAPTION_WINDOW_T5_BATCHES * config.t5_batch_size // len(config.captions))


def _first_missing_folder(storage: Storage) -> Path | None:
    """The outermost folder of a local OUTPUT that does not exist yet; None when there is none."""
    if not storage.is_local:
        return None  # object storage has no folders to make: the lock object is all there is
    missing, folder = None, storage.root.absolute()
    while not folder.exists() and not folder.is_symlink():
        missing, folder = folder, folder.parent
    return missing


def _remove_empty_folders(storage: Storage, top: Path | None) -> None:
    """Remove the folders made for OUTPUT, from OUTPUT up to ``top``, as long as they are empty."""
    if top is None:
        return
    folder = storage.root.absolute()
    while True:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == top:
            return
        folder = folder.parent


def build(source: str, output: str | Path, config: BuildConfig, overwrite: bool = False,
          progress: Callable[[int], None] | None = None, encoders: Encoders | None = None,
          storage_options: dict | None = None, ranks: RankInfo | None = None) -> BuildSummary:
    """Build shards from SOURCE into OUTPUT; resumes when OUTPUT holds an unfinished build of the same config.

    SOURCE and OUTPUT may be local paths or URLs (``s3://...``, opened with ``storage_options``).
    ``ranks`` (``distributed.discover_ranks()`` under torchrun or srun) makes this process one
    worker of a multi-process build; the default is a one-process build. A build may be
    resumed with any number of processes.
    """
    ranks = ranks or RankInfo()
    with joined_ranks(ranks) as group, BuildJob(str(source), output, config, overwrite, encoders, storage_options,
                                                 ranks) as job:
        summary = job.run(progress or (lambda n: None), group)
        summary.merged = finish_ranks(job.ledger(), ranks, group)
    return summary


def _source_options(source: str, config: BuildConfig, storage_options: dict | None) -> dict:
    """fsspec options for SOURCE (or for its image root, when only that is in object storage)."""
    remote = next((location for location in (str(source), config.image_root) if location and is_url(location)), None)
    return storage_options_for(remote, config.endpoint_url, storage_options) if remote else {}
