"""Caption dropout: the build stores the empty caption's encoding once, inspect checks it, and the
reader swaps it in per (seed, epoch, key)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from make_pre_declaration_build import make_pre_declaration_build
from shardkit.build import build
from shardkit.errors import ShardkitError
from shardkit.format import read_npy
from shardkit.inspect import inspect_output
from shardkit.reader import ShardReader

EMPTY = "empty_caption/t5.npy"


def _declared(output: Path) -> dict:
    return json.loads((output / "manifest.json").read_text())["sample_format"]["empty_captions"]["t5"]


def _without_empty_caption(output: Path) -> None:
    """OUTPUT as a build made before shardkit stored the empty caption left it."""
    manifest = json.loads((output / "manifest.json").read_text())
    del manifest["sample_format"]["empty_captions"]
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(output / "empty_caption")


def _epochs(reader: ShardReader, epochs: range) -> list[dict]:
    batches = []
    for epoch in epochs:
        reader.set_epoch(epoch)
        batches.extend(reader)
    return batches


def test_the_build_stores_the_empty_caption_as_captions_are_stored(toy_build, encoders):
    declared = _declared(toy_build)
    payload = (toy_build / EMPTY).read_bytes()
    stored = read_npy(payload, EMPTY)
    ids = np.asarray(encoders.t5.tokenize(""), dtype=np.int32)
    assert np.array_equal(stored, encoders.t5.encode([ids], 1)[0])  # "" encoded like any caption, valid rows only
    assert declared["sha256"] == hashlib.sha256(payload).hexdigest()
    assert declared["shape"] == [len(ids), 32] and declared["length"] == len(ids) and declared["dtype"] == "float16"
    report = inspect_output(str(toy_build), verify_shards=True)
    assert report.verification.sound, report.verification.findings


def test_dropout_swaps_about_p_of_captions_for_the_stored_empty_caption(toy_build):
    reader = ShardReader(toy_build, batch_size=64, layout="dict", caption_dropout=0.1, seed=5, real_prompt_ratio=0.5,
                         latent="mean")
    empty = read_npy((toy_build / EMPTY).read_bytes(), EMPTY)
    padded = np.concatenate([empty, np.repeat(empty[-1:], 300 - len(empty), axis=0)])  # as any caption is padded
    samples = dropped = 0
    epoch = 0
    while samples < 5000:
        reader.set_epoch(epoch)
        epoch += 1
        for batch in reader:
            for i, prompt in enumerate(batch["prompt"]):
                samples += 1
                if prompt == "":
                    dropped += 1
                    assert batch["caption_field"][i] == ""
                    assert np.array_equal(batch["caption_feature"][i, 0].numpy(), padded)
                    assert batch["attention_mask"][i, 0, 0].tolist() == [1] * len(empty) + [0] * (300 - len(empty))
                else:
                    assert batch["attention_mask"][i, 0, 0].sum() > 0
    assert abs(dropped / samples - 0.1) < 0.015, (dropped, samples)


def test_dropout_is_drawn_per_seed_epoch_and_key_whatever_the_order(toy_build):
    def dropped(seed: int, epoch: int, shuffle: bool) -> set[str]:
        reader = ShardReader(toy_build, batch_size=4, layout="dict", caption_dropout=0.3, seed=seed, shuffle=shuffle)
        reader.set_epoch(epoch)
        return {k for b in reader for k, p in zip(b["keys"], b["prompt"]) if p == ""}

    first = dropped(1, 0, shuffle=True)
    assert first and first == dropped(1, 0, shuffle=False)
    assert first != dropped(1, 1, shuffle=True) and first != dropped(2, 0, shuffle=True)
    none = ShardReader(toy_build, batch_size=4, layout="dict", caption_dropout=0.0)
    every = ShardReader(toy_build, batch_size=4, layout="dict", caption_dropout=1.0)
    assert all(p for b in none for p in b["prompt"]) and not any(p for b in every for p in b["prompt"])


def test_a_build_without_the_empty_caption_refuses_dropout_and_a_resume_adds_it(toy_build, toy_dataset, make_config,
                                                                                 encoders, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(toy_build, old)
    _without_empty_caption(old)
    with pytest.raises(ShardkitError, match=r"stores no empty caption .* run the same `shardkit build SOURCE OUTPUT` again"):
        ShardReader(old, batch_size=4, caption_dropout=0.1)
    assert len(list(ShardReader(old, batch_size=4))) > 0  # without dropout it reads as before
    assert inspect_output(str(old), verify_shards=True).verification.sound
    shards = {p.name: p.read_bytes() for p in (old / "shards").iterdir()}
    summary = build(str(toy_dataset), old, make_config(), encoders=encoders)
    assert summary.shards_reused == summary.shards == len(shards)
    assert {p.name: p.read_bytes() for p in (old / "shards").iterdir()} == shards
    assert _declared(old) == _declared(toy_build) and (old / EMPTY).read_bytes() == (toy_build / EMPTY).read_bytes()
    # Shards from before the declaration existed read with dropout once the empty caption is there.
    pre = make_pre_declaration_build(toy_build, tmp_path / "pre")
    with pytest.raises(ShardkitError, match="stores no empty caption"):
        ShardReader(pre, batch_size=4, caption_dropout=0.1)
    with pytest.raises(ShardkitError, match="pass the build folder or its manifest.json"):
        ShardReader(sorted(str(p) for p in (toy_build / "shards").glob("*.tar")), batch_size=4, max_length=300,
                    caption_dropout=0.1)


def test_a_damaged_empty_caption_is_reported_refused_and_written_again_on_resume(toy_build, toy_dataset, make_config,
                                                                                 encoders, tmp_path, caplog):
    output = tmp_path / "out"
    shutil.copytree(toy_build, output)
    original = (output / EMPTY).read_bytes()
    damaged = bytearray(original)
    damaged[-1] ^= 0x01
    (output / EMPTY).write_bytes(bytes(damaged))
    findings = inspect_output(str(output), verify_shards=True).verification.findings
    assert [(f.kind, f.shard) for f in findings] == [("bad_empty_caption", EMPTY)]
    assert "sha256" in findings[0].message
    with pytest.raises(ShardkitError, match="sha256.*run the same `shardkit build SOURCE OUTPUT` again"):
        ShardReader(output, batch_size=4, caption_dropout=0.1)
    (output / EMPTY).unlink()
    findings = inspect_output(str(output), verify_shards=True).verification.findings
    assert [(f.kind, "missing" in f.message) for f in findings] == [("bad_empty_caption", True)]
    with caplog.at_level(logging.WARNING, logger="shardkit.build"):
        build(str(toy_dataset), output, make_config(), encoders=encoders)
    assert "encoding it again" in caplog.text
    assert (output / EMPTY).read_bytes() == original  # the same bytes as the first build wrote
    assert inspect_output(str(output), verify_shards=True).verification.sound


def test_a_rebuild_writes_the_same_empty_caption(toy_build, toy_dataset, make_config, encoders, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(toy_build, output)
    (output / EMPTY).write_bytes(b"left from an earlier build")
    build(str(toy_dataset), output, make_config(), overwrite=True, encoders=encoders)
    assert (output / EMPTY).read_bytes() == (toy_build / EMPTY).read_bytes()
    assert _declared(output) == _declared(toy_build)


@pytest.mark.parametrize("probability", [-0.1, 1.5])
def test_a_dropout_outside_0_1_is_one_clear_error(toy_build, probability):
    with pytest.raises(ShardkitError, match=r"caption_dropout must be within \[0, 1\]"):
        ShardReader(toy_build, batch_size=4, caption_dropout=probability)


def test_dropout_resumes_mid_epoch_and_mixes_builds_with_their_own_empty_caption(toy_build, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(toy_build, other)
    options = dict(batch_size=2, weights=[1, 1], layout="dict", caption_dropout=0.3, seed=3, rank=0, world_size=1)

    def seen(batches) -> list[tuple[list[str], list[str]]]:
        return [(b["keys"], b["prompt"]) for b in batches]

    full = seen(ShardReader([toy_build, other], **options))
    assert any("" in prompts for _, prompts in full) and any(p for _, prompts in full for p in prompts)
    reader = ShardReader([toy_build, other], **options)
    batches = iter(reader)
    head = seen(next(batches) for _ in range(3))
    resumed = ShardReader([toy_build, other], **options)
    resumed.load_state_dict(json.loads(json.dumps(reader.state_dict())))
    assert head + seen(resumed) == full
    (other / EMPTY).unlink()
    with pytest.raises(ShardkitError, match="empty caption"):
        ShardReader([toy_build, other], **options)
