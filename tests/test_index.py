"""`shardkit index`: a build read by wids and by Megatron-Energon without any preparation step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from shardkit.cli import main


def _index(output: Path, *args: str):
    return CliRunner().invoke(main, ["index", str(output), *args])


def _manifest_keys(output: Path) -> list[str]:
    """Every sample key of the build, read with tarfile (one per sample, members grouped by key)."""
    import tarfile

    manifest = json.loads((output / "manifest.json").read_text())
    keys = []
    for shard in manifest["shards"]:
        with tarfile.open(output / shard["path"]) as tar:
            for member in tar:
                key = member.name.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


@pytest.fixture()
def build_copy(toy_build, tmp_path) -> Path:
    output = tmp_path / "out"
    shutil.copytree(toy_build, output)
    return output


def test_wids_reads_every_sample_once(build_copy, tmp_path, monkeypatch):
    wids = pytest.importorskip("wids")
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "wids-cache"))
    result = _index(build_copy, "--format", "wids")
    assert result.exit_code == 0, result.output
    index_file = build_copy / "wids-index.json"
    index = json.loads(index_file.read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    for shard in index["shardlist"]:
        assert not shard["url"].startswith("/")  # relative to the index file
        assert shard["filesize"] == (build_copy / shard["url"]).stat().st_size

    dataset = wids.ShardListDataset(str(index_file), transformations=[])
    keys = [dataset[i]["__key__"] for i in range(len(dataset))]
    expected = _manifest_keys(build_copy)
    assert len(keys) == len(expected) and sorted(k.rsplit("/", 1)[-1] for k in keys) == sorted(expected)


def test_wids_index_elsewhere_points_back_at_the_shards(build_copy, tmp_path):
    target = tmp_path / "indexes" / "toy.json"
    target.parent.mkdir()
    result = _index(build_copy, "--format", "wids", "--output", str(target))
    assert result.exit_code == 0, result.output
    for shard in json.loads(target.read_text())["shardlist"]:
        assert (target.parent / shard["url"]).resolve() == (build_copy / shard["url"].split("out/", 1)[1]).resolve()


def test_energon_reads_every_sample_once_and_verify_stays_clean(build_copy):
    pytest.importorskip("megatron.energon")
    from megatron.energon import WorkerConfig, get_loader, get_train_dataset

    from shardkit.energon import ShardkitSample

    result = _index(build_copy, "--format", "energon")
    assert result.exit_code == 0, result.output
    manifest = json.loads((build_copy / "manifest.json").read_text())
    for shard in manifest["shards"]:
        assert (build_copy / (shard["path"] + ".idx")).stat().st_size == 8 * (shard["samples"] + 1)

    dataset = get_train_dataset(str(build_copy), worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
                                batch_size=None, shuffle_buffer_size=None, max_samples_per_sequence=None, repeat=False)
    samples = list(get_loader(dataset))
    assert sorted(s.__key__.rsplit("/", 1)[-1] for s in samples) == sorted(_manifest_keys(build_copy))
    sample = samples[0]
    assert isinstance(sample, ShardkitSample)
    assert sample.latent.ndim == 3 and sample.caption_features.ndim == 2
    assert sample.caption_features.shape[0] == sample.metadata["t5_lengths"]["prompt"]
    assert sample.caption == sample.metadata["captions"]["prompt"]

    verify = CliRunner().invoke(main, ["inspect", str(build_copy), "--verify", "--no-progress"])
    assert verify.exit_code == 0, verify.output


def test_verify_flags_a_stale_energon_index(build_copy):
    assert _index(build_copy, "--format", "energon").exit_code == 0
    idx = next((build_copy / "shards").glob("*.tar.idx"))
    idx.write_bytes(idx.read_bytes()[:-8] + (123456).to_bytes(8, "little"))
    verify = CliRunner().invoke(main, ["inspect", str(build_copy), "--verify", "--no-progress"])
    assert verify.exit_code == 1 and idx.name in verify.output



def test_a_shard_that_does_not_match_the_manifest_is_refused(build_copy):
    shard = next((build_copy / "shards").glob("*.tar"))
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = _index(build_copy, "--format", "wids")
    assert result.exit_code == 2
    assert shard.name in result.output and "inspect --verify" in result.output
    assert not (build_copy / "wids-index.json").exists()


def test_an_unfinished_build_is_refused(build_copy):
    manifest = json.loads((build_copy / "manifest.json").read_text())
    manifest["status"] = "in_progress"
    (build_copy / "manifest.json").write_text(json.dumps(manifest))
    result = _index(build_copy, "--format", "energon")
    assert result.exit_code == 2 and "rerun `shardkit build`" in result.output
    assert not (build_copy / ".nv-meta").exists()


def test_energon_index_refuses_another_destination(build_copy, tmp_path):
    result = _index(build_copy, "--format", "energon", "--output", str(tmp_path / "x"))
    assert result.exit_code == 2 and "drop --output" in result.output


def test_a_rebuild_with_overwrite_removes_the_old_indexes(build_copy, toy_dataset, make_config, encoders):
    from shardkit.build import build

    assert _index(build_copy, "--format", "wids").exit_code == 0
    assert _index(build_copy, "--format", "energon").exit_code == 0
    build(str(toy_dataset), build_copy, make_config(), overwrite=True, encoders=encoders)
    assert not (build_copy / "wids-index.json").exists() and not (build_copy / ".nv-meta").exists()
    assert not list((build_copy / "shards").glob("*.idx"))
