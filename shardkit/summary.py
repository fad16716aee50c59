"""Summary: what a build holds, from its manifest alone (no shard is read)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from .errors import ShardkitError
from .manifest import FAILURES_NAME, MANIFEST_NAME, ShardSet
from .report import human_bytes


@dataclass
class BucketSummary:
    bucket: str
    height: int
    width: int
    samples: int
    shards: int
    bytes: int


@dataclass
class TokenLengthStats:
    """Token lengths of one caption field over all written samples."""

    field: str
    captions: int
    min: int
    median: float
    p95: int  # nearest rank
    max: int
    max_length: int
    truncated: int  # captions cut at max_length (length == max_length)

    @property
    def truncated_share(self) -> float:
        return self.truncated / self.captions if self.captions else 0.0


@dataclass
class Summary:
    output: str
    status: str
    shardkit_version: str
    resolution: int
    samples: int
    shards: int
    bytes: int
    records_read: int
    records_skipped: int
    buckets: list[BucketSummary]
    token_lengths: list[TokenLengthStats]
    config: dict[str, Any]
    encoders: dict[str, dict]
    skipped_by_reason: dict[str, int]


def _value_at_rank(histogram: list[tuple[int, int]], rank: int) -> int:
    """The rank-th smallest value (1-based) of a sorted (value, count) histogram."""
    seen = 0
    for value, count in histogram:
        seen += count
        if seen >= rank:
            return value
    return histogram[-1][0]


def token_length_stats(name: str, histogram: dict[str, int], max_length: int) -> TokenLengthStats | None:
    items = sorted((int(length), int(count)) for length, count in histogram.items() if int(count) > 0)
    total = sum(count for _, count in items)
    if total == 0:
        return None
    if total % 2:
        median = float(_value_at_rank(items, (total + 1) // 2))
    else:
        median = (_value_at_rank(items, total // 2) + _value_at_rank(items, total // 2 + 1)) / 2
    return TokenLengthStats(field=name, captions=total, min=items[0][0], median=median,
                            p95=_value_at_rank(items, (95 * total + 99) // 100), max=items[-1][0],
                            max_length=max_length, truncated=sum(c for length, c in items if length == max_length))


def summarize(shard_set: ShardSet) -> Summary:
    """What the manifest says the set holds; reads nothing but manifest.json."""
    try:
        return _summarize(shard_set)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ShardkitError(f"{shard_set.url_of(MANIFEST_NAME)} has malformed totals or token lengths ({exc!r}); "
                            f"rerun `shardkit build` to rewrite it") from None


def _summarize(shard_set: ShardSet) -> Summary:
    raw, manifest = shard_set.raw, shard_set.manifest
    totals = raw.get("totals") or manifest.totals()
    buckets = [BucketSummary(bucket=key, height=int(info["hw"][0]), width=int(info["hw"][1]),
                             samples=int(info["samples"]), shards=int(info["shards"]), bytes=int(info["bytes"]))
               for key, info in sorted(totals["per_bucket"].items(), key=lambda kv: float(kv[0]))]
    max_length = int(manifest.config.get("max_length") or manifest.encoders.get("t5", {}).get("max_length") or 0)
    stats = [token_length_stats(name, histogram, max_length)
             for name, histogram in (raw.get("token_lengths") or manifest.token_lengths()).items()]
    records = raw.get("records", {})
    skipped_by_reason = raw.get("skipped_by_reason")
    if skipped_by_reason is None:
        skipped_by_reason = dict(Counter(s["reason"] for s in manifest.all_skips()))
    skipped = int(records.get("skipped", sum(skipped_by_reason.values())))
    read = int(records.get("read", manifest.records_read))
    if manifest.status != "complete":  # the count of records read is written at the end: so far, those handled
        read = int(totals["samples"]) + skipped
    return Summary(output=shard_set.url, status=manifest.status, shardkit_version=str(raw.get("shardkit_version", "?")),
                   resolution=manifest.resolution, samples=int(totals["samples"]), shards=int(totals["shards"]),
                   bytes=int(totals["bytes"]), records_read=read, records_skipped=skipped,
                   buckets=buckets, token_lengths=[s for s in stats if s is not None], config=manifest.config,
                   encoders=manifest.encoders, skipped_by_reason=dict(skipped_by_reason))


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "-"


def _encoder_lines(encoders: dict[str, dict]) -> list[str]:
    lines = []
    for name, info in encoders.items():
        source = info.get("source", "?") + (f" (subfolder {info['subfolder']})" if info.get("subfolder") else "")
        traits = []
        if info.get("latent_channels") is not None:
            traits.append(f"{info['latent_channels']} latent channels")
        if info.get("scaling_factor") is not None:
            traits.append(f"scaling factor {info['scaling_factor']}")
        if info.get("hidden_size") is not None:
            traits.append(f"hidden size {info['hidden_size']}")
        if info.get("max_length") is not None:
            traits.append(f"max_length {info['max_length']}")
        if info.get("vocab_size") is not None:
            traits.append(f"vocab {info['vocab_size']}")
        traits.append(f"computed in {info.get('compute_dtype', '?')}, stored as {info.get('store_dtype', '?')}")
        lines.append(f"    {name:<4} {info.get('model_class', '?')} from {source}")
        lines.append(f"         {', '.join(traits)}")
        lines.append(f"         revision {info.get('revision') or '-'}, config sha256 {_short(info.get('config_sha256'))}, "
                     f"weights {_short(info.get('weights_fingerprint'))}")
    return lines


def format_summary(s: Summary) -> list[str]:
    """The summary as the lines of the text report."""
    config = s.config
    lines = [
        f"{s.output}: shardkit build, status {s.status} (written by shardkit {s.shardkit_version})",
        f"  {s.samples} samples in {s.shards} shards, {human_bytes(s.bytes)}, {len(s.buckets)} buckets; "
        f"{s.records_read} records read, {s.records_skipped} skipped"
        + ("" if s.status == "complete" else " so far (unfinished: rerun `shardkit build` to resume)"),
        f"  resolution {s.resolution}, resize {config.get('resize_mode')}, captions {', '.join(config.get('captions', []))}, "
        + (f"pipeline {config['pipeline']}" if config.get("pipeline") else f"max_length {config.get('max_length')}")
        + f", stored as {config.get('store_dtype')}, "
        f"images {'kept' if config.get('keep_images') else 'left out'}",
        "",
        "  bucket   size       samples  shards      bytes",
    ]
    for b in s.buckets:
        lines.append(f"  {b.bucket:<7}  {b.height:>4}x{b.width:<5}  {b.samples:>7}  {b.shards:>6}  {human_bytes(b.bytes):>9}")
    lines.append(f"  {'total':<18}  {s.samples:>7}  {s.shards:>6}  {human_bytes(s.bytes):>9}")
    if s.token_lengths:
        lines += ["", "  caption tokens  captions  min  median  p95  max  truncated (= max_length)"]
        for t in s.token_lengths:
            lines.append(f"  {t.field:<14}  {t.captions:>8}  {t.min:>3}  {t.median:>6g}  {t.p95:>3}  {t.max:>3}  "
                         f"{t.truncated} ({100 * t.truncated_share:.1f}% at {t.max_length})")
    lines += ["", "  encoders", *_encoder_lines(s.encoders)]
    if s.skipped_by_reason:
        reasons = ", ".join(f"{reason} {count}" for reason, count in s.skipped_by_reason.items())
        lines += ["", f"  skipped: {reasons} (details in {FAILURES_NAME})"]
    else:
        lines += ["", "  skipped: none"]
    return lines
