"""Epoch planning: which batches and shard pieces one reader handles in one epoch. Pure
functions of the shard list, the seed, the epoch and the reader's place; nothing is read.

The rule every rank follows, computed from the manifest alone:

1. The shards are put in the epoch's order (shuffled with ``seed`` and the epoch, or as listed).
2. Each bucket's samples, taken in that shard order, form the bucket's stream; the stream is cut
   into batches of ``batch_size`` (its tail is a partial batch).
3. The batches are listed in the order their first sample appears in the epoch's stream, and
   the list is cut into ``world_size`` equal contiguous blocks of
   ``floor(batches / world_size)`` batches; the few batches past the last block wait for a
   later epoch (with shuffling they are different ones each epoch). Partial batches count only
   when kept (``drop_last=False``; the default keeps them in single-process training only).
4. A rank's block is cut into one contiguous part per DataLoader worker (sizes differ by at
   most one), so the rank's total is exact whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class ShardInfo:
    url: str
    bucket: str  # "" while unknown (a shard list being scanned)
    samples: int
    sha256: str | None = None
    size: int | None = None
    bucket_hw: tuple[int, int] | None = None  # from the manifest: bounds the shard's member sizes


@dataclass(frozen=True)
class PlannedBatch:
    bucket: str
    start: int  # first position in the bucket's stream for this epoch
    size: int  # batch_size, or less for a bucket's partial tail


@dataclass(frozen=True)
class ShardPiece:
    shard: ShardInfo
    start: int  # first sample of the shard to read
    stop: int  # one past the last


@dataclass
class ReaderPlan:
    """What one reader (a rank's DataLoader worker) reads and yields in one epoch."""

    pieces: list[ShardPiece]
    batches: list[PlannedBatch]

    def full_batches(self, batch_size: int) -> Counter:
        return Counter(b.bucket for b in self.batches if b.size == batch_size)

    def partial_samples(self, batch_size: int) -> dict[str, int]:
        return {b.bucket: b.size for b in self.batches if b.size < batch_size}


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from any parts: the same parts give the same seed in every process."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def split_evenly(count: int, parts: int, index: int) -> tuple[int, int]:
    """(start, length) of part ``index`` when ``count`` items are cut into ``parts`` contiguous
    parts whose lengths differ by at most one (the first ones are longer)."""
    base, extra = divmod(count, parts)
    return index * base + min(index, extra), base + (1 if index < extra else 0)


def epoch_shard_order(shards: Sequence[ShardInfo], epoch: int, seed: int, shuffle: bool) -> list[ShardInfo]:
    ordered = list(shards)
    if shuffle:
        random.Random(derive_seed(seed, epoch, "shards")).shuffle(ordered)
    return ordered


def epoch_batches(ordered: Sequence[ShardInfo], batch_size: int, keep_partial: bool) -> list[PlannedBatch]:
    """Every batch of the epoch, in the order its first sample comes in the epoch's stream."""
    totals: Counter = Counter()
    for shard in ordered:
        totals[shard.bucket] += shard.samples
    offsets: Counter = Counter()
    batches: list[PlannedBatch] = []
    for shard in ordered:
        bucket, offset = shard.bucket, offsets[shard.bucket]
        total = totals[bucket]
        full_end = total - total % batch_size
        start = -(-offset // batch_size) * batch_size  # first batch that starts in this shard
        while start < offset + shard.samples:
            if start < full_end:
                batches.append(PlannedBatch(bucket, start, batch_size))
            elif keep_partial:
                batches.append(PlannedBatch(bucket, start, total - start))
            start += batch_size
        offsets[bucket] += shard.samples
    return batches


def count_batches(shards: Sequence[ShardInfo], batch_size: int, keep_partial: bool) -> int:
    totals: Counter = Counter()
    for shard in shards:
        totals[shard.bucket] += shard.samples
    return sum(n // batch_size + (1 if keep_partial and n % batch_size else 0) for n in totals.values())


def batches_per_rank(shards: Sequence[ShardInfo], batch_size: int, world_size: int, keep_partial: bool) -> int:
    """The rule: ``floor(batches in the epoch / world_size)`` for every rank."""
    return count_batches(shards, batch_size, keep_partial) // world_size


def plan_reader(shards: Sequence[ShardInfo], *, batch_size: int, epoch: int, seed: int, shuffle: bool,
                rank: int, world_size: int, worker: int, num_workers: int, keep_partial: bool) -> ReaderPlan:
    """The batches and shard pieces of one reader for one epoch (see the module docstring)."""
    ordered = epoch_shard_order(shards, epoch, seed, shuffle)
    batches = epoch_batches(ordered, batch_size, keep_partial)
    per_rank = len(batches) // world_size
    rank_batches = batches[rank * per_rank:(rank + 1) * per_rank]
    first, count = split_evenly(len(rank_batches), num_workers, worker)
    mine = rank_batches[first:first + count]

    # A contiguous run of the batch list is, per bucket, a contiguous range of the bucket's stream.
    ranges: dict[str, list[int]] = {}
    for batch in mine:
        low_high = ranges.setdefault(batch.bucket, [batch.start, batch.start + batch.size])
        low_high[0] = min(low_high[0], batch.start)
        low_high[1] = max(low_high[1], batch.start + batch.size)
    pieces: list[ShardPiece] = []
    offsets: Counter = Counter()
    for shard in ordered:
        offset = offsets[shard.bucket]
        offsets[shard.bucket] += shard.samples
        if shard.bucket not in ranges:
            continue
        low, high = ranges[shard.bucket]
        start, stop = max(low, offset), min(high, offset + shard.samples)
        if start < stop:
            pieces.append(ShardPiece(shard, start - offset, stop - offset))
    return ReaderPlan(pieces=pieces, batches=mine)
