"""Planning rate, and `--engine ray` against the plain build, on this machine.

    python benchmarks/engines.py [--n 200] [--repeats 2] [--workdir /tmp/shardkit-bench]

- planning: records/s of making the plan (tokenising, bucketing, byte bounds, the source digest)
  of the synthetic PixArt dataset, with width/height in the metadata and without them (then
  every image header is read);
- building: samples/s of a one-process build and of `--engine ray` on a local Ray of this
  machine's CPUs (tiny encoders, CPU), each into a fresh OUTPUT, best of ``--repeats``; Ray's own
  start-up is timed apart. The two OUTPUTs are compared byte for byte.

Results go to benchmarks/results/engines-n{N}.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR, DEFAULT_WORKDIR, bench_config_options  # noqa: E402
from synth import DatasetSpec, make_dataset  # noqa: E402


def _files(output: Path) -> dict[str, bytes]:
    return {p.relative_to(output).as_posix(): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


def _without_sizes(dataset: Path, work: Path) -> Path:
    """The dataset as JSON Lines without width/height: planning reads every image header."""
    items = json.loads((dataset / "InternData" / "data_info.json").read_text())
    target = work / f"{dataset.name}-no-sizes.jsonl"
    target.write_text("".join(json.dumps({k: v for k, v in it.items() if k not in ("width", "height", "ratio")}) + "\n"
                              for it in items))
    return target


def plan_rate(source: str, image_root: str | None, options: dict, encoders, work: Path, repeats: int) -> float:
    from shardkit.build import BuildJob
    from shardkit.config import BuildConfig

    best = float("inf")
    for _ in range(repeats):
        output = work / "plan-out"
        shutil.rmtree(output, ignore_errors=True)
        with BuildJob(source, output, BuildConfig(**options, image_root=image_root), encoders=encoders) as job:
            start = time.perf_counter()
            plan = job.prepare_plan()
            best = min(best, time.perf_counter() - start)
    return plan.source["records"] / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from shardkit.build import build
    from shardkit.config import BuildConfig
    from shardkit.encoders import load_encoders
    from shardkit.ray_engine import RayOptions, build_on_ray
    from shardkit.testing.tiny_models import write_tiny_models

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    models = write_tiny_models(work / "tiny-models")
    dataset = make_dataset(DatasetSpec(args.n, long_side=args.resolution), work, models / "tokenizer")
    options = bench_config_options(models, args.resolution, batch_size=8, t5_batch_size=64, workers=2)
    config = BuildConfig(**options)
    encoders = load_encoders(config)

    results: dict = {"n": args.n, "resolution": args.resolution, "cpus": os.cpu_count()}
    results["plan_records_per_s"] = {
        "sizes in the metadata": plan_rate(str(dataset), None, options, encoders, work, args.repeats),
        "headers read": plan_rate(str(_without_sizes(dataset, work)), str(dataset / "InternImgs"), options,
                                  encoders, work, args.repeats)}

    def best_of(run) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            output = work / "engine-out"
            shutil.rmtree(output, ignore_errors=True)
            start = time.perf_counter()
            run(output)
            best = min(best, time.perf_counter() - start)
        return args.n / best

    plain = best_of(lambda out: build(str(dataset), out, config, encoders=encoders))
    shutil.copytree(work / "engine-out", work / "engine-plain", dirs_exist_ok=True)
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    results["ray_start_s"] = time.perf_counter() - start
    try:
        on_ray = best_of(lambda out: build_on_ray(str(dataset), out, config, RayOptions()))
    finally:
        ray.shutdown()
    results["build_samples_per_s"] = {"plain build": plain, "--engine ray (local Ray)": on_ray}
    results["ray_output_identical"] = _files(work / "engine-out") == _files(work / "engine-plain")

    target = BENCH_DIR / "results" / f"engines-n{args.n}.json"
    target.write_text(json.dumps(results, indent=1) + "\n")
    print("| measure | records/s or samples/s |\n| --- | --- |")
    for name, value in results["plan_records_per_s"].items():
        print(f"| planning, {name} | {value:.0f} records/s |")
    for name, value in results["build_samples_per_s"].items():
        print(f"| build, {name} | {value:.1f} samples/s |")
    print(f"Ray start-up {results['ray_start_s']:.1f}s (not in the build time); "
          f"OUTPUT identical: {results['ray_output_identical']}")


if __name__ == "__main__":
    main()
