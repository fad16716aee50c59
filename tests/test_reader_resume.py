"""Mid-epoch resume and weighted mixing: after a restart in a fresh process the reader yields
exactly the batches the uninterrupted run would have yielded next; mixed builds are drawn in
proportion to their weights, one build and one bucket per batch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from shardkit.errors import ShardkitError
from shardkit.reader import ShardReader

from test_reader import write_synthetic_build

LAYOUT = {"1.0": [10, 7], "0.5": [9], "2.0": [6, 5]}  # 37 samples over three buckets
OPTIONS = dict(batch_size=3, shuffle_buffer=8, seed=5, layout="dict", rank=0, world_size=1)

# Runs in a fresh interpreter: load the saved state into a new reader (and loader), read the rest.
DRIVER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from shardkit.reader import ShardReader
    spec = json.loads(open(sys.argv[1]).read())
    reader = ShardReader(spec["build"], **spec["options"])
    state = json.loads(open(spec["state"]).read())
    if spec["loader"] is None:
        reader.load_state_dict(state)
        batches = iter(reader)
    else:
        from torchdata.stateful_dataloader import StatefulDataLoader
        loader = StatefulDataLoader(reader, batch_size=None, num_workers=spec["loader"])
        loader.load_state_dict(state)
        batches = iter(loader)
    rows = {}
    for i, batch in enumerate(batches):
        if i == spec["count"]:
            break
        rows[f"latent{i}"] = batch["latent"].numpy()
        rows[f"caption{i}"] = batch["caption_feature"].numpy()
        rows[f"mask{i}"] = batch["attention_mask"].numpy()
        rows[f"keys{i}"] = np.array(batch["keys"])
    np.savez(spec["out"], **rows)
""")


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("resume") / "build"
    write_synthetic_build(output, LAYOUT)
    return output


def _arrays(batch) -> dict[str, np.ndarray]:
    return {"latent": batch["latent"].numpy(), "caption": batch["caption_feature"].numpy(),
            "mask": batch["attention_mask"].numpy(), "keys": np.array(batch["keys"])}


def _resume_in_fresh_process(tmp_path: Path, build: Path, options: dict, state: dict, loader: int | None,
                             count: int) -> list[dict[str, np.ndarray]]:
    state_file, spec_file, out = tmp_path / "state.json", tmp_path / "spec.json", tmp_path / "rest.npz"
    state_file.write_text(json.dumps(state))  # the state must survive JSON
    spec_file.write_text(json.dumps({"build": str(build), "options": options, "state": str(state_file),
                                     "loader": loader, "count": count, "out": str(out)}))
    result = subprocess.run([sys.executable, "-c", DRIVER, str(spec_file)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out, allow_pickle=False) as saved:
        found = len([name for name in saved.files if name.startswith("keys")])
        return [{"latent": saved[f"latent{i}"], "caption": saved[f"caption{i}"], "mask": saved[f"mask{i}"],
                 "keys": saved[f"keys{i}"]} for i in range(found)]


def _assert_equal_runs(expected: list[dict], got: list[dict]) -> None:
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        assert list(want["keys"]) == list(have["keys"])
        for name in ("latent", "caption", "mask"):
            np.testing.assert_array_equal(want[name], have[name])


def _loader(reader, workers: int):
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(reader, batch_size=None, num_workers=workers)


@pytest.mark.parametrize("workers", [None, 0, 2], ids=["own-state", "stateful-0", "stateful-2"])
def test_a_fresh_process_resumes_mid_epoch_exactly(build, tmp_path, workers):
    uninterrupted = [_arrays(b) for b in (ShardReader(str(build), **OPTIONS) if workers is None
                                          else _loader(ShardReader(str(build), **OPTIONS), workers))]
    k = 5
    reader = ShardReader(str(build), **OPTIONS)
    source = reader if workers is None else _loader(reader, workers)
    batches = iter(source)
    for _ in range(k):
        next(batches)
    state = source.state_dict()
    if workers is None:
        assert len(json.dumps(state)) < 600  # small: a position, never a sample list
    rest = _resume_in_fresh_process(tmp_path, build, OPTIONS, state, workers, count=len(uninterrupted) - k + 1)
    _assert_equal_runs(uninterrupted[k:], rest)


def test_resume_across_an_epoch_boundary(build, tmp_path):
    reader = ShardReader(str(build), **OPTIONS)
    list(reader)
    reader.set_epoch(1)
    uninterrupted = [_arrays(b) for b in reader]
    again = ShardReader(str(build), **OPTIONS)
    list(again)
    again.set_epoch(1)
    batches = iter(again)
    for _ in range(4):
        next(batches)
    state = again.state_dict()
    assert state["epoch"] == 1
    rest = _resume_in_fresh_process(tmp_path, build, OPTIONS, state, None, count=100)
    _assert_equal_runs(uninterrupted[4:], rest)


def test_resume_in_resampled_mode(build, tmp_path):
    options = {**OPTIONS, "resampled": True, "batches_per_epoch": 12}
    uninterrupted = [_arrays(b) for b in ShardReader(str(build), **options)]
    reader = ShardReader(str(build), **options)
    batches = iter(reader)
    for _ in range(7):
        next(batches)
    rest = _resume_in_fresh_process(tmp_path, build, options, reader.state_dict(), None, count=100)
    _assert_equal_runs(uninterrupted[7:], rest)


def test_a_changed_build_or_option_is_refused(build, tmp_path):
    reader = ShardReader(str(build), **OPTIONS)
    next(iter(reader))
    state = reader.state_dict()
    other = tmp_path / "other"
    write_synthetic_build(other, {"1.0": [10, 8], "0.5": [9], "2.0": [6, 5]})
    with pytest.raises(ShardkitError, match="another build"):
        ShardReader(str(other), **OPTIONS).load_state_dict(state)
    with pytest.raises(ShardkitError, match="batch_size"):
        ShardReader(str(build), **{**OPTIONS, "batch_size": 4}).load_state_dict(state)
    with pytest.raises(ShardkitError, match="not a shardkit reader state"):
        ShardReader(str(build), **OPTIONS).load_state_dict({"epoch": 0})


def test_resuming_under_another_world_size_splits_the_rest_of_the_epoch(build):
    """Two ranks stop after k batches each; three ranks finish the epoch: every batch of the epoch
    is yielded once, no sample twice, and the new ranks get equal shares."""
    options = {**OPTIONS, "shuffle_buffer": 0, "drop_last": True}
    options.pop("rank"), options.pop("world_size")
    k, consumed = 2, []
    for rank in range(2):
        reader = ShardReader(str(build), **options, rank=rank, world_size=2)
        batches = iter(reader)
        consumed += [next(batches)["keys"] for _ in range(k)]
        state = reader.state_dict()
    per_rank_before = len(ShardReader(str(build), **options, rank=0, world_size=2))
    rest = []
    for rank in range(3):
        reader = ShardReader(str(build), **options, rank=rank, world_size=3)
        reader.load_state_dict(state)
        rest.append([b["keys"] for b in reader])
    assert len({len(part) for part in rest}) == 1
    seen = [key for batch in consumed + [b for part in rest for b in part] for key in batch]
    assert len(seen) == len(set(seen))  # nothing repeated
    total_batches = 2 * per_rank_before + (len(ShardReader(str(build), **options, rank=0, world_size=1)) - 2 * per_rank_before)
    assert len(consumed) + sum(len(part) for part in rest) >= total_batches - 2  # at most world-1 wait for later


def test_weighted_mixing_draws_builds_in_proportion(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    write_synthetic_build(small, {"1.0": [20], "0.5": [20]})
    write_synthetic_build(large, {"2.0": [60], "3.0": [50]})  # other buckets: the bucket names the build
    reader = ShardReader([str(small), str(large)], batch_size=2, weights=[3, 1], seed=1, layout="dict",
                         rank=0, world_size=1)
    shares, epoch = Counter(), 0
    while sum(shares.values()) < 2000:
        reader.set_epoch(epoch)
        for batch in reader:
            shares["small" if batch["bucket"] in ("1.0", "0.5") else "large"] += 1
        epoch += 1
    share = shares["small"] / sum(shares.values())
    assert abs(share - 0.75) <= 0.02, shares


def test_mixing_keeps_ranks_equal_and_resumes(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    write_synthetic_build(small, {"1.0": [12], "0.5": [9]})
    write_synthetic_build(large, {"1.0": [30], "2.0": [25]})
    options = dict(batch_size=2, weights=[1, 2], seed=4, layout="dict", shuffle_buffer=6)
    counts = {len(list(ShardReader([str(small), str(large)], **options, rank=r, world_size=3))) for r in range(3)}
    assert len(counts) == 1
    full = [b["keys"] for b in ShardReader([str(small), str(large)], **options, rank=0, world_size=1)]
    reader = ShardReader([str(small), str(large)], **options, rank=0, world_size=1)
    batches = iter(reader)
    head = [next(batches)["keys"] for _ in range(3)]
    resumed = ShardReader([str(small), str(large)], **options, rank=0, world_size=1)
    resumed.load_state_dict(json.loads(json.dumps(reader.state_dict())))
    assert head + [b["keys"] for b in resumed] == full
    with pytest.raises(ShardkitError, match="another build"):
        ShardReader([str(small), str(large)], **{**options, "weights": [1, 1]}, rank=0, world_size=1).load_state_dict(
            reader.state_dict())


def test_builds_with_other_features_are_not_mixed(tmp_path):
    left, right = tmp_path / "left", tmp_path / "right"
    write_synthetic_build(left, {"1.0": [4]})
    write_synthetic_build(right, {"1.0": [4]}, hidden=6)
    with pytest.raises(ShardkitError, match="cannot be mixed"):
        ShardReader([str(left), str(right)], batch_size=2, weights=[1, 1])
    with pytest.raises(ShardkitError, match="one weight per build"):
        ShardReader([str(left), str(right)], batch_size=2, weights=[1])
