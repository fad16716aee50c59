"""Stable Diffusion 3: CLIP-L + CLIP-G + T5 at 256 tokens, none of them masked.

``__call__`` passes ``prompt_2``/``prompt_3`` None (every encoder gets the caption) and
``max_sequence_length`` 256. ``encode_prompt`` concatenates the two CLIPs' penultimate hidden
states (77 rows each, ``tokenizer_max_length`` from the first tokenizer) on the feature axis,
zero-pads them to T5's width and puts them before T5's 256 rows; the pooled vector is both
CLIPs' projected text embeds side by side. The zero padding is not stored: the CLIP rows and the
T5 rows are stored apart and `assemble` rebuilds the [333, D] tensor exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import Family, Member, TextParts, stack
from .text import clip_outputs, t5_fixed_outputs


@dataclass(frozen=True)
class Sd3Family(Family):
    def members(self, parts: TextParts) -> tuple[Member, ...]:
        clip_l, clip_g = parts["text_encoder"].config, parts["text_encoder_2"].config
        rows = int(parts["tokenizer"].model_max_length)
        return (Member("clip_prompt_embeds", (rows, clip_l.hidden_size + clip_g.hidden_size),
                       "text_encoder + text_encoder_2 (CLIPs): penultimate hidden states, concatenated"),
                Member("t5_prompt_embeds", (self.max_length, int(parts["text_encoder_3"].config.hidden_size)),
                       "text_encoder_3 (T5): last hidden state, every row of max_sequence_length, unmasked"),
                Member("pooled_prompt_embeds", (int(clip_l.projection_dim + clip_g.projection_dim),),
                       "text_encoder + text_encoder_2 (CLIPs): projected text embeds, concatenated"))

    def encode(self, parts, captions, batch_size, store_dtype):
        clip_length = parts["tokenizer"].model_max_length  # the pipeline's tokenizer_max_length, for both CLIPs
        hidden_l, pooled_l = clip_outputs(parts["tokenizer"], parts["text_encoder"], captions, clip_length,
                                          parts.device, batch_size, store_dtype, "first_output")
        hidden_g, pooled_g = clip_outputs(parts["tokenizer_2"], parts["text_encoder_2"], captions, clip_length,
                                          parts.device, batch_size, store_dtype, "first_output")
        t5 = t5_fixed_outputs(parts["tokenizer_3"], parts["text_encoder_3"], captions, self.max_length,
                              parts.device, batch_size, store_dtype)
        return [{"clip_prompt_embeds": np.concatenate([hl, hg], axis=-1), "t5_prompt_embeds": t,
                 "pooled_prompt_embeds": np.concatenate([pl, pg], axis=-1)}
                for hl, hg, t, pl, pg in zip(hidden_l, hidden_g, t5, pooled_l, pooled_g)]

    def assemble(self, stored):
        clip, t5 = stack(stored, "clip_prompt_embeds"), stack(stored, "t5_prompt_embeds")
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": stack(stored, "pooled_prompt_embeds")}

    def text_identity(self, parts):
        return {"max_sequence_length": self.max_length}


SD3 = Sd3Family(name="sd3", pipeline_class="StableDiffusion3Pipeline",
                text_components=("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2",
                                 "text_encoder_3"),
                patch_size=2, vae_downsample=8)
