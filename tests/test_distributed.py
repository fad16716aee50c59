"""Builds on several processes: torchrun on CPU (gloo), kill and resume with another number of
processes, the plan's checks, finishing by hand. Every OUTPUT is compared byte for byte with a
one-process build."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_command, build_flags, child_env, output_files, run_build

from shardkit.build import build
from shardkit.cli import main
from shardkit.distributed import RankInfo, discover_ranks
from shardkit.errors import ShardkitError
from shardkit.inspect import inspect_output


def _assert_sound(output: Path) -> None:
    report = inspect_output(str(output), verify_shards=True)
    assert report.exit_code == 0, report.as_json()


# "tars": img2dataset-shaped tars with repeated images, built with --dedup.
@pytest.mark.parametrize("dataset,processes", [("toy", 2), ("toy", 3), ("synthetic", 2), ("synthetic", 3),
                                               ("tars", 3)])
def test_torchrun_launches_write_the_bytes_of_one_process(dataset, processes, one_process_builds, tiny_models,
                                                          tmp_path):
    reference = one_process_builds(dataset)
    output = tmp_path / "out"
    result = run_build(one_process_builds.sources[dataset], output, tiny_models, processes,
                       flags=one_process_builds.flags[dataset])
    assert f"rank 1 of {processes}: done" in result.stdout
    assert output_files(output) == output_files(reference)
    assert not any("-r0" in name for name in output_files(output))  # shard names carry no rank
    _assert_sound(output)


@pytest.mark.parametrize("dataset", ["synthetic", "tars"])
def test_a_killed_launch_resumes_with_one_and_with_three_processes(dataset, one_process_builds, tiny_models, tmp_path):
    source, reference = one_process_builds.sources[dataset], one_process_builds(dataset)
    flags = one_process_builds.flags[dataset]
    killed = tmp_path / "killed"
    launch = subprocess.Popen(build_command(source, killed, tiny_models, processes=2, flags=flags), env=child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(list((killed / ".done").glob("*.json"))) < 3 and launch.poll() is None:
            assert time.monotonic() < deadline, "the launch wrote no shard in time"
            time.sleep(0.05)
    finally:
        # torchrun starts each rank in a session of its own: the ranks are found by their locks.
        ranks = [json.loads(lock.read_text())["pid"] for lock in killed.glob("build.rank*.lock")]
        os.killpg(launch.pid, signal.SIGKILL)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launch.wait(timeout=60)
    assert len(ranks) == 2
    assert json.loads((killed / "manifest.json").read_text())["status"] == "in_progress"
    for processes in (1, 3):
        output = tmp_path / f"resumed-{processes}"
        shutil.copytree(killed, output)
        result = run_build(source, output, tiny_models, processes, flags=flags)
        assert "kept from an earlier run" in result.stdout
        assert output_files(output) == output_files(reference), f"resumed with {processes}"
        _assert_sound(output)


def test_a_damaged_or_foreign_plan_is_refused_in_one_line(one_process_builds, tiny_models, tmp_path):
    toy = tmp_path / "toy"
    shutil.copytree(one_process_builds("toy"), toy)
    plan_file = toy / "plan.json"
    original = plan_file.read_bytes()

    def refusal() -> str:
        result = CliRunner().invoke(main, ["build", str(one_process_builds.sources["toy"]), str(toy),
                                           *build_flags(tiny_models)])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        return result.output

    plan_file.write_bytes(original.replace(b'"shards":[["', b'"shards":[[" ', 1))  # one shard moved elsewhere
    assert "damaged or was edited" in refusal()
    plan_file.write_bytes(original[:100])
    assert "damaged or was edited" in refusal()
    shutil.copy(one_process_builds("synthetic") / "plan.json", plan_file)  # a sound plan of another source
    assert "made from another source" in refusal()
    # Sealed again with a matching sha256, but a shard's records no longer rise in source order.
    body = json.loads(original)["plan"]
    multi = next(shard for shard in body["shards"] if len(shard[2]) > 1)
    multi[2].reverse()
    sealed = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    plan_file.write_text(f'{{"sha256":"{hashlib.sha256(sealed.encode()).hexdigest()}","plan":{sealed}}}\n')
    assert "damaged or was edited" in refusal()
    plan_file.write_bytes(original)
    result = CliRunner().invoke(main, ["build", str(one_process_builds.sources["toy"]), str(toy),
                                       *build_flags(tiny_models)])
    assert result.exit_code == 0 and "kept from an earlier run: 17 samples in 13 planned shards" in result.output
    assert output_files(toy) == output_files(one_process_builds("toy"))


def test_a_changed_source_is_refused_against_the_plan(one_process_builds, make_config, encoders, tmp_path):
    source = tmp_path / "data.jsonl"
    lines = one_process_builds.sources["synthetic"].read_text().splitlines(keepends=True)
    source.write_text("".join(lines))
    config = make_config(image_root=str(one_process_builds.sources["synthetic"].parent))
    output = tmp_path / "out"
    build(str(source), output, config, encoders=encoders)
    source.write_text("".join(lines[:-1]))
    with pytest.raises(ShardkitError, match="made from another source .* or the source changed since"):
        build(str(source), output, config, encoders=encoders)


def test_merge_writes_the_manifest_by_hand_and_refuses_while_shards_are_missing(one_process_builds, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(one_process_builds("synthetic"), output)
    reference = output_files(output)
    (output / "manifest.json").write_text(json.dumps({**json.loads((output / "manifest.json").read_text()),
                                                      "status": "in_progress"}))
    (output / "failures.jsonl").unlink()
    result = CliRunner().invoke(main, ["merge", str(output)])
    assert result.exit_code == 0 and result.output.startswith("wrote ") and "manifest.json" in result.output
    assert output_files(output) == reference

    done = sorted((output / ".done").glob("*.json"))
    done[0].unlink()
    result = CliRunner().invoke(main, ["merge", str(output)])
    assert result.exit_code == 2 and f"1 of {len(done)} planned shards are not done yet" in result.output
    assert json.loads((output / "manifest.json").read_text())["status"] == "in_progress"


def test_rank_discovery_from_torchrun_and_slurm_variables():
    assert discover_ranks({}) == RankInfo()
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x"}
    assert discover_ranks(torchrun) == RankInfo(rank=3, world_size=8, local_rank=1, launcher="torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}
    assert discover_ranks(slurm) == RankInfo(rank=5, world_size=6, local_rank=2, launcher="slurm")
    assert discover_ranks({**slurm, "RANK": "0", "WORLD_SIZE": "2"}).world_size == 2  # torchrun's wins
    for bad, needle in [({"RANK": "0"}, "set both RANK and WORLD_SIZE"), ({"RANK": "2", "WORLD_SIZE": "2"}, "0..WORLD_SIZE-1"),
                        ({"RANK": "x", "WORLD_SIZE": "2"}, "not a whole number")]:
        with pytest.raises(ShardkitError, match=needle):
            discover_ranks(bad)


def test_ranks_without_a_rendezvous_share_the_plan_and_the_last_writes_the_manifest(
        toy_build, toy_dataset, make_config, encoders, tmp_path, monkeypatch):
    """As Slurm array tasks run: RANK/WORLD_SIZE set by hand, no MASTER_ADDR, one after the other."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    output = tmp_path / "out"
    first = build(str(toy_dataset), output, make_config(), encoders=encoders, ranks=RankInfo(rank=1, world_size=2))
    assert not first.complete and first.merged is None and 0 < first.shards_written < 13
    assert json.loads((output / "manifest.json").read_text())["status"] == "in_progress"
    last = build(str(toy_dataset), output, make_config(), encoders=encoders, ranks=RankInfo(rank=0, world_size=2))
    assert last.complete and first.shards_written + last.shards_written == 13 and last.written == 17
    assert output_files(output) == output_files(toy_build)  # built in this process too: the same threads
