"""Manifest stage: what a build holds, written atomically as shards complete.

``OUTPUT/manifest.json`` is the contract with ``inspect``, the reader and a resume: the
effective config, the encoders' identities, the bucket table, and per shard its path, bucket,
sample count, bytes and sha256. ``status`` is "in_progress" until every planned shard is
written, then "complete". Skipped records are counted by reason here and listed one per line
in ``OUTPUT/failures.jsonl``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from . import __version__
from .errors import ShardkitError
from .format import SampleFormat, declare_from_config, member_bounds
from .storage import LocalStorage, Storage, atomic_write_bytes, storage_error, with_timeouts
from .tario import TarSample, iter_tar_samples

MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
FORMAT = "shardkit-manifest"
FORMAT_VERSION = 1


@dataclass
class ShardEntry:
    path: str
    bucket: str
    bucket_hw: list[int]
    samples: int
    bytes: int
    sha256: str
    skipped: list[dict] = field(default_factory=list)  # records of this shard that failed to decode
    token_lengths: dict[str, dict[str, int]] = field(default_factory=dict)  # field -> {length: count}

    @classmethod
    def from_json(cls, data: dict) -> "ShardEntry":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class Manifest:
    config: dict[str, Any]
    encoders: dict[str, dict]
    resolution: int
    buckets: dict[str, list[int]]
    shards: list[ShardEntry] = field(default_factory=list)
    # Planned shards whose every record failed to decode: done, with no file, only skips.
    empty_plans: list[dict] = field(default_factory=list)
    status: str = "in_progress"
    records_read: int = 0
    plan_skipped: list[dict] = field(default_factory=list)
    # Builds split across ranks: {"rank", "world_size"} in a rank's part, {"world_size", "parts"} once merged.
    distributed: dict[str, Any] | None = None
    # The declaration of the samples (format.SampleFormat.as_json()); None in manifests written before it.
    sample_format: dict[str, Any] | None = None
    # The source's own metadata fields in the samples' "source" record: name -> JSON types seen.
    source_fields: dict[str, list[str]] = field(default_factory=dict)

    def declaration(self) -> SampleFormat:
        """What every sample of the build holds: as declared, or derived from the config and
        encoders for a manifest written before declarations (the format they were written in)."""
        if self.sample_format is not None:
            return SampleFormat.from_json(self.sample_format)
        return declare_from_config(self.config, self.encoders)

    # ---- derived views -------------------------------------------------------------------
    def all_skips(self) -> list[dict]:
        shard_skips = [s for entry in self.shards for s in entry.skipped]
        shard_skips += [s for plan in self.empty_plans for s in plan["skipped"]]
        return sorted(self.plan_skipped + shard_skips, key=lambda s: (s["index"], s["reason"]))

    def totals(self) -> dict[str, Any]:
        per_bucket: dict[str, dict[str, Any]] = {}
        for entry in self.shards:
            bucket = per_bucket.setdefault(entry.bucket, {"hw": entry.bucket_hw, "samples": 0, "shards": 0, "bytes": 0})
            bucket["samples"] += entry.samples
            bucket["shards"] += 1
            bucket["bytes"] += entry.bytes
        ordered = {k: per_bucket[k] for k in sorted(per_bucket, key=float)}
        return {
            "samples": sum(e.samples for e in self.shards),
            "shards": len(self.shards),
            "bytes": sum(e.bytes for e in self.shards),
            "per_bucket": ordered,
        }

    def token_lengths(self) -> dict[str, dict[str, int]]:
        merged: dict[str, Counter] = {}
        for entry in self.shards:
            for name, histogram in entry.token_lengths.items():
                merged.setdefault(name, Counter()).update({k: int(v) for k, v in histogram.items()})
        return {name: {k: c[k] for k in sorted(c, key=int)} for name, c in sorted(merged.items())}

    def as_json(self) -> dict[str, Any]:
        skips = self.all_skips()
        totals = self.totals()
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "shardkit_version": __version__,
            "status": self.status,
            "config": self.config,
            "encoders": self.encoders,
            "resolution": self.resolution,
            "buckets": self.buckets,
            **({"sample_format": self.sample_format} if self.sample_format is not None else {}),
            "records": {
                # Counted at the end; until then, the records handled so far (written + skipped).
                "read": self.records_read if self.status == "complete" else totals["samples"] + len(skips),
                "written": totals["samples"],
                "skipped": len(skips),
            },
            "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skips).items())),
            "totals": totals,
            "token_lengths": self.token_lengths(),
            "shards": [asdict(e) for e in sorted(self.shards, key=lambda e: e.path)],
            "empty_plans": sorted(self.empty_plans, key=lambda e: e["path"]),
            "plan_skipped": self.plan_skipped,
            "source_fields": dict(sorted(self.source_fields.items())),
            **({"distributed": self.distributed} if self.distributed is not None else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        if data.get("format") != FORMAT:
            raise ShardkitError("manifest.json is not a shardkit manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ShardkitError(f"manifest format version {data.get('format_version')} is not supported by shardkit {__version__}")
        return cls(config=data["config"], encoders=data["encoders"], resolution=data["resolution"],
                   buckets=data["buckets"], shards=[ShardEntry.from_json(s) for s in data["shards"]],
                   empty_plans=list(data.get("empty_plans", [])), status=data["status"],
                   records_read=data["records"]["read"], plan_skipped=list(data.get("plan_skipped", [])),
                   distributed=data.get("distributed"), sample_format=data.get("sample_format"),
                   source_fields=dict(data.get("source_fields", {})))


def declare_source_fields(declared: dict[str, list[str]], metadata: dict[str, Any]) -> None:
    """Add a sample's source metadata to ``declared`` (name -> the JSON types seen, sorted)."""
    for name, value in metadata.items():
        kinds = declared.setdefault(name, [])
        kind = json_type(value)
        if kind not in kinds:
            kinds.append(kind)
            kinds.sort()


def json_type(value: Any) -> str:
    """A value's JSON type name, as the manifest declares source fields."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _write_whole(output: Path | Storage, name: str, payload: bytes) -> None:
    """A local folder keeps temp file + fsync + rename; object storage takes the file as one whole object."""
    if isinstance(output, Path):
        atomic_write_bytes(output / name, payload)
    elif isinstance(output, LocalStorage):
        atomic_write_bytes(output.root / name, payload)
    else:
        output.write_atomic(name, payload)


def write_manifest(output: Path | Storage, manifest: Manifest, name: str = MANIFEST_NAME) -> None:
    payload = json.dumps(manifest.as_json(), indent=2, ensure_ascii=False, sort_keys=False) + "\n"
    _write_whole(output, name, payload.encode("utf-8"))


def write_failures(output: Path | Storage, manifest: Manifest, name: str = FAILURES_NAME) -> None:
    lines = [json.dumps(s, ensure_ascii=False, sort_keys=True) + "\n" for s in manifest.all_skips()]
    _write_whole(output, name, "".join(lines).encode("utf-8"))


def parse_manifest(payload: bytes, where: str) -> tuple[Manifest, dict[str, Any]]:
    """A manifest and its raw JSON from the bytes of manifest.json; ``where`` names it in errors."""
    try:
        raw = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise ShardkitError(f"{where} is not UTF-8 text; it is not a shardkit manifest") from None
    except json.JSONDecodeError as exc:
        raise ShardkitError(f"{where} is not valid JSON (line {exc.lineno}): the build may have been "
                            f"interrupted; rerun `shardkit build`") from None
    except RecursionError:
        raise ShardkitError(f"{where} holds JSON nested too deeply to read; it is not a shardkit manifest") from None
    if not isinstance(raw, dict):
        raise ShardkitError(f"{where} is not a shardkit manifest")
    try:
        return Manifest.from_json(raw), raw
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardkitError(f"{where} lacks or mangles field {exc}; it is not a complete shardkit manifest") from None


def read_manifest(location: Path) -> Manifest:
    """A manifest from OUTPUT or from the manifest file itself."""
    path = location / MANIFEST_NAME if location.is_dir() else location
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise ShardkitError(f"no {MANIFEST_NAME} at {location}; is it the OUTPUT folder of a `shardkit build`?") from None
    return parse_manifest(payload, str(path))[0]


def read_manifest_at(storage: Storage, name: str = MANIFEST_NAME) -> Manifest:
    """A manifest (or a rank's part) from OUTPUT, local or in object storage."""
    try:
        payload = storage.read_bytes(name)
    except FileNotFoundError:
        raise ShardkitError(f"no {name} in {storage.url}; is it the OUTPUT folder of a `shardkit build`?") from None
    return parse_manifest(payload, storage.url_of(name))[0]


# ---- a build opened for reading ----------------------------------------------------------

@dataclass
class ShardSet:
    """An OUTPUT folder (local path or URL) and its manifest, read through the storage layer."""

    url: str  # OUTPUT as given, without a trailing slash
    storage: Storage
    manifest: Manifest
    raw: dict[str, Any]  # manifest.json as stored: its totals are checked against the shards

    def url_of(self, relative: str) -> str:
        return f"{self.url}/{relative}"

    def open(self, relative: str) -> BinaryIO:
        return self.storage.open(relative)

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.config

    def samples(self, entry: ShardEntry) -> Iterator[TarSample]:
        """A shard's samples, streamed (stop early to read only the first few), every member's
        size bounded by the build's declared format."""
        bounds = member_bounds(self.manifest.declaration(), entry.bucket_hw)
        with self.open(entry.path) as fh:
            yield from iter_tar_samples(fh, max_bytes=bounds)


def open_shard_set(output: str, storage_options: dict[str, Any] | None = None, timeout: float | None = 60.0) -> ShardSet:
    """Read OUTPUT/manifest.json (OUTPUT is a path or an fsspec URL such as s3://bucket/prefix;
    ``storage_options`` go to fsspec, e.g. the endpoint of an S3-compatible store). Remote reads
    that stall end after ``timeout`` seconds."""
    url = str(output).rstrip("/") or str(output)
    if url.endswith("/" + MANIFEST_NAME):
        url = url[: -len(MANIFEST_NAME) - 1]
    storage = Storage.for_url(url, with_timeouts(url, storage_options, timeout))  # a stalled server raises, never hangs
    try:
        payload = storage.read_bytes(MANIFEST_NAME)
    except (FileNotFoundError, NotADirectoryError):
        raise ShardkitError(f"no {MANIFEST_NAME} in {output}; is it the OUTPUT folder of a `shardkit build`?") from None
    except ShardkitError:
        raise
    except Exception as exc:  # unreachable endpoint, no credentials, denied: one line, not a traceback
        if storage.is_local and isinstance(exc, OSError):
            raise ShardkitError(f"cannot read {url}/{MANIFEST_NAME}: {exc}") from None
        raise storage_error(f"{url}/{MANIFEST_NAME}", exc) from None
    manifest, raw = parse_manifest(payload, f"{url}/{MANIFEST_NAME}")
    return ShardSet(url=url, storage=storage, manifest=manifest, raw=raw)
