"""Batched text encoding shared by the family adapters.

Two shapes of work, as the pipelines do it:

* masked (PixArt's T5, Sana's Gemma-2): the pipeline passes the attention mask, so the valid
  tokens' outputs do not depend on how much padding follows them. Captions are tokenised alone,
  sorted by length and cut into batches padded only to their longest caption
  (`encoders.length_batches`); the valid rows are kept.
* fixed (every CLIP, SD3's and Flux's T5): the pipeline encodes ``padding="max_length"`` with no
  mask, so every padded row is part of its output and depends on the padding; captions are
  encoded exactly so, in plain chunks.

Every helper returns numpy rows already in the store dtype: each batch output is cast where it
was computed and copied to the host once (`encoders.to_store_array`), and the rows are views of it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..encoders import T5_CALL_COST_TOKENS, _split_on_oom, length_batches, to_store_array

# Valid rows of one caption: (its batch row [W, D], its token count) -> [L, D].
RowSelect = Callable[[np.ndarray, int], np.ndarray]


def first_rows(hidden: np.ndarray, length: int) -> np.ndarray:
    return hidden[:length]


def token_ids(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text as the pipeline's ``padding="max_length"`` call gives them, minus the padding."""
    return tokenizer(list(texts), max_length=max_length, truncation=True, add_special_tokens=True)["input_ids"]


def encode_masked(model, ids: Sequence[Sequence[int]], pad_id: int, device: torch.device, batch_size: int,
                  store_dtype: np.dtype, select: RowSelect = first_rows) -> list[np.ndarray]:
    """Each caption's selected rows of ``model(input_ids, attention_mask)[0]``, in input order."""
    rows: list[np.ndarray | None] = [None] * len(ids)

    def run(batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        width = max(len(item) for item in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            input_ids[row, :len(item)] = torch.as_tensor(item, dtype=torch.long)
            mask[row, :len(item)] = 1
        with torch.inference_mode():
            hidden = to_store_array(model(input_ids.to(device), attention_mask=mask.to(device))[0], store_dtype)
        return [select(hidden[row], len(item)) for row, item in enumerate(batch)]

    for chunk in length_batches([len(item) for item in ids], batch_size, T5_CALL_COST_TOKENS):
        for i, selected in zip(chunk, _split_on_oom(run, [ids[i] for i in chunk])):
            rows[i] = selected
    return rows  # type: ignore[return-value]


def encode_fixed(tokenizer, model, texts: Sequence[str], max_length: int, device: torch.device, batch_size: int,
                 **model_kwargs) -> Iterator[Any]:
    """``model``'s output on each chunk of ``texts``, tokenised ``padding="max_length"`` to ``max_length``, no mask."""
    for start in range(0, len(texts), batch_size):
        input_ids = tokenizer(list(texts[start:start + batch_size]), padding="max_length", max_length=max_length,
                              truncation=True, return_tensors="pt").input_ids
        with torch.inference_mode():
            yield model(input_ids.to(device), **model_kwargs)


def clip_outputs(tokenizer, model, texts: Sequence[str], max_length: int, device: torch.device, batch_size: int,
                 store_dtype: np.dtype, pooled: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per text, CLIP's penultimate hidden states [max_length, D] and its pooled vector, as SDXL/SD3/Flux take them.

    ``pooled``: "first_output" (``output[0]``: the projected text_embeds of a
    CLIPTextModelWithProjection, as SDXL and SD3 take it) or "pooler_output" (Flux).
    """
    hidden_rows: list[np.ndarray] = []
    pooled_rows: list[np.ndarray] = []
    for output in encode_fixed(tokenizer, model, texts, max_length, device, batch_size, output_hidden_states=True):
        hidden_rows.extend(to_store_array(output.hidden_states[-2], store_dtype))
        pooled_rows.extend(to_store_array(output[0] if pooled == "first_output" else output.pooler_output, store_dtype))
    return hidden_rows, pooled_rows


def t5_fixed_outputs(tokenizer, model, texts: Sequence[str], max_length: int, device: torch.device,
                     batch_size: int, store_dtype: np.dtype) -> list[np.ndarray]:
    """Per text, T5's last hidden state over all ``max_length`` positions, unmasked (SD3, Flux)."""
    rows: list[np.ndarray] = []
    for output in encode_fixed(tokenizer, model, texts, max_length, device, batch_size):
        rows.extend(to_store_array(output[0], store_dtype))
    return rows
