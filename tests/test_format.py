"""The declared sample format: what the manifest says, what a third-party reader needs, and
builds made before the declaration existed."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from make_pre_declaration_build import make_pre_declaration_build
from shardkit.errors import ShardkitError
from shardkit.export import export_pixart
from shardkit.format import SampleFormat, declare_from_config, members_table, safe_relative_path
from shardkit.inspect import inspect_output
from shardkit.manifest import read_manifest
from shardkit.reader import ShardReader

REPO = Path(__file__).resolve().parent.parent


def test_the_manifest_declares_every_member_of_its_samples(toy_build):
    raw = json.loads((toy_build / "manifest.json").read_text())
    declared = SampleFormat.from_json(raw["sample_format"])
    # The config and encoders imply all of it but the stored empty caption's checksum and shape.
    assert replace(declared, empty_captions={}) == declare_from_config(raw["config"], raw["encoders"])
    assert list(declared.empty_captions) == ["t5"] and declared.empty_captions["t5"].path == "empty_caption/t5.npy"
    assert declared.params == {"C": 4, "f": 8, "D": 32, "max_length": 300, "max_image_bytes": declared.params["max_image_bytes"]}
    names = [member.name for member in declared.members]
    assert names == ["json", "txt", "{image_ext}", "latent.npy", "t5_{field}.npy"]
    latent = declared.spec("latent.npy")
    assert latent.dtype == "float16" and declared.shape_rule(latent, [288, 224]) == [(8, 8), (36, 36), (28, 28)]
    assert declared.shape_rule(declared.spec("t5_sharegpt4v.npy"), [288, 224]) == [(1, 300), (32, 32)]


def test_a_declaration_of_an_unknown_format_is_one_clear_error(toy_build):
    raw = json.loads((toy_build / "manifest.json").read_text())
    with pytest.raises(ShardkitError, match="sample format"):
        SampleFormat.from_json({**raw["sample_format"], "version": 99})
    with pytest.raises(ShardkitError, match="malformed"):
        SampleFormat.from_json({**raw["sample_format"], "members": [{"name": 1}]})


def test_docs_format_md_shows_the_code_s_declaration(toy_build):
    declared = read_manifest(toy_build).declaration()
    assert members_table(declared) in (REPO / "docs" / "format.md").read_text()


def _read_with_tarfile_and_numpy(build: Path) -> dict[str, dict]:
    """A third-party reader following docs/format.md: the manifest, tarfile and numpy, nothing else."""
    manifest = json.loads((build / "manifest.json").read_text())
    declared = manifest["sample_format"]
    C, f, D = (declared["params"][name] for name in ("C", "f", "D"))
    samples: dict[str, dict] = {}
    for entry in manifest["shards"]:
        data = (build / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        height, width = entry["bucket_hw"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                payload = tar.extractfile(member).read()
                sample = samples.setdefault(key, {})
                if suffix == "json":
                    sample["meta"] = json.loads(payload)
                elif suffix.endswith(".npy"):
                    sample[suffix] = np.load(io.BytesIO(payload), allow_pickle=False)
        for key, sample in samples.items():
            if sample["meta"]["bucket"] == entry["bucket"]:
                assert sample["latent.npy"].shape == (2 * C, height // f, width // f)
                for name, length in sample["meta"]["t5_lengths"].items():
                    assert sample[f"t5_{name}.npy"].shape == (length, D)
    return samples


def test_a_third_party_reader_with_tarfile_and_numpy_gets_what_shard_reader_gets(toy_build):
    samples = _read_with_tarfile_and_numpy(toy_build)
    batches = list(ShardReader(toy_build, batch_size=1, layout="dict", latent="mean", shuffle=False, dtype=torch.float32))
    assert sorted(samples) == sorted(b["keys"][0] for b in batches)
    for batch in batches:
        sample = samples[batch["keys"][0]]
        moments, feature = sample["latent.npy"], sample["t5_prompt.npy"]
        assert np.array_equal(batch["latent"][0].numpy(), moments[: moments.shape[0] // 2].astype(np.float32))
        padded = np.concatenate([feature, np.repeat(feature[-1:], 300 - len(feature), axis=0)])  # the last row repeated
        assert np.array_equal(batch["caption_feature"][0, 0].numpy(), padded.astype(np.float32))
        assert batch["attention_mask"][0, 0, 0].sum() == len(feature)


def test_a_build_made_before_declarations_is_read_verified_and_exported_the_same(toy_build, tmp_path):
    old = make_pre_declaration_build(toy_build, tmp_path / "old")
    assert "sample_format" not in json.loads((old / "manifest.json").read_text())
    options = dict(batch_size=2, layout="dict", seed=3, real_prompt_ratio=0.5)
    for new_batch, old_batch in zip(ShardReader(toy_build, **options), ShardReader(old, **options), strict=True):
        assert new_batch["keys"] == old_batch["keys"] and torch.equal(new_batch["latent"], old_batch["latent"])
        assert torch.equal(new_batch["caption_feature"], old_batch["caption_feature"])
    report = inspect_output(str(old), verify_shards=True)
    assert report.verification.sound, report.verification.findings
    export_pixart(toy_build, tmp_path / "new_export")
    export_pixart(old, tmp_path / "old_export")
    new_files = {p.relative_to(tmp_path / "new_export"): p.read_bytes() for p in (tmp_path / "new_export").rglob("*") if p.is_file()}
    old_files = {p.relative_to(tmp_path / "old_export"): p.read_bytes() for p in (tmp_path / "old_export").rglob("*") if p.is_file()}
    assert new_files == old_files and len(new_files) > 17


@pytest.mark.parametrize("path", ["../x.png", "/abs.png", "a/../../x.png", "a\\x.png", "C:x.png", "a\x00b.png", "", 7])
def test_one_rule_refuses_sample_paths_that_leave_their_folder(path):
    with pytest.raises(ShardkitError):
        safe_relative_path(path)


@pytest.mark.parametrize("path", ["a.png", "deep/er/a b.jpg", "./a.png", "x..y.png"])
def test_one_rule_accepts_relative_paths(path):
    assert safe_relative_path(path) == path
    assert not re.search(r"\\", path)
