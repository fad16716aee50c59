"""Inspect: what a build holds (``summary``), whether every byte of it is sound (``verify``),
and one picture of it (``preview``), as one report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .manifest import open_shard_set
from .report import human_bytes
from .summary import Summary, format_summary, summarize
from .verify import DEFAULT_VERIFY_JOBS, Verification, verify


@dataclass
class InspectReport:
    summary: Summary
    verification: Verification | None = None
    preview: Any = None  # preview.PreviewResult when a contact sheet was drawn

    @property
    def exit_code(self) -> int:
        return 1 if self.verification is not None and not self.verification.sound else 0

    def as_json(self) -> dict[str, Any]:
        summary = asdict(self.summary)
        for stats, data in zip(self.summary.token_lengths, summary["token_lengths"]):
            data["truncated_share"] = stats.truncated_share
        data: dict[str, Any] = {"output": self.summary.output, "summary": summary, "verified": self.verification is not None}
        if self.verification is not None:
            v = self.verification
            data.update(sound=v.sound, verification={
                "shards_checked": v.shards_checked, "samples_checked": v.samples_checked,
                "bytes_read": v.bytes_read, "seconds": round(v.seconds, 3), "samples_per_bucket": v.samples_per_bucket})
            data["findings"] = [f.as_json() for f in v.findings]
            data["warnings"] = [f.as_json() for f in v.warnings]
        if self.preview is not None:
            data["preview"] = self.preview.as_json()
        return data


def inspect_output(output: str, verify_shards: bool = False, progress: bool = False, preview: str | None = None,
                   thumbs_per_bucket: int = 4, decode_with: str | None = None,
                   decode_subfolder: str | None = None, allow_incomplete: bool = False,
                   storage_options: dict[str, Any] | None = None, jobs: int | None = None,
                   timeout: float | None = 60.0) -> InspectReport:
    """The whole `shardkit inspect`: summary from the manifest, then the optional verification and
    preview. Remote reads that stall end after ``timeout`` seconds (an unreadable_shard finding)."""
    shard_set = open_shard_set(output, storage_options, timeout)
    report = InspectReport(summary=summarize(shard_set))
    if verify_shards:
        report.verification = verify(shard_set, progress=progress, allow_incomplete=allow_incomplete,
                                     jobs=jobs or DEFAULT_VERIFY_JOBS)
    if preview:
        from .preview import render_preview

        report.preview = render_preview(shard_set, preview, thumbs_per_bucket=thumbs_per_bucket,
                                        decode_with=decode_with, decode_subfolder=decode_subfolder)
    return report


def format_report(report: InspectReport) -> str:
    lines = format_summary(report.summary)
    v = report.verification
    if v is not None:
        lines += ["", f"verify: read {v.shards_checked} shards, {v.samples_checked} samples, "
                      f"{human_bytes(v.bytes_read)} in {v.seconds:.1f}s"]
        if v.sound:
            lines.append("  sound: every shard matches the manifest and every sample is complete and finite")
        else:
            lines.append(f"  {len(v.findings)} problem{'s' if len(v.findings) != 1 else ''}:")
            for f in v.findings:
                where = " ".join(part for part in (f.shard, f.key) if part)
                lines.append(f"    {f.kind:<20} {where + ': ' if where else ''}{f.message}")
        for w in v.warnings:
            lines.append(f"  warning: {w.kind} {w.shard}: {w.message}")
    if report.preview is not None:
        lines += ["", f"preview: {report.preview.describe()}"]
    return "\n".join(lines)
