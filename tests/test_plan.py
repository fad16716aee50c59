"""Planning: image lookups ahead of the planner, in order, and rank-split duplicates."""

from __future__ import annotations

import threading

import pytest

import shardkit.plan as plan_module
from shardkit.buckets import BucketTable
from shardkit.config import BuildConfig
from shardkit.images import SourceUnavailable
from shardkit.plan import DUPLICATE_PATH, ImageFacts, Planner, ReadLimits, look_up_image
from shardkit.sources import Record

LIMITS = ReadLimits(max_pixels=10**8, max_bytes=10**9)
SIZES = [(512, 512), (384, 640), (640, 384), (512, 512), (300, 900), (900, 300), (512, 512), (480, 640)]


def _records(tmp_path, paths=None) -> list[Record]:
    paths = paths or [f"img{i}.jpg" for i in range(len(SIZES) * 4)]
    return [Record(index=i, path=path, image_root=tmp_path, captions={"prompt": f"caption {i}"},
                   width=SIZES[i % len(SIZES)][1], height=SIZES[i % len(SIZES)][0])
            for i, path in enumerate(paths)]


def _planner(lookup_threads: int = 0, **config) -> Planner:
    options = dict(shard_max_count=3, keep_images=False)
    options.update(config)
    return Planner(BuildConfig(**options), BucketTable(512), tokenize=lambda text: [len(text), 1],
                   latent_shape=lambda h, w: (8, h // 8, w // 8), hidden_size=4, lookup_threads=lookup_threads)


def _summary(planner: Planner, records) -> list[tuple[str, list[int]]]:
    return [(plan.name, [p.record.index for p in plan.records]) for plan in planner.plan(records)]


def test_lookups_run_ahead_on_threads_and_plans_stay_in_order(tmp_path, monkeypatch):
    records = _records(tmp_path)
    inline = _summary(_planner(), records)
    # Four lookups must be in flight at once to pass the barrier: one at a time would break it.
    barrier = threading.Barrier(4, timeout=20)
    in_flight = []

    def slow_lookup(record, keep_images, limits, dedup=False):
        in_flight.append(record.index)
        if record.index < 4:
            barrier.wait()
        return ImageFacts()

    monkeypatch.setattr(plan_module, "look_up_image", slow_lookup)
    threaded = _summary(_planner(lookup_threads=4), records)
    assert threaded == inline
    assert sorted(in_flight) == list(range(len(records)))


def test_lookup_errors_surface_in_record_order(tmp_path, monkeypatch):
    records = _records(tmp_path)

    def failing_lookup(record, keep_images, limits, dedup=False):
        if record.index == 5:
            raise RuntimeError("storage endpoint went away")
        return ImageFacts()

    monkeypatch.setattr(plan_module, "look_up_image", failing_lookup)
    planner = _planner(lookup_threads=4, shard_max_count=1000)
    with pytest.raises(RuntimeError, match="went away"):
        list(planner.plan(records))
    assert planner.stats.records_read == 5  # records 0-4 were planned, in order, before the error


def test_image_size_from_lookup_bounds_the_shard_bytes(tmp_path):
    (tmp_path / "big.jpg").write_bytes(b"\xff" * 300_000)
    (tmp_path / "small.jpg").write_bytes(b"\xff" * 1000)
    records = [Record(index=i, path=name, image_root=tmp_path, captions={"prompt": "x"}, width=512, height=512)
               for i, name in enumerate(["big.jpg", "small.jpg"])]
    with_images = [p.planned_bytes for plan in _planner(keep_images=True).plan(records) for p in plan.records]
    without = [p.planned_bytes for plan in _planner(keep_images=False).plan(records) for p in plan.records]
    assert with_images[0] - without[0] > 300_000 > with_images[1] - without[1] > 1000


def test_duplicates_hold_with_lookahead(tmp_path, monkeypatch):
    """Records 2 and 4 share a path, and so do 3 and 6: the first of each is planned, the later one
    skipped, however far ahead the lookups run."""
    paths = [f"img{i}.jpg" for i in range(12)]
    paths[4] = paths[2]
    paths[6] = paths[3]
    records = _records(tmp_path, paths)
    monkeypatch.setattr(plan_module, "look_up_image", lambda record, keep_images, limits, dedup=False: ImageFacts())
    for threads in (0, 4):
        planner = _planner(lookup_threads=threads, shard_max_count=1000)
        planned = [p.record.index for plan in planner.plan(iter(records)) for p in plan.records]
        skipped = {s.index: s.reason for s in planner.stats.skips}
        assert skipped == {4: DUPLICATE_PATH, 6: DUPLICATE_PATH}, threads
        assert sorted(planned) == [0, 1, 2, 3, 5, 7, 8, 9, 10, 11], threads


def test_each_skip_is_reported_once(tmp_path):
    records = _records(tmp_path)
    records[3].captions = {}  # missing caption
    records[7].width, records[7].height = 100, 1000  # extreme ratio
    reported = []
    planner = Planner(BuildConfig(keep_images=False), BucketTable(512), tokenize=lambda text: [1],
                      latent_shape=lambda h, w: (8, h // 8, w // 8), hidden_size=4, on_skip=reported.append)
    list(planner.plan(records))
    assert [s.index for s in reported] == [3, 7] == [s.index for s in planner.stats.skips]


def test_a_failed_size_request_stops_the_build_and_a_missing_image_is_left_to_decode(tmp_path, monkeypatch):
    """A kept image's bytes count toward the shard's byte bound: a size lookup that fails on a
    service error must not plan the record without them (the build stops, resumably). A missing
    file leaves the size unknown; the decode stage records its skip."""
    import fsspec

    from shardkit.storage import RemotePath

    fs = fsspec.filesystem("memory")
    fs.pipe("/sizes/a.jpg", b"\xff\xd8\xff" + b"x" * 100)
    record = Record(index=0, path="a.jpg", image_root=RemotePath("memory://sizes"), captions={"prompt": "a"},
                    width=64, height=64)
    assert look_up_image(record, keep_images=True, limits=LIMITS).file_bytes == 103
    assert look_up_image(record, keep_images=False, limits=LIMITS).file_bytes is None
    missing = Record(index=1, path="gone.jpg", image_root=RemotePath("memory://sizes"), captions={"prompt": "b"},
                     width=64, height=64)
    assert look_up_image(missing, keep_images=True, limits=LIMITS) == ImageFacts()

    def broken_info(self, path, **kwargs):
        raise ConnectionError("connection reset by peer")

    with monkeypatch.context() as patched:
        patched.setattr(type(fs), "info", broken_info)
        with pytest.raises(SourceUnavailable, match="connection reset"):
            look_up_image(record, keep_images=True, limits=LIMITS)
    fs.rm("/sizes", recursive=True)
