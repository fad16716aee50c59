"""Helpers shared by the benchmark scripts: configs, timing, subprocess tasks, tables.

Only the standard library at import time: the decode workers (spawned) re-import the main
script, and a benchmark must not make them pay for importing torch.
"""

from __future__ import annotations

import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_WORKDIR = Path(os.environ.get("SHARDKIT_BENCH_DIR", "/tmp/shardkit-bench"))
RESULT_PREFIX = "RESULT "


def bench_config_options(models: Path, resolution: int, batch_size: int, t5_batch_size: int, workers: int,
                         device: str = "cpu", keep_images: bool = True, full_size: bool = False) -> dict:
    """The build options every measurement shares (tiny encoders unless ``full_size``). On a CPU
    two encoder streams, the opt-in that suits the tiny encoders (section 1 compares one)."""
    return dict(resolution=resolution, vae=str(models), vae_subfolder="vae", t5=str(models),
                device=device, dtype="fp32" if device == "cpu" else "fp16", batch_size=batch_size,
                t5_batch_size=t5_batch_size, workers=workers, keep_images=keep_images, progress=False,
                encoder_streams=2 if device == "cpu" else 0)


@dataclass
class CpuClock:
    """Wall time and CPU time of this process (all threads) and of its reaped children."""

    wall: float
    self_cpu: float
    children_cpu: float

    @classmethod
    def now(cls) -> "CpuClock":
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(time.perf_counter(), me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime)

    def since(self, start: "CpuClock") -> dict:
        return {"wall_s": self.wall - start.wall, "cpu_self_s": self.self_cpu - start.self_cpu,
                "cpu_children_s": self.children_cpu - start.children_cpu}


class GpuMonitor:
    """Samples the GPU while a timed region runs: ``nvidia-smi``'s utilisation (the share of time a
    kernel was running, not of the GPU's FLOPs) every 100 ms, and the peak of CUDA memory in use.

    A context manager that does nothing unless ``active``; its ``result()`` goes into a task's answer.
    """

    def __init__(self, active: bool, interval_ms: int = 100) -> None:
        self.active = active and shutil.which("nvidia-smi") is not None
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, float]] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "GpuMonitor":
        if self.active:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 f"-lms={self.interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        output, _ = self._proc.communicate(timeout=10)
        for line in output.splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                self.samples.append((float(parts[0]), float(parts[1])))
            except (ValueError, IndexError):
                continue  # a line cut off by the terminate

    def result(self) -> dict:
        if not self.samples:
            return {}
        utilisation = [u for u, _ in self.samples]
        return {"gpu_busy_pct_mean": sum(utilisation) / len(utilisation), "gpu_busy_samples": len(utilisation),
                "gpu_memory_used_mib_max": max(m for _, m in self.samples)}


def emit(result: dict) -> None:
    """A task's answer: the last line of its stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def task_env(**extra: str) -> dict[str, str]:
    """The environment of a task's interpreter: offline, with this folder first on the import
    path and the caller's path after it (where shardkit runs from PYTHONPATH, with wheels
    installed to a folder of their own, the tasks keep finding it)."""
    path = os.pathsep.join(p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)


def run_task(task: str, args: dict, timeout: float = 3600) -> dict:
    """Run ``tasks.py TASK ARGS`` in a fresh interpreter and return its result."""
    env = task_env()
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "tasks.py"), task, json.dumps(args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark task {task} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import importlib.metadata as md

    versions = {}
    for package in ("torch", "diffusers", "transformers", "numpy", "pillow"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {"cpu_model": model, "cpus": os.cpu_count(), "python": platform.python_version(), "gpu": gpu_name(),
            **versions}


def gpu_name() -> str | None:
    """The first GPU's name as nvidia-smi reports it (None without one)."""
    if shutil.which("nvidia-smi") is None:
        return None
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return proc.stdout.splitlines()[0].strip() if proc.returncode == 0 and proc.stdout.strip() else None


def table(title: str, header: list[str], rows: list[list]) -> str:
    """A Markdown table, so the printed output pastes straight into BENCHMARKS.md."""
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class SlowHttpServer:
    """A folder served over HTTP on 127.0.0.1, waiting ``latency`` seconds before each answer (an
    object store's first-byte latency) and answering single-range GETs with 206, as object stores
    do; it counts the requests and the bytes it sends."""

    def __init__(self, directory: Path, latency: float):
        import functools
        import http.server
        import threading

        self.sent = {"bytes": 0, "requests": 0}
        self.lock = threading.Lock()
        sent, lock = self.sent, self.lock

        class Handler(http.server.SimpleHTTPRequestHandler):
            def send_head(self):
                time.sleep(latency)
                with lock:
                    sent["requests"] += 1
                wanted = self.headers.get("Range", "")
                path = Path(self.translate_path(self.path))
                if self.command != "GET" or not wanted.startswith("bytes=") or not path.is_file():
                    return super().send_head()
                size = path.stat().st_size
                first, _, last = wanted[len("bytes="):].partition("-")
                first, last = int(first or 0), min(int(last) if last else size - 1, size - 1)
                with open(path, "rb") as handle:
                    handle.seek(first)
                    body = io.BytesIO(handle.read(last - first + 1))
                self.send_response(206)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.send_header("Content-Length", str(last - first + 1))
                self.end_headers()
                return body

            def copyfile(self, source, outputfile):
                data = source.read()
                with lock:
                    sent["bytes"] += len(data)
                outputfile.write(data)

            def log_message(self, *a):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # the default 5 refuses concurrent connections and clients retry after 1 s

        self._server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def shutdown(self) -> None:
        self._server.shutdown()
