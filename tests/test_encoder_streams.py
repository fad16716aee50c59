"""Encoder streams (an opt-in): batches are encoded several at a time; shards stay in batch order."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from shardkit.build import build
from shardkit.encoders import EncoderStreams, resolve_encoder_streams
from shardkit.errors import ConfigError


def _files(output: Path) -> dict[str, bytes]:
    return {p.relative_to(output).as_posix(): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


def test_auto_is_one_stream_and_more_are_taken_as_asked():
    assert resolve_encoder_streams(0, torch.device("cpu")) == 1
    assert resolve_encoder_streams(0, torch.device("cuda")) == 1
    assert resolve_encoder_streams(3, torch.device("cpu")) == 3


def test_negative_streams_are_refused(make_config):
    with pytest.raises(ConfigError, match="encoder_streams"):
        make_config(encoder_streams=-1)


def test_streams_run_at_once_on_a_share_of_the_threads_and_restore_them():
    before = torch.get_num_threads()
    both_running = threading.Barrier(2, timeout=20)  # breaks unless two jobs run at the same time

    def job(tag: str) -> tuple[str, int]:
        both_running.wait()
        torch.ones(64).sum()  # a first torch op on this thread takes the process-wide thread count
        return tag, torch.get_num_threads()

    with EncoderStreams(2) as streams:
        first, second = streams.submit(job, "a"), streams.submit(job, "b")
        assert first.result() == ("a", max(1, before // 2))
        assert second.result() == ("b", max(1, before // 2))
    assert torch.get_num_threads() == before


def test_one_stream_runs_inline_and_raises_inline():
    caller = threading.current_thread()
    with EncoderStreams(1) as streams:
        assert streams.submit(threading.current_thread).result() is caller
        with pytest.raises(ZeroDivisionError):
            streams.submit(lambda: 1 / 0)


def _slow_first_two_batches(monkeypatch, vae):
    """The first two VAE batches must run at once (a barrier), and the first then finishes last."""
    original = type(vae).encode
    calls = []
    together = threading.Barrier(2, timeout=20)
    lock = threading.Lock()

    def encode(self, pixels):
        with lock:
            calls.append(len(pixels))
            nth = len(calls)
        if nth <= 2:
            together.wait()
            if nth == 1:
                threading.Event().wait(0.5)  # let batch 2 reach the writer's queue first
        return original(self, pixels)

    monkeypatch.setattr(type(vae), "encode", encode)
    return calls


def test_batches_reach_the_shards_in_order_whichever_stream_finishes_first(toy_dataset, make_config, encoders,
                                                                           tmp_path, monkeypatch):
    config = make_config(encoder_streams=2)
    reference = tmp_path / "reference"
    build(str(toy_dataset), reference, config, encoders=encoders)
    calls = _slow_first_two_batches(monkeypatch, encoders.vae)
    raced = tmp_path / "raced"
    summary = build(str(toy_dataset), raced, config, encoders=encoders)
    assert summary.written == 17 and len(calls) >= 3
    assert _files(raced) == _files(reference)


def test_an_error_in_a_stream_stops_the_build_and_the_resume_completes_it(toy_dataset, make_config, encoders,
                                                                          tmp_path, monkeypatch):
    config = make_config(encoder_streams=2)
    reference = tmp_path / "reference"
    build(str(toy_dataset), reference, config, encoders=encoders)

    original = type(encoders.vae).encode
    calls = []

    def failing(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise RuntimeError("encoder failed (injected)")
        return original(self, pixels)

    monkeypatch.setattr(type(encoders.vae), "encode", failing)
    output = tmp_path / "out"
    with pytest.raises(RuntimeError, match="encoder failed"):
        build(str(toy_dataset), output, config, encoders=encoders)
    # Only whole shards were committed: no temporary file is left, and every listed shard is kept.
    assert not [p for p in (output / "shards").iterdir() if not p.name.endswith(".tar")]
    monkeypatch.setattr(type(encoders.vae), "encode", original)
    summary = build(str(toy_dataset), output, config, encoders=encoders)
    assert summary.written == 17
    assert _files(output) == _files(reference)


def test_a_resume_may_change_the_stream_count(toy_dataset, make_config, encoders, tmp_path):
    output = tmp_path / "out"
    build(str(toy_dataset), output, make_config(encoder_streams=2), encoders=encoders)
    summary = build(str(toy_dataset), output, make_config(encoder_streams=1), encoders=encoders)
    assert summary.shards_reused == summary.shards and summary.written == 17
