"""What the user reads: the progress bar and the closing summary of a build."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:  # importing build pulls in torch; the summary-only inspect must not pay for it
    from .build import BuildSummary


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``: one call per record written or skipped; shows samples/s."""
    if not enabled:
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="sample", dynamic_ncols=True, smoothing=0.1) as bar:
        yield bar.update


def format_build_summary(summary: BuildSummary) -> str:
    # The rate counts only what this run encoded: kept shards cost it nothing.
    rate = summary.written_this_run / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
    lines = [
        f"built {summary.output}: {summary.written} written, {summary.skipped} skipped of {summary.records_read} records read",
        f"  {summary.shards} shards, {human_bytes(summary.bytes)}; this run wrote {summary.written_this_run} samples "
        f"in {summary.elapsed_s:.1f}s ({rate:.1f} samples/s)",
    ]
    if summary.shards_reused:
        lines.append(f"  kept from an earlier run: {summary.kept_samples} samples in {summary.shards_reused} planned shards")
    if summary.skipped_by_reason:
        reasons = ", ".join(f"{reason} {count}" for reason, count in summary.skipped_by_reason.items())
        lines.append(f"  skipped: {reasons} (see failures.jsonl)")
    lines.append("  bucket     size        samples  shards")
    for key, info in summary.per_bucket.items():
        h, w = info["hw"]
        lines.append(f"  {key:<9}  {h:>4}x{w:<5}  {info['samples']:>8}  {info['shards']:>6}")
    return "\n".join(lines)
