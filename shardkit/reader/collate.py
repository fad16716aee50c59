"""The PixArt-Σ collate: decoded samples of one bucket -> the tensors of a training step, and
the buffers those tensors are allocated in.

The batch (``layout="tuple"``): ``latent`` ``[B, C, h, w]`` drawn from the stored posterior
(or its mean), ``caption_feature`` ``[B, 1, max_length, D]`` padded by repeating the last valid
row, ``attention_mask`` ``[B, 1, 1, max_length]``, ``data_info`` with ``img_hw`` and
``aspect_ratio``. ``layout="dict"`` adds keys, prompts, caption fields and the bucket.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .. import worker_memory
from ..errors import ShardkitError
from ..format import pad_caption_feature
from .epoch import derive_seed
from .stages import DecodedSample

PIXART_LAYOUTS = ("tuple", "dict")
LAYOUTS = (*PIXART_LAYOUTS, "diffusers")  # "diffusers": DiffusersCollate
LATENT_MODES = ("sample", "mean")
CAPTION_PADDINGS = ("max_length", "longest")
_FLOAT32_EXACT = (torch.float16, torch.bfloat16, torch.float32)  # dtypes float32 holds exactly


class BatchBuffers:
    """Where the big tensors of a batch are allocated.

    - In a DataLoader worker: in shared memory, so sending the batch to the training process
      copies nothing. Tensors of ``pool_min_bytes`` or more come from this worker's pooled
      blocks (``worker_memory``), refilled once the training process has let go of them;
      torch's own collate takes a fresh segment per tensor, and the kernel's allocating and
      zeroing its pages cost a worker ~3x its reading (BENCHMARKS.md section 4).
    - Elsewhere, buffers of ``pool_min_bytes`` or more are cut from a few pooled blocks: a
      block is used again once nothing refers to it any more (no batch, view, storage or numpy
      array made from it), and a smaller batch (a bucket's tail) takes the front of a bigger
      free block. A fresh buffer of tens of MB is mapped page by page and zero-filled by the
      kernel, which costs several times more than filling it.
    """

    def __init__(self, pool_size: int = 6, pool_min_bytes: int = 1 << 20, worker_pool_size: int = 8):
        self.pool_size = pool_size
        self.pool_min_bytes = pool_min_bytes
        self.worker_pool_size = worker_pool_size  # blocks: ~4 batches (2 prefetched, 1 held, 1 filling)
        self._worker_pool: worker_memory.WorkerBlockPool | None = None
        self._worker_pool_pid = 0
        self._pool: list[np.ndarray] = []  # flat uint8 blocks
        self._lock = threading.Lock()  # a block is chosen and taken (viewed) in one step
        holder = [object()]
        self._free_refs = sys.getrefcount(holder[0])  # the count of a pooled block nobody else holds

    def reused(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array, cut from a free pooled block when one is big enough."""
        dtype = np.dtype(dtype)
        size = math.prod(shape) * dtype.itemsize
        if size < self.pool_min_bytes:
            return np.empty(shape, dtype)
        with self._lock:
            fit = spare = None
            for index in range(len(self._pool)):
                if sys.getrefcount(self._pool[index]) != self._free_refs:
                    continue  # a batch (or something made from it) still holds this block
                block_size = self._pool[index].size
                if block_size >= size and (fit is None or block_size < self._pool[fit].size):
                    fit = index
                elif block_size < size:
                    spare = index
            if fit is not None:
                block = self._pool[fit]
            else:
                block = np.empty(size, np.uint8)
                if len(self._pool) < self.pool_size:
                    self._pool.append(block)
                elif spare is not None:
                    self._pool[spare] = block  # a free block too small for this makes room
            return block[:size].view(dtype).reshape(shape)  # a view: it holds the block while in use

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor for a batch: shared in a DataLoader worker, else reused."""
        if get_worker_info() is not None:
            return self._worker_tensor(shape, dtype)
        try:
            return torch.from_numpy(self.reused(shape, torch.empty(0, dtype=dtype).numpy().dtype))
        except TypeError:  # a dtype numpy lacks (bfloat16): same-sized integers, reinterpreted
            return torch.from_numpy(self.reused(shape, np.dtype(f"u{dtype.itemsize}"))).view(dtype)

    def _worker_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """In a DataLoader worker: big tensors from this worker's pooled shared blocks
        (``worker_memory``), the rest in fresh shared memory as torch's collate allocates it."""
        if worker_memory.AVAILABLE and math.prod(shape) * dtype.itemsize >= self.pool_min_bytes:
            if self._worker_pool is None or self._worker_pool_pid != os.getpid():  # (a forked copy is not ours)
                self._worker_pool, self._worker_pool_pid = worker_memory.WorkerBlockPool(self.worker_pool_size), os.getpid()
            try:
                return self._worker_pool.tensor(shape, dtype)
            except OSError:  # e.g. out of memory for a new block: torch's route may still fit
                pass
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)


@dataclass
class PixArtCollate:
    """Samples of one bucket -> one batch in PixArt-Σ's layout (see the module docstring).
    Latent noise comes from (seed, epoch, sample key): the same sample gets the same noise
    whatever batch, worker or rank it lands in."""

    max_length: int
    latent: str = "sample"
    scale_factor: float | None = None
    dtype: torch.dtype | None = None
    mask_dtype: torch.dtype = torch.int16
    caption_padding: str = "max_length"
    layout: str = "tuple"
    seed: int = 0
    buffers: "BatchBuffers" = field(default_factory=lambda: BatchBuffers())

    def __post_init__(self) -> None:
        for name, value, allowed in (("latent", self.latent, LATENT_MODES), ("layout", self.layout, PIXART_LAYOUTS),
                                     ("caption_padding", self.caption_padding, CAPTION_PADDINGS)):
            if value not in allowed:
                raise ShardkitError(f"{name} must be one of {allowed}, got {value!r}")
        if not (isinstance(self.max_length, int) and self.max_length >= 1):
            raise ShardkitError(f"max_length must be a positive integer, got {self.max_length!r}")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["buffers"]  # each process pools its own batch buffers
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.buffers = BatchBuffers()

    def __call__(self, samples: Sequence[DecodedSample], epoch: int) -> Any:
        """One batch from samples of one bucket, in the layout chosen."""
        if len({s.bucket for s in samples}) != 1:
            raise ValueError("a batch must hold samples of one bucket")
        count = len(samples)
        moments = torch.from_numpy(np.stack([s.moments for s in samples]))
        channels = moments.shape[1] // 2
        float_dtype = self.dtype or moments.dtype
        buffers = self.buffers
        latent = buffers.tensor((count, channels, *moments.shape[2:]), float_dtype)
        # The arithmetic runs in float32 one sample at a time: no batch-sized float32 copy, and
        # up to 512-px buckets a sample is under torch's parallel grain, so no intra-op threads
        # are woken (on a busy machine waking them costs more than the work).
        in_place = float_dtype == torch.float32
        work = None if in_place else torch.empty(latent.shape[1:], dtype=torch.float32)
        generator = torch.Generator() if self.latent == "sample" else None
        direct_mean = generator is None and self.scale_factor is None and moments.dtype in _FLOAT32_EXACT
        for i, sample in enumerate(samples):
            mean = moments[i, :channels]
            if direct_mean:
                latent[i].copy_(mean)  # one conversion, the same values as by way of float32
                continue
            value = latent[i] if in_place else work
            if generator is not None:
                # Each sample's noise comes from its own seed (seed, epoch, key): the same sample
                # gets the same noise whatever batch, worker or rank it lands in. Re-seeding one
                # generator gives the values a fresh one would.
                value.normal_(generator=generator.manual_seed(derive_seed(self.seed, epoch, sample.key, "noise")))
                value.mul_(moments[i, channels:].float()).add_(mean.float())
            else:
                value.copy_(mean)
            if self.scale_factor is not None:
                value.mul_(self.scale_factor)
            if not in_place:
                latent[i].copy_(value)
        # Filled in place: at PixArt's sizes a padded batch is tens of MB, so no extra copies.
        lengths = [min(s.caption_feature.shape[0], self.max_length) for s in samples]
        padded_length = self.max_length if self.caption_padding == "max_length" else max(lengths)
        width = samples[0].caption_feature.shape[1]
        stored_dtype = samples[0].caption_feature.dtype
        shape = (count, 1, padded_length, width)
        stored_torch_dtype = torch.from_numpy(np.empty(0, stored_dtype)).dtype
        convert = self.dtype is not None and self.dtype != stored_torch_dtype
        if convert:  # padded at the stored dtype, then converted by torch in one pass
            features = buffers.reused(shape, stored_dtype)
        else:
            caption_feature = buffers.tensor(shape, stored_torch_dtype)
            features = caption_feature.numpy()
        mask = torch.zeros((count, 1, 1, padded_length), dtype=self.mask_dtype)
        try:
            mask_rows = mask.numpy()[:, 0, 0]  # a view: setting numpy slices costs less than torch indexing
        except TypeError:  # a dtype numpy lacks (bfloat16)
            mask_rows = mask[:, 0, 0]
        for i, sample in enumerate(samples):
            pad_caption_feature(sample.caption_feature, padded_length, out=features[i, 0])
            mask_rows[i, :lengths[i]] = 1
        if convert:
            caption_feature = buffers.tensor(shape, self.dtype).copy_(torch.from_numpy(features))
        data_info = {
            "img_hw": torch.tensor([s.original_hw for s in samples], dtype=torch.float32),
            "aspect_ratio": torch.full((count,), float(samples[0].bucket), dtype=torch.float32),
        }
        if self.layout == "tuple":
            return latent, caption_feature, mask, data_info
        return {"latent": latent, "caption_feature": caption_feature, "attention_mask": mask, "data_info": data_info,
                "keys": [s.key for s in samples], "prompt": [s.prompt for s in samples],
                "caption_field": [s.caption_field for s in samples], "bucket": samples[0].bucket}


@dataclass
class DiffusersCollate:
    """Samples of one bucket -> the diffusers layout: ``latents`` plus what the family's
    pipeline's ``encode_prompt`` returns, under its names (``families.collate.diffusers_batch``).

    ``max_length`` set: a build of PixArt-Σ's encoder pair (``--t5``), its T5 rows right-padded
    with zeros to it and masked as ``PixArtSigmaPipeline.encode_prompt`` returns them; None: a
    ``--pipeline`` build, assembled by its family. Latent noise comes from (seed, epoch, key).
    """

    family: Any  # families.Family
    spec: Any  # families.LatentSpec
    max_length: int | None = None
    latent: str = "sample"
    normalize: bool = False
    dtype: torch.dtype | None = None
    seed: int = 0

    def __call__(self, samples: Sequence[DecodedSample], epoch: int) -> dict:
        from ..families.collate import diffusers_batch

        if len({s.bucket for s in samples}) != 1:
            raise ValueError("a batch must hold samples of one bucket")
        texts = [s.text if s.text is not None else {"prompt_embeds": s.caption_feature} for s in samples]
        family = self.family
        if self.max_length is not None:
            family = _PaddedRows(self.max_length)
        batch = diffusers_batch(family, self.spec, [s.moments for s in samples], texts, [s.key for s in samples],
                                [s.prompt for s in samples], latent=self.latent, normalize=self.normalize,
                                seeds=[derive_seed(self.seed, epoch, s.key, "noise") for s in samples])
        if self.dtype is not None:
            batch = {name: value.to(self.dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                     for name, value in batch.items()}
        return batch


@dataclass(frozen=True)
class _PaddedRows:
    """PixArt-Σ's encode_prompt outputs from a --t5 build's valid rows: zeros past them, masked."""

    max_length: int

    def assemble(self, stored: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        from ..families.base import right_pad

        embeds, mask = right_pad([sample["prompt_embeds"] for sample in stored], self.max_length)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}
