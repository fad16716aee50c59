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
