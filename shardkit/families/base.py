"""What every family adapter declares, and the loading of a pipeline's parts.

A family adapter (one module per family beside this one) says three things about a diffusers
text-to-image pipeline class:

* which components of the pipeline folder it needs: the VAE, the text encoders and tokenizers,
  never the transformer/UNet (`Family.text_components`);
* how a batch of captions is encoded exactly as the pipeline's ``__call__`` encodes a positive
  prompt with its defaults, and what of that is stored per caption (`Family.encode`,
  `Family.members`): only the valid rows where the pipeline masks padding, every row where it
  does not;
* how the stored arrays turn back into what the pipeline's ``encode_prompt`` returns
  (`Family.assemble`), at the pipeline's full padded length and under its names.

The latent side is the VAE's (`vae.py`), the same for every family; the bucket tables are
PixArt's (`buckets.py`) wherever every bucket divides by what the VAE and the transformer's
patching require (`Family.spatial_multiple`).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..buckets import RESOLUTIONS, BucketTable, aspect_table
from ..encoders import load_error, quiet_hub_logging
from ..errors import ShardkitError

# model_index.json names a component as [library, class]; only these libraries are imported.
COMPONENT_LIBRARIES = ("transformers", "diffusers")


@dataclass(frozen=True)
class Member:
    """One array stored per caption (or per sample, for micro-conditioning), and what made it.

    ``shape`` holds ints, except a leading ``"L"``: that many rows, the caption's valid ones, at
    most ``max_rows``. ``dtype`` is ``"store"`` (the build's --store-dtype) or a numpy dtype name.
    """

    name: str
    shape: tuple[int | str, ...]
    made_by: str
    dtype: str = "store"
    max_rows: int | None = None

    def as_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "made_by": self.made_by, "dtype": self.dtype,
                "max_rows": self.max_rows}


@dataclass
class TextParts:
    """The loaded tokenizers and text encoders of one pipeline, by their model_index.json names."""

    components: dict[str, Any]
    device: torch.device
    dtype: torch.dtype

    def __getitem__(self, name: str) -> Any:
        return self.components[name]


@dataclass(frozen=True)
class Family:
    """One diffusers pipeline class: what to load, how to encode, what to store (see module doc)."""

    name: str                      # e.g. "pixart-sigma": the --pipeline FAMILY of tiny-models
    pipeline_class: str            # model_index.json's _class_name, e.g. "PixArtSigmaPipeline"
    text_components: tuple[str, ...]
    patch_size: int                # the transformer's patching (the UNet's total downsampling for SDXL)
    vae_downsample: int            # the VAE's spatial reduction (DC-AE 32, AutoencoderKL 8)
    micro_conditioning: bool = False  # SDXL: original_size, crop_coords_top_left, target_size per sample

    # ---- declared by each adapter

    def members(self, parts: TextParts) -> tuple[Member, ...]:
        raise NotImplementedError

    def encode(self, parts: TextParts, captions: Sequence[str], batch_size: int,
               store_dtype: np.dtype) -> list[dict[str, np.ndarray]]:
        """Per caption, the stored arrays (``members``), in the order of ``captions``."""
        raise NotImplementedError

    def assemble(self, stored: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """What ``encode_prompt`` returns for these captions, batched, from their stored arrays."""
        raise NotImplementedError

    def text_identity(self, parts: TextParts) -> dict:
        """What the manifest records about the text side: settings taken from ``__call__``'s defaults."""
        return {}

    # ---- shared

    @property
    def pipeline(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def call_default(self, parameter: str) -> Any:
        """The default of one of the pipeline's ``__call__`` parameters, read from the installed diffusers."""
        return inspect.signature(self.pipeline.__call__).parameters[parameter].default

    @property
    def max_length(self) -> int:
        """The text encoders' token limit ``__call__`` passes (``max_sequence_length``), where it has one."""
        return int(self.call_default("max_sequence_length"))

    @property
    def spatial_multiple(self) -> int:
        """Every bucket's height and width must divide by this (VAE downsampling x patching)."""
        return self.vae_downsample * self.patch_size

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The base resolutions whose PixArt table fits this family (512 and 1024 for every family)."""
        return tuple(r for r in RESOLUTIONS if all(h % self.spatial_multiple == 0 and w % self.spatial_multiple == 0
                                                   for h, w in aspect_table(r).values()))

    def bucket_table(self, resolution: int) -> BucketTable:
        if resolution not in self.resolutions:
            raise ShardkitError(f"{self.pipeline_class} takes --resolution {' or '.join(map(str, self.resolutions))}: "
                                f"the {resolution} table has buckets that do not divide by {self.spatial_multiple} "
                                f"(VAE downsampling {self.vae_downsample} x patch {self.patch_size})")
        return BucketTable(resolution)

    def load_text(self, source: str, index: dict, device: torch.device, dtype: torch.dtype) -> TextParts:
        """The tokenizers and text encoders this family needs, from ``source``'s subfolders."""
        components = {}
        for name in self.text_components:
            component = load_component(source, index, name, dtype)
            if isinstance(component, torch.nn.Module):
                component.to(device).eval().requires_grad_(False)
            components[name] = component
        return TextParts(components, device=device, dtype=dtype)


def component_class(index: dict, name: str) -> type:
    """The class model_index.json names for component ``name``, from transformers or diffusers only."""
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)):
        raise ShardkitError(f"model_index.json has no usable entry for {name!r} (expected [library, class]); "
                            f"is this the pipeline folder `save_pretrained` wrote?")
    library, class_name = entry
    if library not in COMPONENT_LIBRARIES:
        raise ShardkitError(f"model_index.json names {name!r} from library {library!r}; shardkit loads components "
                            f"from {' and '.join(COMPONENT_LIBRARIES)} only")
    cls = getattr(importlib.import_module(library), class_name, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise ShardkitError(f"{library} has no loadable class {class_name!r} (model_index.json entry {name!r}); "
                            f"upgrade {library} or check the pipeline folder")
    return cls


def load_component(source: str, index: dict, name: str, dtype: torch.dtype) -> Any:
    """One component from ``source/name`` through its class's ``from_pretrained``."""
    cls = component_class(index, name)
    # Weights from safetensors only: a pickled checkpoint (.bin) is never loaded.
    kwargs = {"torch_dtype": dtype, "use_safetensors": True} if issubclass(cls, torch.nn.Module) else {}
    try:
        with quiet_hub_logging():
            return cls.from_pretrained(source, subfolder=name, **kwargs)
    except Exception as exc:  # hub, file and format errors all mean "not a usable component"
        raise load_error(f"{name} ({cls.__name__})", source, "--pipeline", exc) from None


def right_pad(rows: Sequence[np.ndarray], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid rows of each caption zero-padded to ``length``: ([B, length, D], int64 mask [B, length]).
    Rows past ``length`` are cut; the rows may be read-only views of a shard (they are copied)."""
    embeds = np.zeros((len(rows), length, rows[0].shape[-1]), dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, valid in enumerate(rows):
        embeds[i, :len(valid)] = valid[:length]
        mask[i, :min(len(valid), length)] = 1
    return torch.from_numpy(embeds), mask


def stack(stored: Sequence[dict[str, np.ndarray]], name: str) -> torch.Tensor:
    return torch.from_numpy(np.stack([sample[name] for sample in stored]))
