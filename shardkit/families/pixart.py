"""PixArt-α and PixArt-Σ: T5 with its attention mask, captions lower-cased (or cleaned) first.

``__call__`` passes ``clean_caption=True`` and ``max_sequence_length`` (120 for α, 300 for Σ) to
``encode_prompt``, which runs ``_text_preprocessing``: the pipeline's ``_clean_caption`` (twice)
when bs4 and ftfy are installed, else lower-case and strip. Which one ran is recorded
(`text_identity`). The T5 rows past the caption's tokens are masked out by the transformer, so
only the valid rows are stored. PixArt-Σ's own feature extractor (the ``--t5`` path) neither
lower-cases nor cleans: the two give different features for the same caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


from .base import Family, Member, TextParts, right_pad
from .text import encode_masked, token_ids


def caption_preprocessing(family: Family) -> str:
    """What ``_text_preprocessing`` does to a caption under ``__call__``'s default here."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    if family.call_default("clean_caption") and is_bs4_available() and is_ftfy_available():
        return "clean_caption"
    return "lower_strip"


def caption_settings(family: Family) -> dict:
    """What the manifest records of the caption preprocessing: what applied, and why."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    return {"caption_preprocessing": caption_preprocessing(family),
            "clean_caption": bool(family.call_default("clean_caption")),
            "bs4_installed": is_bs4_available(), "ftfy_installed": is_ftfy_available()}


def preprocess(family: Family, captions: Sequence[str]) -> list[str]:
    """The pipeline's own ``_text_preprocessing``, run on a bare instance (it reads no instance state)."""
    bare = family.pipeline.__new__(family.pipeline)
    return bare._text_preprocessing(list(captions), clean_caption=caption_preprocessing(family) == "clean_caption")


@dataclass(frozen=True)
class PixArtFamily(Family):
    def members(self, parts: TextParts) -> tuple[Member, ...]:
        width = int(parts["text_encoder"].config.hidden_size)
        return (Member("prompt_embeds", ("L", width), "text_encoder (T5): last hidden state, the valid rows",
                       max_rows=self.max_length),)

    def encode(self, parts, captions, batch_size, store_dtype):
        tokenizer = parts["tokenizer"]
        ids = token_ids(tokenizer, preprocess(self, captions), self.max_length)
        rows = encode_masked(parts["text_encoder"], ids, tokenizer.pad_token_id, parts.device, batch_size, store_dtype)
        return [{"prompt_embeds": valid} for valid in rows]

    def assemble(self, stored):
        embeds, mask = right_pad([sample["prompt_embeds"] for sample in stored], self.max_length)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def text_identity(self, parts):
        return {**caption_settings(self), "max_sequence_length": self.max_length}


PIXART_ALPHA = PixArtFamily(name="pixart-alpha", pipeline_class="PixArtAlphaPipeline",
                            text_components=("tokenizer", "text_encoder"), patch_size=2, vae_downsample=8)
PIXART_SIGMA = PixArtFamily(name="pixart-sigma", pipeline_class="PixArtSigmaPipeline",
                            text_components=("tokenizer", "text_encoder"), patch_size=2, vae_downsample=8)
