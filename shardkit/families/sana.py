"""Sana: Gemma-2 behind the pipeline's instruction prefix, then a selection of token positions.

``__call__`` passes its ``complex_human_instruction`` list (read here from the installed
diffusers' signature): the lines joined by newlines are prepended to every caption, the whole is
tokenised (right padding) to the instruction's token count + ``max_sequence_length`` - 2, and
``encode_prompt`` keeps position 0 (<bos>) and the last ``max_sequence_length`` - 1 positions
(``select_index``), with the same selection of the attention mask. Gemma attends causally, so
the valid positions do not depend on the padding after them; the selected mask is always a
prefix, so the stored valid rows and their count give back both outputs exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .base import Family, Member, TextParts, right_pad
from .pixart import caption_settings, preprocess
from .text import encode_masked, token_ids


@dataclass(frozen=True)
class SanaFamily(Family):
    @property
    def instruction(self) -> str:
        lines = self.call_default("complex_human_instruction")
        return "\n".join(lines) if lines else ""

    def _window(self, tokenizer) -> tuple[int, int]:
        """(tokenised length of prefix + caption, first position of the selected window)."""
        if not self.instruction:
            return self.max_length, 1
        total = len(tokenizer.encode(self.instruction)) + self.max_length - 2
        return total, total - (self.max_length - 1)

    def members(self, parts: TextParts) -> tuple[Member, ...]:
        width = int(parts["text_encoder"].config.hidden_size)
        return (Member("prompt_embeds", ("L", width),
                       "text_encoder (Gemma-2): last hidden state at select_index, the valid rows",
                       max_rows=self.max_length),)

    def encode(self, parts, captions, batch_size, store_dtype):
        tokenizer = parts["tokenizer"]
        total, start = self._window(tokenizer)
        texts = [self.instruction + caption for caption in preprocess(self, captions)]
        ids = token_ids(tokenizer, texts, total)

        def select(hidden: np.ndarray, length: int) -> np.ndarray:
            return np.concatenate([hidden[:1], hidden[start:length]])

        rows = encode_masked(parts["text_encoder"], ids, tokenizer.pad_token_id, parts.device, batch_size,
                             store_dtype, select)
        return [{"prompt_embeds": valid} for valid in rows]

    def assemble(self, stored):
        embeds, mask = right_pad([sample["prompt_embeds"] for sample in stored], self.max_length)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def text_identity(self, parts):
        total, start = self._window(parts["tokenizer"])
        return {**caption_settings(self), "max_sequence_length": self.max_length,
                "complex_human_instruction_sha256": hashlib.sha256(self.instruction.encode()).hexdigest(),
                "instruction_tokens": total - self.max_length + 2 if self.instruction else 0}


SANA = SanaFamily(name="sana", pipeline_class="SanaPipeline", text_components=("tokenizer", "text_encoder"),
                  patch_size=1, vae_downsample=32)
