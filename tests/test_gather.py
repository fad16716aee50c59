"""Gathering a worker's shards again from SOURCE: shards come whole and in the order they
complete, and the image bytes records carry wait on disk past the memory budget."""

from __future__ import annotations

from array import array

import pytest

from shardkit.buckets import BucketTable
from shardkit.errors import ShardkitError
from shardkit.plan import PlannedRecord
from shardkit.planfile import Batching, BuildPlan, PlannedShard, gather_shards
from shardkit.sources.base import Record

TABLE = BucketTable(512)
BUCKET = TABLE.buckets[0].key


def _plan(*shards: list[int]) -> BuildPlan:
    return BuildPlan(source={"records": 0, "sha256": ""}, config={}, encoders={}, batching=Batching(1, 1, 1),
                     shards=[PlannedShard(BUCKET, i, array("q", indices)) for i, indices in enumerate(shards)],
                     skipped=[])


def _records(count: int) -> list[Record]:
    return [Record(index=i, path=f"part.parquet#{i}", image_root=None, captions={"caption": str(i)}, embedded=True,
                   image_bytes=bytes([i]) * (1000 + i)) for i in range(count)]


def _replan(record: Record, bucket) -> PlannedRecord:
    return PlannedRecord(record=record, key=str(record.index), bucket=bucket, captions={}, token_ids={},
                         expected_hw=None, planned_bytes=0)


def test_shards_come_whole_as_their_last_record_is_read():
    plan = _plan([0, 3, 4], [1, 2], [5])
    gathered = gather_shards(_records(7), plan, [0, 1, 2], TABLE, _replan)
    assert [[p.record.index for p in shard.records] for shard in gathered] == [[1, 2], [0, 3, 4], [5]]


def test_a_worker_gathers_only_its_positions_and_stops_after_its_last_record():
    plan = _plan([0, 3], [1, 2], [5])
    read = []

    def records():
        for record in _records(100):
            read.append(record.index)
            yield record

    assert [shard.index for shard in gather_shards(records(), plan, [1], TABLE, _replan)] == [1]
    assert read == [0, 1, 2, 3]


def test_images_past_the_budget_wait_in_files_and_come_back(tmp_path):
    plan = _plan([0, 2, 4], [1, 3, 5])
    originals = {r.index: r.image_bytes for r in _records(6)}
    shards = gather_shards(_records(6), plan, [0, 1], TABLE, _replan, memory=1500, spill_dir=str(tmp_path))
    first = next(shards)
    # Shard 0 completed at record 4; shard 1 (1, 3 read) had to leave its images on disk.
    assert [p.record.index for p in first.records] == [0, 2, 4]
    assert [folder.name.startswith("shardkit-gather-") for folder in tmp_path.iterdir()] == [True]
    second = next(shards)
    for shard in (first, second):
        assert {p.record.index: p.record.image_bytes for p in shard.records} == \
            {p.record.index: originals[p.record.index] for p in shard.records}
    assert list(shards) == [] and list(tmp_path.iterdir()) == []


def test_a_gather_stopped_early_leaves_no_files(tmp_path):
    plan = _plan([0, 2, 4], [1, 3, 5])
    shards = gather_shards(_records(6), plan, [0, 1], TABLE, _replan, memory=0, spill_dir=str(tmp_path))
    next(shards)
    shards.close()
    assert list(tmp_path.iterdir()) == []


def test_a_record_the_source_no_longer_has_is_one_line():
    plan = _plan([0, 2], [1, 7])
    shards = gather_shards(_records(5), plan, [0, 1], TABLE, _replan)
    with pytest.raises(ShardkitError, match="SOURCE has no record 7 of the plan"):
        list(shards)
