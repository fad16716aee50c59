"""Seeded random byte mutations of a real shard, fed to the reader, ``inspect --verify`` and
``export``: each case ends within seconds with a finding or a ShardReadError / one-line refusal,
never a hang, a traceback or more than a bounded amount of memory."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import resource
import shutil
import signal
from pathlib import Path

import pytest

from shardkit.errors import ShardkitError, ShardReadError
from shardkit.export import export_pixart
from shardkit.inspect import inspect_output
from shardkit.manifest import Manifest, write_manifest
from shardkit.reader import ShardReader

CASES = 300
SECONDS_PER_CASE = 10
MEMORY_GROWTH_LIMIT = 512 << 20  # peak resident memory may not grow past this over all the cases


class _Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Hang()


def _one_shard_build(toy_build: Path, dest: Path) -> Path:
    """A build of the toy build's first three-sample shard alone (images, latents, two caption fields)."""
    shutil.copytree(toy_build, dest, ignore=shutil.ignore_patterns("*.tar"))
    manifest = Manifest.from_json(json.loads((toy_build / "manifest.json").read_text()))
    entry = next(e for e in manifest.shards if e.samples == 3)
    shutil.copy(toy_build / entry.path, dest / entry.path)
    manifest.shards = [entry]
    write_manifest(dest, manifest)
    return dest / entry.path


def _mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    headers = [offset for offset in range(0, len(data), 512) if data[offset + 257:offset + 262] == b"ustar"]
    kind = rng.random()
    if kind < 0.45:  # bytes of a header: the parser's input
        for _ in range(rng.randint(1, 6)):
            data[rng.choice(headers) + rng.randrange(512)] = rng.randrange(256)
    elif kind < 0.75:  # bytes anywhere
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind < 0.85:  # cut short
        del data[rng.randrange(len(data)):]
    elif kind < 0.95:  # a block of noise inserted
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.choice((17, 512, 1024))))
    else:  # a header's size field rewritten
        at = rng.choice(headers) + 124
        data[at:at + 12] = f"{rng.randrange(8 ** 11):011o}\0".encode()
    return bytes(data)


def _run_case(build: Path, dest: Path) -> None:
    try:
        for _ in ShardReader(build, batch_size=1, shuffle=False, retries=0):
            pass
    except ShardReadError:
        pass
    report = inspect_output(str(build), verify_shards=True)
    assert report.verification is not None
    try:
        export_pixart(build, dest, overwrite=True)
    except ShardkitError as exc:
        assert "\n" not in str(exc)


@pytest.mark.timeout(CASES * SECONDS_PER_CASE)
def test_mutated_shards_always_end_with_a_finding_or_a_clear_error(toy_build, tmp_path):
    build = tmp_path / "build"
    shard = _one_shard_build(toy_build, build)
    pristine = shard.read_bytes()
    rng = random.Random(20260105)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    unsound = 0
    try:
        for case in range(CASES):
            data = _mutate(pristine, rng)
            if case % 4 == 3:
                data = gzip.compress(data, compresslevel=1)  # the stream path of the tar reader
            shard.write_bytes(data)
            manifest = json.loads((build / "manifest.json").read_text())
            if case % 2:  # half the cases with a matching checksum, so the content checks have to find it
                manifest["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
                (build / "manifest.json").write_text(json.dumps(manifest))
            signal.alarm(SECONDS_PER_CASE)
            try:
                _run_case(build, tmp_path / "dest")
            except _Hang:
                pytest.fail(f"case {case} did not end within {SECONDS_PER_CASE}s")
            finally:
                signal.alarm(0)
            unsound += not inspect_output(str(build), verify_shards=True).verification.sound
    finally:
        signal.signal(signal.SIGALRM, previous)
        shard.write_bytes(pristine)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert growth < MEMORY_GROWTH_LIMIT, f"peak memory grew by {growth >> 20} MiB"
    assert unsound > CASES * 0.9  # nearly every mutation is caught (a few land in padding)
