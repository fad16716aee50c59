"""End-to-end build of the toy dataset: shard layout, encoder fidelity, determinism."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from shardkit.build import build
from shardkit.buckets import BucketTable
from shardkit.encoders import EncoderStreams, resolve_encoder_streams
from shardkit.images import decode_and_fit, to_model_input
from shardkit.manifest import read_manifest


def _tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_every_shard_holds_one_bucket_and_reads_with_webdataset(toy_build, toy_dataset):
    manifest = json.loads((toy_build / "manifest.json").read_text())
    records = json.loads((toy_dataset / "InternData" / "data_info.json").read_text())
    table = BucketTable(256)
    expected_bucket = {r["path"]: table.closest(r["height"], r["width"]).key for r in records}
    seen_keys: list[str] = []
    for shard in manifest["shards"]:
        url = str(toy_build / shard["path"])
        assert f"{shard['bucket_hw'][0]}x{shard['bucket_hw'][1]}" in Path(shard["path"]).name
        samples = list(wds.WebDataset(url, shardshuffle=False))
        assert len(samples) == shard["samples"]
        for sample in samples:
            meta = json.loads(sample["json"])
            assert meta["bucket"] == shard["bucket"] == expected_bucket[meta["path"]]
            latent = np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)
            h, w = shard["bucket_hw"]
            assert latent.shape == (8, h // 8, w // 8) and latent.dtype == np.float16
            assert sample["txt"].decode() == meta["captions"]["prompt"]
            for name in meta["t5_fields"]:
                t5 = np.load(io.BytesIO(sample[f"t5_{name}.npy"]), allow_pickle=False)
                assert t5.shape == (meta["t5_lengths"][name], 32)
            seen_keys.append(sample["__key__"])
    assert len(seen_keys) == len(set(seen_keys)) == len(records)
    assert all("." not in k and "/" not in k for k in seen_keys)
    assert manifest["records"] == {"read": len(records), "written": len(records), "skipped": 0}


def test_members_of_a_sample_are_adjacent_and_reproducible_metadata(toy_build):
    for shard in (toy_build / "shards").glob("*.tar"):
        members = _tar_members(shard)
        keys = [m.name.split(".", 1)[0] for m in members]
        runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
        assert len(runs) == len(set(runs)), f"a sample's members are split in {shard}"
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)


def test_latents_equal_a_direct_vae_encode(toy_build, toy_dataset, tiny_models, make_config, encoders, tmp_path):
    """Every stored latent equals AutoencoderKL.encode (fp32) of the same transformed image, encoded
    in the same batches and on as many intra-op threads as the build's encoder streams (CPU
    convolutions differ by up to ~1e-3 between batch sizes and thread counts)."""
    from diffusers import AutoencoderKL

    config = make_config(store_dtype="fp32")
    output = tmp_path / "fp32"
    build(str(toy_dataset), output, config, encoders=_fp32(encoders))
    vae = AutoencoderKL.from_pretrained(tiny_models, subfolder="vae").eval()
    table = BucketTable(256)
    checked = 0
    streams = EncoderStreams(resolve_encoder_streams(config.encoder_streams, torch.device("cpu")))

    def direct_encode(pixels: list[np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            dist = vae.encode(to_model_input(torch.from_numpy(np.stack(pixels))).contiguous()).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).numpy()

    with streams:
        for shard in sorted((output / "shards").glob("*.tar")):
            samples = list(wds.WebDataset(str(shard), shardshuffle=False))
            for start in range(0, len(samples), config.batch_size):
                batch = samples[start:start + config.batch_size]
                pixels = []
                for sample in batch:
                    meta = json.loads(sample["json"])
                    image = decode_and_fit(toy_dataset / "InternImgs" / meta["path"], table[meta["bucket"]], "crop",
                                           10**9, None, lanczos=False)
                    pixels.append(image.pixels)
                direct = streams.submit(direct_encode, pixels).result()
                for sample, expected in zip(batch, direct):
                    stored = np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)
                    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5)
                    checked += 1
    assert checked == 17


def _fp32(encoders):
    """The shared encoders, storing fp32 (the store dtype is only a cast after encoding)."""
    import copy

    clone = copy.copy(encoders)
    clone.vae = copy.copy(encoders.vae)
    clone.t5 = copy.copy(encoders.t5)
    for part in (clone.vae, clone.t5):
        part.store_dtype = np.float32
        part.identity = copy.copy(part.identity)
        part.identity.store_dtype = "fp32"
    return clone


def test_t5_rows_equal_a_max_length_padded_encode(toy_build, tiny_models):
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_models, subfolder="tokenizer")
    model = T5EncoderModel.from_pretrained(tiny_models, subfolder="text_encoder").eval()
    checked = 0
    for shard in sorted((toy_build / "shards").glob("*.tar"))[:4]:
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            meta = json.loads(sample["json"])
            for name in meta["t5_fields"]:
                tokens = tokenizer(meta["captions"][name], max_length=300, padding="max_length", truncation=True,
                                   return_tensors="pt")
                with torch.no_grad():
                    full = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state[0]
                valid = int(tokens.attention_mask.sum())
                stored = np.load(io.BytesIO(sample[f"t5_{name}.npy"]), allow_pickle=False)
                assert stored.shape == (valid, 32) == (meta["t5_lengths"][name], 32)
                np.testing.assert_allclose(stored.astype(np.float32), full[:valid].numpy(), rtol=2e-3, atol=2e-3)
                checked += 1
    assert checked >= 6


def _digests(output: Path) -> dict[str, bytes]:
    return {p.relative_to(output).as_posix(): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


def test_same_input_and_config_give_byte_identical_output(toy_build, toy_dataset, make_config, encoders, tmp_path):
    """A second build, this time with two decode worker threads, equals the shared one byte for byte."""
    again = tmp_path / "again"
    build(str(toy_dataset), again, make_config(workers=2), encoders=encoders)
    first, second = _digests(toy_build), _digests(again)
    assert sorted(first) == sorted(second)
    for name in first:
        if name == "manifest.json":  # the workers option itself is recorded in the config
            a, b = json.loads(first[name]), json.loads(second[name])
            a["config"].pop("workers"), b["config"].pop("workers")
            assert a == b
        else:
            assert first[name] == second[name], name
    rebuilt = tmp_path / "rebuilt"
    build(str(toy_dataset), rebuilt, make_config(), encoders=encoders)
    assert _digests(rebuilt) == first


def test_manifest_describes_shards_exactly(toy_build):
    import hashlib

    manifest = read_manifest(toy_build)
    data = json.loads((toy_build / "manifest.json").read_text())
    assert data["status"] == "complete" and data["format_version"] == 1
    assert data["encoders"]["t5"]["hidden_size"] == 32 and data["encoders"]["vae"]["latent_channels"] == 4
    assert data["encoders"]["vae"]["scaling_factor"] == pytest.approx(0.13025)
    assert data["buckets"]["1.0"] == [256, 256]
    for entry in manifest.shards:
        blob = (toy_build / entry.path).read_bytes()
        assert len(blob) == entry.bytes and hashlib.sha256(blob).hexdigest() == entry.sha256
        with tarfile.open(toy_build / entry.path) as tar:
            assert len({m.name.split(".", 1)[0] for m in tar.getmembers()}) == entry.samples
    per_bucket = data["totals"]["per_bucket"]
    assert sum(b["samples"] for b in per_bucket.values()) == data["records"]["written"]
    lengths = data["token_lengths"]["prompt"]
    assert sum(lengths.values()) == data["records"]["written"]


def test_shard_limits_by_count_and_bytes(toy_dataset, make_config, encoders, tmp_path):
    by_count = tmp_path / "count"
    build(str(toy_dataset), by_count, make_config(shard_max_count=1), encoders=encoders)
    manifest = read_manifest(by_count)
    assert all(e.samples == 1 for e in manifest.shards) and len(manifest.shards) == 17
    by_bytes = tmp_path / "bytes"
    limit = 150_000
    build(str(toy_dataset), by_bytes, make_config(shard_max_bytes=limit, shard_max_count=100), encoders=encoders)
    manifest = read_manifest(by_bytes)
    multi = [e for e in manifest.shards if e.samples > 1]
    assert multi, "the limit should still let small samples share a shard"
    assert all(e.bytes <= limit for e in multi)
    assert len(manifest.shards) > 13  # some bucket needed a second shard because of the byte limit
    assert sum(e.samples for e in manifest.shards) == 17


def test_images_can_be_left_out(toy_dataset, make_config, encoders, tmp_path):
    output = tmp_path / "noimg"
    build(str(toy_dataset), output, make_config(keep_images=False), encoders=encoders)
    for shard in (output / "shards").glob("*.tar"):
        names = [m.name for m in _tar_members(shard)]
        assert not any(n.endswith((".jpg", ".png")) for n in names)
