"""Host-memory policy: when the C heap is trimmed, that it is a safe no-op without glibc, and that
trimming during a build changes nothing that gets written."""

from __future__ import annotations

import ctypes
import itertools
import os
import platform

import pytest
import torch

from shardkit import hostmem
from shardkit.build import build
from shardkit.hostmem import HeapTrimmer

MiB = 1 << 20


class FakeHeap:
    """RSS values to report one by one, and a record of the trims asked for."""

    def __init__(self, rss_mib: list[int]):
        self.rss = [value * MiB for value in rss_mib]
        self.reads = 0
        self.trims = 0

    def resident_bytes(self) -> int:
        value = self.rss[self.reads]
        self.reads += 1
        return value

    def malloc_trim(self, pad: int) -> int:
        assert pad == 0  # 0: give back every free page, not only the top of the heap
        self.trims += 1
        return 1


def _run(trimmer: HeapTrimmer, heap: FakeHeap) -> list[int]:
    """The trim count after each batch."""
    counts = []
    for _ in heap.rss:
        trimmer.after_batch()
        counts.append(heap.trims)
    return counts


def test_trims_only_past_the_ceiling_of_a_freshly_trimmed_heap_plus_slack():
    # batch 1 sets the ceiling (500); 600 is within the slack; 700 is past it: trim. The batch
    # after a trim only raises the ceiling (to 650), so 740 stays within it and 760 trims again.
    heap = FakeHeap([500, 600, 700, 650, 740, 760, 520, 600])
    trimmer = HeapTrimmer(heap.malloc_trim, heap.resident_bytes, slack=100 * MiB, slack_fraction=0)
    assert _run(trimmer, heap) == [0, 0, 1, 1, 1, 2, 2, 2]
    assert trimmer.trims == 2
    assert trimmer.ceiling == 650 * MiB  # the ceiling never drops: it is the largest batch's need


def test_the_slack_is_a_share_of_the_ceiling_above_its_floor():
    # Ceiling 1000 MiB: a fifth of it (200) is the slack, not the 64 MiB floor; 1150 stays, 1250 trims.
    heap = FakeHeap([1000, 1150, 1250, 1000, 1150])
    assert _run(HeapTrimmer(heap.malloc_trim, heap.resident_bytes, slack=64 * MiB, slack_fraction=0.2), heap) == [0, 0, 1, 1, 1]
    # Ceiling 100 MiB: a fifth (20) is under the floor, so 64 MiB it is; 150 stays, 170 trims.
    heap = FakeHeap([100, 150, 170])
    assert _run(HeapTrimmer(heap.malloc_trim, heap.resident_bytes, slack=64 * MiB, slack_fraction=0.2), heap) == [0, 0, 1]


def test_a_steady_heap_is_never_trimmed():
    heap = FakeHeap([800] + [790, 810, 800, 805] * 5)
    trimmer = HeapTrimmer(heap.malloc_trim, heap.resident_bytes, slack=64 * MiB, slack_fraction=0)
    _run(trimmer, heap)
    assert heap.trims == 0


def test_without_malloc_trim_or_rss_it_does_nothing():
    heap = FakeHeap([100, 10_000])
    trimmer = HeapTrimmer(None, heap.resident_bytes, slack=0)
    assert not trimmer.active
    _run(trimmer, heap)
    assert heap.reads == 0 and trimmer.trims == 0
    no_proc = HeapTrimmer(heap.malloc_trim, lambda: None, slack=0)
    for _ in range(3):
        no_proc.after_batch()
    assert heap.trims == 0


def test_malloc_trim_is_not_looked_up_where_the_c_library_is_not_glibc(monkeypatch):
    def not_glibc(name):
        raise ValueError(f"unrecognized configuration name {name}")

    monkeypatch.setattr(os, "confstr", not_glibc)
    assert hostmem._glibc_malloc_trim() is None


def test_a_c_library_without_malloc_trim_is_a_no_op(monkeypatch):
    class NoTrim:
        pass

    monkeypatch.setattr(os, "confstr", lambda name: "glibc 2.36", raising=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: NoTrim())
    assert hostmem._glibc_malloc_trim() is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/statm"),
                    reason="glibc on Linux only")
def test_glibc_trim_and_rss_work_here():
    malloc_trim = hostmem._glibc_malloc_trim()
    assert malloc_trim is not None
    assert malloc_trim(0) in (0, 1)
    assert hostmem._resident_bytes() > 10 * MiB


def test_only_cpu_builds_trim(monkeypatch):
    heap = FakeHeap([100, 10_000, 100, 10_000])
    monkeypatch.setattr(hostmem, "_process_trimmer", HeapTrimmer(heap.malloc_trim, heap.resident_bytes, slack=0, slack_fraction=0))
    for _ in range(2):
        hostmem.after_encoder_batch(torch.device("cuda"))
    assert heap.reads == 0
    for _ in range(2):
        hostmem.after_encoder_batch(torch.device("cpu"))
    assert heap.trims == 1


def _files(output) -> dict[str, bytes]:
    return {p.relative_to(output).as_posix(): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


def test_a_build_trimmed_after_every_batch_writes_the_same_bytes(toy_build, toy_dataset, make_config, encoders,
                                                                  tmp_path, monkeypatch):
    real_trim = hostmem._glibc_malloc_trim()
    calls = []

    def counted_trim(pad: int) -> int:
        calls.append(pad)
        return real_trim(pad) if real_trim is not None else 0

    # RSS that grows by 1 GiB a batch and no slack: every batch but the first after a trim trims the heap.
    growing = itertools.count(1 << 30, 1 << 30)
    every_batch = HeapTrimmer(counted_trim, lambda: next(growing), slack=0, slack_fraction=0)
    monkeypatch.setattr(hostmem, "_process_trimmer", every_batch)
    output = tmp_path / "trimmed"
    build(str(toy_dataset), output, make_config(), encoders=encoders)
    assert len(calls) >= 2  # the pipeline calls the hook after its encoder batches
    assert _files(output) == _files(toy_build)
