"""GPU code paths (channels-last NHWC input, pinned non-blocking copies, fp16 autocast, the cast
to the store dtype on the device). They run only where torch sees a CUDA GPU: CI machines have
none; ``benchmarks/device_check.sh`` runs them on a GPU machine."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shardkit.build import build
from shardkit.encoders import load_encoders
from shardkit.inspect import inspect_output
from shardkit.manifest import read_manifest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")


def _relative_rms(got: np.ndarray, expected: np.ndarray) -> float:
    got, expected = got.astype(np.float64), expected.astype(np.float64)
    return float(np.sqrt(np.mean((got - expected) ** 2)) / (np.sqrt(np.mean(expected ** 2)) + 1e-12))


def _arrays(output: Path) -> dict[str, dict[str, np.ndarray]]:
    """key -> member suffix -> array, for every .npy member of every shard."""
    samples: dict[str, dict[str, np.ndarray]] = {}
    for shard in sorted((output / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                if suffix.endswith(".npy"):
                    data = tar.extractfile(member).read()
                    samples.setdefault(key, {})[suffix] = np.load(io.BytesIO(data), allow_pickle=False)
    return samples


@pytest.fixture(scope="module")
def gpu_fp32_build(tmp_path_factory, toy_dataset, make_config) -> Path:
    output = tmp_path_factory.mktemp("gpu") / "fp32"
    build(str(toy_dataset), output, make_config(device="cuda", dtype="fp32"))
    return output


def test_the_gpu_path_takes_its_gpu_settings(make_config):
    encoders = load_encoders(make_config(device="cuda", dtype="auto"))
    assert encoders.device.type == "cuda"
    assert encoders.vae.channels_last
    assert encoders.vae.weights_dtype == torch.float16 or encoders.vae.autocast_dtype == torch.float16
    assert encoders.t5.dtype == torch.float16


def test_an_fp32_gpu_build_writes_what_the_cpu_build_writes(gpu_fp32_build, toy_build):
    gpu, cpu = _arrays(gpu_fp32_build), _arrays(toy_build)
    assert sorted(gpu) == sorted(cpu)
    assert sorted(p.name for p in (gpu_fp32_build / "shards").glob("*.tar")) == \
        sorted(p.name for p in (toy_build / "shards").glob("*.tar"))
    for key, members in cpu.items():
        assert sorted(gpu[key]) == sorted(members)
        for suffix, expected in members.items():
            got = gpu[key][suffix]
            assert got.shape == expected.shape and got.dtype == expected.dtype
            # cuDNN picks other convolution algorithms (TF32 included): close, not bit-equal.
            assert _relative_rms(got, expected) < 1e-2, f"{key}.{suffix}"


def test_an_fp16_gpu_build_is_sound_and_says_how_it_computed(tmp_path, toy_dataset, make_config, toy_build):
    output = tmp_path / "fp16"
    summary = build(str(toy_dataset), output, make_config(device="cuda", dtype="auto"))
    assert summary.written == 17 and summary.skipped == 0
    manifest = read_manifest(output)
    assert {manifest.encoders["vae"]["compute_dtype"], manifest.encoders["t5"]["compute_dtype"]} <= \
        {"float16", "autocast-float16"}
    report = inspect_output(str(output), verify_shards=True)
    assert report.exit_code == 0, [f.as_json() for f in report.verification.findings]
    gpu, cpu = _arrays(output), _arrays(toy_build)
    errors = {f"{key}.{suffix}": _relative_rms(gpu[key][suffix], expected)
              for key, members in cpu.items() for suffix, expected in members.items()}
    # fp16 keeps 11 significant bits: a few tenths of a percent through the tiny encoders
    # (bf16, with 8, gives at most 0.8% here, measured on the CPU).
    assert max(errors.values()) < 3e-2, max(errors.items(), key=lambda item: item[1])


def test_a_gpu_build_is_reproducible(gpu_fp32_build, tmp_path, toy_dataset, make_config):
    again = tmp_path / "again"
    build(str(toy_dataset), again, make_config(device="cuda", dtype="fp32"))
    first = json.loads((gpu_fp32_build / "manifest.json").read_text())
    second = json.loads((again / "manifest.json").read_text())
    # Same inputs, same batches, same kernels: the same bytes (cuDNN is deterministic per algorithm
    # choice for inference convolutions; a difference here means non-determinism worth knowing).
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]


@pytest.mark.parametrize("name", ["pixart-sigma", "sana", "sdxl", "sd3", "flux"])
def test_each_family_on_the_gpu_in_fp16_matches_its_pipeline_in_fp16(name, tiny_pipeline):
    """Every family adapter under the GPU defaults (fp16 compute, the VAE under autocast where its
    config asks for it) against the pipeline itself in fp16 on the same GPU."""
    import inspect

    import diffusers

    from shardkit.families import load_pipeline_encoders
    from shardkit.images import to_model_input

    folder = tiny_pipeline(name)
    encoders = load_pipeline_encoders(str(folder), torch.device("cuda"), "auto", np.dtype(np.float16))
    pipe_class = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
    pipe = pipe_class.from_pretrained(folder, torch_dtype=torch.float16).to("cuda")
    captions = ["A Red Fox in the SNOW", "two horses in a misty meadow at dawn, soft light"]
    kwargs = {"do_classifier_free_guidance": False} if name != "flux" else {}
    if name == "sd3":
        kwargs.update(prompt_2=None, prompt_3=None)
    if name == "sana":
        kwargs["complex_human_instruction"] = inspect.signature(pipe_class.__call__).parameters[
            "complex_human_instruction"].default
    with torch.no_grad():
        reference = pipe.encode_prompt(captions, device=torch.device("cuda"), **kwargs)[0].float().cpu()
    ours = encoders.family.assemble(encoders.encode_captions(captions, batch_size=2))
    mask = ours.get("prompt_attention_mask")
    valid = mask.bool() if mask is not None else torch.ones(reference.shape[:2], dtype=torch.bool)
    assert _relative_rms(ours["prompt_embeds"].float()[valid].numpy(), reference[valid].numpy()) < 1e-2

    pixels = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        encoded = pipe.vae.encode(to_model_input(pixels).to("cuda", torch.float16))
    expected = encoded.latent if encoders.vae.spec.stored == "latent" else encoded.latent_dist.mean
    got = encoders.encode_images(pixels)[:, :encoders.vae.spec.latent_channels]
    assert _relative_rms(got, expected.float().cpu().numpy()) < 1e-2
