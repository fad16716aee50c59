"""One build at a time in an OUTPUT, with any number of workers per build.

The workers of one build (ranks of a launch, Ray actors and their driver) share OUTPUT; a second
build is refused in one line naming the holder; planners take turns at plan.lock; no lock is left
behind after a normal end, an error, Ctrl-C or SIGTERM, and kill -9 leaves a stale lock that the
next build takes over.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shardkit.build import BuildJob, build
from shardkit.distributed import RankInfo
from shardkit.errors import ShardkitError
from shardkit.outputlock import (PLAN_LOCK, actor_lock_name, launch_of, lock_output, lock_worker, planning,
                                 release_launch)
from shardkit.storage import Storage

REPO = Path(__file__).resolve().parent.parent
RENDEZVOUS = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "run-a"}


@pytest.fixture()
def storage(tmp_path) -> Storage:
    storage = Storage.for_url(tmp_path / "out")
    storage.prepare()
    return storage


def _locks(storage: Storage) -> list[str]:
    """The lock files in OUTPUT (none when a build stopped before it began removed the folder it made)."""
    return sorted(path.name for path in Path(storage.root).glob("*.lock"))


def _live_process():
    """Another live process of this host, to hold locks that are not stale."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _holder(pid: int, launch: str, worker: str = "") -> str:
    """A lock file's content, as a worker of ``launch`` on this host would write it."""
    return json.dumps({"host": socket.gethostname(), "pid": pid, "started": "2026-01-01T00:00:00Z", "launch": launch,
                       "worker": worker, "pid_namespace": os.readlink("/proc/self/ns/pid"), "process_start": None})


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_ranks_of_one_launch_share_output_whatever_their_number(storage, monkeypatch):
    for name, value in RENDEZVOUS.items():
        monkeypatch.setenv(name, value)
    # An elastic launch: ranks of 2, then of 3 join with the same rendezvous and run id.
    with lock_worker(storage, RankInfo(0, 2)), lock_worker(storage, RankInfo(1, 2)), \
            lock_worker(storage, RankInfo(2, 3)):
        assert _locks(storage) == ["build.rank000.lock", "build.rank001.lock", "build.rank002.lock"]
        with pytest.raises(ShardkitError, match="another build holds OUTPUT") as refused:
            lock_worker(storage, RankInfo())  # a one-process build
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(refused.value)
        monkeypatch.setenv("MASTER_PORT", "29501")  # another launch: under a free name, or its own rank's
        for other in (RankInfo(3, 4), RankInfo(1, 2)):
            with pytest.raises(ShardkitError, match=r"another build holds OUTPUT .*\(rank \d of [23]\)"):
                lock_worker(storage, other)
    assert _locks(storage) == []


def test_launch_ids_tell_launches_apart():
    two = RankInfo(0, 2)
    assert launch_of(two, RENDEZVOUS) == launch_of(RankInfo(1, 4), RENDEZVOUS)
    assert launch_of(two, RENDEZVOUS) != launch_of(two, {**RENDEZVOUS, "TORCHELASTIC_RUN_ID": "run-b"})
    # One-host launches on two hosts both use the loopback address: the host tells them apart.
    assert socket.gethostname() in launch_of(two, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
    assert launch_of(two, {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"}) != launch_of(two, {"SLURM_JOB_ID": "8"})
    assert launch_of(RankInfo(), {}) != launch_of(RankInfo(), {})  # a lone process is a launch of its own


@pytest.mark.timeout(60)
def test_a_live_lock_of_another_launch_is_refused_under_any_name_and_a_dead_one_deleted(storage):
    live = _live_process()
    try:
        (storage.root / "build.actor001.lock").write_text(_holder(live.pid, "driver x", "Ray actor 1"))
        (storage.root / "build.rank005.lock").write_text(_holder(_dead_pid(), "launch y", "rank 5 of 6"))
        with pytest.raises(ShardkitError, match=rf"pid {live.pid} on host .* \(Ray actor 1\).*build.actor001.lock"):
            lock_worker(storage, RankInfo())
        assert _locks(storage) == ["build.actor001.lock", "build.rank005.lock"]  # nothing taken on a refusal
        (storage.root / "build.actor001.lock").unlink()
        with lock_worker(storage, RankInfo()):
            assert _locks(storage) == ["build.lock"]  # the dead launch's lock is gone
    finally:
        live.kill()
        live.wait()


@pytest.mark.timeout(60)
def test_a_restarted_actor_takes_over_its_own_lock_and_the_driver_deletes_its_actors_locks(storage):
    live = _live_process()  # a worker whose earlier run cannot be judged dead from here (another node)
    try:
        (storage.root / actor_lock_name(0)).write_text(_holder(live.pid, "driver x", "Ray actor 0"))
        with pytest.raises(ShardkitError, match="another build holds OUTPUT"):
            lock_output(storage, actor_lock_name(0), "driver y", "Ray actor 0")  # another driver's actor
        lock_output(storage, actor_lock_name(0), "driver x", "Ray actor 0")  # Ray restarted actor 0
        lock_output(storage, actor_lock_name(1), "driver x", "Ray actor 1")
        with lock_output(storage, "build.lock", "driver x"):
            release_launch(storage, "driver x", keep="build.lock")  # the driver stopped its actors
            assert _locks(storage) == ["build.lock"]
        assert _locks(storage) == []
    finally:
        live.kill()
        live.wait()


@pytest.mark.timeout(60)
def test_planners_of_one_launch_take_turns_and_another_launch_is_refused(storage):
    order = []

    def second_planner():
        with planning(storage, "launch a"):
            order.append("second in")

    with planning(storage, "launch a"):
        other = threading.Thread(target=second_planner)
        other.start()
        with pytest.raises(ShardkitError, match=r"another build holds OUTPUT .*plan\.lock"):
            with planning(storage, "launch b"):
                pass
        time.sleep(0.5)
        assert order == [] and other.is_alive()  # waits while the first plans
        order.append("first out")
    other.join(timeout=30)
    assert order == ["first out", "second in"]


@pytest.mark.timeout(300)
def test_the_plan_is_made_under_plan_lock(toy_dataset, make_config, encoders, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    live = _live_process()
    try:
        with BuildJob(str(toy_dataset), output, make_config(), encoders=encoders) as job:
            # Another build began planning after this one took its lock (its own lock refused it later).
            (output / PLAN_LOCK).write_text(_holder(live.pid, "another launch", "planner"))
            with pytest.raises(ShardkitError, match=rf"another build holds OUTPUT .*pid {live.pid}.*plan\.lock"):
                job.prepare_plan()
        assert not (output / "plan.json").exists()
    finally:
        live.kill()
        live.wait()
    (output / PLAN_LOCK).write_text(_holder(_dead_pid(), "another launch", "planner"))  # a planner killed -9
    summary = build(str(toy_dataset), output, make_config(), encoders=encoders)
    assert summary.written == 17 and (output / "plan.json").exists()
    assert _locks(Storage.for_url(output)) == []


@pytest.mark.timeout(300)
def test_an_error_exit_leaves_no_lock(toy_dataset, make_config, encoders, tmp_path):
    output = tmp_path / "out"
    build(str(toy_dataset), output, make_config(), encoders=encoders)
    with pytest.raises(ShardkitError, match="different options"):
        build(str(toy_dataset), output, make_config(max_ratio=2.0), encoders=encoders)
    assert _locks(Storage.for_url(output)) == []


def _cli_build(source: Path, output: Path, tiny_models: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "shardkit", "build", str(source), str(output), "--resolution", "256",
               "--vae", str(tiny_models), "--vae-subfolder", "vae", "--t5", str(tiny_models), "--device", "cpu",
               "--dtype", "fp32", "--batch-size", "4", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "kill-9"])
def test_a_stopped_build_leaves_no_lock_or_one_the_next_build_takes_over(stop, toy_dataset, tiny_models, make_config,
                                                                         encoders, tmp_path):
    output = tmp_path / "out"
    process = _cli_build(toy_dataset, output, tiny_models)
    try:
        _wait_for(output / "build.lock", process)
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    assert process.returncode != 0 and "Traceback" not in stderr, stderr
    if stop != signal.SIGKILL:
        assert _locks(Storage.for_url(output)) == []
        if stop == signal.SIGINT:
            assert "interrupted: OUTPUT is left resumable" in stderr
        return
    assert json.loads((output / "build.lock").read_text())["pid"] == process.pid  # stale
    summary = build(str(toy_dataset), output, make_config(), encoders=encoders)
    assert summary.written == 17 and _locks(Storage.for_url(output)) == []


@pytest.mark.timeout(60)
def test_a_lock_of_a_killed_process_not_yet_reaped_is_stale(storage):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child.kill()  # not waited for: a zombie, as orphans stay where no init reaps them
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        (storage.root / "build.lock").write_text(_holder(child.pid, "launch z"))
        with lock_worker(storage, RankInfo()):
            assert json.loads((storage.root / "build.lock").read_text())["pid"] == os.getpid()
    finally:
        child.wait()
