"""One measurement per fresh interpreter: ``python benchmarks/tasks.py TASK 'JSON ARGS'``.

Each task loads what it needs (models are loaded and warmed up outside the timed region),
times one piece of work and prints ``RESULT {json}`` as its last line. ``run_all.py`` runs
them; they can also be run by hand. Imports stay inside the functions: spawned decode
workers re-import this file and must not pay for torch.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from common import CpuClock, GpuMonitor, SlowHttpServer, emit


# ---- shared -------------------------------------------------------------------------------

def _load(options: dict):
    from shardkit.config import BuildConfig
    from shardkit.encoders import load_encoders

    config = BuildConfig(**options)
    encoders = load_encoders(config)
    _warm_up(encoders)
    return config, encoders


def _warm_up(encoders) -> None:
    """First calls allocate kernels and caches; neither side of a comparison is charged for them."""
    import torch

    encoders.vae.encode(torch.zeros((1, 64, 64, 3), dtype=torch.uint8))
    encoders.t5.encode([[5, 6, 1]], 1)


def _stub_encoders(encoders, hidden: int | None = None) -> None:
    """Encoders that cost nothing but return arrays of the real shapes and dtypes (T5 rows of
    width ``hidden`` instead of the model's, to count the host's work at T5-XXL's width)."""
    import numpy as np

    vae, t5 = encoders.vae, encoders.t5
    channels = 2 * vae.identity.latent_channels
    width = hidden or t5.hidden_size

    def fake_vae(pixels):
        return np.zeros((len(pixels), channels, pixels.shape[1] // vae.downsample, pixels.shape[2] // vae.downsample),
                        vae.store_dtype)

    def fake_t5(token_ids, batch_size):
        return [np.zeros((len(ids), width), t5.store_dtype) for ids in token_ids]

    vae.encode = fake_vae
    t5.encode = fake_t5
    if hidden:  # the manifest declares the width the rows are written at
        import dataclasses

        t5.identity = dataclasses.replace(t5.identity, hidden_size=hidden)


def _decode_in_processes() -> None:
    """The previous design of build.py, for comparison: decode in spawned worker processes, whose
    pixels come back pickled through a pipe, instead of in threads of the build process."""
    import concurrent.futures as futures
    import multiprocessing

    import shardkit.build as build_module

    def process_executor(self):
        if self.config.workers == 0:
            return None
        return futures.ProcessPoolExecutor(max_workers=self.config.workers,
                                           mp_context=multiprocessing.get_context("spawn"))

    build_module.BuildJob._decode_executor = process_executor


def _fresh(path: str) -> Path:
    out = Path(path)
    shutil.rmtree(out, ignore_errors=True)
    return out


# ---- build ----------------------------------------------------------------------------------

def task_build(args: dict) -> dict:
    """shardkit's build() with loaded encoders: wall and CPU time (decode workers included)."""
    from shardkit.build import build

    config, encoders = _load(args["config"])
    if args.get("stub"):
        _stub_encoders(encoders, args.get("stub_hidden"))
    if args.get("decode_processes"):
        _decode_in_processes()
    if args.get("plain_gpu_layout"):  # GPU A/B: NCHW tensors and pageable host-to-device copies
        import torch

        encoders.vae.channels_last = False
        encoders.vae.model.to(memory_format=torch.contiguous_format)
    out = _fresh(args["out"])
    with GpuMonitor(config.device == "cuda") as gpu:
        start = CpuClock.now()
        summary = build(args["source"], out, config, encoders=encoders)
        result = CpuClock.now().since(start)
    result.update(samples=summary.written, skipped=summary.skipped, bytes=summary.bytes, shards=summary.shards,
                  **gpu.result(), **_cuda_peak())
    return result


def task_build_stages(args: dict) -> dict:
    """Host CPU per pipeline stage: decode in-process (workers=0), encoders stubbed, per-thread CPU clocks."""
    import cProfile
    import pstats

    import shardkit.build as build_module
    import shardkit.plan as plan_module
    import shardkit.shards as shards_module

    config, encoders = _load(dict(args["config"], workers=0))
    _stub_encoders(encoders)
    stages: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                stages[name] = stages.get(name, 0.0) + time.thread_time() - t0
        return wrapper

    profile = cProfile.Profile()
    decode = build_module.run_decode_job

    def profiled_decode(job):
        profile.enable()
        try:
            return decode(job)
        finally:
            profile.disable()

    # Wrap names the pipeline looks up at call time; what is left of the process CPU is "other".
    build_module.run_decode_job = timed("decode + resize (images.py)", profiled_decode)
    plan_module.Planner._plan_record = timed("plan: tokenise, checks", plan_module.Planner._plan_record)
    build_module.npy_bytes = timed("serialise: npy", build_module.npy_bytes)
    build_module.json_bytes = timed("serialise: json", build_module.json_bytes)
    shards_module.ShardWriter.add = timed("tar framing + sha256 + write", shards_module.ShardWriter.add)
    shards_module.ShardWriter.commit = timed("shard commit (close, fsync)", shards_module.ShardWriter.commit)
    out = _fresh(args["out"])
    start = CpuClock.now()
    summary = build_module.build(args["source"], out, config, encoders=encoders)
    result = CpuClock.now().since(start)
    result.update(samples=summary.written, stages=stages)
    stats = pstats.Stats(profile)
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:8]  # by own time
    result["decode_profile"] = [{"function": f"{Path(fn[0]).name}:{fn[2]}", "own_s": v[2], "calls": v[1]}
                                for fn, v in top]
    return result


def task_encoders(args: dict) -> dict:
    """The same encoders on pre-decoded pixels, in the build's batches: the build's ceiling."""
    import numpy as np
    import torch

    from shardkit.buckets import BucketTable
    from shardkit.build import caption_window_size
    from shardkit.encoders import EncoderStreams, resolve_encoder_streams
    from shardkit.images import decode_and_fit
    from shardkit.plan import Planner
    from shardkit.sources import iter_records, resolve_source

    config, encoders = _load(args["config"])
    table = BucketTable(config.resolution)
    planner = Planner(config, table, encoders.t5.tokenize, encoders.vae.feature_shape, encoders.t5.hidden_size)
    window = caption_window_size(config)
    batches, caption_windows = [], []
    for plan in planner.plan(iter_records(resolve_source(args["source"]), config.captions)):
        for first in range(0, len(plan.records), config.batch_size):
            records = plan.records[first:first + config.batch_size]
            pixels = [decode_and_fit(r.record.location, plan.bucket, config.resize_mode, config.max_image_pixels,
                                     r.expected_hw, table.uses_lanczos).pixels for r in records]
            batches.append(torch.from_numpy(np.stack(pixels)))
        caption_windows += [[r.token_ids for r in plan.records[first:first + window]]
                            for first in range(0, len(plan.records), window)]

    def encode_window(token_ids) -> tuple[float, int, int]:
        t0 = time.perf_counter()
        features = encoders.t5.encode_distinct(token_ids, config.t5_batch_size)
        return time.perf_counter() - t0, len(features), sum(len(f) for f in features.values())

    def encode_images(pixels) -> float:
        t0 = time.perf_counter()
        encoders.vae.encode(pixels)
        return time.perf_counter() - t0

    # The build's work, run as the build runs it: VAE batches and caption windows on its encoder
    # streams (two at once on a multi-core CPU). vae_s and t5_s add up the time of every stream.
    streams = resolve_encoder_streams(config.encoder_streams, encoders.device)
    with GpuMonitor(config.device == "cuda") as gpu, EncoderStreams(streams) as pool:
        start = CpuClock.now()
        t5_jobs = [pool.submit(encode_window, token_ids) for token_ids in caption_windows]
        vae_jobs = [pool.submit(encode_images, pixels) for pixels in batches]
        vae_s = sum(job.result() for job in vae_jobs)
        t5_s, captions, tokens = (sum(values) for values in zip(*(job.result() for job in t5_jobs)))
        result = CpuClock.now().since(start)
    result.update(samples=sum(len(p) for p in batches), vae_s=vae_s, t5_s=t5_s, batches=len(batches), streams=streams,
                  captions=captions, tokens=tokens, **gpu.result(), **_cuda_peak())
    return result


def _cuda_peak() -> dict:
    """Peak CUDA memory the task's tensors took (allocator's view), when a GPU was used."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20}


# ---- the PixArt-style baseline ----------------------------------------------------------------

def task_baseline(args: dict) -> dict:
    from baseline import extract_t5, extract_vae, make_pool

    pool = make_pool(args["workers"])  # forked before torch is imported, like DataLoader workers
    config, encoders = _load(args["config"])
    out = _fresh(args["out"])
    source = Path(args["source"])
    with GpuMonitor(config.device == "cuda") as gpu:
        start = CpuClock.now()
        images = extract_vae(source, out, encoders.vae.model, config.resolution, args["workers"], pool=pool)
        if pool is not None:
            pool.close()
            pool.join()
        vae_done = CpuClock.now()
        captions = {}
        for field in config.captions:
            captions[field] = extract_t5(source, out, encoders.t5.tokenizer, encoders.t5.model, field, config.max_length)
        result = CpuClock.now().since(start)
    result.update(samples=images, captions=captions, vae_wall_s=vae_done.wall - start.wall,
                  t5_wall_s=result["wall_s"] - (vae_done.wall - start.wall), **gpu.result(), **_cuda_peak())
    return result


# ---- reading ------------------------------------------------------------------------------------

def task_read_raw(args: dict) -> dict:
    """The ceiling: every shard's bytes read sequentially, nothing parsed. A small build reads in
    tens of ms, too short to time alone, so whole passes repeat for at least ``min_seconds``;
    the times returned are per pass."""
    paths = sorted(Path(args["build"]).glob("shards/*.tar"))
    total = passes = 0
    start = CpuClock.now()
    while not passes or time.perf_counter() - start.wall < args.get("min_seconds", 0.5):
        for path in paths:
            with open(path, "rb", buffering=0) as fh:
                while chunk := fh.read(1 << 20):
                    total += len(chunk)
        passes += 1
    result = {name: value / passes for name, value in CpuClock.now().since(start).items()}
    result.update(bytes=total // passes, files=len(paths), passes=passes)
    return result


def task_read_perfile(args: dict) -> dict:
    from baseline import PerFileReader

    import torch

    torch.manual_seed(0)
    reader = PerFileReader(Path(args["source"]), Path(args["features"]), args["resolution"], args["field"],
                           args["batch_size"], args["max_length"])
    result, _ = _timed_epochs(reader)
    read = [p for folder in (reader.vae_dir, reader.caption_dir) for p in folder.iterdir()]
    result.update(bytes=sum(p.stat().st_size for p in read))
    return result


def _timed_epochs(loader, on_batch=None) -> tuple[dict, object]:
    """Two epochs of ``loader``, each batch let go before the next as a training loop does:
    ``wall_s`` times the first (in a fresh process), ``warm_wall_s`` the second (the steady
    state of a long run: heap, buffers and caches warm). ``on_batch(batch)`` is the training
    step's share of the work, timed with it. Returns the result and a last batch."""
    result: dict = {}
    for prefix in ("", "warm_"):
        samples = batches = 0
        start = CpuClock.now()
        for batch in loader:
            if on_batch is not None:
                on_batch(batch)
            samples += len(batch[0])
            batches += 1
        timed = CpuClock.now().since(start)
        result.update({f"{prefix}{name}": value for name, value in timed.items()})
        result.setdefault("samples", samples)
        result.setdefault("batches", batches)
    return result, batch


def task_read_reader(args: dict) -> dict:
    """shardkit.reader's ShardReader, iterated in this process (``num_workers=0``; a DataLoader
    worker does the same work but collates into shared memory). Each batch is let go before the
    next, as a training loop does. ``caption_padding`` (default PixArt's "max_length")."""
    from shardkit.reader import ShardReader

    dataset = ShardReader(args["build"], batch_size=args["batch_size"], shuffle=True, seed=0,
                           caption_fields=[args["field"]], caption_padding=args.get("caption_padding", "max_length"))
    result, batch = _timed_epochs(dataset)
    result.update(bytes=sum(p.stat().st_size for p in Path(args["build"]).glob("shards/*.tar")),
                  batch_shapes=[list(batch[0].shape), list(batch[1].shape), list(batch[2].shape)])
    return result


def task_read_reader_workers(args: dict) -> dict:
    """ShardReader through a DataLoader with ``workers`` forked worker processes, as training
    reads. ``route``: "pooled" sends batch tensors in shardkit.worker_memory's reused blocks;
    "torch" in a fresh shared-memory segment per tensor, as torch's collate does (and as
    shardkit did before). With ``stage``, the training process copies each batch's latent and
    features into one reused buffer, the read a host-to-device copy makes."""
    import torch
    from torch.utils.data import DataLoader

    from shardkit import worker_memory
    from shardkit.reader import ShardReader

    if args["route"] == "torch":
        worker_memory.AVAILABLE = False
    dataset = ShardReader(args["build"], batch_size=args["batch_size"], shuffle=True, seed=0, caption_fields=[args["field"]])
    loader = DataLoader(dataset, batch_size=None, num_workers=args["workers"], persistent_workers=True,
                        multiprocessing_context="fork")
    staging: dict[int, torch.Tensor] = {}

    def stage(batch) -> None:
        for index, tensor in enumerate(batch[:2]):
            buffer = staging.get(index)
            if buffer is None or buffer.numel() < tensor.numel() or buffer.dtype != tensor.dtype:
                buffer = staging[index] = torch.empty(tensor.numel(), dtype=tensor.dtype)
            buffer[:tensor.numel()].copy_(tensor.reshape(-1))

    result, _ = _timed_epochs(loader, stage if args.get("stage") else None)
    return result


def task_widen(args: dict) -> dict:
    """Copies of a build and (given ``features``) of the per-file features with T5 rows of the real
    width (random values).

    Latents already have the SDXL VAE's shape (4 channels, 8x down), so only the caption features
    differ from the real thing: this makes read throughput measurable at real sizes on any machine.
    """
    import io
    import tarfile

    import numpy as np

    from shardkit.format import npy_bytes
    from shardkit.shards import Sample, ShardWriter

    hidden = args["hidden"]
    rng = np.random.default_rng(0)

    def wide(length: int, rows: int | None = None) -> np.ndarray:
        return (0.2 * rng.standard_normal((rows or length, hidden), dtype=np.float32)).astype(np.float16)

    src, dst = Path(args["build"]), _fresh(args["out"])
    manifest = json.loads((src / "manifest.json").read_text())
    for entry in manifest["shards"]:
        writer = ShardWriter(dst, entry["path"])
        with tarfile.open(src / entry["path"]) as tar:
            key, members = None, []
            for member in tar:
                member_key, suffix = member.name.split(".", 1)
                if member_key != key and members:
                    writer.add(Sample(key, members))
                    members = []
                key = member_key
                payload = tar.extractfile(member).read()
                if suffix.startswith("t5_"):
                    rows = np.load(io.BytesIO(payload), allow_pickle=False).shape[0]
                    payload = npy_bytes(wide(rows))
                members.append((suffix, payload))
            if members:
                writer.add(Sample(key, members))
        written = writer.commit()
        entry["bytes"], entry["sha256"] = written.bytes, written.sha256
    manifest["encoders"]["t5"]["hidden_size"] = hidden
    manifest["totals"]["bytes"] = sum(e["bytes"] for e in manifest["shards"])
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))

    if "features" not in args:
        return {"build": str(dst), "shard_bytes": manifest["totals"]["bytes"]}
    # The per-file layout: the VAE files as they are, the read caption field at [1, 300, hidden]
    # with T5-XXL's repeated padding rows (see fullsize.padded_row_sources), so it deflates as
    # PixArt's real files do.
    from baseline import CAPTION_DIRS, VAE_DIR
    from fullsize import padded_row_sources

    features, wide_features = Path(args["features"]) / "InternData", _fresh(args["features_out"]) / "InternData"
    vae_dir = VAE_DIR.format(resolution=args["resolution"])
    shutil.copytree(features / vae_dir, wide_features / vae_dir)
    caption_dir = wide_features / CAPTION_DIRS[args["field"]]
    caption_dir.mkdir(parents=True)
    for path in sorted((features / CAPTION_DIRS[args["field"]]).iterdir()):
        with np.load(path, allow_pickle=False) as npz:
            mask = npz["attention_mask"]
        rows = wide(0, mask.shape[-1])[padded_row_sources(int(mask.sum()), mask.shape[-1])]
        np.savez_compressed(caption_dir / path.name, caption_feature=rows[None], attention_mask=mask)
    return {"build": str(dst), "features": str(wide_features.parent), "shard_bytes": manifest["totals"]["bytes"]}


# ---- stage micro-benchmarks ------------------------------------------------------------------------

def _reference_fit(data: bytes, bucket, resize_mode: str, lanczos: bool):
    """The exact transform shardkit.images reproduces: full decode, EXIF turn, resize, centre crop."""
    import io

    import numpy as np
    from PIL import Image, ImageOps

    from shardkit.images import fit_to_bucket, to_rgb

    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    rgb = to_rgb(image)
    resized, top, left = fit_to_bucket((rgb.height, rgb.width), bucket, resize_mode)
    resample = Image.Resampling.LANCZOS if lanczos else Image.Resampling.BICUBIC
    if (rgb.height, rgb.width) != resized:
        rgb = rgb.resize((resized[1], resized[0]), resample)
    return np.array(rgb.crop((left, top, left + bucket.width, top + bucket.height))), rgb, (top, left)


def task_decode(args: dict) -> dict:
    """images.decode_and_fit against the exact reference transform: CPU ms per image and pixel error."""
    import numpy as np
    from PIL import Image

    from shardkit.buckets import BucketTable
    from shardkit.images import decode_and_fit

    root = Path(args["source"])
    table = BucketTable(args["resolution"])
    items = json.loads((root / "InternData" / "data_info.json").read_text())
    jobs = [(root / "InternImgs" / it["path"], table.closest(it["height"], it["width"])) for it in items]
    blobs = [path.read_bytes() for path, _ in jobs]
    lanczos = table.uses_lanczos

    def reference_all():
        return [_reference_fit(data, bucket, "crop", lanczos)[0] for data, (_, bucket) in zip(blobs, jobs)]

    def shardkit_all():
        return [decode_and_fit(path, bucket, "crop", 10**10, None, lanczos).pixels for path, bucket in jobs]

    times = {"reference": [], "shardkit": []}
    for _ in range(args.get("repeats", 3)):  # interleaved, best of: the machine is shared
        for name, fn in (("reference", reference_all), ("shardkit", shardkit_all)):
            t0 = time.process_time()
            fn()
            times[name].append((time.process_time() - t0) * 1000 / len(jobs))
    reference, ours = reference_all(), shardkit_all()

    def psnr(a, b) -> float:
        mse = float(np.mean((a.astype(np.float64) - b) ** 2))
        return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)

    errors = [np.abs(a.astype(np.int16) - b) for a, b in zip(ours, reference)]
    # Yardstick: how far apart two legitimate filters (BICUBIC vs LANCZOS) already are.
    yardstick = []
    for data, (_, bucket) in zip(blobs, jobs):
        ref, _, _ = _reference_fit(data, bucket, "crop", False)
        other, _, _ = _reference_fit(data, bucket, "crop", True)
        yardstick.append(psnr(ref, other))
    return {"images": len(jobs), "reference_ms": min(times["reference"]), "shardkit_ms": min(times["shardkit"]),
            "max_abs": int(max(e.max() for e in errors)), "mean_abs": float(np.mean([e.mean() for e in errors])),
            "psnr_min": min(psnr(a, b) for a, b in zip(ours, reference)),
            "psnr_median": float(np.median([psnr(a, b) for a, b in zip(ours, reference)])),
            "bicubic_vs_lanczos_psnr_median": float(np.median(yardstick)),
            "mean_megapixels": float(np.mean([Image.open(p).width * Image.open(p).height for p, _ in jobs]) / 1e6)}


def task_serialise(args: dict) -> dict:
    """ShardWriter.add against tarfile's own stream writer on the same samples: CPU and byte identity."""
    import hashlib
    import io
    import tarfile

    import numpy as np

    from shardkit.format import npy_bytes
    from shardkit.shards import Sample, ShardWriter

    rng = np.random.default_rng(0)
    hidden, latent_hw = args["hidden"], args["latent_hw"]
    samples = []
    for i in range(args["samples"]):
        members = [("json", bytes(900)), ("txt", bytes(180)), ("jpg", rng.bytes(90_000 + 37 * i)),
                   ("latent.npy", npy_bytes(rng.standard_normal((8, *latent_hw)).astype(np.float16)))]
        for field, length in (("prompt", 27), ("sharegpt4v", 110)):
            members.append((f"t5_{field}.npy", npy_bytes(rng.standard_normal((length, hidden)).astype(np.float16))))
        samples.append(Sample(f"sample{i:06d}-0123456789abcdef", members))
    payload = sum(len(p) for s in samples for _, p in s.members)

    def with_tarfile(path: Path) -> str:
        digest = hashlib.sha256()

        class Hashing(io.RawIOBase):
            def writable(self):
                return True

            def write(self, data):
                fh.write(data)
                digest.update(data)
                return len(data)

        with open(path, "wb") as fh, tarfile.open(fileobj=Hashing(), mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                for suffix, data in sample.members:
                    info = tarfile.TarInfo(f"{sample.key}.{suffix}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
        return digest.hexdigest()

    def with_shardwriter(path: Path) -> str:
        writer = ShardWriter(path.parent, path.name)
        for sample in samples:
            writer.add(sample)
        return writer.commit().sha256

    out = _fresh(args["out"])
    out.mkdir(parents=True)
    times = {"tarfile": [], "shardkit": []}
    digests = {}
    for _ in range(args.get("repeats", 3)):
        for name, fn in (("tarfile", with_tarfile), ("shardkit", with_shardwriter)):
            t0 = time.process_time()
            digests[name] = fn(out / f"{name}.tar")
            times[name].append((time.process_time() - t0) * 1000 / len(samples))
    return {"samples": len(samples), "bytes_per_sample": payload / len(samples),
            "tarfile_ms": min(times["tarfile"]), "shardkit_ms": min(times["shardkit"]),
            "identical_bytes": digests["tarfile"] == digests["shardkit"]}


def task_output_cast(args: dict) -> dict:
    """Host CPU per sample to turn encoder outputs into stored arrays: the cast to fp16 done by
    numpy after the copy to the host (build.py before this task existed) against the cast done
    by torch where the output was computed (``encoders.to_store_array``), at real dimensions."""
    import numpy as np
    import torch

    from shardkit.encoders import to_store_array

    device = torch.device(args["device"])
    store = np.dtype(np.float16)
    batch, hidden = args["batch"], args["hidden"]
    rng = torch.Generator(device="cpu").manual_seed(0)
    outputs = {}
    # One sample: a latent and two captions (the benchmark's medians, 28 and 104 tokens, padded
    # to their batch's width as length_batches pads them).
    for compute in args["compute_dtypes"]:
        dtype = getattr(torch, compute)
        latent = torch.randn((batch, 8, *args["latent_hw"]), generator=rng).to(device, dtype)
        captions = [(torch.randn((batch, width, hidden), generator=rng).to(device, dtype), length)
                    for width, length in ((32, 28), (112, 104))]
        outputs[compute] = (latent, captions)

    def numpy_after_copy(latent, captions):
        kept = [latent.float().cpu().numpy().astype(store)]
        for hidden_states, length in captions:
            rows = hidden_states.float().cpu().numpy()
            kept += [rows[row, :length].astype(store) for row in range(batch)]
        return kept

    def torch_where_computed(latent, captions):
        kept = [to_store_array(latent, store)]
        for hidden_states, length in captions:
            rows = to_store_array(hidden_states, store)
            kept += [rows[row, :length] for row in range(batch)]
        return kept

    result = {}
    for compute, (latent, captions) in outputs.items():
        times = {"numpy": [], "torch": []}
        for _ in range(args.get("repeats", 5)):
            for name, fn in (("numpy", numpy_after_copy), ("torch", torch_where_computed)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.process_time()
                kept = fn(latent, captions)
                times[name].append((time.process_time() - t0) * 1000 / batch)
        same = all(a.tobytes() == b.tobytes() for a, b in zip(numpy_after_copy(latent, captions),
                                                               torch_where_computed(latent, captions)))
        result[compute] = {"numpy_ms": min(times["numpy"]), "torch_ms": min(times["torch"]), "identical_bytes": same,
                           "values_per_sample": int(latent[0].numel() + sum(length * hidden for _, length in captions))}
        del kept
    return {"device": str(device), "batch": batch, "hidden": hidden, "latent_hw": args["latent_hw"], "by_compute": result}


def task_flops(args: dict) -> dict:
    """FLOPs per sample of the full-size encoders, shardkit's way and the per-file way (meta device)."""
    from fullsize import t5_encode_flops, vae_encode_flops

    vae = [vae_encode_flops(h, w) for h, w in args["buckets"]]
    dynamic = [sum(t5_encode_flops(length) for length in lengths) for lengths in args["token_lengths"]]
    padded = [len(lengths) * t5_encode_flops(args["max_length"]) for lengths in args["token_lengths"]]
    n = len(vae)
    # What T5 computes under each batching policy: every caption at its batch's padded width.
    computed = {policy: sum(count * t5_encode_flops(width) for width, count in widths) / n
                for policy, widths in args.get("t5_widths", {}).items()}
    return {"vae_flops": sum(vae) / n, "t5_flops_shardkit": sum(dynamic) / n, "t5_flops_baseline": sum(padded) / n,
            "t5_flops_computed": computed}


def task_npz_proxy(args: dict) -> dict:
    """PixArt's compressed caption .npz at the real width: a 2-layer T5 with T5-XXL's width, heads
    and position buckets (random init) encodes sample captions padded to max_length."""
    import io

    import numpy as np
    import torch
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from fullsize import T5_XXL_CONFIG, distinct_padded_rows

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(**dict(T5_XXL_CONFIG, num_layers=2))).eval()
    tokenizer = AutoTokenizer.from_pretrained(args["tokenizer"])
    rows = []
    for text in args["captions"]:
        token = tokenizer([text], max_length=args["max_length"], padding="max_length", truncation=True,
                          return_tensors="pt")
        with torch.no_grad():
            feature = model(token.input_ids, attention_mask=token.attention_mask)[0]
        buffer = io.BytesIO()
        np.savez_compressed(buffer, caption_feature=feature.to(torch.float16).numpy(),
                            attention_mask=token.attention_mask.to(torch.int16).numpy())
        length = int(token.attention_mask.sum())
        rows.append({"length": length, "distinct_rows": distinct_padded_rows(length, args["max_length"]),
                     "npz_bytes": len(buffer.getvalue())})
    return {"rows": rows, "hidden": T5_XXL_CONFIG["d_model"]}


def task_plan_remote(args: dict) -> dict:
    """Planning from object storage: records/s with image lookups one at a time vs on threads ahead.

    The dataset is served over HTTP on 127.0.0.1 by a server that waits ``latency_ms`` before each
    answer, the first-byte latency of an object store. Planning needs each image's size (images are
    kept) and, where the metadata has no width/height, its header: one request per record.
    """
    from transformers import AutoTokenizer

    import shardkit.images as images_module
    from shardkit.buckets import BucketTable
    from shardkit.config import BuildConfig
    from shardkit.plan import Planner
    from shardkit.sources import iter_records, resolve_source

    root = Path(args["source"])
    # The served folder: the dataset (linked) plus a JSON Lines source without width/height, so
    # that the planner must read each image's header.
    served = _fresh(args["work"])
    served.mkdir(parents=True)
    for folder in ("InternData", "InternImgs"):
        (served / folder).symlink_to(root / folder)
    items = json.loads((root / "InternData" / "data_info.json").read_text())
    (served / "no-sizes.jsonl").write_text("".join(
        json.dumps({"path": f"InternImgs/{it['path']}", "prompt": it["prompt"]}) + "\n" for it in items[:args["records"]]))
    server = SlowHttpServer(served, args["latency_ms"] / 1000)
    sent, count_lock = server.sent, server.lock
    base = server.url
    tokenizer = AutoTokenizer.from_pretrained(args["tokenizer"])
    results = {}
    prefix_bytes = images_module._HEADER_PREFIX_BYTES
    layouts = (("sizes in metadata (a HEAD per record)", "data_info.json", prefix_bytes, True),
               ("no sizes, header from a whole-image GET (before)", "no-sizes.jsonl", 1 << 40, True),
               ("no sizes, header from the first 64 KiB (ranged GET; HEAD if larger)", "no-sizes.jsonl", prefix_bytes, True),
               ("no sizes, --no-images: header from the first 64 KiB (ranged GET only)", "no-sizes.jsonl", prefix_bytes, False))
    try:
        for label, name, header_bytes, keep_images in layouts:
            config = BuildConfig(resolution=512, captions=["prompt"], keep_images=keep_images, vae="unused", t5="unused")
            images_module._HEADER_PREFIX_BYTES = header_bytes  # "before": every header read takes the whole file
            source = f"{base}/{'InternData/' if name == 'data_info.json' else ''}{name}"
            for threads in args["threads"]:
                planner = Planner(config, BucketTable(512), lambda text: tokenizer(text)["input_ids"],
                                  lambda h, w: (8, h // 8, w // 8), 32, lookup_threads=threads)
                records = iter_records(resolve_source(source), config.captions)
                limited = (r for r in records if r.index < args["records"])
                with count_lock:
                    sent.update(bytes=0, requests=0)
                start = CpuClock.now()
                planned = sum(len(plan.records) for plan in planner.plan(limited))
                clock = CpuClock.now().since(start)
                with count_lock:
                    served_bytes, requests = sent["bytes"], sent["requests"]
                results[f"{label} | {threads}"] = dict(clock, records=planner.stats.records_read, planned=planned,
                                                       threads=threads, layout=label, bytes_served=served_bytes,
                                                       requests=requests)
    finally:
        images_module._HEADER_PREFIX_BYTES = prefix_bytes
        server.shutdown()
    return {"latency_ms": args["latency_ms"], "runs": results}


def task_plan_parquet(args: dict) -> dict:
    """Planning alone (no decode, no encoding) of a synthetic Parquet source, as a build plans before
    writing plan.json: records/s, and the process's peak RSS against its RSS once the (stubbed)
    encoders are loaded."""
    import resource

    from shardkit.build import caption_window_size
    from shardkit.buckets import BucketTable
    from shardkit.plan import Planner
    from shardkit.planfile import Batching, gather_shards, make_plan
    from shardkit.sources import iter_records, resolve_source
    from synth import make_parquet

    source = make_parquet(args["records"], Path(args["work"]))
    config, encoders = _load(args["config"])
    _stub_encoders(encoders)
    before, arenas_before = _rss(), _python_arenas()
    table = BucketTable(config.resolution)
    planner = Planner(config, table, encoders.t5.tokenize, encoders.vae.feature_shape, encoders.t5.hidden_size)
    identities = {"vae": encoders.vae.identity.content_json(), "t5": encoders.t5.identity.content_json()}
    batching = Batching(vae_batch=config.batch_size, caption_window=caption_window_size(config),
                        t5_batch=config.t5_batch_size)
    start = CpuClock.now()
    plan = make_plan(iter_records(resolve_source(str(source)), config.captions), planner, config.content_fields(),
                     identities, batching)
    result = CpuClock.now().since(start)
    after = _rss()
    _malloc_trim()  # what the C heap keeps beyond live objects (fragmentation) is handed back
    result.update(records=planner.stats.records_read, planned=sum(len(s.records) for s in plan.shards),
                  skipped=len(planner.stats.skips), plans=len(plan.shards), plan_bytes=len(plan.to_bytes()),
                  records_per_s=planner.stats.records_read / result["wall_s"], rss_before_mib=before / 2**20,
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
                  rss_after_mib=after / 2**20, rss_after_trim_mib=_rss() / 2**20,
                  index_mib=planner.index_bytes / 2**20, source_bytes=source.stat().st_size,
                  python_arenas_added=_python_arenas() - arenas_before)
    # A lone worker's first build stage: every shard of the plan gathered again from SOURCE, each
    # held (its records' image bytes included) until its last record is read. RSS is sampled as
    # each shard completes, when what is held is largest.
    gather_start_rss = peak = _rss()
    start = CpuClock.now()
    gathered = 0
    for shard in gather_shards(iter_records(resolve_source(str(source)), config.captions), plan,
                               range(len(plan.shards)), table, planner.replan):
        gathered += len(shard.records)
        peak = max(peak, _rss())
    gather = CpuClock.now().since(start)
    result.update(gathered=gathered, gather_records_per_s=gathered / gather["wall_s"],
                  gather_growth_mib=(peak - gather_start_rss) / 2**20)
    return result


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: the row then shows the heap as it is


def _python_arenas() -> int:
    """pymalloc's 1 MiB arenas in use: an arena stays while any small object in it lives."""
    import gc
    import os
    import re
    import sys
    import tempfile

    gc.collect()
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)  # the statistics go to the C stderr
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        match = re.search(rb"# arenas allocated current +=\s+([\d,]+)", out.read())
    return int(match.group(1).replace(b",", b"")) if match else -1


def _rss() -> int:
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def task_verify(args: dict) -> dict:
    """`inspect --verify` of a build with 1 and more shards at a time: from local disk, and served
    over HTTP with ``latency_ms`` before each answer (object storage)."""
    from shardkit.inspect import inspect_output

    results = []
    server = SlowHttpServer(Path(args["build"]), args["latency_ms"] / 1000)
    try:
        for _ in range(args["repeats"]):
            for where, location in (("local disk", args["build"]), (f"HTTP, {args['latency_ms']} ms", server.url)):
                for jobs in args["jobs"]:
                    start = CpuClock.now()
                    report = inspect_output(location, verify_shards=True, jobs=jobs)
                    results.append(dict(CpuClock.now().since(start), where=where, jobs=jobs, sound=report.verification.sound,
                                        shards=report.verification.shards_checked,
                                        bytes=report.verification.bytes_read))
    finally:
        server.shutdown()
    return {"runs": results}


def task_t5_padding(args: dict) -> dict:
    """T5 tokens computed (padding included) and T5 calls for a dataset's captions under three
    groupings, counted from the build's plans (nothing is encoded): each VAE batch's distinct
    captions sorted and cut every t5_batch_size (shardkit before caption windows); caption windows
    cut the same way; caption windows cut by ``length_batches`` (shardkit now)."""
    from shardkit.build import caption_window_size
    from shardkit.buckets import BucketTable
    from shardkit.config import BuildConfig
    from shardkit.encoders import length_batches
    from shardkit.plan import Planner
    from shardkit.sources import iter_records, resolve_source
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args["tokenizer"])

    def fixed_cuts(lengths: list[int], size: int) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[start:start + size] for start in range(0, len(order), size)]

    results = {}
    for batch_size in args["batch_sizes"]:
        config = BuildConfig(resolution=args["resolution"], batch_size=batch_size, t5_batch_size=args["t5_batch_size"],
                             device="cpu", progress=False)
        planner = Planner(config, BucketTable(config.resolution),
                          lambda text: tokenizer(text, max_length=config.max_length, truncation=True)["input_ids"],
                          lambda h, w: (8, h // 8, w // 8), 4096)
        plans = [[r.token_ids for r in plan.records]
                 for plan in planner.plan(iter_records(resolve_source(args["source"]), config.captions))]
        window = caption_window_size(config)
        policies = {"per VAE batch, fixed cuts": (batch_size, fixed_cuts),
                    "caption windows, fixed cuts": (window, fixed_cuts),
                    "caption windows, length_batches": (window, length_batches)}
        counts = {}
        for name, (group, cut) in policies.items():
            widths: Counter = Counter()  # padded width -> captions encoded at it
            calls = valid = 0
            for plan in plans:
                for first in range(0, len(plan), group):
                    lengths = list({ids.tobytes(): len(ids) for fields in plan[first:first + group]
                                    for ids in fields.values()}.values())
                    for chunk in cut(lengths, config.t5_batch_size):
                        widths[max(lengths[i] for i in chunk)] += len(chunk)
                        calls += 1
                    valid += sum(lengths)
            counts[name] = {"calls": calls, "valid_tokens": valid,
                            "computed_tokens": sum(width * n for width, n in widths.items()),
                            "widths": sorted(widths.items())}
        results[str(batch_size)] = {"records": sum(len(p) for p in plans), "plans": len(plans), "window": window,
                                    "policies": counts}
    return results


def task_write_full_models(args: dict) -> dict:
    from fullsize import write_full_size_models

    return {"path": str(write_full_size_models(Path(args["dest"]), Path(args["tiny_models"]), args["device"]))}


TASKS = {name[len("task_"):]: fn for name, fn in dict(globals()).items() if name.startswith("task_")}


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in TASKS:
        sys.exit(f"usage: tasks.py {{{','.join(TASKS)}}} 'JSON ARGS'")
    emit(TASKS[sys.argv[1]](json.loads(sys.argv[2])))


if __name__ == "__main__":
    main()
