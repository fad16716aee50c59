"""The pipeline: records -> plans -> decode workers -> per-bucket batches -> VAE + T5 -> shards + manifest.

Data flows one way. Decoding runs in worker threads a bounded window ahead of the
encoders; shard writing and hashing run on a writer thread, so the encoders wait on neither.
On a CPU, two batches are encoded at once (encoder streams); the writer takes their results in
batch order, so the shards do not depend on which finished first.
"""

from __future__ import annotations

import concurrent.futures as futures
import errno
import logging
import re
import shutil
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .buckets import BucketTable
from .config import BuildConfig
from .distributed import (PART_PATTERN, MergeSummary, RankInfo, check_world_size, finish_ranks, joined_ranks,
                          select_cuda_device, split_records)
from .encoders import (EncoderStreams, Encoders, check_encoders_match, load_encoders, non_finite_features,
                       resolve_encoder_streams)
from .errors import ShardFormatError, ShardkitError
from .images import DecodeJob, DecodeResult, SourceUnavailable, run_decode_job
from .lookahead import bounded_map
from .index import INDEX_FILES
from .manifest import MANIFEST_NAME, Manifest, ShardEntry, read_manifest_at, write_failures, write_manifest
from .format import (EMPTY_CAPTION_FOLDER, EmptyCaption, SampleFormat, declare_from_config, json_bytes,
                     load_empty_caption, npy_bytes)
from .plan import PlannedRecord, Planner, ShardPlan, Skip, check_caption_fields
from .shards import Sample, ShardWriter, WrittenShard, remove_partial_shards
from .sources import count_records, iter_records, resolve_source
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
# What a build writes at the top of OUTPUT (manifests, failures, rank parts and their temp files).
_BUILD_FILE = re.compile(r"^\.?(manifest(\.rank\d{3,})?\.json|failures(\.rank\d{3,})?\.jsonl)(\.tmp)?$")


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
    # Multi-rank launches: the merge on rank 0, True on the others once rank 0 merged,
    # None when the parts wait for `shardkit merge`.
    merged: MergeSummary | bool | None = None
    kept_samples: int = 0  # of ``written``, those in shards kept from an earlier run

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    @property
    def written_this_run(self) -> int:
        return self.written - self.kept_samples


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


class BuildJob:
    """A build made ready (OUTPUT checked, encoders loaded, resume state read); ``run()`` does the work.

    OUTPUT and SOURCE may be URLs (``s3://bucket/prefix``) opened with ``storage_options``
    (plus ``config.endpoint_url``). With ``ranks`` of a multi-rank launch, this process builds
    its share of the records into its own shards and manifest part.
    """

    def __init__(self, source: str, output: str | Path, config: BuildConfig, overwrite: bool = False,
                 encoders: Encoders | None = None, storage_options: dict | None = None, ranks: RankInfo | None = None,
                 announce: Callable[[str], None] | None = None):
        self.config = config
        self.ranks = ranks or RankInfo()
        announce = announce or (lambda line: None)
        self.storage = Storage.for_url(output, storage_options_for(output, config.endpoint_url, storage_options))
        self.output = self.storage.location
        self.spec = resolve_source(source, config.image_root, _source_options(source, config, storage_options))
        self.table = BucketTable(config.resolution)
        # Every mistake in the options is found before the encoders load (seconds to minutes) and
        # before OUTPUT is created or changed.
        check_caption_fields(iter_records(self.spec, config.captions), config.captions, self.spec.describe())
        previous = self._check_output(overwrite)
        if encoders is not None:
            check_encoders_match(encoders, config)
        else:
            announce(f"loading encoders: VAE {config.vae}, T5 {config.t5} ...")
            encoders = load_encoders(config, select_cuda_device(config.device, self.ranks))
        self.encoders = encoders
        self._prepare_output(overwrite)
        self.manifest = self._open_manifest(previous)
        self.done_paths = {e.path for e in self.manifest.shards} | {e["path"] for e in self.manifest.empty_plans}
        self.kept_samples = sum(e.samples for e in self.manifest.shards)
        self.shards_reused = 0
        self._write_failure: BaseException | None = None
        self._writers: list[ShardWriter] = []

    @property
    def resume_note(self) -> str | None:
        """What a resumed build keeps, said before it starts; None for a fresh build."""
        if not self.done_paths:
            return None
        return (f"resuming {self.output}: {len(self.manifest.shards)} shards ({self.kept_samples} samples) kept "
                f"from an earlier run; encoding the rest")

    # ---- OUTPUT handling -----------------------------------------------------------------
    def _check_output(self, overwrite: bool) -> Manifest | None:
        """Whether OUTPUT can take this build, changing nothing; the earlier build's manifest to resume."""
        storage = self.storage
        if storage.is_local:
            if storage.root.exists() and not storage.root.is_dir():
                raise ShardkitError(f"OUTPUT {storage.root} is a file; pass a folder path")
            if not storage.root.exists():
                return None
        else:
            storage.prepare()  # object storage: checks the bucket, creates nothing
        names = storage.listdir("")
        if not any(name == MANIFEST_NAME or PART_PATTERN.match(name) for name in names):
            foreign = [name for name in names if name not in ("shards", EMPTY_CAPTION_FOLDER)
                       and not _BUILD_FILE.match(name)]
            if foreign:
                raise ShardkitError(f"OUTPUT {self.output} is not empty and holds no shardkit manifest "
                                    f"(found {', '.join(sorted(foreign)[:3])}); choose an empty folder")
        if overwrite:
            return None
        check_world_size(storage, self.ranks)
        if not storage.exists(self.ranks.manifest_name):
            return None
        previous = read_manifest_at(storage, self.ranks.manifest_name)
        old = {k: v for k, v in previous.config.items() if k not in BuildConfig.RUNTIME_FIELDS}
        new = self.config.content_fields()
        changed = [f"{k} {_option_value(old.get(k))} -> {_option_value(new.get(k))}"
                   for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if changed:
            raise ShardkitError(f"OUTPUT {self.output} was built with different options ({'; '.join(changed)}); "
                                f"use the same options to resume, or pass --overwrite to start over")
        return previous

    def _prepare_output(self, overwrite: bool) -> None:
        storage = self.storage
        storage.prepare()
        if overwrite:
            self._start_over()
        if storage.is_local:
            remove_partial_shards(storage.root, self.ranks.cleans)

    def _start_over(self) -> None:
        """--overwrite: delete the earlier build. Each rank deletes only its own files (and rank 0 what
        belongs to no rank), so the ranks of a launch can start over at the same time."""
        for name in self.storage.listdir(""):
            if _BUILD_FILE.match(name) and self.ranks.cleans(name):
                self.storage.remove(name)
        if self.ranks.rank == 0:
            for name in INDEX_FILES:  # what `shardkit index` wrote describes the build being deleted
                self.storage.remove(name)
            self.storage.remove(EMPTY_CAPTION_FOLDER)
        if not self.ranks.distributed:
            self.storage.remove("shards")
            return
        for name in self.storage.listdir("shards"):
            if self.ranks.cleans(name):
                self.storage.remove(f"shards/{name}")

    def _open_manifest(self, previous: Manifest | None) -> Manifest:
        encoders = {"vae": self.encoders.vae.identity.as_json(), "t5": self.encoders.t5.identity.as_json()}
        config = self.config.to_json()
        fresh = Manifest(config=config, encoders=encoders, resolution=self.config.resolution,
                         buckets=self.table.as_json(), sample_format=None,
                         distributed={"rank": self.ranks.rank, "world_size": self.ranks.world_size}
                         if self.ranks.distributed else None)
        declared = declare_from_config(config, encoders)
        if previous is None:
            fresh.sample_format = self._with_empty_captions(declared, None).as_json()
            return fresh
        for name in ("vae", "t5"):
            old = {k: v for k, v in previous.encoders[name].items() if k != "compute_dtype"}
            new = getattr(self.encoders, name).identity.content_json()
            if old != new:
                raise ShardkitError(f"OUTPUT {self.output} was built with a different {name.upper()} "
                                    f"({previous.encoders[name]['source']}); pass --overwrite to start over")
        # Only shards whose file is really there, whole, count as done (one listing, local or remote).
        sizes = self.storage.list_sizes("shards")
        kept = []
        for entry in previous.shards:
            if sizes.get(entry.path.rsplit("/", 1)[-1]) == entry.bytes:
                kept.append(entry)
            else:
                log.warning("shard %s listed in the manifest is missing or damaged; it will be rebuilt", entry.path)
                self.storage.remove(entry.path)
        fresh.shards = kept
        fresh.empty_plans = previous.empty_plans
        fresh.sample_format = self._with_empty_captions(declared, previous).as_json()
        return fresh

    def _with_empty_captions(self, declared: SampleFormat, previous: Manifest | None) -> SampleFormat:
        """The declaration plus the empty caption's T5 encoding, stored once in OUTPUT (by rank 0 of
        a multi-rank launch: its part's declaration is the merged one). A resume keeps the stored
        file while it matches its declaration, so it stays byte-identical however often the build
        resumes; a missing or damaged one is encoded and written again."""
        if self.ranks.rank != 0:
            return declared
        try:
            kept = previous.declaration().empty_captions.get("t5") if previous is not None else None
        except ShardkitError:
            kept = None
        if kept is not None:
            try:
                size = self.storage.size(kept.path)
                if size is None or size > kept.max_bytes:
                    raise ShardFormatError("it is missing" if size is None else f"it is {size} bytes, more than its "
                                           f"shape needs")
                load_empty_caption(kept, self.storage.read_bytes(kept.path), declared)
                return replace(declared, empty_captions={"t5": kept})
            except (OSError, ShardFormatError) as exc:
                log.warning("%s is missing or damaged (%s); encoding it again", kept.path, exc)
        ids = np.asarray(self.encoders.t5.tokenize(""), dtype=np.int32)
        feature = self.encoders.t5.encode([ids], 1)[0]
        if not np.isfinite(feature).all():
            raise ShardkitError(non_finite_detail("the empty caption's T5 encoding", self.encoders, self.config))
        payload = npy_bytes(feature)
        entry = EmptyCaption.of("t5", payload)
        self.storage.write_atomic(entry.path, payload)
        return replace(declared, empty_captions={"t5": entry})

    # ---- the pipeline --------------------------------------------------------------------
    def run(self, progress: Callable[[int], None]) -> BuildSummary:
        # Shards are written where they are committed from: OUTPUT itself when it is a local folder
        # (commit = rename), else a private local folder (commit = one upload per shard).
        if self.storage.is_local:
            self.staging = self.storage.root
            return self._run(progress)
        self.staging = Path(tempfile.mkdtemp(prefix="shardkit-staging-", dir=self.config.staging_dir))
        try:
            return self._run(progress)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _run(self, progress: Callable[[int], None]) -> BuildSummary:
        start = time.perf_counter()
        planner = Planner(self.config, self.table, self.encoders.t5.tokenize, self.encoders.vae.feature_shape,
                          self.encoders.t5.hidden_size, lookup_threads=self._lookup_threads(),
                          on_skip=lambda skip: progress(1))
        # Ranks split the records before planning; a record whose path came earlier on another
        # rank says so, and is skipped exactly as in a one-process build.
        records = split_records(iter_records(self.spec, self.config.captions), self.ranks)
        plans = planner.plan(records)
        executor = self._decode_executor()
        writer = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardkit-writer")
        self.encoder_streams = EncoderStreams(resolve_encoder_streams(self.config.encoder_streams, self.encoders.device))
        backlog: deque = deque()
        open_shard: _OpenShard | None = None
        try:
            self.encoder_streams.open()
            window = max(2 * self.config.batch_size, 4 * max(self.config.workers, 1))
            for (plan, planned), result in bounded_map(run_decode_job, self._decode_jobs(plans, progress),
                                                        executor, window):
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
                if len(open_shard.batch) >= self.config.batch_size:
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
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                where = self.output if self.storage.is_local else f"the staging folder {self.staging}"
                raise ShardkitError(f"no space left on the device holding {where}; free some space (or pass "
                                    f"--staging-dir) and run the same command again to resume (completed shards "
                                    f"are kept)") from None
            if isinstance(exc, SourceUnavailable):
                raise ShardkitError(f"{exc}; check the storage endpoint and credentials, then run the same command "
                                    f"again to resume (completed shards are kept)") from None
            raise
        self.encoder_streams.close()
        writer.shutdown(wait=True)
        if executor is not None:
            executor.shutdown(wait=True)

        self.manifest.records_read = planner.stats.records_read
        self.manifest.plan_skipped = [s.as_json() for s in planner.stats.skips]
        self.manifest.status = "complete"
        write_manifest(self.storage, self.manifest, self.ranks.manifest_name)
        write_failures(self.storage, self.manifest, self.ranks.failures_name)
        data = self.manifest.as_json()
        return BuildSummary(output=self.output, records_read=data["records"]["read"], written=data["records"]["written"],
                            skipped_by_reason=data["skipped_by_reason"], per_bucket=data["totals"]["per_bucket"],
                            bytes=data["totals"]["bytes"], shards=data["totals"]["shards"],
                            shards_reused=self.shards_reused, elapsed_s=time.perf_counter() - start,
                            rank=self.ranks.rank, world_size=self.ranks.world_size, kept_samples=self.kept_samples)

    def _lookup_threads(self) -> int:
        """Threads that look images up ahead of the planner: each lookup in object storage is a
        round trip (tens of ms), so one at a time would starve the encoders; local lookups are
        cheap and run inline."""
        return _REMOTE_LOOKUP_THREADS if isinstance(self.spec.image_root, RemotePath) else 0

    def _decode_jobs(self, plans: Iterator[ShardPlan], progress) -> Iterator[tuple]:
        lanczos = self.table.uses_lanczos
        for plan in plans:
            if self.ranks.shard_name(plan.name) in self.done_paths:
                self.shards_reused += 1
                progress(len(plan.records))
                continue
            for planned in plan.records:
                job = DecodeJob(path=planned.record.location, bucket=plan.bucket, resize_mode=self.config.resize_mode,
                                max_pixels=self.config.max_image_pixels, expected_hw=planned.expected_hw, lanczos=lanczos)
                yield (plan, planned), job

    def _decode_executor(self) -> futures.ThreadPoolExecutor | None:
        if self.config.workers == 0:
            return None
        # Threads, not processes: PIL releases the GIL while decoding and resizing, and threads
        # cost no start-up and no copying of image bytes and pixels between processes
        # (measured in BENCHMARKS.md: host CPU per sample drops by a third).
        return futures.ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="shardkit-decode")

    def _submit(self, writer: futures.Executor, backlog: deque, fn, *args) -> None:
        backlog.append(writer.submit(self._guarded_write, fn, *args))
        while len(backlog) > _WRITER_BACKLOG:
            backlog.popleft().result()  # re-raises a writer error (e.g. disk full) here
        while backlog and backlog[0].done():
            backlog.popleft().result()

    def _flush(self, shard: "_OpenShard", writer, backlog, progress) -> None:
        """Hand the shard's pending batch to the encoders, and its samples-to-be to the writer thread."""
        if not shard.batch:
            return
        planned = [p for p, _ in shard.batch]
        images = [r.image for _, r in shard.batch]
        captions = self._caption_windows(shard, planned)
        latents = self.encoder_streams.submit(self._encode_images, images)
        pending = _PendingBatch(planned=planned, images=images, latents=latents, captions=captions, skips=shard.skips)
        if shard.writer is None:
            shard.writer = ShardWriter(self.staging, self.ranks.shard_name(shard.plan.name), self.storage)
            self._writers = [w for w in self._writers if not w.committed] + [shard.writer]
        self._submit(writer, backlog, self._write_batch, shard.plan, shard.writer, pending)
        progress(len(shard.batch))
        shard.batch = []

    def _close(self, shard: "_OpenShard", writer, backlog, progress) -> None:
        self._flush(shard, writer, backlog, progress)
        self._submit(writer, backlog, self._finish_shard, shard.plan, shard.writer, shard.skips)

    def _encode_images(self, images: list) -> np.ndarray:
        return self.encoders.vae.encode(torch.from_numpy(np.stack([image.pixels for image in images])))

    def _caption_windows(self, shard: "_OpenShard", planned: list[PlannedRecord]) -> list[futures.Future]:
        """The windows of the plan holding these records' captions, each submitted to the encoders
        the first time a batch needs it. Batches come in plan order, so earlier windows are let go."""
        size = caption_window_size(self.config)
        needed = sorted({shard.positions[p.key] // size for p in planned})
        for index in [i for i in shard.caption_windows if i < needed[0]]:
            del shard.caption_windows[index]
        for index in needed:
            if index not in shard.caption_windows:
                records = shard.plan.records[index * size:(index + 1) * size]
                shard.caption_windows[index] = self.encoder_streams.submit(
                    self.encoders.t5.encode_distinct, [r.token_ids for r in records], self.config.t5_batch_size)
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
            bad = non_finite_features(latents[i], t5)
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
            "t5_lengths": {name: int(array.shape[0]) for name, array in t5.items()},
            "image_ext": image.extension if self.config.keep_images else None,
        }
        members = [("json", json_bytes(metadata)), ("txt", planned.captions[primary].encode("utf-8"))]
        if self.config.keep_images:
            members.append((image.extension, image.image_bytes))
        members.append(("latent.npy", npy_bytes(latent)))
        members.extend((f"t5_{name}.npy", npy_bytes(array)) for name, array in t5.items())
        return Sample(planned.key, members)

    def _finish_shard(self, plan: ShardPlan, shard_writer: ShardWriter | None, shard_skips: list[dict]) -> None:
        # Decode skips are found on the main thread, non-finite ones here: source order for both.
        shard_skips = sorted(shard_skips, key=lambda skip: skip["index"])
        if shard_writer is not None and not shard_writer.samples:
            shard_writer.abort()  # every record decoded was skipped after encoding: no empty tar
            shard_writer = None
        if shard_writer is None:
            # Every record of this plan failed to decode: remember the plan as done, with its skips.
            self.manifest.empty_plans.append({"path": self.ranks.shard_name(plan.name), "skipped": shard_skips})
        else:
            written: WrittenShard = shard_writer.commit()
            histogram: dict[str, Counter] = {}
            written_keys = set(written.keys)
            for planned in plan.records:
                if planned.key in written_keys:
                    for name, ids in planned.token_ids.items():
                        histogram.setdefault(name, Counter())[str(len(ids))] += 1
            self.manifest.shards.append(ShardEntry(
                path=written.path, bucket=plan.bucket.key, bucket_hw=[plan.bucket.height, plan.bucket.width],
                samples=written.samples, bytes=written.bytes, sha256=written.sha256, skipped=shard_skips,
                token_lengths={name: dict(sorted(c.items(), key=lambda kv: int(kv[0]))) for name, c in sorted(histogram.items())}))
        write_manifest(self.storage, self.manifest, self.ranks.manifest_name)


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
    computed = f"VAE {encoders.vae.compute_dtype_name}, T5 {str(encoders.t5.dtype).replace('torch.', '')}"
    return (f"{what} has NaN or infinite values (computed in {computed}, stored as {config.store_dtype}); "
            f"rebuild with --dtype fp32 (or bf16), or --store-dtype fp32 if the values exceed fp16's range")


def caption_window_size(config: BuildConfig) -> int:
    """Records per caption window: a few T5 batches' worth of captions, at least one VAE batch."""
    return max(config.batch_size, _CAPTION_WINDOW_T5_BATCHES * config.t5_batch_size // len(config.captions))


def build(source: str, output: str | Path, config: BuildConfig, overwrite: bool = False,
          progress: Callable[[int], None] | None = None, encoders: Encoders | None = None,
          storage_options: dict | None = None, ranks: RankInfo | None = None) -> BuildSummary:
    """Build shards from SOURCE into OUTPUT; resumes when OUTPUT holds an unfinished build of the same config.

    SOURCE and OUTPUT may be local paths or URLs (``s3://...``, opened with ``storage_options``).
    ``ranks`` (``distributed.discover_ranks()`` under torchrun or srun) makes this process one
    rank of a multi-rank build; the default is a one-process build.
    """
    ranks = ranks or RankInfo()
    with joined_ranks(ranks) as group:
        job = BuildJob(str(source), output, config, overwrite, encoders, storage_options, ranks)
        summary = job.run(progress or (lambda n: None))
        summary.merged = finish_ranks(job.storage, ranks, group)
    return summary


def total_records(source: str, config: BuildConfig, storage_options: dict | None = None,
                  ranks: RankInfo | None = None) -> int | None:
    """How many records this process will read, when cheap to know (for the progress bar)."""
    total = count_records(resolve_source(source, config.image_root, _source_options(source, config, storage_options)))
    ranks = ranks or RankInfo()
    return None if total is None else len(range(ranks.rank, total, ranks.world_size))


def _source_options(source: str, config: BuildConfig, storage_options: dict | None) -> dict:
    """fsspec options for SOURCE (or for its image root, when only that is in object storage)."""
    remote = next((location for location in (str(source), config.image_root) if location and is_url(location)), None)
    return storage_options_for(remote, config.endpoint_url, storage_options) if remote else {}
