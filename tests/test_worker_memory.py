"""DataLoader workers send big batch tensors as pooled shared-memory blocks, refilled only once
the training process has let go of every tensor and view in them."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
from torch.utils.data import DataLoader

from shardkit import worker_memory
from shardkit.reader import BatchBuffers, ShardReader

from test_reader import write_synthetic_build

pytestmark = pytest.mark.skipif(not worker_memory.AVAILABLE, reason="memfd_create is Linux only")


def _send(tensor: torch.Tensor) -> torch.Tensor:
    """What a DataLoader does with a worker's tensor, here within one process."""
    return pickle.loads(ForkingPickler.dumps(tensor))


def test_a_block_is_refilled_only_after_the_consumer_lets_go_of_every_view():
    pool = worker_memory.WorkerBlockPool(pool_size=2)
    sent = pool.tensor((4, 8), torch.float16).fill_(1)
    block = pool._blocks[0]
    received = _send(sent)
    assert type(received) is torch.Tensor and torch.equal(received, torch.ones(4, 8, dtype=torch.float16))
    del sent
    gc.collect()
    assert block.in_use()  # sent: only the consumer frees it
    view = received[1:]
    del received
    gc.collect()
    assert block.in_use()  # a view still reads it

    other = pool.tensor((4, 8), torch.float16).fill_(2)  # must come from another block
    assert len(pool._blocks) == 2 and pool._blocks[1].in_use()
    assert torch.equal(view, torch.ones(3, 8, dtype=torch.float16))
    del view
    gc.collect()
    assert not block.in_use()
    again = pool.tensor((2, 8), torch.float16)  # the smallest free block that fits: the first one
    assert again.data_ptr() == block.bytes[worker_memory._HEADER:].ctypes.data

    # A tensor dropped without being sent is freed by the worker itself.
    del again
    gc.collect()
    assert not block.in_use()

    # Sent twice: the second send is a copy, so the first consumer alone decides the block's fate.
    first, second = _send(other), _send(other)
    del other
    assert torch.equal(first, second) and second.data_ptr() != first.data_ptr()
    del second
    gc.collect()
    assert pool._blocks[1].in_use()
    del first
    gc.collect()
    assert not pool._blocks[1].in_use()

    values = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    brain = pool.tensor((3, 4), torch.bfloat16)
    brain.copy_(values)
    assert torch.equal(_send(brain).float(), values)


def _open_descriptors() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_blocks_close_their_descriptors_once_nothing_holds_them():
    before = _open_descriptors()
    pool = worker_memory.WorkerBlockPool(pool_size=1)
    pooled = pool.tensor((64,), torch.float32)
    unpooled = pool.tensor((64,), torch.float32)  # the one pooled block is in use: a block of its own
    assert len(pool._blocks) == 1
    received = [_send(pooled), _send(unpooled)]
    del pooled, unpooled, received
    assert _open_descriptors() == before + 2  # the pooled block: its memfd and its map's own descriptor
    del pool
    assert _open_descriptors() == before


def _check_against_store(batch: dict, expected: dict) -> None:
    """A batch read with latent="mean" holds exactly what was stored for its keys."""
    for i, key in enumerate(batch["keys"]):
        feature = torch.from_numpy(expected[key]["features"]["prompt"])
        moments = torch.from_numpy(expected[key]["moments"])
        assert torch.equal(batch["caption_feature"][i, 0, :len(feature)], feature)
        assert torch.equal(batch["caption_feature"][i, 0, len(feature):], feature[-1].expand(12 - len(feature), -1))
        assert torch.equal(batch["latent"][i], moments[:len(moments) // 2])


def test_dataloader_workers_reuse_blocks_and_never_overwrite_a_held_batch(tmp_path, monkeypatch):
    expected = write_synthetic_build(tmp_path, {"1.0": [40], "2.0": [40]}, hidden=64)
    made = multiprocessing.Value("i", 0)
    real_memfd_create = os.memfd_create

    def counting_memfd_create(*args):
        with made.get_lock():
            made.value += 1
        return real_memfd_create(*args)

    monkeypatch.setattr(os, "memfd_create", counting_memfd_create)
    dataset = ShardReader(tmp_path, batch_size=2, layout="dict", latent="mean", caption_fields=["prompt"], seed=3)
    dataset.collate.buffers = BatchBuffers(pool_min_bytes=0)  # pool even these small tensors (latent, features)
    pooled_tensors = 2 * len(dataset)

    def loader():
        return DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork")

    held = list(loader())
    assert len(held) == len(dataset) == 40 and sorted(k for b in held for k in b["keys"]) == sorted(expected)
    for batch in held:  # every batch kept: no block was refilled under one
        _check_against_store(batch, expected)
    assert made.value == pooled_tensors

    made.value = 0
    for batch in loader():
        _check_against_store(batch, expected)
    assert made.value < pooled_tensors / 2  # let go batch by batch: blocks come back
