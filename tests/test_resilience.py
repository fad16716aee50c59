"""Crash safety and resume: SIGKILL at several points, disk full, Ctrl-C, GPU out-of-memory."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from shardkit import shards as shards_module
from shardkit.build import build
from shardkit.errors import ShardkitError
from shardkit.inspect import inspect_output
from shardkit.manifest import read_manifest

# Runs a build in a child process that SIGKILLs itself at the Nth call of a chosen function.
_KILL_DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from shardkit import build as build_module, manifest, shards
    from shardkit.config import BuildConfig

    point, nth, source, output, config_json = sys.argv[1:6]
    nth = int(nth)
    calls = [0]

    def should_die():
        calls[0] += 1
        return calls[0] == nth

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point in ("first_sample", "mid_shard"):
        original_add = shards.ShardWriter.add
        def add(self, sample):
            if should_die():
                die()
            return original_add(self, sample)
        shards.ShardWriter.add = add
    elif point == "between_shards":
        original_commit = shards.ShardWriter.commit
        def commit(self):
            result = original_commit(self)  # the shard is complete under its final name...
            if should_die():
                die()                       # ...but the manifest does not list it yet
            return result
        shards.ShardWriter.commit = commit
    elif point == "manifest_write":
        original_write = manifest.atomic_write_bytes
        def write(path, payload):
            if path.name == "manifest.json" and should_die():
                temp = path.with_name("." + path.name + ".tmp")
                temp.write_bytes(payload[: len(payload) // 2])  # half a manifest, then death
                die()
            return original_write(path, payload)
        manifest.atomic_write_bytes = write
    build_module.build(source, output, BuildConfig(**json.loads(config_json)))
    print("finished without being killed")
""")


def _files(output: Path) -> dict[str, bytes]:
    return {p.relative_to(output).as_posix(): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("point,nth", [("first_sample", 1), ("mid_shard", 6), ("between_shards", 3),
                                       ("manifest_write", 4)])
def test_sigkill_then_resume_equals_an_uninterrupted_build(point, nth, toy_build, toy_dataset, make_config,
                                                           encoders, tmp_path):
    output = tmp_path / "out"
    config = make_config()
    child = subprocess.run([sys.executable, "-c", _KILL_DRIVER, point, str(nth), str(toy_dataset), str(output),
                            json.dumps(config.to_json())], capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stdout + child.stderr
    if (output / "manifest.json").exists():
        # What the kill left is unfinished but sound: nothing it lists is damaged.
        assert read_manifest(output).status == "in_progress"
        interrupted = inspect_output(str(output), verify_shards=True, allow_incomplete=True)
        assert interrupted.exit_code == 0, [f.as_json() for f in interrupted.verification.findings]
        assert "build_incomplete" in {w.kind for w in interrupted.verification.warnings}
        assert inspect_output(str(output), verify_shards=True).exit_code == 1  # but not a finished build
    build(str(toy_dataset), output, config, encoders=encoders)
    resumed, clean = _files(output), _files(toy_build)
    assert sorted(resumed) == sorted(clean)
    for name in clean:
        assert resumed[name] == clean[name], f"{name} differs after resuming from {point}"
    report = inspect_output(str(output), verify_shards=True)
    assert report.exit_code == 0 and not report.verification.warnings


def interrupt_build(source, output, config, encoders, monkeypatch, at_sample: int = 10) -> None:
    """A build stopped by Ctrl-C as it adds its ``at_sample``-th sample: OUTPUT is left resumable."""
    original_add = shards_module.ShardWriter.add
    calls = []

    def interrupted_add(self, sample):
        calls.append(sample.key)
        if len(calls) == at_sample:
            raise KeyboardInterrupt
        return original_add(self, sample)

    monkeypatch.setattr(shards_module.ShardWriter, "add", interrupted_add)
    with pytest.raises(KeyboardInterrupt):
        build(str(source), output, config, encoders=encoders)
    monkeypatch.setattr(shards_module.ShardWriter, "add", original_add)


def test_resume_keeps_completed_shards(toy_dataset, make_config, encoders, tmp_path, monkeypatch):
    output = tmp_path / "out"
    config = make_config()
    interrupt_build(toy_dataset, output, config, encoders, monkeypatch)
    assert not list((output / "shards").glob(".partial-*")), "an interrupted shard must not stay behind"
    done = read_manifest(output)
    assert done.status == "in_progress" and done.shards
    mtimes = {e.path: (output / e.path).stat().st_mtime_ns for e in done.shards}
    summary = build(str(toy_dataset), output, config, encoders=encoders)
    assert summary.shards_reused == len(mtimes) and summary.written == 17
    assert all((output / path).stat().st_mtime_ns == mtime for path, mtime in mtimes.items())


def test_changed_config_is_refused_and_overwrite_starts_over(toy_build, toy_dataset, make_config, encoders, tmp_path):
    import shutil

    output = tmp_path / "out"
    shutil.copytree(toy_build, output)
    with pytest.raises(ShardkitError, match="different options .*resize_mode"):
        build(str(toy_dataset), output, make_config(resize_mode="stretch"), encoders=encoders)
    summary = build(str(toy_dataset), output, make_config(resize_mode="stretch"), overwrite=True, encoders=encoders)
    assert summary.shards_reused == 0 and read_manifest(output).config["resize_mode"] == "stretch"


def test_disk_full_stops_cleanly_and_resumes(toy_build, toy_dataset, make_config, encoders, tmp_path, monkeypatch):
    output = tmp_path / "out"
    original_add = shards_module.ShardWriter.add
    calls = []

    def full_disk_add(self, sample):
        calls.append(1)
        if len(calls) >= 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original_add(self, sample)

    monkeypatch.setattr(shards_module.ShardWriter, "add", full_disk_add)
    with pytest.raises(ShardkitError, match="no space left .* run the same command again to resume"):
        build(str(toy_dataset), output, make_config(), encoders=encoders)
    monkeypatch.setattr(shards_module.ShardWriter, "add", original_add)
    assert not list((output / "shards").glob(".partial-*"))
    build(str(toy_dataset), output, make_config(), encoders=encoders)
    assert _files(output) == _files(toy_build)


def test_gpu_out_of_memory_halves_the_batch(toy_build, toy_dataset, make_config, encoders, tmp_path, monkeypatch):
    vae = encoders.vae
    original = type(vae)._encode
    sizes = []

    def tight_memory(self, pixels):
        sizes.append(len(pixels))
        if len(pixels) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, pixels)

    monkeypatch.setattr(type(vae), "_encode", tight_memory)
    output = tmp_path / "out"
    summary = build(str(toy_dataset), output, make_config(), encoders=encoders)
    assert summary.written == 17 and summary.skipped == 0
    # Every multi-image batch failed and was retried in halves down to single images.
    assert max(sizes) >= 3 and 2 in sizes and 1 in sizes
    import io
    import webdataset as wds

    def latents(root):
        out = {}
        for shard in sorted((root / "shards").glob("*.tar")):
            for sample in wds.WebDataset(str(shard), shardshuffle=False):
                out[sample["__key__"]] = np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)
        return out

    split, whole = latents(output), latents(toy_build)
    assert split.keys() == whole.keys()
    for key in whole:
        np.testing.assert_allclose(split[key].astype(np.float32), whole[key].astype(np.float32), atol=2e-3)
