"""Model families: one small adapter per diffusers text-to-image pipeline class.

`family_for(index)` picks the adapter from a pipeline folder's ``model_index.json``
(``_class_name``); `load_pipeline_encoders` loads what it needs (VAE, tokenizers, text encoders;
never the transformer/UNet). To admit another family, write a module beside these with a
`base.Family` subclass (members, encode, assemble) and add its instance to `FAMILIES`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..encoders import load_error, quiet_hub_logging
from ..errors import ShardkitError
from .base import Family, Member, TextParts
from .flux import FLUX
from .pixart import PIXART_ALPHA, PIXART_SIGMA
from .sana import SANA
from .sd3 import SD3
from .sdxl import SDXL
from .vae import LatentSpec, PipelineVae

__all__ = ["FAMILIES", "Family", "LatentSpec", "Member", "PipelineEncoders", "TextParts", "family_by_name",
           "family_for", "load_pipeline_encoders", "read_model_index"]

# Pipeline class name (model_index.json's _class_name) -> its adapter.
FAMILIES: dict[str, Family] = {family.pipeline_class: family
                               for family in (PIXART_ALPHA, PIXART_SIGMA, SANA, SDXL, SD3, FLUX)}

# model_index.json is a few hundred bytes; anything far larger is not one.
_MAX_INDEX_BYTES = 1 << 20


def family_for(index: dict) -> Family:
    """The adapter of the pipeline class ``index`` names; an unsupported class is refused in one line."""
    class_name = index.get("_class_name")
    if class_name not in FAMILIES:
        raise ShardkitError(f"pipeline class {class_name!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[class_name]


def family_by_name(name: str) -> Family:
    by_name = {family.name: family for family in FAMILIES.values()}
    if name not in by_name:
        raise ShardkitError(f"unknown family {name!r}; choose one of {', '.join(by_name)}")
    return by_name[name]


def read_model_index(source: str) -> dict:
    """``model_index.json`` of a local pipeline folder or a Hugging Face id (from the cache or the hub)."""
    local = Path(source).expanduser()
    try:
        if local.is_dir():
            path = local / "model_index.json"
        else:
            from huggingface_hub import hf_hub_download

            with quiet_hub_logging():
                path = Path(hf_hub_download(source, "model_index.json"))
        with open(path, "rb") as fh:
            data = fh.read(_MAX_INDEX_BYTES + 1)
        if len(data) > _MAX_INDEX_BYTES:
            raise ValueError("model_index.json is larger than 1 MiB")
        index = json.loads(data)
    except Exception as exc:
        raise load_error("pipeline's model_index.json", source, "--pipeline", exc) from None
    if not isinstance(index, dict):
        raise ShardkitError(f"{source}: model_index.json is not a JSON object; pass --pipeline a diffusers pipeline folder")
    return index


@dataclass
class PipelineEncoders:
    """A family's loaded encoders: the VAE and the text parts, with what they store."""

    family: Family
    source: str
    vae: PipelineVae
    text: TextParts
    store_dtype: np.dtype

    @property
    def members(self) -> tuple[Member, ...]:
        return self.family.members(self.text)

    def encode_captions(self, captions: list[str], batch_size: int) -> list[dict[str, np.ndarray]]:
        """Per caption, the stored arrays; a caption given more than once is encoded once."""
        distinct = list(dict.fromkeys(captions))
        if not distinct:
            return []
        encoded = dict(zip(distinct, self.family.encode(self.text, distinct, batch_size, self.store_dtype)))
        return [encoded[caption] for caption in captions]

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        return self.vae.encode(pixels)

    def identity(self) -> dict:
        """What the manifest records: the family, its latents' normalisation, its text settings and members."""
        return {"pipeline_class": self.family.pipeline_class, "family": self.family.name, "source": self.source,
                "latents": self.vae.spec.as_json(), "text": self.family.text_identity(self.text),
                "members": [member.as_json() for member in self.members]}


def load_pipeline_encoders(source: str, device: torch.device, dtype: str = "fp32",
                           store_dtype: np.dtype = np.dtype(np.float16)) -> PipelineEncoders:
    """The VAE and text encoders of the pipeline at ``source`` (folder or Hugging Face id)."""
    from ..encoders import resolve_dtype

    index = read_model_index(source)
    family = family_for(index)
    text = family.load_text(source, index, device, resolve_dtype(dtype, device))
    vae = PipelineVae(source, index, device, dtype, np.dtype(store_dtype))
    return PipelineEncoders(family=family, source=source, vae=vae, text=text, store_dtype=np.dtype(store_dtype))
