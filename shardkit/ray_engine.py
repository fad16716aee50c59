"""``--engine ray``: the build's plan executed on a Ray cluster, with the same bytes as a local build.

The driver (this process) plans, or checks the plan already in OUTPUT, exactly as a local build
does, and holds the manifest role. The shards still to write go to a pool of encoder actors
(``num_gpus`` each on a GPU cluster, CPU actors otherwise), at most two per actor at a time.
An actor decodes a shard's images in Ray tasks on the cluster's CPUs, a bounded window of
chunks ahead, and writes the shard with the same executor as a local build; the driver records
it in the manifest and advances the progress bar.

Failures: a decode task that dies is retried by Ray; an actor that dies is restarted and its
shard written again from the start (a shard's temporary file is truncated, its bytes depend
only on the plan), so the result is unchanged. An error of the build itself (disk full, an
unreachable source) stops the build, resumable as any other.

OUTPUT must be storage every node reaches (a bucket, or a shared filesystem), and shardkit must
be installed on every node.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .build import BuildJob, BuildSummary, ShardExecutor, decode_jobs, staging_folder
from .buckets import BucketTable
from .config import BuildConfig
from .encoders import load_encoders
from .errors import ShardkitError
from .images import DecodeJob, DecodeResult, run_decode_job
from .outputlock import actor_lock_name, lock_output, release_launch
from .plan import ShardPlan
from .planfile import Batching
from .report import progress_bar
from .storage import Storage, storage_options_for

# Shards handed to one actor at a time: one being written, one waiting, so an actor never idles
# while the driver hands out the next.
_SHARDS_PER_ACTOR = 2
NAMESPACE = "shardkit"


@dataclass
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray started for the build
    actors: int | None = None  # None: one per GPU share, or half the CPUs on a CPU cluster
    gpus_per_actor: float = 1.0


def _ray():
    try:
        import ray
    except ImportError:
        raise ShardkitError("--engine ray needs Ray: pip install 'shardkit[ray]'") from None
    return ray


def actor_prefix(output: str | Path) -> str:
    """Encoder actors are named ``{prefix}{i}`` in the ``shardkit`` namespace (one build per OUTPUT)."""
    return f"shardkit-encoder-{hashlib.sha256(str(output).encode()).hexdigest()[:8]}-"


def decode_chunk(jobs: list[DecodeJob]) -> list[DecodeResult]:
    """A Ray task: decode and fit a run of a shard's images (run_decode_job never raises for a bad image)."""
    return [run_decode_job(job) for job in jobs]


class ShardActor:
    """One encoder actor: the encoders loaded once, then whole shards written on request."""

    def __init__(self, config_json: dict, output: str, storage_options: dict | None, batching: dict,
                 decode_window: int, index: int, launch: str):
        import ray

        self.config = BuildConfig(**config_json)
        self.storage = Storage.for_url(output, storage_options_for(output, self.config.endpoint_url, storage_options))
        # This actor's lock, of the driver's launch; a restarted actor takes over its earlier run's.
        # The driver deletes it once it stopped the actors.
        self.lock = lock_output(self.storage, actor_lock_name(index), launch, f"Ray actor {index}")
        self.encoders = load_encoders(self.config)  # Ray has set CUDA_VISIBLE_DEVICES to this actor's GPU
        self.batching = Batching(**batching)
        self.lanczos = BucketTable(self.config.resolution).uses_lanczos
        self.decode_window = decode_window
        self._decode = ray.remote(num_cpus=1)(decode_chunk)

    def identities(self) -> dict:
        """The encoders as the manifest records them (their compute dtype is the actor's, not the driver's)."""
        return self.encoders.identities()

    def write(self, shard: ShardPlan) -> tuple[int, int]:
        """Write one shard of the plan (and its done record); returns its records and the samples written."""
        with staging_folder(self.storage, self.config) as staging:
            executor = ShardExecutor(self.config, self.encoders, self.storage, staging, self.batching)
            executor.execute(self._decoded(shard), progress=lambda n: None)
        return len(shard.records), executor.samples_written

    def _decoded(self, shard: ShardPlan) -> Iterator:
        """The shard's decoded records in order, decoded in Ray tasks a window of chunks ahead."""
        jobs = list(decode_jobs([shard], self.config, self.lanczos))
        size = self.batching.vae_batch
        chunks = deque()
        for start in range(0, len(jobs), size):
            chunk = jobs[start:start + size]
            chunks.append((chunk, self._decode.remote([job for _, job in chunk])))
            if len(chunks) >= self.decode_window:
                yield from self._results(*chunks.popleft())
        while chunks:
            yield from self._results(*chunks.popleft())

    @staticmethod
    def _results(chunk, ref) -> Iterator:
        import ray

        for (tag, _), result in zip(chunk, ray.get(ref)):
            yield tag, result


def build_on_ray(source: str, output: str | Path, config: BuildConfig, options: RayOptions, overwrite: bool = False,
                 storage_options: dict | None = None, progress: bool = False) -> BuildSummary:
    """Build SOURCE into OUTPUT on a Ray cluster; resumes as a local build does, with the same bytes."""
    ray = _ray()
    start = time.perf_counter()
    # The driver plans and writes manifests: it needs the tokenizer and the encoders' identities,
    # on the CPU, never a GPU the actors need.
    with BuildJob(str(source), output, config, overwrite, storage_options=storage_options, device="cpu") as job:
        return _drive(ray, job, options, storage_options, progress, start)


def _drive(ray, job: BuildJob, options: RayOptions, storage_options: dict | None, progress: bool,
           start: float) -> BuildSummary:
    """Plan (holding the driver's lock), start the actors, hand them the shards, stop them."""
    plan = job.prepare_plan()
    ledger = job.ledger()
    positions = job.pending(ledger)
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    actors = []
    written = (0, 0)
    try:
        actors = _start_actors(ray, job, options, storage_options)
        job.header.encoders = ray.get(actors[0].identities.remote())
        ledger.publish()
        total = sum(len(plan.shards[p].records) for p in positions)
        with progress_bar(progress, total) as advance:
            written = _hand_out(ray, actors, job.shards_of(positions), ledger, advance)
    except Exception as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ShardkitError):
            raise ShardkitError(str(cause)) from None
        raise
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()
        release_launch(job.storage, job.lock.launch, keep=job.lock.name)  # the actors' locks
    manifest = ledger.publish()
    return BuildSummary.of(job.output, manifest, shards_reused=job.shards_reused, shards_written=written[0],
                           written_this_run=written[1], kept_samples=job.kept_samples,
                           elapsed_s=time.perf_counter() - start)


def _start_actors(ray, job: BuildJob, options: RayOptions, storage_options: dict | None) -> list:
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    on_gpus = gpus > 0 and job.config.device != "cpu"
    if job.config.device == "cuda" and not on_gpus:
        raise ShardkitError("--device cuda was asked for but the Ray cluster has no GPU; use --device cpu or auto")
    count = options.actors or (max(1, int(gpus / options.gpus_per_actor)) if on_gpus else max(1, cpus // 2))
    # Decode tasks in flight per actor: enough to keep the cluster's CPUs busy, two at least.
    decode_window = max(2, -(-cpus // count))
    actor_class = ray.remote(ShardActor)
    prefix = actor_prefix(job.storage.url)
    config_json = job.config.to_json()
    return [actor_class.options(name=f"{prefix}{i}", namespace=NAMESPACE, num_cpus=1,
                                num_gpus=options.gpus_per_actor if on_gpus else 0,
                                max_restarts=-1, max_task_retries=-1).remote(
                config_json, job.storage.url, storage_options, job.plan.batching.as_json(), decode_window, i,
                job.lock.launch)
            for i in range(count)]


def _hand_out(ray, actors: list, shards: Iterator[ShardPlan], ledger, advance) -> tuple[int, int]:
    """Give shards to the least busy actor, at most ``_SHARDS_PER_ACTOR`` each; the manifest after each one.

    Returns the shards and the samples written."""
    in_flight: dict[Any, int] = {}  # task -> actor index
    load = [0] * len(actors)
    shards_written = samples_written = 0

    def collect() -> None:
        nonlocal shards_written, samples_written
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            load[in_flight.pop(ref)] -= 1
            records, samples = ray.get(ref)
            advance(records)
            shards_written += 1
            samples_written += samples
            ledger.publish()

    for shard in shards:
        while min(load) >= _SHARDS_PER_ACTOR:
            collect()
        index = load.index(min(load))
        in_flight[actors[index].write.remote(shard)] = index
        load[index] += 1
    while in_flight:
        collect()
    return shards_written, samples_written
