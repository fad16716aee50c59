"""Encoder outputs are cast to the store dtype where they were computed, with numpy's rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardkit.encoders import to_store_array

# Values where a float32 -> float16 cast can go wrong: past fp16's range (inf), fp16 subnormals,
# exact ties between two fp16 neighbours (round to even), and NaN.
EDGE_VALUES = np.array([0.0, -0.0, 1.0, 65504.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 1e-9, 2.0 ** -24, 1 + 2.0 ** -11,
                        1 + 3 * 2.0 ** -11, np.nan, np.inf, -np.inf], dtype=np.float32)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("store", [np.dtype(np.float16), np.dtype(np.float32)])
def test_the_device_cast_stores_the_bytes_numpy_would(device, store):
    values = np.concatenate([EDGE_VALUES, np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 1e3])
    stored = to_store_array(torch.from_numpy(values).to(device), store)
    assert stored.dtype == store
    with np.errstate(over="ignore"):  # the overflow to inf is what is being checked
        expected = values.astype(store)
    assert stored.tobytes() == expected.tobytes()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_compute_stores_what_a_float32_detour_would(device):
    values = torch.from_numpy(np.random.default_rng(1).standard_normal(4096).astype(np.float32) * 1e4)
    bf16 = values.to(torch.bfloat16).to(device)
    assert to_store_array(bf16, np.dtype(np.float16)).tobytes() == \
        bf16.float().cpu().numpy().astype(np.float16).tobytes()


def test_encoders_hand_the_host_store_dtype_tensors(encoders, monkeypatch):
    """What crosses to the host (Tensor.cpu) is already fp16: the cast is not left to numpy."""
    crossing = []
    original_cpu = torch.Tensor.cpu

    def recording_cpu(self, *args, **kwargs):
        crossing.append(self.dtype)
        return original_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", recording_cpu)
    pixels = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    latents = encoders.vae.encode(pixels)
    rows = encoders.t5.encode([[5, 6, 7, 1], [8, 1]], batch_size=2)
    assert encoders.vae.store_dtype == encoders.t5.store_dtype == np.float16  # the fixture stores fp16
    assert crossing == [torch.float16, torch.float16]
    assert latents.dtype == np.float16 and [r.dtype for r in rows] == [np.float16, np.float16]
    assert [r.shape[0] for r in rows] == [4, 2] and all(r.flags.c_contiguous for r in rows)
