"""T5 batching: captions are encoded a window of records ahead and cut into low-padding batches."""

from __future__ import annotations

import itertools
import json
import random

from shardkit.build import build, caption_window_size
from shardkit.encoders import length_batches


def _cost(lengths: list[int], batches: list[list[int]], call_cost: int) -> int:
    return sum(len(batch) * max(lengths[i] for i in batch) + call_cost for batch in batches)


def _cheapest_cut_by_brute_force(lengths: list[int], max_batch: int, call_cost: int) -> int:
    ordered = sorted(lengths)
    best = None
    for cuts in itertools.product((False, True), repeat=len(ordered) - 1):
        groups, current = [], [ordered[0]]
        for value, cut in zip(ordered[1:], cuts):
            if cut:
                groups.append(current)
                current = []
            current.append(value)
        groups.append(current)
        if all(len(g) <= max_batch for g in groups):
            cost = sum(len(g) * max(g) + call_cost for g in groups)
            best = cost if best is None else min(best, cost)
    return best


def test_batches_cover_every_caption_once_longest_first_within_the_size_limit():
    rng = random.Random(0)
    lengths = [rng.randint(3, 300) for _ in range(300)]
    batches = length_batches(lengths, 64)
    assert sorted(i for batch in batches for i in batch) == list(range(300))
    assert all(1 <= len(batch) <= 64 for batch in batches)
    widths = [max(lengths[i] for i in batch) for batch in batches]
    assert widths == sorted(widths, reverse=True)
    # Contiguous in length order: no batch's range overlaps another's.
    spans = [(min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches]
    assert all(low_a >= high_b for (low_a, _), (_, high_b) in zip(spans, spans[1:]))


def test_cuts_are_the_cheapest_possible():
    rng = random.Random(1)
    for _ in range(40):
        lengths = [rng.choice([rng.randint(5, 40), rng.randint(40, 300)]) for _ in range(rng.randint(1, 9))]
        max_batch, call_cost = rng.randint(1, 5), rng.choice([0, 16, 256])
        batches = length_batches(lengths, max_batch, call_cost)
        assert _cost(lengths, batches, call_cost) == _cheapest_cut_by_brute_force(lengths, max_batch, call_cost)


def test_a_few_long_captions_get_a_batch_of_their_own():
    """Cutting sorted captions every 64 would pad 30 short prompts to the 2 long captions' width."""
    lengths = [20] * 30 + [300] * 2
    batches = length_batches(lengths, 64)
    assert [sorted(lengths[i] for i in batch) for batch in batches] == [[300, 300], [20] * 30]
    # With a prohibitive cost per call, one batch is cheaper.
    assert len(length_batches(lengths, 64, call_cost=10**6)) == 1


def _record_t5_calls(monkeypatch, encoders):
    calls = []
    original = type(encoders.t5).encode_distinct

    def recording(self, captions, batch_size):
        captions = list(captions)
        calls.append(captions)
        return original(self, captions, batch_size)

    monkeypatch.setattr(type(encoders.t5), "encode_distinct", recording)
    return calls


def test_captions_are_encoded_per_window_of_the_plan_once_each(toy_dataset, make_config, encoders, tmp_path,
                                                               monkeypatch):
    # One image per VAE batch and a window of 4 records: the windows, not the VAE batches, set T5's work.
    config = make_config(batch_size=1, t5_batch_size=1, captions=("prompt",))
    assert caption_window_size(config) == 4
    calls = _record_t5_calls(monkeypatch, encoders)
    summary = build(str(toy_dataset), tmp_path / "out", config, encoders=encoders)
    assert summary.written == 17
    assert max(len(window) for window in calls) > 1  # more records than one VAE batch holds
    assert all(len(window) <= 4 for window in calls)
    # No window is encoded twice: at most every planned record once, and at least every written one.
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    planned = summary.records_read - len(manifest["plan_skipped"])
    assert summary.written <= sum(len(window) for window in calls) <= planned
