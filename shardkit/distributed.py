"""Builds across processes, GPUs and machines: who am I, which records are mine, joining the parts.

A launch of N processes (torchrun, or srun under Slurm) splits the records by index: rank r
takes the records with ``index % N == r``, before planning, so each rank's plans are as
deterministic as a one-process build's. Each rank writes its own shards (their names carry
the rank) and its own manifest part, ``manifest.rankRRR.json`` + ``failures.rankRRR.jsonl``,
recording N. The final ``manifest.json`` covers every rank's shards:

- collective finish: when the launcher set up a rendezvous (MASTER_ADDR / MASTER_PORT, as
  torchrun does), the ranks join a gloo process group; after the last rank is done, rank 0
  merges the parts;
- ``shardkit merge OUTPUT`` merges the parts after the fact (Slurm arrays, launches without a
  rendezvous, or after rerunning a rank that died).

A rerun with the same N resumes each rank from its part; a different N is refused, because
the split (and so every plan) depends on N.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping

from .config import BuildConfig
from .errors import ShardkitError
from .manifest import (FAILURES_NAME, MANIFEST_NAME, Manifest, read_manifest_at, write_failures,
                       write_manifest)
from .sources import Record
from .storage import Storage

log = logging.getLogger(__name__)

PART_PATTERN = re.compile(r"^manifest\.rank(\d{3,})\.json$")
FAILURES_PART_PATTERN = re.compile(r"^failures\.rank(\d{3,})\.jsonl$")
_RANK_TAG = re.compile(r"-r(\d{3,})-\d+\.tar$")
# How long a rank that is done waits for the slowest one at the finish (ranks may differ by hours).
_RANK_TIMEOUT = timedelta(hours=24)


def part_name(rank: int) -> str:
    return f"manifest.rank{rank:03d}.json"


def failures_part_name(rank: int) -> str:
    return f"failures.rank{rank:03d}.jsonl"


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the launch."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # "torchrun", "slurm", "env" or "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def manifest_name(self) -> str:
        return part_name(self.rank) if self.distributed else MANIFEST_NAME

    @property
    def failures_name(self) -> str:
        return failures_part_name(self.rank) if self.distributed else FAILURES_NAME

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    def shard_name(self, plan_name: str) -> str:
        """``shards/256x256-00003.tar`` -> ``shards/256x256-r001-00003.tar`` when the launch has several ranks."""
        if not self.distributed:
            return plan_name
        head, index = plan_name.rsplit("-", 1)
        return f"{head}-r{self.rank:03d}-{index}"

    def cleans(self, name: str) -> bool:
        """Whether this rank deletes a file of OUTPUT (shard, temp shard or manifest part) when starting over.

        Each rank deletes its own; rank 0 also deletes what belongs to no rank of this launch.
        Ranks never touch each other's files, so they can start over at the same time.
        """
        match = _RANK_TAG.search(name) or PART_PATTERN.match(name) or FAILURES_PART_PATTERN.match(name)
        owner = int(match.group(1)) if match else None
        if owner is not None and owner < self.world_size:
            return owner == self.rank
        return self.rank == 0


def discover_ranks(env: Mapping[str, str] | None = None) -> RankInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK (torchrun, or set by hand), else SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID."""
    env = os.environ if env is None else env

    def number(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise ShardkitError(f"{name}={env[name]!r} is not a whole number") from None

    if "RANK" in env or "WORLD_SIZE" in env:
        if not ("RANK" in env and "WORLD_SIZE" in env):
            raise ShardkitError("set both RANK and WORLD_SIZE (torchrun sets them), or neither for a one-process build")
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
        rank, world_size = number("RANK"), number("WORLD_SIZE")
        local_rank = number("LOCAL_RANK") if "LOCAL_RANK" in env else 0
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world_size = number("SLURM_PROCID"), number("SLURM_NTASKS")
        local_rank = number("SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    else:
        return RankInfo()
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ShardkitError(f"rank {rank} of world size {world_size} (local rank {local_rank}) is not a process of the "
                            f"launch; RANK must be 0..WORLD_SIZE-1")
    return RankInfo(rank=rank, world_size=world_size, local_rank=local_rank, launcher=launcher)


def select_cuda_device(device: str, ranks: RankInfo) -> str | None:
    """Pin this rank to ``cuda:LOCAL_RANK`` (the encoders then load on the current device).

    Where each process sees a single GPU (e.g. Slurm's --gpus-per-task=1), that GPU is used.
    """
    if not ranks.distributed or device not in ("auto", "cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    index = ranks.local_rank if ranks.local_rank < count else (0 if count == 1 else None)
    if index is None:
        raise ShardkitError(f"local rank {ranks.local_rank} has no GPU of its own: this node shows {count}; "
                            f"launch at most {count} processes per node")
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def split_records(records: Iterator[Record], ranks: RankInfo) -> Iterator[Record]:
    """This rank's records: those with ``index % world_size == rank``.

    Every rank still looks at every record's path (no file is opened), so a path repeated in
    the source is skipped as ``duplicate_path`` on whichever rank holds the later occurrence,
    exactly as in a one-process build: the record carries the fact (``repeats_earlier_path``),
    so it holds however far ahead of the planner this stream runs.
    """
    if not ranks.distributed:
        yield from records
        return
    seen: set[str] = set()
    for record in records:
        repeated = False
        if not record.escapes_root:
            path = record.normalized_path
            repeated = path in seen
            seen.add(path)
        if record.index % ranks.world_size != ranks.rank:
            continue
        record.repeats_earlier_path = repeated
        yield record


def _part_ranks(names: list[str]) -> dict[int, str]:
    return {int(m.group(1)): name for name in names if (m := PART_PATTERN.match(name))}


def _recorded_world_size(manifest: Manifest) -> int:
    return int((manifest.distributed or {}).get("world_size", 1))


def check_world_size(storage: Storage, ranks: RankInfo) -> None:
    """Refuse to resume OUTPUT with a different number of ranks than it was started with."""
    names = storage.listdir("")
    parts = _part_ranks(names)
    recorded = None
    if parts:
        recorded = _recorded_world_size(read_manifest_at(storage, parts[min(parts)]))
        if recorded == ranks.world_size and max(parts) >= recorded:  # a part left by a larger launch
            recorded = _recorded_world_size(read_manifest_at(storage, parts[max(parts)]))
    elif MANIFEST_NAME in names:
        recorded = _recorded_world_size(read_manifest_at(storage, MANIFEST_NAME))
    if recorded is not None and recorded != ranks.world_size:
        launch = "one process" if recorded == 1 else f"{recorded} processes (ranks)"
        now = "one process" if ranks.world_size == 1 else f"{ranks.world_size}"
        raise ShardkitError(f"OUTPUT {storage.url} was built by {launch} and this launch has {now}: which records "
                            f"go to which shard depends on the number of ranks, so resume with WORLD_SIZE={recorded} "
                            f"(torchrun --nproc-per-node x --nnodes, or srun --ntasks), or pass --overwrite to start over")


# ---- the final manifest ----------------------------------------------------------------

@dataclass
class MergeSummary:
    world_size: int
    shards: int
    samples: int
    records_read: int
    skipped: int
    bytes: int

    def describe(self, url: str) -> str:
        return (f"merged {self.world_size} rank parts into {url}/{MANIFEST_NAME}: {self.samples} samples in "
                f"{self.shards} shards, {self.skipped} skipped of {self.records_read} records read")


def merge_parts(storage: Storage) -> MergeSummary:
    """Join every rank's manifest part into ``manifest.json`` (+ ``failures.jsonl``) once all are complete."""
    parts = _part_ranks(storage.listdir(""))
    if not parts:
        raise ShardkitError(f"no rank manifests (manifest.rankNNN.json) in {storage.url}: merge joins the parts of a "
                            f"build launched on several processes")
    first = read_manifest_at(storage, parts[min(parts)])
    world_size = _recorded_world_size(first)
    missing = [r for r in range(world_size) if r not in parts]
    if missing:
        raise ShardkitError(f"rank(s) {', '.join(map(str, missing))} of {world_size} left no manifest part in "
                            f"{storage.url}: they never started or died early; rerun the build with WORLD_SIZE="
                            f"{world_size} to finish them, then merge")
    stray = [r for r in parts if r >= world_size]
    if stray:
        raise ShardkitError(f"{storage.url} holds manifest parts of ranks {stray}, beyond the world size {world_size} "
                            f"recorded in the parts: a launch with another number of ranks wrote there; rebuild with "
                            f"--overwrite")
    manifests = [first if r == min(parts) else read_manifest_at(storage, parts[r]) for r in range(world_size)]
    reference = {k: v for k, v in first.config.items() if k not in BuildConfig.RUNTIME_FIELDS}
    for rank, part in enumerate(manifests):
        if _recorded_world_size(part) != world_size or (part.distributed or {}).get("rank") != rank:
            raise ShardkitError(f"{parts[rank]} records {part.distributed}, not rank {rank} of {world_size}; "
                                f"rebuild with --overwrite")
        if part.status != "complete":
            raise ShardkitError(f"rank {rank} of {world_size} has not finished ({parts[rank]} is {part.status}): "
                                f"rerun the build with WORLD_SIZE={world_size} to resume it, then merge")
        if {k: v for k, v in part.config.items() if k not in BuildConfig.RUNTIME_FIELDS} != reference or \
                _encoder_content(part) != _encoder_content(first):
            raise ShardkitError(f"rank {rank} was built with other options or encoders than rank {min(parts)}; "
                                f"rebuild with --overwrite")
    shards = [entry for part in manifests for entry in part.shards]
    sizes = storage.list_sizes("shards")
    for rank, part in enumerate(manifests):
        for entry in part.shards:
            if sizes.get(entry.path.rsplit("/", 1)[-1]) != entry.bytes:
                raise ShardkitError(f"{entry.path} listed by rank {rank} is missing or has the wrong size: rerun the "
                                    f"build with WORLD_SIZE={world_size} to rebuild it, then merge")
    merged = Manifest(config=first.config, encoders=first.encoders, resolution=first.resolution, buckets=first.buckets,
                      sample_format=first.sample_format,
                      shards=shards, empty_plans=[p for part in manifests for p in part.empty_plans],
                      status="complete", records_read=sum(p.records_read for p in manifests),
                      plan_skipped=sorted((s for p in manifests for s in p.plan_skipped),
                                          key=lambda s: (s["index"], s["reason"])),
                      distributed={"world_size": world_size, "parts": [parts[r] for r in range(world_size)]})
    # failures first, the manifest last: manifest.json is what says the set is complete.
    write_failures(storage, merged)
    write_manifest(storage, merged)
    data = merged.as_json()
    return MergeSummary(world_size=world_size, shards=data["totals"]["shards"], samples=data["totals"]["samples"],
                        records_read=data["records"]["read"], skipped=data["records"]["skipped"],
                        bytes=data["totals"]["bytes"])


def _encoder_content(manifest: Manifest) -> dict:
    return {name: {k: v for k, v in identity.items() if k != "compute_dtype"}
            for name, identity in manifest.encoders.items()}


# ---- the collective finish ---------------------------------------------------------------

class RankGroup:
    """The ranks of one launch joined in a gloo process group: votes and a barrier, no data.

    gloo runs on CPU, so the finish needs no GPU memory and works the same on CPU-only nodes.
    """

    def __init__(self, ranks: RankInfo, group, owns_default_group: bool):
        self.ranks = ranks
        self._group = group
        self._owns_default_group = owns_default_group
        self.finishing = False  # this rank has reached the finish (it votes there, not on failure)

    @classmethod
    def connect(cls, ranks: RankInfo, env: Mapping[str, str] | None = None) -> "RankGroup | None":
        """Join the launch's rendezvous (MASTER_ADDR / MASTER_PORT); None when there is none to join."""
        env = os.environ if env is None else env
        if not ranks.distributed:
            return None
        if not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
            log.info("%s: no MASTER_ADDR/MASTER_PORT, so no collective finish; run `shardkit merge` when every rank "
                     "is done", ranks.describe())
            return None
        import torch.distributed as dist

        if not dist.is_available():
            return None
        try:
            if dist.is_initialized():
                return cls(ranks, dist.new_group(backend="gloo", timeout=_RANK_TIMEOUT), owns_default_group=False)
            dist.init_process_group(backend="gloo", init_method="env://", rank=ranks.rank,
                                    world_size=ranks.world_size, timeout=_RANK_TIMEOUT)
        except Exception as exc:
            raise ShardkitError(f"{ranks.describe()} cannot join the other ranks at {env['MASTER_ADDR']}:"
                                f"{env['MASTER_PORT']} ({type(exc).__name__}: {exc}); unset MASTER_ADDR to build "
                                f"without the collective finish and run `shardkit merge OUTPUT` afterwards") from None
        return cls(ranks, None, owns_default_group=True)

    def vote(self, ok: bool) -> bool:
        """True when every rank says ok; waits for all of them."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._group)
        return bool(flag.item())

    def close(self) -> None:
        import torch.distributed as dist

        if self._owns_default_group and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def joined_ranks(ranks: RankInfo) -> Iterator[RankGroup | None]:
    """The launch's rank group for the finish (None for one process or without a rendezvous).

    A rank that fails votes "failed" at once, so the others still finish their own shards
    (kept for the resume) and then stop instead of merging an incomplete set.
    """
    group = RankGroup.connect(ranks)
    try:
        yield group
    except BaseException as exc:
        if group is not None and not group.finishing:
            group.finishing = True
            log.error("%s failed (%s: %s); the other ranks finish their own shards, then all stop",
                      ranks.describe(), type(exc).__name__, exc)
            try:
                group.vote(False)
            except Exception as vote_error:  # the others may be gone already; the original error matters
                log.debug("failure vote not delivered: %s", vote_error)
        raise
    finally:
        if group is not None:
            group.close()


def finish_ranks(storage: Storage, ranks: RankInfo, group: RankGroup | None) -> MergeSummary | bool | None:
    """After this rank's part is complete: wait for every rank, then rank 0 writes the final manifest.

    Returns the merge on rank 0, True on the other ranks once rank 0 has merged, None when
    there is no collective (the parts stay for ``shardkit merge``).
    """
    if group is None:
        return None
    group.finishing = True
    if not group.vote(True):
        raise ShardkitError(f"{ranks.describe()} is complete, but another rank failed: fix its error and rerun the "
                            f"same launch to resume (completed shards are kept); the final manifest.json is written "
                            f"once every rank is done")
    merged, error = None, None
    if ranks.rank == 0:
        try:
            merged = merge_parts(storage)
        except ShardkitError as exc:
            error = exc
    if not group.vote(error is None):
        if error is not None:
            raise error
        raise ShardkitError(f"rank 0 could not merge the rank parts; run `shardkit merge {storage.url}` to see why")
    return merged if ranks.rank == 0 else True
