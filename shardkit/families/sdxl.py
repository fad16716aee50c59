"""Stable Diffusion XL: two CLIP text encoders, no mask, plus per-sample micro-conditioning.

``encode_prompt`` (``prompt_2`` None, so both encoders get the caption; ``clip_skip`` None) takes
each encoder's penultimate hidden states over all 77 positions and concatenates them on the
feature axis; the pooled vector is the first 2-D ``output[0]``, i.e. text_encoder_2's projected
text embeds (text_encoder's ``output[0]`` is its 3-D last hidden state). CLIP attends causally
without a mask, so every padded row is stored.

The UNet also takes ``original_size``, ``crops_coords_top_left`` and ``target_size`` per sample
(the micro-conditioning): the image's size before resizing, the crop's top-left corner in the
resized image, and the bucket's size, each (height, width).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Family, Member, TextParts, stack
from .text import clip_outputs

MICRO_CONDITIONING = ("original_size", "crop_coords_top_left", "target_size")


def micro_conditioning(original_hw, crop_top_left, target_hw) -> dict[str, np.ndarray]:
    """One sample's SDXL micro-conditioning members, each (height, width) or (top, left) as int32 [2]."""
    return {name: np.asarray(value, dtype=np.int32)
            for name, value in zip(MICRO_CONDITIONING, (original_hw, crop_top_left, target_hw))}


@dataclass(frozen=True)
class SdxlFamily(Family):
    def members(self, parts: TextParts) -> tuple[Member, ...]:
        first, second = parts["text_encoder"].config, parts["text_encoder_2"].config
        rows = int(parts["tokenizer"].model_max_length)
        return (Member("prompt_embeds", (rows, first.hidden_size + second.hidden_size),
                       "text_encoder + text_encoder_2 (CLIPs): penultimate hidden states, concatenated"),
                Member("pooled_prompt_embeds", (int(second.projection_dim),),
                       "text_encoder_2 (CLIP): projected text embeds"),
                *(Member(name, (2,), "the image's size and crop (per sample)", dtype="int32")
                  for name in MICRO_CONDITIONING))

    def encode(self, parts, captions, batch_size, store_dtype):
        first, _ = clip_outputs(parts["tokenizer"], parts["text_encoder"], captions, parts["tokenizer"].model_max_length,
                                parts.device, batch_size, store_dtype, "first_output")
        second, pooled = clip_outputs(parts["tokenizer_2"], parts["text_encoder_2"], captions,
                                      parts["tokenizer_2"].model_max_length, parts.device, batch_size, store_dtype,
                                      "first_output")
        return [{"prompt_embeds": np.concatenate([a, b], axis=-1), "pooled_prompt_embeds": p}
                for a, b, p in zip(first, second, pooled)]

    def assemble(self, stored):
        out = {"prompt_embeds": stack(stored, "prompt_embeds"), "pooled_prompt_embeds": stack(stored, "pooled_prompt_embeds")}
        if all(name in sample for sample in stored for name in MICRO_CONDITIONING):
            out.update({name: stack(stored, name) for name in MICRO_CONDITIONING})
        return out


SDXL = SdxlFamily(name="sdxl", pipeline_class="StableDiffusionXLPipeline",
                  text_components=("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"),
                  # The UNet halves the latent twice: buckets divide by 8 x 4.
                  patch_size=4, vae_downsample=8, micro_conditioning=True)
