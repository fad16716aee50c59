"""`--engine ray` on a local Ray started here (2 CPUs, no GPU): the bytes of a one-process build,
also when an encoder actor is killed in the middle."""

from __future__ import annotations

import threading
import time

import pytest
import ray
from click.testing import CliRunner
from conftest import build_flags, output_files

from shardkit.cli import main
from shardkit.distributed import RankInfo
from shardkit.inspect import inspect_output
from shardkit.outputlock import lock_worker
from shardkit.ray_engine import NAMESPACE, RayOptions, actor_prefix, build_on_ray
from shardkit.storage import Storage


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of this test process, CPU only, stopped (with every worker it started) at the end."""
    ray.init(num_cpus=2, num_gpus=0, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("dataset", ["toy", "synthetic", "tars"])
def test_a_ray_build_writes_the_bytes_of_one_process(dataset, local_ray, one_process_builds, tiny_models, tmp_path):
    output = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(one_process_builds.sources[dataset]), str(output),
                                       *build_flags(tiny_models), *one_process_builds.flags[dataset],
                                       "--engine", "ray"])
    assert result.exit_code == 0, result.output
    assert output_files(output) == output_files(one_process_builds(dataset))
    assert inspect_output(str(output), verify_shards=True).exit_code == 0


def test_a_killed_encoder_actor_is_restarted_and_the_bytes_are_the_same(local_ray, one_process_builds, make_config,
                                                                         tmp_path):
    output = tmp_path / "out"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = build_on_ray(str(one_process_builds.sources["synthetic"]), output, make_config(),
                                              RayOptions(actors=1))
        except BaseException as exc:  # reported by the assertion below
            outcome["error"] = exc

    driver = threading.Thread(target=run)
    driver.start()
    deadline = time.monotonic() + 300
    while len(list((output / ".done").glob("*.json"))) < 2:
        assert driver.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.05)
    assert sorted(p.name for p in output.glob("*.lock")) == ["build.actor000.lock", "build.lock"]  # actor, driver
    actor = ray.get_actor(f"{actor_prefix(output)}0", namespace=NAMESPACE)
    ray.kill(actor, no_restart=False)  # as if its process died: Ray restarts it and retries its shards
    driver.join(timeout=300)
    assert "error" not in outcome and outcome["summary"].complete, outcome
    assert not list(output.glob("*.lock"))  # the driver's released, its actors' deleted
    assert output_files(output) == output_files(one_process_builds("synthetic"))
    assert inspect_output(str(output), verify_shards=True).exit_code == 0


@pytest.mark.timeout(120)
def test_a_ray_build_into_an_output_another_build_holds_is_refused_in_one_line(one_process_builds, tiny_models,
                                                                               tmp_path):
    output = Storage.for_url(tmp_path / "out")
    output.prepare()
    with lock_worker(output, RankInfo(rank=1, world_size=2)):  # a rank of a torchrun launch
        result = CliRunner().invoke(main, ["build", str(one_process_builds.sources["toy"]), str(output.root),
                                           *build_flags(tiny_models), "--engine", "ray"])
    assert result.exit_code == 2 and result.output.startswith("error: another build holds OUTPUT"), result.output
    assert "build.rank001.lock" in result.output and "Traceback" not in result.output
    assert [p.name for p in output.root.iterdir()] == []
