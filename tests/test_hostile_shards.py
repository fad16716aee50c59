"""Hostile shards: the reader, ``inspect --verify`` and ``export`` agree on what a malformed shard
is, and each ends quickly with one clear line: never a loop, a traceback or a memory blow-up."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from shardkit.cli import main
from shardkit.errors import ShardkitError, ShardReadError
from shardkit.export import export_pixart
from shardkit.format import json_bytes
from shardkit.inspect import inspect_output
from shardkit.reader import ShardReader
from test_reader import serve, write_synthetic_build

pytestmark = pytest.mark.timeout(120)


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime, info.mode = size, kind, 0, 0o644
    return info.tobuf(tarfile.USTAR_FORMAT)


def _member(name: str, payload: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    return _header(name, len(payload), kind) + payload + bytes(-len(payload) % 512)


def _pax(records: dict[str, str]) -> bytes:
    body = b""
    for key, value in records.items():
        record = f" {key}={value}\n".encode()
        length = len(record) + len(str(len(record)))
        length += len(str(length)) - len(str(len(record)))
        body += str(length).encode() + record
    return _member("././@PaxHeader", body, tarfile.XHDTYPE)


def _members_of(shard: Path) -> bytes:
    """The shard's bytes without its end-of-archive blocks."""
    with tarfile.open(shard) as tar:
        tar.getmembers()
        end = tar.offset
    return shard.read_bytes()[:end]


def _replace_shard(build: Path, data: bytes, *, samples: int | None = None) -> Path:
    """Put ``data`` in place of the build's only shard; the manifest records its real size and checksum."""
    manifest = json.loads((build / "manifest.json").read_text())
    entry = manifest["shards"][0]
    (build / entry["path"]).write_bytes(data)
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    if samples is not None:
        entry["samples"] = samples
    (build / "manifest.json").write_text(json.dumps(manifest))
    return build / entry["path"]


def _all_three_refuse(build: Path, tmp_path: Path, reader_match: str, finding: str) -> None:
    started = time.monotonic()
    with pytest.raises(ShardReadError, match=reader_match):
        list(ShardReader(build, batch_size=1, shuffle=False))
    report = inspect_output(str(build), verify_shards=True)
    assert finding in report.verification.kinds(), report.verification.findings
    with pytest.raises(ShardkitError, match="refusing to export"):
        export_pixart(build, tmp_path / "dest")
    assert not (tmp_path / "dest" / "InternData" / "data_info.json").exists()
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("compress", [False, True])
def test_a_negative_pax_size_is_refused_and_never_moves_the_read_back(tmp_path, compress):
    build = tmp_path / "build"
    write_synthetic_build(build, {"1.0": [2]})
    shard = next((build / "shards").glob("*.tar"))
    hostile = _members_of(shard) + _pax({"size": "-1024"}) + _member("dotless", b"x" * 600) + bytes(1024)
    _replace_shard(build, gzip.compress(hostile) if compress else hostile)
    _all_three_refuse(build, tmp_path, "size '-1024'", "unreadable_member")


def test_a_negative_pax_size_streamed_over_http_ends_quickly(tmp_path):
    build = tmp_path / "build"
    write_synthetic_build(build, {"1.0": [2]})
    shard = next((build / "shards").glob("*.tar"))
    _replace_shard(build, _members_of(shard) + _pax({"size": "-1024"}) + _member("dotless", b"x" * 600) + bytes(1024))
    with serve(build) as url:
        with pytest.raises(ShardReadError, match="size '-1024'"):
            list(ShardReader(url, batch_size=1, shuffle=False, retries=0))
        dataset = ShardReader(url, batch_size=1, shuffle=False, on_error="skip", retries=0)
        list(dataset)  # the samples before the damage, then the shard is given up
        assert dataset.stats.shards_failed == 1 and "size '-1024'" in dataset.stats.failed_shards[0]


@pytest.mark.parametrize("records, match", [
    ({"path": "p" * 5000}, "name of 5000 characters"),
    ({"size": "12abc"}, "size '12abc'"),
])
def test_bad_pax_records_are_refused(tmp_path, records, match):
    build = tmp_path / "build"
    write_synthetic_build(build, {"1.0": [1]})
    shard = next((build / "shards").glob("*.tar"))
    _replace_shard(build, _members_of(shard) + _pax(records) + _member("k.txt", b"x") + bytes(1024))
    _all_three_refuse(build, tmp_path, match, "unreadable_member")


def test_an_oversized_gnu_long_name_is_refused_before_it_is_read(tmp_path):
    build = tmp_path / "build"
    write_synthetic_build(build, {"1.0": [1]})
    shard = next((build / "shards").glob("*.tar"))
    huge = _header("././@LongLink", 8 ** 11 - 1, tarfile.GNUTYPE_LONGNAME)
    _replace_shard(build, _members_of(shard) + huge + bytes(4096))
    _all_three_refuse(build, tmp_path, "claims 8589934591 bytes", "unreadable_member")


def test_a_member_larger_than_the_format_allows_is_refused_before_it_is_read(tmp_path):
    # 64 MB of zeros gzip to 64 KB: the decompressed member is refused by its declared size, unread.
    build = tmp_path / "build"
    expected = write_synthetic_build(build, {"1.0": [1]})
    key = next(iter(expected))
    shard = next((build / "shards").glob("*.tar"))
    bomb = _header(f"{key}.t5_sharegpt4v.npy", 64 << 20)
    with tarfile.open(shard) as tar:
        keep = b"".join(_member(m.name, tar.extractfile(m).read()) for m in tar if not m.name.endswith("sharegpt4v.npy"))
    _replace_shard(build, gzip.compress(keep + bomb + bytes(64 << 20) + bytes(1024), compresslevel=1))
    with pytest.raises(ShardReadError, match="more than the .* format allows"):
        list(ShardReader(build, batch_size=1, shuffle=False))
    report = inspect_output(str(build), verify_shards=True)
    assert "oversized_member" in report.verification.kinds()
    with pytest.raises(ShardkitError, match="refusing to export.*oversized_member"):
        export_pixart(build, tmp_path / "dest")


def _rewrite_member(shard: Path, name: str, payload: bytes) -> bytes:
    with tarfile.open(shard) as tar:
        members = [(m.name, payload if m.name == name else tar.extractfile(m).read()) for m in tar]
    return b"".join(_member(n, p) for n, p in members) + bytes(1024)


def test_an_npy_header_claiming_a_huge_shape_is_a_finding_and_export_says_so_in_one_line(tmp_path):
    build = tmp_path / "build"
    expected = write_synthetic_build(build, {"1.0": [2]})
    key = sorted(expected)[0]
    shard = next((build / "shards").glob("*.tar"))
    huge = _npy_header((100000, 100000, 100))  # 2 TB claimed, 16 bytes held
    _replace_shard(build, _rewrite_member(shard, f"{key}.latent.npy", huge))
    report = inspect_output(str(build), verify_shards=True)
    messages = [f.message for f in report.verification.findings if f.key == key]
    assert "unreadable_member" in report.verification.kinds() and any("header needs" in m for m in messages)
    result = CliRunner().invoke(main, ["export", str(build), str(tmp_path / "dest"), "--no-progress"])
    assert result.exit_code == 2 and "refusing to export" in result.output and "Traceback" not in result.output
    with pytest.raises(ShardReadError, match="header needs"):
        list(ShardReader(build, batch_size=1, shuffle=False))


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A .npy payload whose header claims ``shape`` of float16 but that holds 16 bytes of data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f2", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + bytes(16)


@pytest.mark.parametrize("path", ["../outside.png", "/etc/passwd", "a\\b.png", "nul\x00.png"])
def test_verify_flags_the_sample_paths_export_refuses(tmp_path, path):
    build = tmp_path / "build"
    expected = write_synthetic_build(build, {"1.0": [1]})
    key = next(iter(expected))
    shard = next((build / "shards").glob("*.tar"))
    _replace_shard(build, _rewrite_member(shard, f"{key}.json", json_bytes({**expected[key]["meta"], "path": path})))
    report = inspect_output(str(build), verify_shards=True)
    assert report.verification.kinds() == {"bad_metadata"}
    assert "leaves its folder" in report.verification.findings[0].message or "usable" in report.verification.findings[0].message
    with pytest.raises(ShardkitError, match="refusing to export.*bad_metadata"):
        export_pixart(build, tmp_path / "dest")


def test_export_refuses_a_shard_whose_checksum_does_not_match(tmp_path):
    build = tmp_path / "build"
    write_synthetic_build(build, {"1.0": [2], "2.0": [1]})
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64
    (build / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["export", str(build), str(tmp_path / "dest"), "--no-progress"])
    assert result.exit_code == 2 and "sha256_mismatch" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "dest" / "InternData" / "data_info.json").exists()


def test_export_refuses_a_manifest_that_claims_fewer_samples_than_the_shard_holds(tmp_path):
    build = tmp_path / "build"
    write_synthetic_build(build, {"1.0": [3]})
    shard = next((build / "shards").glob("*.tar"))
    _replace_shard(build, shard.read_bytes(), samples=2)
    with pytest.raises(ShardkitError, match="count_mismatch"):
        export_pixart(build, tmp_path / "dest")
    assert not (tmp_path / "dest" / "InternData" / "data_info.json").exists()
