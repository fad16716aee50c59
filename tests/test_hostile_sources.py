"""Hostile sources and outputs: special files, endless and huge files, symlinks out of the image root,
two builds into one OUTPUT, JSON nested past what a parser can hold, export through a link in DEST.

Each ends as a recorded skip or one line on stderr with a non-zero exit, never a hang (builds that
meet a FIFO run in a subprocess with a timeout) and never a traceback.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from shardkit.build import build
from shardkit.cli import main
from shardkit.config import BuildConfig
from shardkit.distributed import RankInfo
from shardkit.errors import ShardkitError
from shardkit.images import ImageSkip, read_header
from shardkit.outputlock import lock_worker
from shardkit.storage import Storage

REPO = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 300
BUILD_ADDRESS_SPACE = 6 * 1024**3  # a tiny build needs far less; an endless read meets it in seconds


def _photo(path: Path, size=(96, 64), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path.read_bytes()


def _jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def _failures(output: Path) -> dict[str, str]:
    lines = (output / "failures.jsonl").read_text(encoding="utf-8").splitlines()
    return {record["source"]: record["reason"] for record in map(json.loads, lines)}


def _written(output: Path) -> dict[str, dict]:
    """path -> the sample's members, from every shard."""
    samples = {}
    for shard in sorted((output / "shards").glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            samples[json.loads(sample["json"])["path"]] = sample
    return samples


def _cli_build(source: Path, output: Path, tiny_models: Path, *extra: str, timeout: float = BUILD_TIMEOUT_S):
    """`shardkit build` in a subprocess: a read that blocks fails the test at the timeout instead of hanging it."""
    command = [sys.executable, "-m", "shardkit", "build", str(source), str(output), "--resolution", "256",
               "--vae", str(tiny_models), "--vae-subfolder", "vae", "--t5", str(tiny_models), "--device", "cpu",
               "--dtype", "fp32", "--batch-size", "4", "--no-progress", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
                              preexec_fn=_cap_address_space)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the build did not end within {timeout} s: a source read blocked")


def _cap_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (BUILD_ADDRESS_SPACE, BUILD_ADDRESS_SPACE))


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


# ---- special files, endless and huge files ---------------------------------------------------

@pytest.mark.timeout(BUILD_TIMEOUT_S + 60)
def test_special_and_oversized_files_are_recorded_skips_never_a_hang(tmp_path, tiny_models):
    """FIFOs, a socket, links to /dev/zero and files over --max-image-bytes, each with and without a
    size in the metadata (so met by the planner's header read and by the decoder): skips, and the
    build ends, with the decode workers on threads as in a real build. The build's address space
    is capped, so a regression reading /dev/zero fails here instead of exhausting the machine."""
    images = tmp_path / "data"
    items, expected = [], {}

    def add(name: str, reason: str, sized: bool):
        items.append({"path": name, "prompt": f"photo {name}", **({"width": 96, "height": 64} if sized else {})})
        expected[name] = reason

    for sized in (True, False):
        tag = "sized" if sized else "nosize"
        _photo(images / f"good_{tag}.jpg")
        add(f"good_{tag}.jpg", "", sized)
        os.mkfifo(images / f"fifo_{tag}.jpg")
        add(f"fifo_{tag}.jpg", "not_a_regular_file", sized)
        (images / f"zero_{tag}.jpg").symlink_to("/dev/zero")
        add(f"zero_{tag}.jpg", "not_a_regular_file", sized)
        _photo(images / f"big_{tag}.png", size=(400, 300), seed=3)  # noise: far over the 100 KB bound
        add(f"big_{tag}.png", "file_too_large", sized)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socket_path = images / "sock.jpg"
    if len(str(socket_path)) < 100:  # AF_UNIX paths are short
        server.bind(str(socket_path))
        add("sock.jpg", "not_a_regular_file", True)
    source = _jsonl(images / "records.jsonl", items)
    output = tmp_path / "out"
    try:  # links followed out of the root, so the rule under test is "regular files only"
        result = _cli_build(source, output, tiny_models, "--workers", "2", "--max-image-bytes", "100000",
                            "--follow-symlinks-outside-root")
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    failures = _failures(output)
    assert failures == {name: reason for name, reason in expected.items() if reason}
    assert set(_written(output)) == {name for name, reason in expected.items() if not reason}
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["records"]["written"] + manifest["records"]["skipped"] == manifest["records"]["read"] == len(items)


@pytest.mark.timeout(30)
def test_header_reads_refuse_special_files_before_reading(tmp_path):
    fifo = tmp_path / "b.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageSkip) as skip:
        read_header(fifo, 10**8)
    assert skip.value.reason == "not_a_regular_file" and "FIFO" in skip.value.detail
    zero = tmp_path / "z.jpg"
    zero.symlink_to("/dev/zero")
    with pytest.raises(ImageSkip) as skip:  # checked before the link's target: it leaves the root
        read_header(zero, 10**8, root=tmp_path)
    assert skip.value.reason == "path_outside_root" and "/dev/zero" in skip.value.detail


def test_byte_bound_follows_the_pixel_limit_unless_given():
    assert BuildConfig(max_image_pixels=1000).image_byte_limit() == 1000 * 8 + 1024 * 1024
    assert BuildConfig(max_image_pixels=1000, max_image_bytes=5000).image_byte_limit() == 5000


@pytest.mark.timeout(60)
def test_default_byte_bound_skips_a_file_larger_than_its_pixels_allow(tmp_path, make_config, encoders):
    images = tmp_path / "data"
    _photo(images / "small.jpg")
    with open(images / "huge.jpg", "wb") as handle:  # sparse: 2 MiB of nothing, claiming to be 8x8
        handle.truncate(2 * 1024 * 1024)
    source = _jsonl(images / "records.jsonl", [
        {"path": "small.jpg", "prompt": "a photo", "width": 96, "height": 64},
        {"path": "huge.jpg", "prompt": "a photo", "width": 8, "height": 8}])
    output = tmp_path / "out"
    build(str(source), output, make_config(max_image_pixels=96 * 64), encoders=encoders)
    assert _failures(output) == {"huge.jpg": "file_too_large"} and set(_written(output)) == {"small.jpg"}


# ---- symlinks and the image root -------------------------------------------------------------

def _linked_source(tmp_path: Path) -> tuple[Path, bytes]:
    """A PixArt dataset whose InternImgs holds links: inside the root, out of it to a file, and out
    of it through a linked folder (a symlink farm)."""
    root = tmp_path / "dataset"
    images = root / "InternImgs"
    secret = _photo(tmp_path / "secret.jpg", seed=7)
    _photo(tmp_path / "farm" / "far.jpg", seed=8)
    _photo(images / "real.jpg", seed=1)
    _photo(images / "sub" / "deep.jpg", seed=2)
    (images / "inside.jpg").symlink_to("sub/deep.jpg")
    (images / "link.jpg").symlink_to("../../secret.jpg")
    (images / "farm").symlink_to(tmp_path / "farm", target_is_directory=True)
    items = [{"path": path, "prompt": f"photo {path}", **({"width": 96, "height": 64} if sized else {})}
             for path, sized in [("real.jpg", True), ("inside.jpg", True), ("link.jpg", True),
                                 ("farm/far.jpg", False)]]
    (root / "InternData").mkdir()
    (root / "InternData" / "data_info.json").write_text(json.dumps(items))
    return root, secret


@pytest.mark.timeout(120)
def test_symlinks_out_of_the_image_root_are_skipped(tmp_path, make_config, encoders):
    source, secret = _linked_source(tmp_path)
    output = tmp_path / "out"
    build(str(source), output, make_config(), encoders=encoders)
    assert _failures(output) == {"link.jpg": "path_outside_root", "farm/far.jpg": "path_outside_root"}
    written = _written(output)
    assert set(written) == {"real.jpg", "inside.jpg"}  # a link inside the root is fine
    assert not any(secret in member for sample in written.values() for member in sample.values()
                   if isinstance(member, bytes))
    detail = [json.loads(line) for line in (output / "failures.jsonl").read_text().splitlines()][0]["detail"]
    assert "secret.jpg" in detail and "--follow-symlinks-outside-root" in detail


@pytest.mark.timeout(120)
def test_follow_symlinks_outside_root_reads_symlink_farms(tmp_path, make_config, encoders):
    source, secret = _linked_source(tmp_path)
    output = tmp_path / "out"
    build(str(source), output, make_config(follow_symlinks_outside_root=True), encoders=encoders)
    written = _written(output)
    assert set(written) == {"real.jpg", "inside.jpg", "link.jpg", "farm/far.jpg"}
    assert written["link.jpg"]["jpg"] == secret


@pytest.mark.timeout(120)
def test_caption_files_follow_the_same_rules(tmp_path, make_config, encoders):
    folder = tmp_path / "folder"
    for name in ("a", "b", "c", "d"):
        _photo(folder / f"{name}.jpg", seed=ord(name))
    (folder / "a.txt").write_text("a fine caption")
    (tmp_path / "private.txt").write_text("a private note")
    (folder / "b.txt").symlink_to("../private.txt")
    os.mkfifo(folder / "c.txt")
    (folder / "d.txt").write_bytes(b"x" * (1024 * 1024 + 1))
    output = tmp_path / "out"
    build(str(folder), output, make_config(), encoders=encoders)
    assert _failures(output) == {"b.jpg": "path_outside_root", "c.jpg": "not_a_regular_file",
                                 "d.jpg": "file_too_large"}
    assert set(_written(output)) == {"a.jpg"}


# ---- one build at a time in an OUTPUT --------------------------------------------------------

@pytest.mark.timeout(120)
def test_a_second_build_into_a_locked_output_stops_in_one_line(tmp_path, toy_dataset):
    output = tmp_path / "out"
    output.mkdir()
    with lock_worker(Storage.for_url(output), RankInfo()):
        # A VAE that does not exist: the lock is refused before any encoder loads.
        result = _cli_build(toy_dataset, output, tmp_path / "no-models")
    assert result.returncode != 0
    line = _one_line_error(result.stderr)
    assert "another build holds OUTPUT" in line and f"pid {os.getpid()}" in line and "build.lock" in line
    assert not (output / "build.lock").exists()  # released by its holder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.timeout(120)
def test_a_stale_lock_on_this_host_is_taken_over(tmp_path, toy_dataset, make_config, encoders):
    output = tmp_path / "out"
    output.mkdir()
    (output / "build.lock").write_text(json.dumps({
        "host": socket.gethostname(), "pid": _dead_pid(), "started": "2026-01-01T00:00:00Z", "launch": "x",
        "worker": "", "pid_namespace": os.readlink("/proc/self/ns/pid"), "process_start": "1"}))
    summary = build(str(toy_dataset), output, make_config(), encoders=encoders)
    assert summary.written == 17 and not (output / "build.lock").exists()


@pytest.mark.parametrize("holder", [{"host": "another-host", "pid": 1}, None], ids=["other-host", "no-holder"])
def test_a_lock_that_cannot_be_judged_from_here_is_refused(tmp_path, holder):
    output = tmp_path / "out"
    output.mkdir()
    payload = "garbage" if holder is None else json.dumps({
        **holder, "started": "2026-01-01T00:00:00Z", "launch": "x", "worker": "", "pid_namespace": None,
        "process_start": None})
    (output / "build.lock").write_text(payload)
    with pytest.raises(ShardkitError, match="another build holds OUTPUT") as refused:
        lock_worker(Storage.for_url(output), RankInfo())
    assert ("host another-host" if holder else "names no build") in str(refused.value)
    assert (output / "build.lock").read_text() == payload


def test_ranks_of_one_launch_lock_apart_and_other_launches_are_refused(tmp_path):
    storage = Storage.for_url(tmp_path / "out")
    storage.prepare()
    with lock_worker(storage, RankInfo(rank=0, world_size=2)), lock_worker(storage, RankInfo(rank=1, world_size=2)):
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["build.rank000.lock", "build.rank001.lock"]
        for other_launch in (RankInfo(), RankInfo(rank=2, world_size=3), RankInfo(rank=1, world_size=2)):
            with pytest.raises(ShardkitError, match="another build holds OUTPUT"):
                lock_worker(storage, other_launch)
    assert list((tmp_path / "out").iterdir()) == []
    with lock_worker(storage, RankInfo(rank=0, world_size=2)):  # a rank lock refuses a one-process build
        with pytest.raises(ShardkitError, match="rank 0 of 2"):
            lock_worker(storage, RankInfo())


# ---- JSON nested past any parser's depth -----------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.timeout(120)
def test_deeply_nested_metadata_is_one_line(tmp_path, tiny_models):
    pixart = tmp_path / "pixart"
    (pixart / "InternImgs").mkdir(parents=True)
    (pixart / "InternData").mkdir()
    (pixart / "InternData" / "data_info.json").write_text(DEEP)
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text('{"path": "a.jpg", "prompt": "x"}\n\n' + '{"path": "b.jpg", "prompt": ' + DEEP + "}\n")
    for source, where in ((pixart, "data_info.json"), (jsonl, "records.jsonl line 3")):
        result = CliRunner().invoke(main, ["build", str(source), str(tmp_path / "out"), "--resolution", "256",
                                           "--vae", str(tiny_models), "--vae-subfolder", "vae", "--t5",
                                           str(tiny_models), "--device", "cpu", "--no-progress", "--overwrite"])
        assert result.exit_code == 2, result.output
        line = _one_line_error(result.output)
        assert where in line and "nested too deeply" in line


def test_deeply_nested_manifest_is_one_line(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "manifest.json").write_text('{"format": "shardkit-manifest", "shards": ' + DEEP + "}")
    for command in (["inspect", str(output)], ["export", str(output), str(tmp_path / "dest")]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, result.output
        assert "nested too deeply" in _one_line_error(result.output)


# ---- inspect against object storage it cannot reach ------------------------------------------

def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("credentials", [True, False], ids=["unreachable", "no-credentials"])
def test_inspect_of_unreachable_object_storage_is_one_line(tmp_path, monkeypatch, credentials):
    missing = str(tmp_path / "none")
    monkeypatch.setenv("AWS_CONFIG_FILE", missing)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", missing)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup either
    if credentials:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    storage_options = json.dumps({"config_kwargs": {"retries": {"max_attempts": 1}}, "skip_instance_cache": True})
    result = CliRunner().invoke(main, ["inspect", "s3://bucket/build", "--endpoint-url",
                                       f"http://127.0.0.1:{_closed_port()}", "--storage-options", storage_options])
    assert result.exit_code == 2, result.output
    line = _one_line_error(result.output)
    assert ("cannot reach s3://bucket/build/manifest.json" if credentials else "no credentials for") in line


# ---- export never writes through a link in DEST ----------------------------------------------

@pytest.mark.timeout(120)
def test_export_never_writes_through_a_symlink_in_dest(toy_build, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "InternImgs").symlink_to(elsewhere, target_is_directory=True)
    result = CliRunner().invoke(main, ["export", str(toy_build), str(dest), "--overwrite", "--no-progress"])
    assert result.exit_code == 2
    assert "leads out of DEST" in _one_line_error(result.output)
    assert list(elsewhere.iterdir()) == []

    # A link at a file's own name is replaced by the file, its target left alone.
    (dest / "InternImgs").unlink()
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    (dest / "InternData").mkdir(exist_ok=True)
    (dest / "InternData" / "data_info.json").symlink_to(victim)
    result = CliRunner().invoke(main, ["export", str(toy_build), str(dest), "--overwrite", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "untouched"
    assert not (dest / "InternData" / "data_info.json").is_symlink()
    assert len(json.loads((dest / "InternData" / "data_info.json").read_text())) == 17
