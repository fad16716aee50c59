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

Several builds mixed with weights (``mixed_epoch_batches``): each build makes its own batch list
as above (its shard order seeded per build), build ``b`` contributes ``n_b`` batches from the
front of its list, in proportion to its weight, and the epoch ends where the build needing the
most passes has made one: ``T = min_b floor(len_b * W / w_b)``, ``n_b = floor(T * w_b / W)``.
The builds' batches are interleaved in a seeded order (a fixed stride order without shuffling),
and steps 3-4 cut the interleaved list. A batch never mixes builds or buckets.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter, defaultdict
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
    source: int = 0  # which of the reader's builds holds it


@dataclass(frozen=True)
class PlannedBatch:
    bucket: str
    start: int  # first position in the bucket's stream for this epoch
    size: int  # batch_size, or less for a bucket's partial tail
    source: int = 0  # the build it comes from

    @property
    def group(self) -> tuple[int, str]:
        """What its samples share: the build and the bucket."""
        return self.source, self.bucket


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
        return Counter(b.group for b in self.batches if b.size == batch_size)

    def partial_samples(self, batch_size: int) -> dict[tuple[int, str], int]:
        return {b.group: b.size for b in self.batches if b.size < batch_size}


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from any parts: the same parts give the same seed in every process."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def split_evenly(count: int, parts: int, index: int) -> tuple[int, int]:
    """(start, length) of part ``index`` when ``count`` items are cut into ``parts`` contiguous
    parts whose lengths differ by at most one (the first ones are longer)."""
    base, extra = divmod(count, parts)
    return index * base + min(index, extra), base + (1 if index < extra else 0)


def build_seed(seed: int, source: int) -> int:
    """The seed of one build's shard order: the reader's own for the first (or only) build."""
    return seed if source == 0 else derive_seed(seed, "build", source)


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
                batches.append(PlannedBatch(bucket, start, batch_size, shard.source))
            elif keep_partial:
                batches.append(PlannedBatch(bucket, start, total - start, shard.source))
            start += batch_size
        offsets[bucket] += shard.samples
    return batches


def count_batches(shards: Sequence[ShardInfo], batch_size: int, keep_partial: bool) -> int:
    totals: Counter = Counter()
    for shard in shards:
        totals[shard.bucket] += shard.samples
    return sum(n // batch_size + (1 if keep_partial and n % batch_size else 0) for n in totals.values())


def mix_counts(lengths: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Batches each build gives to one epoch (see the module docstring)."""
    total_weight = sum(weights)
    passes = [length * total_weight / weight for length, weight in zip(lengths, weights) if weight > 0]
    epoch_length = math.floor(min(passes)) if passes else 0
    return [math.floor(epoch_length * weight / total_weight + 1e-9) if weight > 0 else 0 for weight in weights]


def _interleave(counts: Sequence[int], rng: random.Random | None) -> list[int]:
    """Build labels, ``counts[b]`` of each: seeded order, or evenly spread (stride order) without rng."""
    if rng is not None:
        labels = [source for source, count in enumerate(counts) for _ in range(count)]
        rng.shuffle(labels)
        return labels
    slots = sorted(((k + 0.5) / count, source) for source, count in enumerate(counts) for k in range(count))
    return [source for _, source in slots]


def mixed_epoch_batches(builds: Sequence[Sequence[ShardInfo]], weights: Sequence[float] | None, *, batch_size: int,
                        epoch: int, seed: int, shuffle: bool, keep_partial: bool) -> tuple[list[list[ShardInfo]], list[PlannedBatch]]:
    """Every build's shard order and the epoch's interleaved batch list (one build: its own list)."""
    orders = [epoch_shard_order(shards, epoch, build_seed(seed, source), shuffle) for source, shards in enumerate(builds)]
    lists = [epoch_batches(order, batch_size, keep_partial) for order in orders]
    if len(lists) == 1:
        return orders, lists[0]
    counts = mix_counts([len(batches) for batches in lists], weights)
    labels = _interleave(counts, random.Random(derive_seed(seed, epoch, "mix")) if shuffle else None)
    taken = [0] * len(lists)
    mixed = []
    for source in labels:
        mixed.append(lists[source][taken[source]])
        taken[source] += 1
    return orders, mixed


def epoch_batch_count(builds: Sequence[Sequence[ShardInfo]], weights: Sequence[float] | None, batch_size: int,
                      keep_partial: bool) -> int:
    lengths = [count_batches(shards, batch_size, keep_partial) for shards in builds]
    return lengths[0] if len(lengths) == 1 else sum(mix_counts(lengths, weights))


def batches_per_rank(shards: Sequence[ShardInfo], batch_size: int, world_size: int, keep_partial: bool) -> int:
    """The rule: ``floor(batches in the epoch / world_size)`` for every rank."""
    return count_batches(shards, batch_size, keep_partial) // world_size


def plan_reader(shards: Sequence[ShardInfo], **place: Any) -> ReaderPlan:
    """The batches and shard pieces of one reader of one build for one epoch."""
    return plan_builds([shards], None, **place)


def plan_builds(builds: Sequence[Sequence[ShardInfo]], weights: Sequence[float] | None, *, batch_size: int, epoch: int,
                seed: int, shuffle: bool, rank: int, world_size: int, worker: int, num_workers: int,
                keep_partial: bool, consumed: frozenset[tuple[str, int]] | None = None) -> ReaderPlan:
    """The batches and shard pieces of one reader (a rank's DataLoader worker) for one epoch of
    one build or of several mixed with ``weights`` (see the module docstring).

    ``consumed``: (shard url, sample index) already trained on this epoch, when it resumes under
    another layout: the epoch's other samples are batched again and cut as above."""
    orders, batches = mixed_epoch_batches(builds, weights, batch_size=batch_size, epoch=epoch, seed=seed,
                                          shuffle=shuffle, keep_partial=keep_partial)
    if consumed is not None:
        return _plan_rest(orders, batches, consumed, batch_size=batch_size, rank=rank, world_size=world_size,
                          worker=worker, num_workers=num_workers)
    per_rank = len(batches) // world_size
    rank_batches = batches[rank * per_rank:(rank + 1) * per_rank]
    first, count = split_evenly(len(rank_batches), num_workers, worker)
    mine = rank_batches[first:first + count]

    # Per build and bucket, the stream positions this reader's batches cover (one contiguous
    # range unless the epoch resumed under another layout).
    ranges: dict[tuple[int, str], list[tuple[int, int]]] = defaultdict(list)
    for batch in sorted(mine, key=lambda b: (b.group, b.start)):
        spans = ranges[batch.group]
        if spans and spans[-1][1] == batch.start:
            spans[-1] = (spans[-1][0], batch.start + batch.size)
        else:
            spans.append((batch.start, batch.start + batch.size))
    pieces: list[ShardPiece] = []
    for ordered in orders:
        offsets: Counter = Counter()
        for shard in ordered:
            offset = offsets[shard.bucket]
            offsets[shard.bucket] += shard.samples
            for low, high in ranges.get((shard.source, shard.bucket), ()):
                start, stop = max(low, offset), min(high, offset + shard.samples)
                if start < stop:
                    pieces.append(ShardPiece(shard, start - offset, stop - offset))
    return ReaderPlan(pieces=pieces, batches=mine)


def _plan_rest(orders: Sequence[Sequence[ShardInfo]], batches: Sequence[PlannedBatch], consumed: frozenset[tuple[str, int]],
               *, batch_size: int, rank: int, world_size: int, worker: int, num_workers: int) -> ReaderPlan:
    """The epoch's samples not yet consumed, batched again per build and bucket (in the order of
    the epoch's batches), then cut into equal rank blocks and worker parts."""
    samples: dict[tuple[int, str], list[tuple[ShardInfo, int]]] = defaultdict(list)  # group -> stream order
    for ordered in orders:
        for shard in ordered:
            samples[shard.source, shard.bucket].extend((shard, index) for index in range(shard.samples))
    rest: dict[tuple[int, str], list[tuple[int, ShardInfo, int]]] = defaultdict(list)  # (epoch batch, shard, index)
    for position, batch in enumerate(batches):
        for shard, index in samples[batch.group][batch.start:batch.start + batch.size]:
            if (shard.url, index) not in consumed:
                rest[batch.group].append((position, shard, index))
    regrouped = []
    for group, items in rest.items():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            regrouped.append((chunk[0][0], start, group, chunk))
    regrouped.sort(key=lambda entry: (entry[0], entry[1]))
    per_rank = len(regrouped) // world_size
    rank_part = regrouped[rank * per_rank:(rank + 1) * per_rank]
    first, count = split_evenly(len(rank_part), num_workers, worker)
    mine = rank_part[first:first + count]
    order = {shard.url: (o, n) for o, ordered in enumerate(orders) for n, shard in enumerate(ordered)}
    chosen = sorted(((shard, index) for *_, chunk in mine for _, shard, index in chunk),
                    key=lambda item: (order[item[0].url], item[1]))
    pieces: list[ShardPiece] = []
    for shard, index in chosen:
        if pieces and pieces[-1].shard == shard and pieces[-1].stop == index:
            pieces[-1] = ShardPiece(shard, pieces[-1].start, index + 1)
        else:
            pieces.append(ShardPiece(shard, index, index + 1))
    planned = [PlannedBatch(group[1], start, len(chunk), group[0]) for _, start, group, chunk in mine]
    return ReaderPlan(pieces=pieces, batches=planned)
