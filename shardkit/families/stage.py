"""A pipeline's encoders as the build's encoder stage (``shardkit build --pipeline MODEL``).

The build (build.py) plans, decodes, batches and writes the same way whichever encoders it got;
it asks them for the few things below. `load_family_encoders` wraps a loaded `PipelineEncoders`
in the two roles the PixArt-Σ pair fills (``encoders.VaeEncoder``, ``encoders.T5Encoder``):

* the image role encodes uint8 pixel batches into the stored latents (`FamilyImages`);
* the text role (`FamilyText`) keys each caption by its UTF-8 bytes: the plan and the caption
  windows carry them as "ids", and the family encodes the text itself, as its pipeline does.
  Per caption field it stores the family's members as ``KEY.<field>.<member>.npy``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..encoders import Encoders, _config_sha256, _weights_fingerprint
from ..format import NPY_HEADER_BYTES, family_member
from . import PipelineEncoders, load_pipeline_encoders

# Tar framing per member (header block + worst-case padding): the planner's upper bound.
_TAR_MEMBER_OVERHEAD = 1024


@dataclass
class Identity:
    """What the manifest records of one role; ``compute_dtype`` is a runtime choice, left out of
    what a resume compares."""

    fields: dict

    def as_json(self) -> dict:
        return dict(self.fields)

    def content_json(self) -> dict:
        return {k: v for k, v in self.fields.items() if k != "compute_dtype"}


def _components_fingerprint(source: str, names: Iterable[str]) -> str | None:
    """The weights fingerprint of each local component folder (None for a hub id)."""
    if not Path(source).expanduser().is_dir():
        return None
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}:{_weights_fingerprint(Path(source).expanduser() / name)}".encode())
    return digest.hexdigest()


class FamilyImages:
    """The image role: the pipeline's VAE."""

    def __init__(self, encoders: PipelineEncoders):
        vae = encoders.vae
        self.spec = vae.spec
        self.dtype = vae.weights_dtype
        self._encode = encoders.encode_images
        self.identity = Identity({
            "source": encoders.source, "subfolder": "vae", "model_class": self.spec.vae_class,
            "config_sha256": _config_sha256(dict(vae.model.config)),
            "weights_fingerprint": _components_fingerprint(encoders.source, ["vae"]),
            "compute_dtype": self.compute_dtype_name, "store_dtype": encoders.store_dtype.name,
            "scaling_factor": self.spec.scaling_factor, "shift_factor": self.spec.shift_factor,
            "latent_channels": self.spec.latent_channels, "downsample_factor": self.spec.downsample})
        self._autocast = vae.autocast_dtype

    @property
    def compute_dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def feature_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.spec.stored_shape(height, width)

    def encode(self, pixels: torch.Tensor) -> np.ndarray:
        return self._encode(pixels)


class FamilyText:
    """The text role: captions in, the family's members per caption out (see the module doc)."""

    hidden_size = 0  # no single width: the planner bounds a caption's bytes by `caption_bytes`

    def __init__(self, encoders: PipelineEncoders):
        self.encoders = encoders
        self.dtype = encoders.text.dtype
        self.members = [m for m in encoders.members if m.dtype == "store"]  # per caption; the rest per sample
        self.itemsize = encoders.store_dtype.itemsize
        configs = {name: part.config.to_dict() for name, part in encoders.text.components.items()
                   if hasattr(part, "config")}
        self.identity = Identity({
            **encoders.identity(), "model_class": f"{encoders.family.pipeline_class} text encoders",
            "compute_dtype": str(self.dtype).replace("torch.", ""),
            "store_dtype": encoders.store_dtype.name, "config_sha256": _config_sha256(configs),
            "weights_fingerprint": _components_fingerprint(encoders.source, encoders.family.text_components)})

    @staticmethod
    def tokenize(text: str) -> np.ndarray:
        """The caption's key: its UTF-8 bytes (the family tokenizes the text itself)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def caption_bytes(self, ids: np.ndarray) -> int:
        """The most bytes one caption field's members take in a shard (the planner's bound)."""
        del ids  # the rows stored do not follow from the caption's length in bytes
        return sum(math.prod(m.max_rows if d == "L" else int(d) for d in m.shape) * self.itemsize
                   + NPY_HEADER_BYTES + _TAR_MEMBER_OVERHEAD for m in self.members)

    def encode_distinct(self, captions: Iterable[dict[str, np.ndarray]], batch_size: int) -> dict[bytes, dict]:
        """The members of every distinct caption among ``captions`` (field -> key per record), by key."""
        distinct: dict[bytes, str] = {}
        for fields in captions:
            for ids in fields.values():
                key = ids.tobytes()
                if key not in distinct:
                    distinct[key] = ids.astype(np.uint8).tobytes().decode("utf-8")
        return dict(zip(distinct, self.encoders.encode_captions(list(distinct.values()), batch_size)))

    @staticmethod
    def stored_members(field: str, features: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        return [(family_member(field, name), array) for name, array in features.items()]

    @staticmethod
    def stored_length(features: dict[str, np.ndarray]) -> int:
        """The rows of the caption's first member (its valid tokens where the family masks)."""
        return int(next(iter(features.values())).shape[0])


def load_family_encoders(source: str, device: torch.device, dtype: str, store_dtype: np.dtype) -> Encoders:
    """The pipeline at ``source`` (folder or Hugging Face id) as the build's encoders."""
    encoders = load_pipeline_encoders(source, device, dtype, store_dtype)
    return Encoders(vae=FamilyImages(encoders), t5=FamilyText(encoders), device=device, family=encoders)

