"""Encoder precision: the VAE's autocast rule, and NaN/inf features skipped instead of written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shardkit.build import NON_FINITE_FEATURES, build
from shardkit.encoders import vae_precision
from shardkit.inspect import inspect_output


def test_vae_precision_upcasts_where_the_vae_asks_for_it():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # SDXL's VAE (force_upcast): fp32 weights under fp16 autocast, as PixArt-Σ encodes.
    assert vae_precision("auto", cuda, force_upcast=True) == (torch.float32, torch.float16)
    assert vae_precision("auto", cuda, force_upcast=False) == (torch.float16, None)
    assert vae_precision("fp16", cuda, force_upcast=True) == (torch.float16, None)  # asked for: as given
    assert vae_precision("bf16", cuda, force_upcast=True) == (torch.bfloat16, None)
    assert vae_precision("auto", cpu, force_upcast=True) == (torch.float32, None)


def test_the_vae_encodes_under_autocast_when_set(encoders, monkeypatch):
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    exact = encoders.vae.encode(pixels)
    monkeypatch.setattr(encoders.vae, "autocast_dtype", torch.bfloat16)  # CPU autocast has bf16
    assert encoders.vae.compute_dtype_name == "autocast-bfloat16"
    autocast = encoders.vae.encode(pixels)
    difference = np.abs(autocast.astype(np.float32) - exact.astype(np.float32))
    # bf16 convolutions: close to the fp32 result, and not equal to it (autocast did engage).
    assert 0 < difference.max() < 0.1 * (np.abs(exact).max() + 1)


def _failures(output) -> list[dict]:
    return [json.loads(line) for line in (output / "failures.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("where", ["latent", "caption"])
def test_a_non_finite_latent_or_caption_is_skipped_with_what_to_change(where, toy_dataset, make_config, encoders,
                                                                       tmp_path, monkeypatch):
    vae_encode, t5_encode = type(encoders.vae).encode, type(encoders.t5).encode_distinct
    calls = []

    def nan_in_first_latent(self, pixels):
        latents = vae_encode(self, pixels)
        calls.append(len(pixels))
        if len(calls) == 1:
            latents[0, 0, 0, 0] = np.nan
        return latents

    def inf_in_one_caption(self, captions, batch_size):
        features = t5_encode(self, captions, batch_size)
        calls.append(len(features))
        if len(calls) == 1:
            first = next(iter(features))
            features[first] = features[first].copy()
            features[first][-1, 0] = np.inf
        return features

    if where == "latent":
        monkeypatch.setattr(type(encoders.vae), "encode", nan_in_first_latent)
    else:
        monkeypatch.setattr(type(encoders.t5), "encode_distinct", inf_in_one_caption)
    output = tmp_path / "out"
    summary = build(str(toy_dataset), output, make_config(), encoders=encoders)
    skips = [s for s in _failures(output) if s["reason"] == NON_FINITE_FEATURES]
    # One latent is one record; one caption's features may be shared by several records.
    assert skips and summary.skipped_by_reason[NON_FINITE_FEATURES] == len(skips)
    assert len(skips) == 1 or where == "caption"
    assert summary.written + summary.skipped == summary.records_read == 17
    expected = "the VAE latent" if where == "latent" else "the T5 features of caption field"
    assert all(expected in s["detail"] and "--dtype fp32" in s["detail"] and "float32" in s["detail"] for s in skips)
    verification = inspect_output(str(output), verify_shards=True).verification
    assert verification.sound and verification.samples_checked == summary.written  # no NaN was written


def test_a_shard_whose_every_record_is_skipped_leaves_no_empty_tar(toy_dataset, make_config, encoders,
                                                                  tmp_path, monkeypatch):
    vae_encode = type(encoders.vae).encode

    def all_nan(self, pixels):
        return np.full_like(vae_encode(self, pixels), np.nan)

    monkeypatch.setattr(type(encoders.vae), "encode", all_nan)
    output = tmp_path / "out"
    config = make_config()
    summary = build(str(toy_dataset), output, config, encoders=encoders)
    assert summary.written == 0 and summary.skipped_by_reason[NON_FINITE_FEATURES] == summary.skipped > 0
    assert summary.shards == 0 and not list((output / "shards").glob("*"))
    # The plans are done: a resume encodes nothing again.
    monkeypatch.setattr(type(encoders.vae), "encode", lambda self, pixels: pytest.fail("re-encoded on resume"))
    again = build(str(toy_dataset), output, config, encoders=encoders)
    assert again.written == 0 and again.skipped == summary.skipped


def _stored_latents(output) -> dict[str, tuple[dict, np.ndarray]]:
    """path -> (metadata, latent) for every sample in the build's shards."""
    import io
    import tarfile

    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted((output / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                members.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    stored = {}
    for parts in members.values():
        meta = json.loads(parts["json"])
        stored[meta["path"]] = (meta, np.load(io.BytesIO(parts["latent.npy"]), allow_pickle=False))
    return stored


def test_a_cpu_fp32_build_stores_the_latents_of_an_fp64_encode(tiny_models, make_config, tmp_path):
    """The CPU path must run the VAE on NCHW input: PyTorch's channels-last CPU GroupNorm is far
    less exact. Images already at their bucket's size are encoded from exactly their pixels."""
    from diffusers import AutoencoderKL
    from PIL import Image

    rng = np.random.default_rng(3)
    source = tmp_path / "images"
    source.mkdir()
    pixels = {}
    for name, (height, width) in {"square.png": (256, 256), "wide.png": (224, 288), "tall.png": (288, 224)}.items():
        # Smooth gradients with a little grain, like a sky: where channels-last GroupNorm loses most.
        ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
        array = np.clip(ramp + rng.normal(0, 3, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(array).save(source / name)
        (source / name).with_suffix(".txt").write_text(f"a picture called {name}")
        pixels[name] = array
    output = tmp_path / "out"
    build(str(source), output, make_config(captions=("prompt",), store_dtype="fp32", dtype="fp32", device="cpu"))

    vae = AutoencoderKL.from_pretrained(tiny_models, subfolder="vae", torch_dtype=torch.float64).eval()
    stored = _stored_latents(output)
    assert sorted(stored) == sorted(pixels)
    for name, (meta, latent) in stored.items():
        assert meta["bucket_hw"] == list(pixels[name].shape[:2]) and (meta["crop_top"], meta["crop_left"]) == (0, 0)
        x = torch.from_numpy(pixels[name]).permute(2, 0, 1)[None].to(torch.float64) / 127.5 - 1.0
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
        expected = torch.cat([posterior.mean, posterior.std], dim=1)[0].numpy()
        assert latent.dtype == np.float32 and latent.shape == expected.shape
        relative = np.abs(latent - expected).max() / np.abs(expected).max()
        assert relative < 1e-5, f"{name}: {relative:.2e}"
