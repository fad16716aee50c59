"""Builds across processes, GPUs and machines: who am I, which shards are mine, the finish.

A launch of N processes (torchrun, or srun under Slurm) executes the one plan of the build
(planfile.py): rank r writes the shards at plan positions p with ``p % N == r`` that are not
done yet. Names carry no rank and a shard's bytes depend only on its plan entry, so a launch
of N may be resumed by a launch of M, or by one process, and the result is the same.

When the launcher set up a rendezvous (MASTER_ADDR / MASTER_PORT, as torchrun does), the ranks
join a gloo process group: rank 0 plans while the others wait, and at the end every rank waits
for the others, then rank 0 writes the complete manifest. Without one (Slurm arrays), each
process plans alone if there is no plan yet (the same plan), and whichever finishes last writes
the complete manifest; ``shardkit merge OUTPUT`` writes it by hand.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Iterator, Mapping

from .errors import ShardkitError

if TYPE_CHECKING:
    from .ledger import Ledger
    from .manifest import Manifest

log = logging.getLogger(__name__)

# How long a rank that is done waits for the slowest one at the finish (ranks may differ by hours).
_RANK_TIMEOUT = timedelta(hours=24)


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

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


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
            log.info("%s: no MASTER_ADDR/MASTER_PORT, so no collective finish: the last process to finish writes "
                     "the complete manifest", ranks.describe())
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
        if not flag.item():
            self.finishing = True  # a rank that failed has voted and left: nobody votes again
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


def finish_ranks(ledger: "Ledger", ranks: RankInfo, group: RankGroup | None) -> "Manifest | bool | None":
    """After this rank's shards are done: wait for every rank, then rank 0 writes the complete manifest.

    Returns the manifest on rank 0, True on the other ranks once rank 0 has written it, None
    when there is no rendezvous (the last process to finish has written it, or `shardkit merge`
    will).
    """
    if group is None:
        return None
    group.finishing = True
    if not group.vote(True):
        raise ShardkitError(f"{ranks.describe()} is done, but another rank failed: fix its error and rerun (with any "
                            f"number of processes) to resume; completed shards are kept")
    manifest = ledger.publish() if ranks.rank == 0 else None
    if not group.vote(manifest is None or manifest.status == "complete"):
        raise ShardkitError(f"shards of the plan are missing after every rank finished; run `shardkit merge "
                            f"{ledger.storage.url}` to see which")
    return manifest if ranks.rank == 0 else True
