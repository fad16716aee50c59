"""Batch memory for DataLoader workers: shared-memory blocks that a worker fills, the training
process maps, and the worker fills again once the training process has let go of the batch.

torch's own route for a worker's batch is a fresh shared-memory segment per tensor: the kernel
allocates and zeroes every page of it, and frees them after. For PixArt's padded caption
features that is tens of MB per batch, and it costs a worker several times more than filling
the batch (BENCHMARKS.md section 4). Here each big tensor of a batch is cut from a pooled block
(an anonymous ``memfd``), and is sent to the training process as the block's file descriptor
plus a shape. The block's first byte says whether it is in use: the worker sets it when it
hands the block out; the training process clears it once nothing there refers to the batch any
more (no tensor, view or array made from it), and a worker that drops a batch without sending
it clears it itself. A block is only ever refilled while that byte is clear.

Linux only (``os.memfd_create``); elsewhere workers allocate as torch does.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from multiprocessing.reduction import DupFd, ForkingPickler

import numpy as np
import torch
from torch.multiprocessing.reductions import reduce_tensor

# The data starts one page in, so it is page-aligned; the first byte is the in-use flag.
_HEADER = mmap.PAGESIZE
_FREE, _IN_USE = 0, 1

AVAILABLE = hasattr(os, "memfd_create")


class _Block:
    """One memfd, mapped in the worker that made it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.fd = os.memfd_create("shardkit-batch", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, _HEADER + capacity)
            self.map = mmap.mmap(self.fd, _HEADER + capacity)
        except OSError:
            os.close(self.fd)
            raise
        self.bytes = np.frombuffer(self.map, np.uint8)
        weakref.finalize(self, os.close, self.fd)  # (the map keeps a descriptor of its own)

    def in_use(self) -> bool:
        return self.bytes[0] != _FREE


class PooledTensor(torch.Tensor):
    """A batch tensor living in a pooled block. Sending it to another process (the DataLoader
    pickles a worker's batch with multiprocessing's ForkingPickler) sends the block's
    descriptor, not the data. torch operations on it give plain tensors."""

    __torch_function__ = torch._C._disabled_torch_function_impl


# id(PooledTensor) -> {"block", "sent"}; an entry lives as long as its tensor object.
_HANDED_OUT: dict[int, dict] = {}


def _reduce_pooled(tensor: PooledTensor):
    state = _HANDED_OUT.get(id(tensor))
    if state is None or state["sent"]:
        # Sent once already (a second consumer would free the block early): torch's own route, on a copy.
        return reduce_tensor(tensor.as_subclass(torch.Tensor).clone())
    block = state["block"]
    descriptor = DupFd(block.fd)
    state["sent"] = True  # from here on only the receiver frees the block
    return _rebuild_in_consumer, (descriptor, _HEADER + block.capacity,
                                  tensor.numel() * tensor.element_size(), str(tensor.dtype).removeprefix("torch."),
                                  tuple(tensor.shape))


ForkingPickler.register(PooledTensor, _reduce_pooled)


def _let_go(key: int, block: _Block, state: dict) -> None:
    """The worker's tensor object is gone: one never sent frees its block here (nobody else will)."""
    _HANDED_OUT.pop(key, None)
    if not state["sent"]:
        block.bytes[0] = _FREE


class WorkerBlockPool:
    """The blocks of one worker process; ``tensor()`` gives an uninitialised PooledTensor from a
    free block big enough (the smallest such), or from a new block while the pool has room, or
    else from a block made for it alone (not pooled)."""

    def __init__(self, pool_size: int):
        self.pool_size = pool_size
        self._blocks: list[_Block] = []
        self._lock = threading.Lock()

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            fits = [b for b in self._blocks if b.capacity >= nbytes and not b.in_use()]
            if fits:
                block = min(fits, key=lambda b: b.capacity)
            else:
                block = _Block(nbytes)
                if len(self._blocks) < self.pool_size:
                    self._blocks.append(block)
                else:  # every pooled block is held: replace a free, too small one, if any
                    spare = next((i for i, b in enumerate(self._blocks) if not b.in_use()), None)
                    if spare is not None:
                        self._blocks[spare] = block
            block.bytes[0] = _IN_USE
        raw = torch.from_numpy(block.bytes[_HEADER:_HEADER + nbytes])
        tensor = raw.view(dtype).view(shape).as_subclass(PooledTensor)
        state = {"block": block, "sent": False}
        _HANDED_OUT[id(tensor)] = state
        weakref.finalize(tensor, _let_go, id(tensor), block, state)
        return tensor


# ---- the training process's side ------------------------------------------------------------

def _clear_flag(mapping: mmap.mmap) -> None:
    mapping[0] = _FREE


def _rebuild_in_consumer(dup_fd, map_size: int, nbytes: int, dtype_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Map the block and view the batch tensor in it; the block's flag is cleared once nothing
    here refers to that memory any more (the numpy array under every tensor and view of it)."""
    fd = dup_fd.detach()
    try:
        mapping = mmap.mmap(fd, map_size)
    finally:
        os.close(fd)
    array = np.frombuffer(mapping, np.uint8, count=nbytes, offset=_HEADER)
    weakref.finalize(array, _clear_flag, mapping)
    return torch.from_numpy(array).view(getattr(torch, dtype_name)).view(shape)
