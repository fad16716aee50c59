"""The build plan, computed once and kept in ``OUTPUT/plan.json`` before any pixel is encoded.

The plan says which records go into which shard, in which order, and how a shard's encoder
batches and T5 batches are cut. It depends only on SOURCE and the config, so any worker (a
torchrun or Slurm rank, a Ray actor, a lone process, today or after a restart with another
number of workers) executes any of its shards and writes the same bytes.

The file is compact: per shard its bucket, its number within the bucket and the source indices
of its records; the records themselves are read again from SOURCE by whoever executes a shard.
A digest of every record of SOURCE (index, path, captions, width, height, and the source's own
metadata where it has more) ties the plan to its source, and a sha256 over the rest of the file
catches any edit: a resume refuses a plan that is damaged, edited, or made for another source or
config. Every choice of records (skips, filters, --dedup) is made here, once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .buckets import Bucket, BucketTable
from .errors import ShardkitError
from .plan import PlannedRecord, Planner, ShardPlan
from .sources import Record
from .storage import Storage

PLAN_NAME = "plan.json"
PLAN_FORMAT = "shardkit-plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class Batching:
    """How each shard is cut into encoder calls; recorded in the plan, so every worker cuts alike."""

    vae_batch: int  # decoded images per VAE call (a record that fails to decode leaves its place to the next)
    caption_window: int  # records whose captions are sorted and cut into T5 batches together
    t5_batch: int  # most captions per T5 call

    def as_json(self) -> dict[str, int]:
        return {"vae_batch": self.vae_batch, "caption_window": self.caption_window, "t5_batch": self.t5_batch}


@dataclass(frozen=True)
class PlannedShard:
    bucket: str  # bucket key, e.g. "0.57"
    index: int  # per bucket, in order of closing
    # Source indices in shard order, which is source order. An array of int64, not a tuple of
    # ints: a plan lists every record of SOURCE, 8 bytes each instead of 36.
    records: array

    def name(self, table: BucketTable) -> str:
        return ShardPlan(bucket=table[self.bucket], index=self.index).name


@dataclass
class BuildPlan:
    source: dict[str, Any]  # {"records": N, "sha256": digest of every record}; not where it lives
    config: dict[str, Any]  # the options that decide the bytes (BuildConfig.content_fields())
    encoders: dict[str, dict]  # VAE and T5 identities (without the runtime compute dtype)
    batching: Batching
    shards: list[PlannedShard]  # in plan order; a shard's position is its claim number
    skipped: list[dict]  # records skipped while planning (failures.jsonl lines)
    # The source's own metadata fields of the planned records, with their JSON types (the manifest's).
    source_fields: dict[str, list[str]] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "format_version": PLAN_VERSION, "source": self.source, "config": self.config,
                "encoders": self.encoders, "batching": self.batching.as_json(),
                "shards": [[s.bucket, s.index, list(s.records)] for s in self.shards], "skipped": self.skipped,
                "source_fields": self.source_fields}

    def to_bytes(self) -> bytes:
        body = _canonical(self.body())
        return b'{"sha256":"' + hashlib.sha256(body).hexdigest().encode() + b'","plan":' + body + b"}\n"

    @classmethod
    def from_bytes(cls, payload: bytes, where: str) -> "BuildPlan":
        """The plan in ``payload``; a damaged or edited file is refused in one line."""
        refuse = (f"{where} is damaged or was edited (its sha256 does not match its content); rebuild with "
                  f"--overwrite")
        try:
            outer = json.loads(payload.decode("utf-8"))
            body = outer["plan"]
            stored = outer["sha256"]
        except (UnicodeDecodeError, ValueError, TypeError, KeyError):
            raise ShardkitError(refuse) from None
        if not isinstance(body, dict) or hashlib.sha256(_canonical(body)).hexdigest() != stored:
            raise ShardkitError(refuse)
        if body.get("format") != PLAN_FORMAT or body.get("format_version") != PLAN_VERSION:
            raise ShardkitError(f"{where} is not a shardkit plan of version {PLAN_VERSION}; rebuild with --overwrite")
        try:
            return cls(source=body["source"], config=body["config"], encoders=body["encoders"],
                       batching=Batching(**body["batching"]),
                       shards=[PlannedShard(bucket, int(index), _source_indices(records))
                               for bucket, index, records in body["shards"]],
                       skipped=list(body["skipped"]), source_fields=dict(body.get("source_fields", {})))
        except (KeyError, TypeError, ValueError, OverflowError):
            raise ShardkitError(refuse) from None

    def refusal(self, other: "BuildPlan", where: str, source_name: str) -> str | None:
        """Why this plan (read from OUTPUT) cannot serve a build that would plan ``other`` from
        ``source_name``; None when it can."""
        if self.config != other.config:
            changed = sorted(k for k in set(self.config) | set(other.config) if self.config.get(k) != other.config.get(k))
            return f"{where} was made with other options ({', '.join(changed)}); use the same options, or --overwrite"
        if self.encoders != other.encoders:
            return f"{where} was made with other encoders; use the same --vae and --t5, or --overwrite"
        if self.batching != other.batching:
            return f"{where} cuts encoder batches otherwise ({self.batching.as_json()}); rebuild with --overwrite"
        if self.source != other.source:
            return (f"{where} was made from another source ({self.source['records']} records) than {source_name} "
                    f"({other.source['records']} records), or the source changed since; build into a new OUTPUT, "
                    f"or pass --overwrite")
        return None


def _source_indices(values: Iterable[int]) -> array:
    """A shard's source indices: non-negative and rising, as the planner reads SOURCE in order."""
    indices = array("q", values)
    if (indices and indices[0] < 0) or any(a >= b for a, b in zip(indices, indices[1:])):
        raise ValueError("a shard's source indices must rise")
    return indices


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class SourceDigest:
    """sha256 over every record of SOURCE as the metadata gives it: a changed source changes it."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.records = 0

    def add(self, record: Record) -> None:
        fields = [record.index, record.path, record.captions, record.width, record.height]
        # Metadata beyond the captions (a tar's json, a table's columns) decides filters and what samples
        # hold; so does a source's own problem with the record. Sources without them digest as before.
        extra = {k: v for k, v in record.metadata.items() if k not in record.captions}
        if extra or record.source_problem is not None:
            fields += [extra, record.source_problem]
        self._hash.update(_canonical(fields))
        self._hash.update(b"\n")
        self.records += 1

    def passing(self, records: Iterable[Record]) -> Iterator[Record]:
        for record in records:
            self.add(record)
            yield record

    def as_json(self) -> dict[str, Any]:
        # Where SOURCE lives is left out: the same records read from a bucket or a disk plan alike.
        return {"records": self.records, "sha256": self._hash.hexdigest()}


def make_plan(records: Iterable[Record], planner: Planner, config: dict, encoders: dict,
              batching: Batching) -> BuildPlan:
    """Plan every record of SOURCE (every header lookup happens here, none later)."""
    digest = SourceDigest()
    # While planning, closed shards go into flat arrays, and their PlannedShards are made at the end:
    # small objects made one per shard amid the planner's churn would each pin an allocator arena
    # (measured: about 100 bytes a record left after planning).
    indices, ends, numbers, buckets = array("q"), array("q"), array("q"), []
    for plan in planner.plan(digest.passing(records)):
        indices.extend(p.record.index for p in plan.records)
        ends.append(len(indices))
        numbers.append(plan.index)
        buckets.append(plan.bucket.key)
    shards = [PlannedShard(bucket, number, indices[start:end])
              for bucket, number, start, end in zip(buckets, numbers, [0, *ends[:-1]], ends)]
    del indices
    # Skips as a plan read back from its file holds them (keys sorted): the manifest is the same either way.
    skipped = json.loads(_canonical([s.as_json() for s in planner.stats.skips]))
    return BuildPlan(source=digest.as_json(), config=config, encoders=encoders, batching=batching,
                     shards=shards, skipped=skipped, source_fields=planner.stats.source_fields)


def describe_source(records: Iterable[Record]) -> dict[str, Any]:
    """The plan's ``source`` entry of SOURCE as it is now (one pass over its metadata, no image opened)."""
    digest = SourceDigest()
    for _ in digest.passing(records):
        pass
    return digest.as_json()


def read_plan(storage: Storage) -> BuildPlan | None:
    try:
        payload = storage.read_bytes(PLAN_NAME)
    except FileNotFoundError:
        return None
    return BuildPlan.from_bytes(payload, storage.url_of(PLAN_NAME))


def gather_shards(records: Iterable[Record], plan: BuildPlan, positions: Iterable[int], table: BucketTable,
                  replan: Callable[[Record, Bucket], PlannedRecord], memory: int = 1 << 30,
                  spill_dir: str | None = None) -> Iterator[ShardPlan]:
    """The shards at ``positions`` of the plan, with their records read again from SOURCE.

    One pass over the records, which stops once every wanted record is read; a shard is yielded as
    soon as its last record has been read, so only the shards still being gathered are held. The
    wanted indices wait in two flat arrays sorted by index (12 bytes a record, not a dict entry of
    about 120): a lone worker wants every record of SOURCE. Image bytes that records carry (tar and
    Parquet sources) are held up to ``memory`` bytes; past it, the shard holding the most moves
    its images to a file under ``spill_dir`` until it is complete.
    """
    shards = [plan.shards[position] for position in positions]
    wanted = np.concatenate([np.frombuffer(shard.records, dtype=np.int64) for shard in shards]
                            or [np.empty(0, dtype=np.int64)])
    owner = np.repeat(np.arange(len(shards), dtype=np.int32), [len(shard.records) for shard in shards])
    order = np.argsort(wanted, kind="stable")
    wanted, owner = wanted[order], owner[order]
    del order
    gathered: dict[int, list[PlannedRecord]] = {}
    next_wanted = 0
    with _SpilledImages(memory, spill_dir) as images:
        for record in records:
            if next_wanted == len(wanted):
                return
            index = int(wanted[next_wanted])
            if record.index < index:
                continue
            if record.index > index:
                break  # SOURCE no longer has a record the plan names
            slot = int(owner[next_wanted])
            next_wanted += 1
            shard = shards[slot]
            # A shard's records rise in source order, so each one read is the shard's next.
            items = gathered.setdefault(slot, [])
            items.append(replan(record, table[shard.bucket]))
            images.hold(slot, record, gathered)
            if len(items) == len(shard.records):
                del gathered[slot]
                images.give_back(slot, items)
                yield ShardPlan(bucket=table[shard.bucket], index=shard.index, records=items)
    if next_wanted < len(wanted):
        raise ShardkitError(f"SOURCE has no record {int(wanted[next_wanted])} of the plan: it changed since it was "
                            f"planned; build into a new OUTPUT, or pass --overwrite")


class _SpilledImages:
    """The image bytes of shards being gathered: in memory up to a budget, then in one file per
    shard (the shard holding the most goes first), read back when the shard is complete."""

    def __init__(self, budget: int, folder: str | None):
        self.budget, self.folder = budget, folder
        self.in_memory: dict[int, int] = {}  # slot -> bytes its records hold
        self.total = 0
        self.files: dict[int, Any] = {}  # slot -> its spill file
        self.places: dict[int, list[tuple[int, int, int]]] = {}  # slot -> (place in the shard, offset, size)
        self.temp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "_SpilledImages":
        return self

    def __exit__(self, *exc_info) -> None:
        for file in self.files.values():
            file.close()
        if self.temp is not None:
            self.temp.cleanup()

    def hold(self, slot: int, record: Record, gathered: dict[int, list[PlannedRecord]]) -> None:
        size = len(record.image_bytes or b"")
        if not size:
            return
        self.in_memory[slot] = self.in_memory.get(slot, 0) + size
        self.total += size
        while self.total > self.budget and self.in_memory:
            largest = max(self.in_memory, key=self.in_memory.__getitem__)
            self._spill(largest, gathered[largest])

    def _spill(self, slot: int, items: list[PlannedRecord]) -> None:
        if self.temp is None:
            self.temp = tempfile.TemporaryDirectory(prefix="shardkit-gather-", dir=self.folder)
        if slot not in self.files:
            self.files[slot] = open(os.path.join(self.temp.name, f"{slot}.bin"), "w+b")
        file, places = self.files[slot], self.places.setdefault(slot, [])
        file.seek(0, os.SEEK_END)
        for place, item in enumerate(items):
            data = item.record.image_bytes
            if data:
                places.append((place, file.tell(), len(data)))
                file.write(data)
                item.record.image_bytes = None
        self.total -= self.in_memory.pop(slot)

    def give_back(self, slot: int, items: list[PlannedRecord]) -> None:
        """The complete shard's images, all in memory again; its file is deleted."""
        self.total -= self.in_memory.pop(slot, 0)
        file = self.files.pop(slot, None)
        if file is None:
            return
        with file:
            for place, offset, size in self.places.pop(slot):
                file.seek(offset)
                items[place].record.image_bytes = file.read(size)
        os.unlink(file.name)
