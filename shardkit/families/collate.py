"""A batch in the diffusers layout: what a family's pipeline computes, from what a build stored.

`diffusers_batch` turns the stored arrays of B samples of one bucket (each sample's latent and
its caption's members, as `PipelineEncoders` wrote them) into the dict a training step of that
family takes: ``latents`` ``[B, C, h, w]`` plus the outputs of the pipeline's ``encode_prompt``
under their own names (`Family.assemble`), SDXL's micro-conditioning, ``keys`` and
``captions``. It reads no files, so any reader can use it as its last stage.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import Family
from .vae import LatentSpec

LATENT_MODES = ("sample", "mean")


def latents_from_stored(spec: LatentSpec, stored: Sequence[np.ndarray], latent: str = "sample",
                        normalize: bool = False, generator: torch.Generator | None = None,
                        seeds: Sequence[int] | None = None) -> torch.Tensor:
    """``[B, C, h, w]`` float32 from the stored latents of one bucket.

    ``latent``: ``"sample"`` draws ``mean + std * noise`` from an AutoencoderKL's stored
    posterior, ``"mean"`` takes its mean; a DC-AE latent is deterministic and returned as
    stored either way. ``seeds``: one per sample, its noise's seed (the same sample gets the
    same noise in whatever batch it lands); else ``generator`` draws the batch's noise.
    ``normalize`` applies ``(x - shift_factor) * scaling_factor``.
    """
    if latent not in LATENT_MODES:
        raise ValueError(f"latent must be one of {LATENT_MODES}, got {latent!r}")
    batch = torch.from_numpy(np.stack(stored)).float()
    if spec.stored == "mean_std":
        mean, std = batch[:, :spec.latent_channels], batch[:, spec.latent_channels:]
        if latent == "mean":
            batch = mean
        elif seeds is not None:
            noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(seed))
                                 for seed in seeds])
            batch = mean + std * noise
        else:
            batch = mean + std * torch.randn(mean.shape, generator=generator)
    return spec.normalize(batch) if normalize else batch


def diffusers_batch(family: Family, spec: LatentSpec, latents: Sequence[np.ndarray],
                    texts: Sequence[dict[str, np.ndarray]], keys: Sequence[str], captions: Sequence[str], *,
                    latent: str = "sample", normalize: bool = False,
                    generator: torch.Generator | None = None, seeds: Sequence[int] | None = None) -> dict:
    """The family's training batch: latents, its ``encode_prompt`` outputs (and, for SDXL, the
    micro-conditioning members the samples carry), keys and captions."""
    batch = {"latents": latents_from_stored(spec, latents, latent, normalize, generator, seeds)}
    batch.update(family.assemble(texts))
    batch["keys"] = list(keys)
    batch["captions"] = list(captions)
    return batch
