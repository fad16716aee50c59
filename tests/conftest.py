"""Shared fixtures: the tiny encoders and one toy build are made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
TOY_DATASET = REPO / "examples" / "toy-dataset"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from shardkit.testing.tiny_models import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def toy_dataset() -> Path:
    return TOY_DATASET


@pytest.fixture(scope="session")
def make_config(tiny_models):
    """BuildConfig for the tiny encoders; keyword arguments override any option."""
    from shardkit.config import BuildConfig

    def factory(**overrides) -> BuildConfig:
        options = dict(resolution=256, vae=str(tiny_models), vae_subfolder="vae", t5=str(tiny_models),
                       device="cpu", dtype="fp32", batch_size=4, t5_batch_size=8, shard_max_count=8,
                       workers=0, progress=False)
        options.update(overrides)
        return BuildConfig(**options)

    return factory


@pytest.fixture(scope="session")
def encoders(make_config):
    """The tiny encoders loaded once; pass to ``build(..., encoders=encoders)`` with a config of the same models."""
    from shardkit.encoders import load_encoders

    return load_encoders(make_config())


@pytest.fixture(scope="session")
def toy_build(tmp_path_factory, toy_dataset, make_config, encoders) -> Path:
    """One build of the toy dataset, shared read-only: copy it before changing anything."""
    from shardkit.build import build

    output = tmp_path_factory.mktemp("toy") / "out"
    build(str(toy_dataset), output, make_config(), encoders=encoders)
    return output


# ---- builds in child processes (one thread each, as torchrun ranks and Ray actors run) ------------

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                    "SLURM_NTASKS", "SLURM_LOCALID", "RAY_ADDRESS")


def build_flags(tiny_models: Path) -> list[str]:
    """The options of ``make_config()``, as command-line flags."""
    return ["--resolution", "256", "--vae", str(tiny_models), "--vae-subfolder", "vae", "--t5", str(tiny_models),
            "--device", "cpu", "--dtype", "fp32", "--batch-size", "4", "--t5-batch-size", "8",
            "--shard-max-count", "8", "--workers", "0", "--no-progress"]


def child_env() -> dict[str, str]:
    """Encoders compute on one thread in every child, so their float rounding is the same everywhere."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return env


def build_command(source: Path, output: Path, tiny_models: Path, processes: int = 1,
                  flags: tuple[str, ...] = ()) -> list[str]:
    """`shardkit build` on one process, or on several under torchrun (gloo rendezvous on 127.0.0.1);
    ``flags`` are added to (and override) ``build_flags``."""
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] \
        if processes > 1 else [sys.executable]
    return [*launcher, "-m", "shardkit", "build", str(source), str(output), *build_flags(tiny_models), *flags]


def run_build(source: Path, output: Path, tiny_models: Path, processes: int = 1, flags: tuple[str, ...] = ()):
    import subprocess

    result = subprocess.run(build_command(source, output, tiny_models, processes, flags), capture_output=True,
                            text=True, env=child_env(), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def output_files(output: Path) -> dict[str, bytes]:
    """Every file of OUTPUT (shards, plan, manifest, failures, done records, empty caption) with its bytes."""
    return {p.relative_to(output).as_posix(): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """A JSON Lines dataset of 48 small generated images over many buckets, plus records that are
    skipped (a missing file, a corrupt image, a repeated path), so failures.jsonl has lines."""
    import json
    import random

    from PIL import Image

    root = tmp_path_factory.mktemp("synthetic")
    (root / "images").mkdir()
    rng = random.Random(7)
    words = "a red cat on the mat under blue sky with two old boats near green hills at dawn".split()
    lines = []
    for i in range(48):
        size = (rng.randint(40, 160), rng.randint(40, 160))
        Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3))).save(root / "images" / f"{i:03d}.jpg")
        lines.append({"path": f"images/{i:03d}.jpg", "prompt": " ".join(rng.choices(words, k=rng.randint(3, 30)))})
    for name in ("corrupt.jpg", "corrupt-sized.jpg"):
        (root / "images" / name).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    lines[10:10] = [{"path": "images/missing.jpg", "prompt": "gone"}]
    lines[20:20] = [{"path": "images/corrupt.jpg", "prompt": "broken"}]  # skipped while planning (its header)
    lines[25:25] = [{"path": "images/corrupt-sized.jpg", "width": 64, "height": 64, "prompt": "broken"}]  # at decode
    lines[30:30] = [dict(lines[5])]
    (root / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "data.jsonl"


@pytest.fixture(scope="session")
def duplicated_tars(tmp_path_factory) -> Path:
    """img2dataset-shaped WebDataset tars (KEY.jpg, KEY.txt, KEY.json with metadata) of 30 small
    generated images over many buckets, spread over three shards: every fifth sample repeats the
    image bytes of one three places earlier (across shard boundaries too), and one has no image."""
    import io
    import json
    import random
    import tarfile

    from PIL import Image

    root = tmp_path_factory.mktemp("duplicated-tars") / "tars"
    root.mkdir()
    rng = random.Random(11)
    images: list[bytes] = []
    for i in range(30):
        if i % 5 == 4:
            images.append(images[i - 3])
            continue
        out = io.BytesIO()
        size = (rng.randint(40, 160), rng.randint(40, 160))
        Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3))).save(out, "PNG" if i % 3 else "JPEG")
        images.append(out.getvalue())

    def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    for shard in range(3):
        with tarfile.open(root / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(shard * 10, shard * 10 + 10):
                key = f"{i:09d}"
                if i != 17:  # a failed download: no image member
                    add(tar, f"{key}.jpg", images[i])
                add(tar, f"{key}.txt", f"generated picture number {i}".encode())
                add(tar, f"{key}.json", json.dumps({"key": key, "status": "success", "aesthetic": i / 4}).encode())
    return root


# The flags a build of ``duplicated_tars`` takes: captions from the .txt members, --dedup, small shards.
TAR_FLAGS = ("--captions", "txt", "--dedup", "--shard-max-count", "3")


@pytest.fixture(scope="session")
def one_process_builds(tmp_path_factory, tiny_models, toy_dataset, synthetic_dataset, duplicated_tars):
    """``builds(name)``: OUTPUT of a one-process `shardkit build` of "toy", "synthetic" or "tars"
    (with ``builds.flags[name]``), made once."""
    made: dict[str, Path] = {}
    sources = {"toy": toy_dataset, "synthetic": synthetic_dataset, "tars": duplicated_tars}
    flags = {"toy": (), "synthetic": (), "tars": TAR_FLAGS}

    def builds(name: str) -> Path:
        if name not in made:
            output = tmp_path_factory.mktemp(f"one-process-{name}") / "out"
            run_build(sources[name], output, tiny_models, flags=flags[name])
            made[name] = output
        return made[name]

    builds.sources = sources
    builds.flags = flags
    return builds


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """tiny_pipeline(family) -> the folder of that family's tiny diffusers pipeline, written once per session."""
    from shardkit.testing.tiny_pipelines import write_tiny_pipeline

    root = tmp_path_factory.mktemp("pipelines")
    written: dict[str, Path] = {}

    def factory(family: str) -> Path:
        if family not in written:
            written[family] = write_tiny_pipeline(root / family, family)
        return written[family]

    return factory


# ---- what each diffusers pipeline computes, the reference of every family -------------------

# How each pipeline's __call__ calls encode_prompt for a positive prompt, with its defaults (diffusers 0.42).
CALL_KWARGS = {
    "pixart-alpha": dict(do_classifier_free_guidance=False, clean_caption=True, max_sequence_length=120),
    "pixart-sigma": dict(do_classifier_free_guidance=False, clean_caption=True, max_sequence_length=300),
    "sana": dict(do_classifier_free_guidance=False, clean_caption=False, max_sequence_length=300),
    "sdxl": dict(prompt_2=None, do_classifier_free_guidance=False),
    "sd3": dict(prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=256),
    "flux": dict(prompt_2=None, max_sequence_length=512),
}
OUTPUT_NAMES = {
    "pixart-alpha": ("prompt_embeds", "prompt_attention_mask"),
    "pixart-sigma": ("prompt_embeds", "prompt_attention_mask"),
    "sana": ("prompt_embeds", "prompt_attention_mask"),
    "sdxl": ("prompt_embeds", None, "pooled_prompt_embeds"),
    "sd3": ("prompt_embeds", None, "pooled_prompt_embeds"),
    "flux": ("prompt_embeds", "pooled_prompt_embeds", "text_ids"),
}


def pipeline_reference(name: str, pipe, captions: list[str]) -> dict:
    """``pipe.encode_prompt(captions)`` as the pipeline's ``__call__`` calls it, by output name."""
    import inspect

    import torch

    kwargs = dict(CALL_KWARGS[name])
    if name == "sana":
        kwargs["complex_human_instruction"] = inspect.signature(type(pipe).__call__).parameters[
            "complex_human_instruction"].default
    with torch.no_grad():
        outputs = pipe.encode_prompt(captions, device=torch.device("cpu"), **kwargs)
    return {key: value for key, value in zip(OUTPUT_NAMES[name], outputs) if key}


def close_in_fp16(ours, reference) -> None:
    """Equal up to one fp16 rounding of the stored values (2^-11 relative), plus summation-order noise."""
    import torch

    torch.testing.assert_close(ours.float(), reference.float(), rtol=2e-3, atol=2e-3)
