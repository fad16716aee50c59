"""Every shardkit benchmark in one run, printed as Markdown tables (the ones in BENCHMARKS.md).

    python benchmarks/run_all.py                 # CPU, tiny encoders, N=200
    python benchmarks/run_all.py --n 500 --repeats 3
    python benchmarks/run_all.py --device cuda --full-size     # GPU: random-init SDXL VAE + T5-XXL

What it measures, each in a fresh interpreter (benchmarks/tasks.py) on synthetic PixArt-layout
datasets (benchmarks/synth.py):

1. build throughput of shardkit's build() against a PixArt-Σ-style per-file extractor
   (benchmarks/baseline.py) with the same encoders, and against the encoders alone on
   pre-decoded pixels in the build's own batches (interleaved repeats; best and median);
2. host overhead: CPU ms per sample outside the encoders (encoders replaced by free stubs), per
   stage, for 512-px JPEGs and for the 384-1024 px set;
3. bytes per sample, measured here and projected to the real dimensions;
4. read throughput of shardkit.reader, of PixArt-style per-file reading, and of raw tar bytes;
5. peak RSS of `shardkit build` at N and 10 N samples;
6. stage micro-benchmarks (decode/resize vs the exact reference transform, tar writing);
7. the FLOP floor of the full-size encoders (computed on the meta device, not measured);
8. planning alone at scale: synthetic Parquet sources of 100k and 1M records.

The machine is shared with other work: every comparison interleaves its two sides and keeps
the best of ``--repeats`` runs, and each table records the load average seen while it ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, DEFAULT_WORKDIR, REPO, bench_config_options, machine, run_task, table, task_env  # noqa: E402
from procmon import run_with_peak  # noqa: E402

FULL_HIDDEN = 4096  # T5-XXL
FULL_LATENT_CHANNELS = 4  # SDXL VAE
MAX_LENGTH = 300
SECTIONS = ("build", "host", "bytes", "read", "memory", "stages", "plan", "scale", "verify", "flops", "gpu")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="samples per build (memory also runs 10 N)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each timed build")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2,
                        help="VAE batch of the build (on CPU, with two encoder streams, the tiny VAE is fastest at "
                             "batches of 1-2: BENCHMARKS.md section 1)")
    parser.add_argument("--t5-batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="decode processes, for the build and the baseline alike")
    parser.add_argument("--read-batch-size", type=int, default=16)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--full-size", action="store_true",
                        help="random-init full-size SDXL VAE + T5-XXL instead of the tiny encoders (GPU)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None,
                        help="run these sections only (bytes and read reuse the builds in --workdir when there)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the N / 10 N peak-RSS builds")
    parser.add_argument("--scale-records", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="records of the synthetic Parquet sources the scale section plans")
    parser.add_argument("--memory-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for the peak-RSS builds, e.g. MALLOC_MMAP_THRESHOLD_=4194304 (repeatable)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="datasets and build outputs")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default benchmarks/results/<device>-<models>.json)")
    return parser.parse_args()


class Report:
    def __init__(self) -> None:
        self.sections: list[str] = []
        self.results: dict = {}

    def add(self, key: str, text: str, data) -> None:
        print(text, flush=True)
        self.sections.append(text)
        self.results[key] = data


def _load() -> float:
    return round(os.getloadavg()[0], 1)


def _rate(samples: int, seconds: float) -> float:
    return samples / seconds if seconds > 0 else float("nan")


# ---- bytes ----------------------------------------------------------------------------------------

def _member_kind(suffix: str, image_exts: set[str]) -> str:
    if suffix == "latent.npy":
        return "latent"
    if suffix.startswith("t5_"):
        return "t5"
    if suffix in ("json", "txt"):
        return "metadata"
    return "image" if suffix in image_exts else "other"


def shard_bytes(build: Path) -> dict:
    """Bytes of a build by member kind, tar framing included (header + padding per member)."""
    kinds: Counter = Counter()
    files = 0
    total = 0
    for path in sorted(build.glob("shards/*.tar")):
        files += 1
        size = path.stat().st_size
        total += size
        used = 0
        with tarfile.open(path) as tar:
            for member in tar:
                suffix = member.name.split(".", 1)[1]
                framed = 512 + math.ceil(member.size / 512) * 512
                kinds[_member_kind(suffix, {"jpg", "png", "webp", "jpeg", "bmp", "gif", "tif", "tiff"})] += framed
                used += framed
        kinds["archive end"] += size - used
    manifest = json.loads((build / "manifest.json").read_text())
    samples = manifest["records"]["written"]
    return {"samples": samples, "total": total, "files": files, "by_kind": dict(kinds),
            "token_lengths": manifest.get("token_lengths", {})}


def baseline_bytes(features: Path) -> dict:
    out = {}
    for folder in sorted((features / "InternData").iterdir()):
        sizes = [(p.stat().st_size, p.stat().st_blocks * 512) for p in folder.iterdir() if p.is_file()]
        out[folder.name] = {"files": len(sizes), "apparent": sum(s for s, _ in sizes), "on_disk": sum(b for _, b in sizes)}
    return out


def _npz_uncompressed(hidden: int, length: int = MAX_LENGTH) -> int:
    """np.savez of caption_feature [1, L, D] fp16 + attention_mask [1, L] int16, without compression."""
    npy_header = 128
    zip_overhead = 2 * (30 + 46 + len("caption_feature.npy")) + 22 + 40  # local + central headers, end record
    return (npy_header + length * hidden * 2) + (npy_header + length * 2) + zip_overhead


# ---- the run ------------------------------------------------------------------------------------------

class Context:
    """What every section shares: options, models, datasets, the build outputs and the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        from shardkit.testing.tiny_models import write_tiny_models

        from synth import DatasetSpec, describe, make_dataset

        self.args = args
        self.work = args.workdir
        self.work.mkdir(parents=True, exist_ok=True)
        self.tiny = write_tiny_models(self.work / "tiny-models")
        self.models = self.tiny
        if args.full_size:
            self.models = Path(run_task("write_full_models", {"dest": str(self.work / "full-models"),
                                                              "tiny_models": str(self.tiny), "device": args.device})["path"])
        self.report = Report()
        info = machine()
        info.update(device=args.device, models="full-size random-init SDXL VAE + T5-XXL" if args.full_size else
                    "tiny random encoders (shardkit tiny-models)", n=args.n, repeats=args.repeats,
                    resolution=args.resolution, batch_size=args.batch_size, t5_batch_size=args.t5_batch_size,
                    workers=args.workers, command=" ".join([Path(sys.executable).name] + sys.argv))
        print(f"machine: {json.dumps(info)}", flush=True)
        self.report.results["machine"] = info
        print("datasets ...", flush=True)
        self.dataset = lambda n, long_side=None: make_dataset(DatasetSpec(n, long_side=long_side), self.work,
                                                              self.tiny / "tokenizer")
        self.main_ds = self.dataset(args.n)
        self.ds512 = self.dataset(args.n, 512)
        self.report.results["datasets"] = {"main": describe(self.main_ds), "ls512": describe(self.ds512)}
        self.options = bench_config_options(self.models, args.resolution, args.batch_size, args.t5_batch_size,
                                            args.workers, device=args.device)
        self.out = self.work / "out"

    def ensure_builds(self) -> None:
        """The shardkit build and the per-file baseline of the main dataset (bytes and read need them)."""
        if not (self.out / "build" / "manifest.json").is_file():
            run_task("build", {"config": self.options, "source": str(self.main_ds), "out": str(self.out / "build")})
        if not (self.out / "baseline" / "InternData").is_dir():
            run_task("baseline", {"config": self.options, "source": str(self.main_ds), "out": str(self.out / "baseline"),
                                  "workers": self.args.workers})


def section_build(ctx: Context) -> None:
    """Build throughput: shardkit, the per-file baseline, the encoders alone (interleaved)."""
    args, out, options, report, main_ds = ctx.args, ctx.out, ctx.options, ctx.report, ctx.main_ds
    runs: dict[str, list[dict]] = {"shardkit": [], "baseline": [], "encoders": [], "processes": [], "one_stream": [],
                                   "encoders_one_stream": [], "plain_gpu_layout": [], "two_streams": []}
    loads = []
    for _ in range(args.repeats):
        loads.append(_load())
        runs["shardkit"].append(run_task("build", {"config": options, "source": str(main_ds), "out": str(out / "build")}))
        runs["baseline"].append(run_task("baseline", {"config": options, "source": str(main_ds),
                                                      "out": str(out / "baseline"), "workers": args.workers}))
        runs["encoders"].append(run_task("encoders", {"config": options, "source": str(main_ds)}))
        if args.device == "cpu":  # CPU-only comparisons (decode design, CPU memory layout)
            runs["processes"].append(run_task("build", {"config": options, "source": str(main_ds),
                                                        "out": str(out / "build-processes"), "decode_processes": True}))
            one_stream = dict(options, encoder_streams=1)  # the build before encoder streams
            runs["one_stream"].append(run_task("build", {"config": one_stream, "source": str(main_ds),
                                                         "out": str(out / "build-one-stream")}))
            runs["encoders_one_stream"].append(run_task("encoders", {"config": one_stream, "source": str(main_ds)}))
        else:  # GPU-only: what channels-last and pinned, non-blocking input copies bring
            runs["plain_gpu_layout"].append(run_task("build", {"config": options, "source": str(main_ds),
                                                               "out": str(out / "build-plain-layout"),
                                                               "plain_gpu_layout": True}))
            # and whether a second encoder thread (host work of one batch beside the GPU work of
            # the other) beats the GPU default of one
            runs["two_streams"].append(run_task("build", {"config": dict(options, encoder_streams=2),
                                                          "source": str(main_ds), "out": str(out / "build-two-streams")}))
    loads.append(_load())

    def best(name: str) -> dict:
        return min(runs[name], key=lambda r: r["wall_s"])

    def rates(name: str) -> tuple[float, float]:
        values = [_rate(r["samples"], r["wall_s"]) for r in runs[name]]
        return max(values), statistics.median(values)

    sk, bl, enc = (rates(k) for k in ("shardkit", "baseline", "encoders"))
    rows = [
        ["shardkit build() (encoders loaded)", sk[0], sk[1], best("shardkit")["cpu_self_s"] + best("shardkit")["cpu_children_s"], "1.00"],
        ["PixArt-Σ-style per-file extraction", bl[0], bl[1], best("baseline")["cpu_self_s"] + best("baseline")["cpu_children_s"],
         f"{sk[0] / bl[0]:.2f}x faster"],
        ["encoders alone on pre-decoded pixels", enc[0], enc[1], best("encoders")["cpu_self_s"],
         f"build = {100 * sk[0] / enc[0]:.0f}% of it"],
    ]
    if runs["processes"]:
        pr = rates("processes")
        rows.append(["for reference: decode in spawned processes (build.py before f4fe59c)", pr[0], pr[1],
                     best("processes")["cpu_self_s"] + best("processes")["cpu_children_s"], f"{pr[0] / sk[0]:.2f}x build()"])
    if runs["one_stream"]:
        one, enc_one = rates("one_stream"), rates("encoders_one_stream")
        rows.append(["for reference: one encoder stream, 2 intra-op threads (build.py before encoder streams)",
                     one[0], one[1], best("one_stream")["cpu_self_s"] + best("one_stream")["cpu_children_s"],
                     f"{one[0] / sk[0]:.2f}x build(), {one[0] / bl[0]:.2f}x per-file"])
        rows.append(["for reference: encoders alone, one stream", enc_one[0], enc_one[1],
                     best("encoders_one_stream")["cpu_self_s"], f"one-stream build = {100 * one[0] / enc_one[0]:.0f}% of it"])
    if runs["plain_gpu_layout"]:
        pl = rates("plain_gpu_layout")
        rows.append(["for reference: VAE without channels-last and pinned, non-blocking input copies", pl[0], pl[1],
                     best("plain_gpu_layout")["cpu_self_s"] + best("plain_gpu_layout")["cpu_children_s"],
                     f"{pl[0] / sk[0]:.2f}x build()"])
    if runs["two_streams"]:
        two = rates("two_streams")
        rows.append(["for reference: two encoder streams (threads) instead of the GPU default of one", two[0], two[1],
                     best("two_streams")["cpu_self_s"] + best("two_streams")["cpu_children_s"],
                     f"{two[0] / sk[0]:.2f}x build()"])
    text = table(f"Build throughput, N={args.n} ({args.repeats} interleaved runs, load average {min(loads)}-{max(loads)})",
                 ["what", "samples/s best", "samples/s median", "CPU s (best run)", "ratio"], rows)
    base = best("baseline")
    text += (f"\nbaseline split: VAE phase {base['vae_wall_s']:.1f} s (one image per call), T5 phases "
             f"{base['t5_wall_s']:.1f} s (every caption padded to {MAX_LENGTH}, one at a time); "
             f"encoders alone: VAE {best('encoders')['vae_s']:.1f} s + T5 {best('encoders')['t5_s']:.1f} s.\n")
    report.add("build", text, {"runs": runs, "loads": loads})


def _cpu_s(run: dict) -> float:
    return run["cpu_self_s"] + run["cpu_children_s"]


def section_host(ctx: Context) -> None:
    """Host overhead: CPU per sample outside the encoders (encoders stubbed)."""
    args, out, options, report = ctx.args, ctx.out, ctx.options, ctx.report
    main_ds, ds512 = ctx.main_ds, ctx.ds512
    quarter = ctx.dataset(max(args.n // 4, 8), 512)

    def least_cpu_stub_build(dataset: Path, **extra) -> dict:
        """The stubbed build of ``dataset`` that took the least CPU over the repeats."""
        return min((run_task("build", {"config": options, "source": str(dataset), "out": str(out / "stub"),
                                       "stub": True, **extra}) for _ in range(args.repeats)), key=_cpu_s)

    host_rows = []
    host = {}
    for label, dataset, small in (("512-px JPEG", ds512, quarter), ("384-1024 px JPEG", main_ds, None)):
        for mode in ("threads", "processes"):
            full = least_cpu_stub_build(dataset, decode_processes=mode == "processes")
            marginal = None
            if small is not None:
                part = least_cpu_stub_build(small, decode_processes=mode == "processes")
                marginal = 1000 * (_cpu_s(full) - _cpu_s(part)) / (full["samples"] - part["samples"])
            host[f"{label} {mode}"] = {"full": full, "marginal_ms": marginal}
            host_rows.append([label, "threads (build.py)" if mode == "threads" else
                              "spawned processes (build.py before f4fe59c)", 1000 * _cpu_s(full) / full["samples"],
                              "-" if marginal is None else marginal, 1000 * full["wall_s"] / full["samples"]])
    # The same 512-px build with T5 rows at T5-XXL's width: what serialising, hashing, checking
    # and writing ~1.1 MB of features per sample adds (the stubs' arrays are zeros; none of these
    # costs depends on the values).
    wide = least_cpu_stub_build(ds512, stub_hidden=FULL_HIDDEN)
    host["512-px JPEG threads, T5 rows at real width"] = {"full": wide}
    host_rows.append([f"512-px JPEG, T5 rows at D={FULL_HIDDEN}", "threads (build.py)",
                      1000 * _cpu_s(wide) / wide["samples"], "-", 1000 * wide["wall_s"] / wide["samples"]])
    stages = run_task("build_stages", {"config": options, "source": str(ds512), "out": str(out / "stages")})
    text = table("Host overhead: CPU ms per sample outside the encoders (encoders stubbed)",
                 ["input", "decode runs in", "CPU ms/sample (whole build() call)",
                  "CPU ms/sample (marginal, N/4 -> N)", "wall ms/sample"], host_rows)
    total = 1000 * stages["cpu_self_s"] / stages["samples"]
    stage_rows = [[name, 1000 * s / stages["samples"]] for name, s in sorted(stages["stages"].items(), key=lambda kv: -kv[1])]
    stage_rows.append(["other (loop, batching, manifest, threads)", total - sum(r[1] for r in stage_rows)])
    stage_rows.append(["total (one process, workers=0)", total])
    text += "\n" + table("Where the host time goes, 512-px JPEG (workers=0, per-thread CPU clocks)",
                         ["stage", "CPU ms/sample"], stage_rows)
    text += "\ndecode profile (own time, s): " + ", ".join(f"{p['function']} {p['own_s']:.3f}"
                                                           for p in stages["decode_profile"][:5]) + "\n"
    report.add("host", text, {"builds": host, "stages": stages})


def section_bytes(ctx: Context) -> None:
    """Bytes per sample, measured and projected to the real dimensions."""
    out, report = ctx.out, ctx.report
    built = shard_bytes(out / "build")
    base_files = baseline_bytes(out / "baseline")
    n = built["samples"]
    kinds = built["by_kind"]
    # The per-file layout also needs data_info.json (sizes, ratios, texts) to train: charge its share.
    info_share = (ctx.main_ds / "InternData" / "data_info.json").stat().st_size / n
    features_only = sum(v for k, v in kinds.items() if k != "image")
    base_apparent = sum(v["apparent"] for v in base_files.values()) + info_share * n
    base_disk = sum(v["on_disk"] for v in base_files.values()) + info_share * n
    rows = [
        ["measured here (tiny: latent 8 ch, T5 D=32)", "shardkit, features only (--no-images)", features_only / n,
         f"{features_only / base_apparent:.3f}"],
        ["", "shardkit, images kept (default)", built["total"] / n, f"{built['total'] / base_apparent:.3f}"],
        ["", "per-file baseline (.npy + 2 .npz + data_info.json share)", base_apparent / n, "1.000"],
        ["", "per-file baseline, on disk (4 KiB blocks)", base_disk / n, f"{base_disk / base_apparent:.3f}"],
    ]

    # Projection: the same samples, buckets and token lengths at the real feature sizes; json, txt and
    # images as measured. Tar framing per member: 512-byte header + on average 256 bytes of padding.
    token_lengths = {f: {int(k): v for k, v in h.items()} for f, h in built["token_lengths"].items()}
    per_bucket = json.loads((out / "build" / "manifest.json").read_text())["totals"]["per_bucket"]
    npy, framing = 128, 768
    latent = sum(b["samples"] * 2 * FULL_LATENT_CHANNELS * (b["hw"][0] // 8) * (b["hw"][1] // 8) * 2
                 for b in per_bucket.values()) / n
    t5_valid = sum(length * count * FULL_HIDDEN * 2 for h in token_lengths.values() for length, count in h.items()) / n
    captions = sum(sum(h.values()) for h in token_lengths.values()) / n
    metadata = (kinds.get("metadata", 0) + kinds.get("archive end", 0)) / n
    sk_projected = metadata + latent + framing + npy + t5_valid + captions * (framing + npy)
    # PixArt's .npz: padded to 300 rows, then deflated. Repeated padding rows deflate to almost nothing;
    # the size of the rest is calibrated on a 2-layer T5 with T5-XXL's width and position buckets.
    from fullsize import distinct_padded_rows

    sample = _caption_sample(ctx.main_ds, per_field=6)
    proxy = run_task("npz_proxy", {"captions": sample, "tokenizer": str(ctx.tiny / "tokenizer"), "max_length": MAX_LENGTH})
    slope, intercept = _fit([r["distinct_rows"] * FULL_HIDDEN * 2 for r in proxy["rows"]], [r["npz_bytes"] for r in proxy["rows"]])
    deflated = sum(count * (slope * distinct_padded_rows(length, MAX_LENGTH) * FULL_HIDDEN * 2 + intercept)
                   for h in token_lengths.values() for length, count in h.items()) / n
    from baseline import LATENT_SAVE_DTYPE

    base_latent = latent * np.dtype(LATENT_SAVE_DTYPE).itemsize // 2 + npy  # `latent` counts fp16 bytes
    base_raw = base_latent + captions * _npz_uncompressed(FULL_HIDDEN) + info_share
    base_deflated = base_latent + deflated + info_share
    images = kinds.get("image", 0) / n
    rows += [
        ["projected (latent [8,h/8,w/8] fp16, T5-XXL D=4096 fp16)", "shardkit, features only", sk_projected,
         f"{sk_projected / base_deflated:.3f}"],
        ["", "shardkit, images kept", sk_projected + images, f"{(sk_projected + images) / base_deflated:.3f}"],
        ["", "per-file baseline as PixArt writes it (fp32 latent .npy, np.savez_compressed)", base_deflated, "1.000"],
        ["", "per-file baseline if the .npz were not compressed (np.savez)", base_raw, f"{base_raw / base_deflated:.3f}"],
    ]
    medians = {f: _median_of_histogram(h) for f, h in token_lengths.items()}
    text = table(f"Bytes per sample (N={n}; token-length medians {medians}; {len(per_bucket)} buckets)",
                 ["", "what", "bytes/sample", "ratio to baseline"], rows)
    # The ratio hangs on caption length: shardkit's rows grow with it, the deflated baseline's
    # padding rows do not. Same samples and latents, every caption at one length.
    sweep = []
    for length in (16, 32, 48, 64, 80, 96, 120, 160):
        sk = sk_projected - t5_valid + captions * length * FULL_HIDDEN * 2
        base = base_latent + info_share + captions * (slope * distinct_padded_rows(length, MAX_LENGTH) * FULL_HIDDEN * 2 + intercept)
        sweep.append([length, sk, base, f"{sk / base:.3f}"])
    text += "\n" + table(f"Projected ratio with every caption at one token length ({captions:.0f} captions per sample)",
                         ["tokens per caption", "shardkit bytes/sample", "baseline bytes/sample", "ratio"], sweep)
    text += ("\nshardkit by member kind (bytes/sample, framing included): "
             + ", ".join(f"{k} {v / n:,.0f}" for k, v in sorted(kinds.items()))
             + f".\ncompressed .npz model: bytes = {slope:.3f} x distinct rows x {FULL_HIDDEN * 2} + {intercept:,.0f} "
             f"(fitted on {len(proxy['rows'])} captions encoded by the proxy; repeated padding rows cost ~0).\n")
    report.add("bytes", text, {"shardkit": built, "baseline": base_files, "npz_proxy": proxy, "projected": {
        "shardkit_features": sk_projected, "baseline_deflated": base_deflated, "baseline_uncompressed": base_raw,
        "npz_fit": [slope, intercept], "token_medians": medians, "length_sweep": sweep}})


def _caption_sample(dataset: Path, per_field: int) -> list[str]:
    import random

    items = json.loads((dataset / "InternData" / "data_info.json").read_text())
    picked = random.Random(0).sample(items, min(per_field, len(items)))
    return [it[f] for f in ("prompt", "sharegpt4v") for it in picked if it.get(f)]


def _fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares line y = slope * x + intercept."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    return slope, my - slope * mx


def _read_comparison(ctx: Context, build: Path, features: Path | None, width: str) -> tuple[list[list], dict]:
    """Raw tar bytes, shardkit.reader and per-file reading of one build, interleaved, best of repeats.
    The reader also runs with ``caption_padding="longest"`` (an extra row, not PixArt's layout).
    Without ``features`` the per-file side is not run."""
    args = ctx.args
    runs: dict[str, list[dict]] = {"raw": [], "reader": [], "reader_longest": [], "perfile": []}
    reader_error = None
    for _ in range(args.repeats):
        runs["raw"].append(run_task("read_raw", {"build": str(build)}))
        if features is not None:
            runs["perfile"].append(run_task("read_perfile", {
                "source": str(ctx.main_ds), "features": str(features), "resolution": args.resolution,
                "field": "prompt", "batch_size": args.read_batch_size, "max_length": MAX_LENGTH}))
        if reader_error is None:
            try:
                for key, padding in (("reader", "max_length"), ("reader_longest", "longest")):
                    runs[key].append(run_task("read_reader", {"build": str(build), "field": "prompt",
                                                              "batch_size": args.read_batch_size,
                                                              "caption_padding": padding}))
            except RuntimeError as exc:
                reader_error = str(exc).strip().splitlines()[-1]
    n = json.loads((build / "manifest.json").read_text())["records"]["written"]
    raw = min(runs["raw"], key=lambda r: r["wall_s"])
    raw_rate = _rate(n, raw["wall_s"])
    # Steady state of a long run: the better of each run's two epochs (a first epoch includes a fresh
    # process's warm-up; a second one may take a full garbage collection of the imports).
    steady = lambda key: _rate(runs[key][0]["samples"], min(min(r["wall_s"], r["warm_wall_s"]) for r in runs[key]))
    if runs["perfile"]:
        perfile = min(runs["perfile"], key=lambda r: r["wall_s"])
        pf_rate, pf_warm = _rate(perfile["samples"], perfile["wall_s"]), steady("perfile")
        versus_perfile = lambda rate, warm: (f", {rate / pf_rate:.1f}x per-file", f", {warm / pf_warm:.1f}x")
    else:
        versus_perfile = lambda rate, warm: ("", "")
    rows = [[width, "raw sequential read of the shard bytes (ceiling)", raw_rate, "-",
             raw["bytes"] / raw["wall_s"] / 1e6, "-"]]
    if runs["reader"]:
        for key, label in (("reader", "shardkit.reader ShardReader (1 process)"),
                           ("reader_longest", "shardkit.reader, caption_padding='longest' (not PixArt's layout)")):
            if runs[key]:
                rd = min(runs[key], key=lambda r: r["wall_s"])
                rd_rate = _rate(rd["samples"], rd["wall_s"])
                rd_warm = steady(key)
                first, later = versus_perfile(rd_rate, rd_warm)
                rows.append([width, label, rd_rate, rd_warm, rd["bytes"] / rd["wall_s"] / 1e6,
                             f"{100 * rd_rate / raw_rate:.0f}% of raw{first} "
                             f"(steady: {100 * rd_warm / raw_rate:.0f}%{later})"])
    else:
        rows.append([width, "shardkit.reader ShardReader", "pending", "pending", "pending", reader_error or "not run"])
    if runs["perfile"]:
        rows.append([width, "PixArt-style per-file np.load + pad + stack (1 process)", pf_rate, pf_warm,
                     perfile["bytes"] / perfile["wall_s"] / 1e6, "-"])
    return rows, {"runs": runs, "reader_error": reader_error}


def _widen(ctx: Context) -> dict:
    """The same samples with T5 rows of the real width: only the caption features change size."""
    out = ctx.out
    return run_task("widen", {"build": str(out / "build"), "out": str(out / "build-wide"), "hidden": FULL_HIDDEN,
                              "features": str(out / "baseline"), "features_out": str(out / "baseline-wide"),
                              "resolution": ctx.args.resolution, "field": "prompt"})


def _wide_build_10n(ctx: Context) -> Path:
    """A build of the 10 N dataset at the real T5 width (made once, kept in --workdir): reading 200
    samples takes tens of ms, too short for a steady ceiling."""
    out, wide = ctx.out, ctx.out / "build-wide-10n"
    if not (wide / "manifest.json").is_file():
        build = out / "build-10n"
        if not (build / "manifest.json").is_file():
            run_task("build", {"config": ctx.options, "source": str(ctx.dataset(10 * ctx.args.n)), "out": str(build)})
        run_task("widen", {"build": str(build), "out": str(wide), "hidden": FULL_HIDDEN, "field": "prompt"})
    return wide


def _worker_comparison(ctx: Context, build: Path) -> tuple[list[list], dict]:
    """The reader through a DataLoader with 2 workers: batches in pooled blocks vs torch's fresh
    shared memory per tensor, with and without the training process's staging copy; interleaved."""
    args = ctx.args
    variants = [(route, stage) for stage in (False, True) for route in ("torch", "pooled")]
    runs: dict[str, list[dict]] = {f"{route}{'_staged' if stage else ''}": [] for route, stage in variants}
    for _ in range(args.repeats):
        for route, stage in variants:
            runs[f"{route}{'_staged' if stage else ''}"].append(run_task("read_reader_workers", {
                "build": str(build), "field": "prompt", "batch_size": args.read_batch_size,
                "workers": 2, "route": route, "stage": stage}))
    rate = lambda key: _rate(runs[key][0]["samples"], min(r["wall_s"] for r in runs[key]))
    steady = lambda key: _rate(runs[key][0]["samples"], min(min(r["wall_s"], r["warm_wall_s"]) for r in runs[key]))
    rows = []
    for stage in (False, True):
        suffix = "_staged" if stage else ""
        consumer = "training process copies each batch once" if stage else "training process does nothing"
        for route, label in (("torch", "fresh shared memory per tensor (torch's collate route; before)"),
                             ("pooled", "pooled shared blocks (shardkit.worker_memory)")):
            key = f"{route}{suffix}"
            rows.append([consumer, label, rate(key), steady(key),
                         "-" if route == "torch" else f"{rate(key) / rate('torch' + suffix):.2f}x "
                                                      f"(steady {steady(key) / steady('torch' + suffix):.2f}x)"])
    return rows, runs


def section_read(ctx: Context) -> None:
    """Read throughput: shardkit.reader, per-file reading, raw tar bytes; tiny and real T5 width;
    and the reader in DataLoader workers."""
    args, out, report = ctx.args, ctx.out, ctx.report
    loads = [_load()]
    rows, tiny = _read_comparison(ctx, out / "build", out / "baseline", "32 (tiny)")
    wide = _widen(ctx)
    wide_rows, wide_runs = _read_comparison(ctx, Path(wide["build"]), Path(wide["features"]), f"{FULL_HIDDEN} (random values)")
    wide_10n = _wide_build_10n(ctx)
    long_rows, long_runs = _read_comparison(ctx, wide_10n, None, f"{FULL_HIDDEN}, 10 N = {10 * args.n} samples")
    worker_rows, worker_runs = _worker_comparison(ctx, wide_10n)
    loads.append(_load())
    text = table(f"Read throughput, warm page cache, batch {args.read_batch_size}, field 'prompt' "
                 f"(best of {args.repeats}, load average {min(loads)}-{max(loads)})",
                 ["T5 width", "what", "samples/s", "samples/s, steady (best epoch of 2)", "MB/s", "ratio"],
                 rows + wide_rows + long_rows)
    text += "\n" + table(f"shardkit.reader in a DataLoader, 2 worker processes, T5 width {FULL_HIDDEN}, "
                         f"10 N = {10 * args.n} samples (best of {args.repeats})",
                         ["training process", "how workers send batches", "samples/s",
                          "samples/s, steady (best epoch of 2)", "pooled vs fresh"], worker_rows)
    report.add("read", text, {"tiny": tiny, "wide": wide_runs, "wide_10n": long_runs, "workers_10n": worker_runs})


def section_memory(ctx: Context) -> None:
    """Peak RSS of `shardkit build` at N and 10 N samples."""
    args, out, options, report, models = ctx.args, ctx.out, ctx.options, ctx.report, ctx.models
    big = ctx.dataset(10 * args.n)
    extra_env = dict(item.split("=", 1) for item in args.memory_env)
    mem_rows = []
    peaks = {}
    for label, dataset in ((f"N = {args.n}", ctx.main_ds), (f"10 N = {10 * args.n}", big)):
        command = [sys.executable, "-m", "shardkit", "build", str(dataset), str(out / "memory"), "--overwrite",
                   "--no-progress", "--resolution", str(args.resolution), "--vae", str(models),
                   "--vae-subfolder", "vae", "--t5", str(models), "--device", args.device,
                   "--dtype", options["dtype"], "--batch-size", str(args.batch_size),
                   "--t5-batch-size", str(args.t5_batch_size), "--workers", str(args.workers)]
        peak = run_with_peak(command, cwd=str(REPO), env=dict(os.environ, **extra_env), stdout=open(os.devnull, "w"))
        if peak.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed with exit code {peak.returncode}")
        peaks[label] = vars(peak)
        samples = json.loads((out / "memory" / "manifest.json").read_text())["records"]["written"]
        mem_rows.append([label, peak.tree_rss_peak / 2**20, peak.maxrss_largest / 2**20, peak.wall_s,
                         _rate(samples, peak.wall_s)])
    first, last = mem_rows
    # The same builds with the encoders stubbed out: what shardkit itself holds, without the
    # memory the encoders' allocations leave behind.
    env = task_env(**extra_env)
    stub_rows = []
    for label, dataset in ((f"N = {args.n}", ctx.main_ds), (f"10 N = {10 * args.n}", big)):
        task = {"config": options, "source": str(dataset), "out": str(out / "memory-stub"), "stub": True}
        peak = run_with_peak([sys.executable, str(BENCH_DIR / "tasks.py"), "build", json.dumps(task)], cwd=str(REPO),
                             env=env, stdout=open(os.devnull, "w"))
        if peak.returncode != 0:
            raise RuntimeError(f"the stubbed build of {dataset} failed with exit code {peak.returncode}")
        peaks[f"stub {label}"] = vars(peak)
        stub_rows.append([label + ", encoders stubbed", peak.tree_rss_peak / 2**20, peak.maxrss_largest / 2**20,
                          peak.wall_s, "-"])
    setting = f" with {' '.join(args.memory_env)}" if args.memory_env else ""
    text = table(f"Peak memory of `shardkit build`{setting} (CLI, whole run incl. start-up and model load)",
                 ["samples", "peak RSS, process tree (MiB)", "peak RSS, build process (MiB)", "wall s",
                  "samples/s end to end"], mem_rows + stub_rows)
    text += (f"\nratio 10 N / N: tree {last[1] / first[1]:.2f}, build process {last[2] / first[2]:.2f}; "
             f"encoders stubbed: tree {stub_rows[1][1] / stub_rows[0][1]:.2f}\n")
    report.add("memory", text, peaks)


def section_stages(ctx: Context) -> None:
    """Stage micro-benchmarks: decode + resize, tar writing, encoder outputs to stored arrays."""
    args, out, report = ctx.args, ctx.out, ctx.report
    large = ctx.dataset(16, 4096)
    decode_rows = []
    decode = {}
    for label, dataset in (("512-px JPEG", ctx.ds512), ("384-1024 px JPEG", ctx.main_ds), ("4096-px JPEG", large)):
        d = run_task("decode", {"source": str(dataset), "resolution": args.resolution, "repeats": 3})
        decode[label] = d
        decode_rows.append([label, d["mean_megapixels"], d["reference_ms"], d["shardkit_ms"],
                            f"{d['reference_ms'] / d['shardkit_ms']:.2f}x", d["max_abs"], d["mean_abs"],
                            f"{d['psnr_min']:.1f} / {d['psnr_median']:.1f}", f"{d['bicubic_vs_lanczos_psnr_median']:.1f}"])
    text = table(f"Decode + resize to a {args.resolution} bucket: images.py against the exact transform (CPU ms/image, best of 3)",
                 ["input", "mean MPix", "exact (full decode)", "images.py", "speed-up", "max |diff|", "mean |diff|",
                  "PSNR dB min / median", "yardstick: BICUBIC vs LANCZOS PSNR"], decode_rows)
    serial_rows = []
    serial = {}
    for label, hidden, latent_hw in (("tiny dims (D=32, latent 8x64x64)", 32, (64, 64)),
                                     ("real dims (D=4096, latent 8x64x64)", FULL_HIDDEN, (64, 64))):
        s = run_task("serialise", {"samples": 200, "hidden": hidden, "latent_hw": list(latent_hw),
                                   "out": str(out / "serialise"), "repeats": 3})
        serial[label] = s
        serial_rows.append([label, s["bytes_per_sample"], s["tarfile_ms"], s["shardkit_ms"],
                            f"{s['tarfile_ms'] / s['shardkit_ms']:.2f}x", s["identical_bytes"]])
    text += "\n" + table("Tar writing incl. sha256: tarfile's stream writer vs ShardWriter (CPU ms/sample, best of 3)",
                         ["samples", "payload bytes/sample", "tarfile w|", "ShardWriter", "speed-up", "identical bytes"],
                         serial_rows)
    cast = run_task("output_cast", {"device": args.device, "batch": 16, "hidden": FULL_HIDDEN, "latent_hw": [64, 64],
                                    "compute_dtypes": ["float32", "float16"], "repeats": 5})
    cast_rows = [[f"{compute} ({'CPU default' if compute == 'float32' else 'GPU default'})", c["values_per_sample"],
                  c["numpy_ms"], c["torch_ms"], f"{c['numpy_ms'] / max(c['torch_ms'], 1e-6):.0f}x", c["identical_bytes"]]
                 for compute, c in cast["by_compute"].items()]
    text += "\n" + table(f"Encoder outputs to stored fp16 arrays on {cast['device']}, real dims (latent 8x64x64, "
                          f"captions of 28 + 104 rows at D={FULL_HIDDEN}; host CPU ms/sample, best of 5)",
                          ["computed in", "values/sample", "numpy cast after the copy (before)",
                           "torch cast where computed (encoders.to_store_array)", "less host CPU", "identical bytes"],
                          cast_rows)
    report.add("stages", text, {"decode": decode, "serialise": serial, "output_cast": cast})


def section_plan(ctx: Context) -> None:
    """Planning from object storage: image lookups one at a time vs on threads ahead of the planner."""
    args, report = ctx.args, ctx.report
    latency_ms = 20
    result = run_task("plan_remote", {"source": str(ctx.main_ds), "latency_ms": latency_ms, "records": args.n,
                                      "threads": [0, 8, 32], "tokenizer": str(ctx.tiny / "tokenizer"),
                                      "work": str(ctx.out / "plan-remote")})
    runs = list(result["runs"].values())
    serial = {r["layout"]: _rate(r["records"], r["wall_s"]) for r in runs if r["threads"] == 0}
    rows = [[r["layout"], "inline, one at a time (before)" if r["threads"] == 0 else f"{r['threads']} lookup threads",
             _rate(r["records"], r["wall_s"]), f"{_rate(r['records'], r['wall_s']) / serial[r['layout']]:.1f}x",
             f"{r['requests'] / r['records']:.1f}", f"{r['bytes_served'] / r['records'] / 1024:,.1f}"]
            for r in runs]
    text = table(f"Planning from object storage ({args.n} records over HTTP on 127.0.0.1, {latency_ms} ms before "
                 f"each answer)", ["metadata", "image lookups", "records/s", "speed-up", "requests/record",
                                   "KiB served/record"], rows)
    text += ("\nImages kept (all but the last layout): the planner needs each image's size (a HEAD) and, where the "
             "metadata has no width/height, its header. build.py uses 32 threads for object-storage sources, none for local files. "
             "The server runs in the benchmark's process on the same 2 cores, so the threaded rates are bounded by "
             "this machine's CPU as much as by the lookups.\n")
    report.add("plan", text, result)


def section_scale(ctx: Context) -> None:
    """Planning alone at scale: synthetic img2dataset-style Parquet of 100k and 1M records
    (--no-images, encoders stubbed, nothing decoded or encoded): records/s and peak RSS."""
    args, report = ctx.args, ctx.report
    options = dict(ctx.options, keep_images=False, captions=["caption"])
    runs, rows = {}, []
    for records in args.scale_records:
        run = run_task("plan_parquet", {"records": records, "work": str(ctx.work / "parquet"), "config": options},
                       timeout=6 * 3600)
        runs[str(records)] = run
        rows.append([f"{records:,}", f"{run['source_bytes'] / 2**20:.0f}", run["records_per_s"],
                     1e6 * run["cpu_self_s"] / records, run["rss_before_mib"], run["peak_rss_mib"],
                     run["peak_rss_mib"] - run["rss_before_mib"], run["index_mib"],
                     run["rss_after_trim_mib"] - run["rss_before_mib"], run["plans"], run["plan_bytes"] / 2**20,
                     run["python_arenas_added"], run["gather_records_per_s"], run["gather_growth_mib"]])
    text = table(f"Planning a Parquet source at scale ({args.resolution}-px buckets, --no-images, encoders stubbed, "
                 f"one process)", ["records", "Parquet MiB", "records/s", "CPU µs/record", "RSS before planning (MiB)",
                                   "peak RSS (MiB)", "growth while planning (MiB)", "digest tables (MiB)",
                                   "growth left after malloc_trim (MiB)", "shard plans", "plan.json (MiB)",
                                   "Python arenas added", "gathering every shard again: records/s",
                                   "RSS growth while gathering (MiB)"], rows)
    report.add("scale", text, runs)


def section_verify(ctx: Context) -> None:
    """`shardkit inspect --verify` of the real-width build: one shard at a time against several,
    from local disk and over HTTP with an object store's latency."""
    args, out, report = ctx.args, ctx.out, ctx.report
    wide = out / "build-wide"
    if not (wide / "manifest.json").is_file():
        _widen(ctx)
    latency_ms = 20
    result = run_task("verify", {"build": str(wide), "latency_ms": latency_ms, "jobs": [1, 4, 8],
                                 "repeats": args.repeats})
    best: dict[tuple[str, int], dict] = {}
    for run in result["runs"]:
        key = (run["where"], run["jobs"])
        if key not in best or run["wall_s"] < best[key]["wall_s"]:
            best[key] = run
    rows = [[where, jobs, run["wall_s"], run["bytes"] / run["wall_s"] / 1e6,
             f"{best[(where, 1)]['wall_s'] / run['wall_s']:.2f}x", "sound" if run["sound"] else "NOT SOUND"]
            for (where, jobs), run in best.items()]
    text = table(f"inspect --verify of the T5-width-4096 build ({next(iter(best.values()))['shards']} shards, "
                 f"{next(iter(best.values()))['bytes'] / 1e6:.0f} MB; best of {args.repeats})",
                 ["shards read from", "--jobs", "seconds", "MB/s", "speed-up", "verdict"], rows)
    text += ("\nThe HTTP server answers after 20 ms and runs in the benchmark's process on the same cores: "
             "more jobs overlap the waits, and then the hashing, tar parsing and value checks bound the rate.\n")
    report.add("verify", text, result)


def section_flops(ctx: Context) -> None:
    """T5 padding under each batching policy (counted), and the FLOP floor of the full-size encoders
    (computed on the meta device), padding included."""
    args, report = ctx.args, ctx.report
    items = json.loads((ctx.main_ds / "InternData" / "data_info.json").read_text())
    from shardkit.buckets import BucketTable

    padding_rows, padding = [], {}
    batch_sizes = sorted({args.batch_size, 16})  # the run's VAE batch and BuildConfig's default
    # The counts do not depend on the device: a GPU run (often on a time budget) counts only N and
    # leaves the 10 N rows, and the 10 N dataset they need, to the CPU run.
    counted = [(f"N={args.n}", ctx.main_ds)]
    if args.device == "cpu":
        counted.append((f"10 N={10 * args.n}", ctx.dataset(10 * args.n)))
    for label, dataset in counted:
        padding[label] = run_task("t5_padding", {"tokenizer": str(ctx.tiny / "tokenizer"), "batch_sizes": batch_sizes,
                                                 "resolution": args.resolution, "t5_batch_size": args.t5_batch_size,
                                                 "source": str(dataset)})
        for batch_size, result in padding[label].items():
            for policy, counts in result["policies"].items():
                padding_rows.append([label, batch_size, policy, counts["calls"],
                                     f"{counts['computed_tokens'] / counts['valid_tokens']:.2f}"])
    text = table(f"T5 tokens computed per valid token (padding included), t5_batch_size {args.t5_batch_size}; "
                 f"counted from the plans, nothing encoded",
                 ["dataset", "VAE batch", "captions grouped and cut", "T5 calls", "computed / valid tokens"], padding_rows)

    bucket_table = BucketTable(args.resolution)
    buckets_hw = [[b.height, b.width] for b in (bucket_table.closest(it["height"], it["width"]) for it in items)]
    lengths = _token_lengths(items, ctx.tiny)
    policies = padding[f"N={args.n}"][str(args.batch_size)]["policies"]
    flops = run_task("flops", {"buckets": buckets_hw, "token_lengths": lengths, "max_length": MAX_LENGTH,
                               "t5_widths": {name: counts["widths"] for name, counts in policies.items()}})
    t5_computed = flops["t5_flops_computed"]["caption windows, length_batches"]
    flops["t5_flops_shardkit_computed"] = t5_computed
    sk_flops = flops["vae_flops"] + t5_computed
    bl_flops = flops["vae_flops"] + flops["t5_flops_baseline"]
    floor_rows = [[gpu, peak, peak * 1e12 / sk_flops, peak * 1e12 / bl_flops, f"{bl_flops / sk_flops:.2f}"]
                  for gpu, peak in _peaks().items()]
    text += "\n" + table(
        f"FLOP floor at {args.resolution} px with the full-size encoders (computed, NOT measured): VAE "
        f"{flops['vae_flops'] / 1e12:.2f} TFLOP/sample; T5 {flops['t5_flops_shardkit'] / 1e12:.2f} on the valid tokens, "
        f"{t5_computed / 1e12:.2f} as shardkit batches them (VAE batch {args.batch_size}; "
        + ", ".join(f"{name}: {value / 1e12:.2f}" for name, value in flops["t5_flops_computed"].items())
        + f"), {flops['t5_flops_baseline'] / 1e12:.2f} TFLOP/sample padded to {MAX_LENGTH}",
        ["GPU", "dense fp16 peak TFLOPS", "shardkit samples/s at 100% of peak",
         "per-file baseline samples/s at 100% of peak", "baseline FLOPs / shardkit FLOPs"], floor_rows)
    report.add("flops", text, dict(flops, t5_padding=padding))


def section_gpu(ctx: Context) -> None:
    """On a GPU: images/s, captions/s and achieved TFLOP/s of each encoder against the data-sheet peak,
    shardkit's way and the per-file way (needs the build and flops sections of this run)."""
    args, report = ctx.args, ctx.report
    results = report.results
    if args.device != "cuda" or "build" not in results or "flops" not in results:
        return
    from fullsize import peak_tflops

    runs, flops = results["build"]["runs"], results["flops"]
    peak = peak_tflops(results["machine"].get("gpu"))
    peak_name, peak_value = peak if peak else ("unknown GPU", float("nan"))

    def best(name: str) -> dict:
        return min(runs[name], key=lambda r: r["wall_s"])

    enc, base, sk = best("encoders"), best("baseline"), best("shardkit")
    n = enc["samples"]
    # vae_s and t5_s add up every stream's time: per-encoder rates are exact with one stream (the
    # GPU default) and a lower bound with more.
    summed = f", time summed over {enc['streams']} streams" if enc.get("streams", 1) > 1 else ""
    base_captions = sum(base["captions"].values())

    def row(what: str, items: float, unit: str, seconds: float, useful_flop: float, executed_flop: float,
            busy: float | None) -> list:
        useful, executed = useful_flop / seconds / 1e12, executed_flop / seconds / 1e12
        return [what, f"{items / seconds:,.1f} {unit}/s", useful, executed, f"{100 * executed / peak_value:.1f}%",
                "-" if busy is None else f"{busy:.0f}%"]

    # useful: VAE + T5 on the valid tokens; executed: T5 at the padded widths each side runs.
    t5_useful, t5_executed = flops["t5_flops_shardkit"], flops["t5_flops_shardkit_computed"]
    sk_useful, sk_executed = flops["vae_flops"] + t5_useful, flops["vae_flops"] + t5_executed
    bl_executed = flops["vae_flops"] + flops["t5_flops_baseline"]
    rows = [
        row(f"VAE, shardkit (batches of {args.batch_size}, encoders alone{summed})", n, "images", enc["vae_s"],
            flops["vae_flops"] * n, flops["vae_flops"] * n, None),
        row("VAE, per-file (1 image per call; phase incl. its decode waits and saves)", base["samples"], "images",
            base["vae_wall_s"], flops["vae_flops"] * base["samples"], flops["vae_flops"] * base["samples"], None),
        row(f"T5, shardkit (caption windows, length-sorted batches of <= {args.t5_batch_size}, encoders alone{summed})",
            enc["captions"], "captions", enc["t5_s"], t5_useful * n, t5_executed * n, None),
        row(f"T5, per-file (1 caption per call, padded to {MAX_LENGTH}; phase incl. saves)", base_captions, "captions",
            base["t5_wall_s"], t5_useful * base["samples"], flops["t5_flops_baseline"] * base["samples"], None),
        row("encoders alone, both (shardkit's batches)", n, "samples", enc["wall_s"], sk_useful * n, sk_executed * n,
            enc.get("gpu_busy_pct_mean")),
        row("shardkit build() end to end", sk["samples"], "samples", sk["wall_s"], sk_useful * sk["samples"],
            sk_executed * sk["samples"], sk.get("gpu_busy_pct_mean")),
        row("per-file extraction end to end", base["samples"], "samples", base["wall_s"], sk_useful * base["samples"],
            bl_executed * base["samples"], base.get("gpu_busy_pct_mean")),
    ]
    text = table(f"GPU: encoder throughput against the FLOP floor ({results['machine'].get('gpu')}; peak taken as "
                 f"{peak_name} dense fp16 {peak_value:g} TFLOP/s; {args.resolution} px, fp16, best of {args.repeats})",
                 ["what", "throughput", "useful TFLOP/s (valid tokens)", "executed TFLOP/s", "executed / peak",
                  "GPU busy (nvidia-smi)"], rows)
    memory = {name: best(name).get("cuda_max_allocated_mib") for name in ("shardkit", "baseline", "encoders")}
    text += ("\nuseful = FLOPs of the work that must be done (VAE + T5 on the valid tokens); executed = FLOPs run, "
             "padding included. GPU busy = share of 100 ms samples in which a kernel ran, over the timed region. "
             f"Peak CUDA memory allocated (MiB): {memory}.\n")
    report.add("gpu", text, {"peak": [peak_name, peak_value], "rows": rows, "cuda_max_allocated_mib": memory})


def main() -> None:
    args = _parse()
    started = time.perf_counter()
    ctx = Context(args)
    chosen = args.only or [s for s in SECTIONS if not (s == "memory" and args.skip_memory)]
    if any(s in chosen for s in ("bytes", "read", "verify")) and "build" not in chosen:
        ctx.ensure_builds()
    suffix = "" if args.only is None else "-only-" + "-".join(args.only)
    target = args.json or (REPO / "benchmarks" / "results" /
                           f"{args.device}-{'full' if args.full_size else 'tiny'}-n{args.n}{suffix}.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    results = ctx.report.results
    for name in SECTIONS:
        if name in chosen:
            globals()[f"section_{name}"](ctx)
            # Written after every section: a run cut short (a time budget) keeps what it finished.
            results["elapsed_s"] = time.perf_counter() - started
            target.write_text(json.dumps(results, indent=1, default=str) + "\n")
            target.with_suffix(".md").write_text("\n".join(ctx.report.sections))
    print(f"\nbenchmarks: {results['elapsed_s']:.0f} s", flush=True)
    print(f"results: {target} (+ .md)")


def _median_of_histogram(histogram: dict[str, int]) -> int:
    values = sorted((int(k), v) for k, v in histogram.items())
    half, seen = sum(v for _, v in values) / 2, 0
    for length, count in values:
        seen += count
        if seen >= half:
            return length
    return 0


def _token_lengths(items: list[dict], tiny: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "tokenizer"))
    return [[min(len(tokenizer(it[f])["input_ids"]), MAX_LENGTH) for f in ("prompt", "sharegpt4v") if it.get(f)]
            for it in items]


def _peaks() -> dict[str, float]:
    from fullsize import PEAK_TFLOPS

    return PEAK_TFLOPS


if __name__ == "__main__":
    main()
