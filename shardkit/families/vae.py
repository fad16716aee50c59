"""The VAE side of every family: loaded from the pipeline's ``vae/``, its normalisation declared.

What is stored per image, as today: ``concat([posterior.mean, posterior.std])`` on the channel
axis for an ``AutoencoderKL`` (training draws ``mean + std * noise``), the latent itself for an
``AutoencoderDC`` (Sana's DC-AE has no posterior). What training feeds the transformer is
``(latent - shift_factor) * scaling_factor``, both from the VAE's config (SD3 and Flux have a
shift, the others none).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..encoders import _split_on_oom, use_channels_last, vae_features, vae_precision
from ..errors import ShardkitError
from .base import component_class, load_component

# VAE class -> (what is stored, the config field whose length sets the downsampling).
VAE_KINDS = {"AutoencoderKL": ("mean_std", "block_out_channels"),
             "AutoencoderDC": ("latent", "encoder_block_out_channels")}


@dataclass(frozen=True)
class LatentSpec:
    """What the manifest records of a build's latents."""

    vae_class: str
    stored: str             # "mean_std": [2C, h, w] mean then std; "latent": [C, h, w]
    latent_channels: int
    downsample: int         # spatial reduction: h = height / downsample
    scaling_factor: float
    shift_factor: float | None

    @classmethod
    def from_config(cls, vae_class: str, config: dict) -> "LatentSpec":
        if vae_class not in VAE_KINDS:
            raise ShardkitError(f"VAE class {vae_class} is not supported; supported: {', '.join(VAE_KINDS)}")
        stored, blocks = VAE_KINDS[vae_class]
        shift = config.get("shift_factor")
        return cls(vae_class=vae_class, stored=stored, latent_channels=int(config["latent_channels"]),
                   downsample=2 ** (len(config[blocks]) - 1), scaling_factor=float(config.get("scaling_factor", 1.0)),
                   shift_factor=None if shift is None else float(shift))

    def stored_shape(self, height: int, width: int) -> tuple[int, int, int]:
        channels = 2 * self.latent_channels if self.stored == "mean_std" else self.latent_channels
        return (channels, height // self.downsample, width // self.downsample)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """What the transformer is trained on: ``(latents - shift_factor) * scaling_factor``."""
        return (latents - (self.shift_factor or 0.0)) * self.scaling_factor

    def as_json(self) -> dict:
        return asdict(self)


class PipelineVae:
    """The pipeline's VAE on ``device``, encoding uint8 pixel batches into the stored latents."""

    def __init__(self, source: str, index: dict, device: torch.device, dtype: str, store_dtype: np.dtype):
        cls = component_class(index, "vae")
        config = cls.load_config(source, subfolder="vae")
        self.spec = LatentSpec.from_config(cls.__name__, dict(config))
        self.weights_dtype, self.autocast_dtype = vae_precision(dtype, device, bool(config.get("force_upcast", True)))
        self.model = load_component(source, index, "vae", self.weights_dtype).to(device).eval().requires_grad_(False)
        self.device, self.store_dtype = device, store_dtype
        self.channels_last = use_channels_last(self.model, device)

    def encode(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 [B, H, W, 3] -> the stored latents [B, C or 2C, H/f, W/f] in the store dtype."""
        parts = _split_on_oom(self._encode, pixels)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def _encode(self, pixels: torch.Tensor) -> list[np.ndarray]:
        return vae_features(self, pixels, self.spec.stored)
