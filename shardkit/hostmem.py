"""Host-memory policy of CPU builds: give the encoders' freed activation memory back to the OS.

On CPU the VAE's activations are plain malloc'd buffers whose sizes change with every
(bucket shape, batch size). glibc serves the first big ones with mmap, raises its mmap
threshold when one is freed and from then on serves them from heap arenas that it keeps:
freed buffers stay resident, and differently sized ones seldom fit each other's holes, so
peak RSS grows with the number of shapes a build meets, that is with N.

``malloc_trim(0)`` hands back the free pages of every arena, holes in the middle of a heap
included. It is not free: the next batch faults in again whatever it reuses. So the trimmer
learns the ceiling of a freshly trimmed heap (RSS after the first batch that follows a trim:
live data plus one batch's buffers) and trims only when RSS has grown a slack past it (half
the ceiling). The peak is then about (1.5 x ceiling + one batch's activations), whatever N, for a
handful of trims per build.

Only glibc has ``malloc_trim``: elsewhere (musl, macOS, Windows) and on GPU builds, whose
activations live in device memory, this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Callable

import torch

log = logging.getLogger(__name__)

# RSS growth past the ceiling of a freshly trimmed heap that triggers a trim: a share of the
# ceiling (at least a floor), so the bound scales with the encoders. Each trim costs the next
# batches a page fault per page they reuse, dear on some VMs: at a fifth of the ceiling a
# 200-sample build trimmed 14-24 times and ran 1.20x slower than untrimmed on one machine; at half,
# 5-8 trims and 10 N / N peak 1.05x (a fixed 512 MiB once let the 10 N peak reach 1.28x the N
# build's: the N build had not yet met its bound). BENCHMARKS.md section 5.
TRIM_SLACK_FRACTION = 0.5
TRIM_SLACK_MIN_BYTES = 64 << 20

_STATM = "/proc/self/statm"


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # raises where the C library is not glibc
        function = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError, ValueError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def _resident_bytes() -> int | None:
    """This process's current RSS, from /proc (None where there is no /proc)."""
    try:
        with open(_STATM, "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """Trims the C heap after an encoder batch once RSS has grown past the ceiling of a freshly
    trimmed heap by ``slack_fraction`` of that ceiling, or by ``slack`` bytes if that is more."""

    def __init__(self, malloc_trim: Callable[[int], int] | None, resident_bytes: Callable[[], int | None],
                 slack: int = TRIM_SLACK_MIN_BYTES, slack_fraction: float = TRIM_SLACK_FRACTION):
        self.malloc_trim = malloc_trim
        self.resident_bytes = resident_bytes
        self.slack = slack
        self.slack_fraction = slack_fraction
        # The most RSS seen after the first batch that followed a trim (or the start): what a heap
        # holding one batch's freed buffers needs, not what it keeps from earlier shapes.
        self.ceiling = 0
        self.fresh = True  # no batch since the start or the last trim
        self.trims = 0
        self._lock = threading.Lock()  # CPU builds may encode on several threads (encoder streams)

    @property
    def active(self) -> bool:
        return self.malloc_trim is not None

    def after_batch(self) -> None:
        if self.malloc_trim is None:
            return
        with self._lock:
            rss = self.resident_bytes()
            if rss is None:
                return
            if self.fresh:
                self.ceiling = max(self.ceiling, rss)
                self.fresh = False
            elif rss > self.ceiling + max(self.slack, self.slack_fraction * self.ceiling):
                self.malloc_trim(0)
                self.trims += 1
                self.fresh = True


# One C heap per process, so one trimmer per process.
_process_trimmer: HeapTrimmer | None = None


def process_trimmer() -> HeapTrimmer:
    global _process_trimmer
    if _process_trimmer is None:
        _process_trimmer = HeapTrimmer(_glibc_malloc_trim(), _resident_bytes)
        if not _process_trimmer.active:
            log.debug("malloc_trim is not available (C library is not glibc); freed host memory is left to the allocator")
    return _process_trimmer


def after_encoder_batch(device: torch.device) -> None:
    """Call after each encoder batch: on a CPU build, keeps the heap from growing with the shapes met."""
    if device.type == "cpu":
        process_trimmer().after_batch()
