"""Flux: CLIP-L's pooled output plus T5 at 512 tokens, unmasked; ``text_ids`` are zeros.

``encode_prompt`` (``prompt_2`` None, ``max_sequence_length`` 512 from ``__call__``) returns T5's
last hidden state over all 512 positions (no mask, so every row is stored), CLIP's
``pooler_output`` (not projected), and ``text_ids``, a [512, 3] tensor of zeros that needs no
storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Family, Member, TextParts, stack
from .text import clip_outputs, t5_fixed_outputs


@dataclass(frozen=True)
class FluxFamily(Family):
    def members(self, parts: TextParts) -> tuple[Member, ...]:
        return (Member("prompt_embeds", (self.max_length, int(parts["text_encoder_2"].config.hidden_size)),
                       "text_encoder_2 (T5): last hidden state, every row of max_sequence_length, unmasked"),
                Member("pooled_prompt_embeds", (int(parts["text_encoder"].config.hidden_size),),
                       "text_encoder (CLIP): pooler_output"))

    def encode(self, parts, captions, batch_size, store_dtype):
        _, pooled = clip_outputs(parts["tokenizer"], parts["text_encoder"], captions,
                                 parts["tokenizer"].model_max_length, parts.device, batch_size, store_dtype,
                                 "pooler_output")
        t5 = t5_fixed_outputs(parts["tokenizer_2"], parts["text_encoder_2"], captions, self.max_length,
                              parts.device, batch_size, store_dtype)
        return [{"prompt_embeds": t, "pooled_prompt_embeds": p} for t, p in zip(t5, pooled)]

    def assemble(self, stored):
        embeds = stack(stored, "prompt_embeds")
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": stack(stored, "pooled_prompt_embeds"),
                "text_ids": torch.zeros(embeds.shape[1], 3, dtype=embeds.dtype)}

    def text_identity(self, parts):
        return {"max_sequence_length": self.max_length}


FLUX = FluxFamily(name="flux", pipeline_class="FluxPipeline",
                  text_components=("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"),
                  # The transformer packs 2x2 latent patches.
                  patch_size=2, vae_downsample=8)
