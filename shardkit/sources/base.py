"""What every source kind yields: Records, their keys, and the spec that names a source."""

from __future__ import annotations

import datetime
import decimal
import hashlib
import math
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..format import DEFAULT_MAX_IMAGE_PIXELS, image_bound
from ..storage import RemotePath

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Skip reasons a source itself reports (the record exists, its content does not).
MISSING_IMAGE = "missing_image"
DAMAGED_SHARD = "damaged_shard"
INVALID_METADATA = "invalid_metadata"

# A caption (a caption file, a tar's caption member) is read up to this size: T5 keeps a few
# hundred tokens of it, and a larger "caption" is a mistake or an attack on memory.
CAPTION_MAX_BYTES = 1024 * 1024
CAPTION_LIMIT = f"captions are read up to {CAPTION_MAX_BYTES} bytes"
# Metadata nested deeper than this (a tar's json member, a table's struct and list columns) is
# refused: what a trainer filters on is flat, and deep nesting only costs recursion downstream.
MAX_METADATA_DEPTH = 32

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_STEM_CHARS = 64

Location = Path | RemotePath


@dataclass
class Record:
    """One image-caption pair as the source describes it."""

    index: int  # position in the source, for messages and failures.jsonl
    # Where the image is: a path relative to ``image_root``, or for an image held in the source
    # itself (``embedded``) the sample's name there (``00000.tar/KEY``, ``part-0.parquet#12``).
    path: str
    image_root: Location | None
    captions: dict[str, Any]  # raw caption values: validated in plan.py
    width: int | None = None  # from the metadata; None means "read the image header"
    height: int | None = None
    # Folder sources: the same-stem .txt the first caption field is read from (relative path).
    caption_file: str | None = None
    # (reason, detail) when the caption file was refused (not a regular file, too large, outside the root).
    refused_caption: tuple[str, str] | None = None
    # The source's own per-sample metadata (img2dataset's url, sha256, aesthetic, ...), JSON values,
    # carried into the sample's metadata record and what --filter expressions read.
    metadata: dict[str, Any] = field(default_factory=dict)
    embedded: bool = False  # the image bytes come from the source (a tar member, a Parquet cell)
    image_bytes: bytes | None = None  # embedded: the bytes, None when the source has none
    source_key: str | None = None  # the source's own key for the sample, made readable in ours
    # (reason, detail) when the source could not give this record whole: a skip before anything else.
    source_problem: tuple[str, str] | None = None

    @property
    def normalized_path(self) -> str:
        if self.embedded:
            return self.path
        return posixpath.normpath(self.path.replace("\\", "/"))

    @property
    def escapes_root(self) -> bool:
        if self.embedded:
            return False
        norm = self.normalized_path
        return posixpath.isabs(norm) or norm == ".." or norm.startswith("../")

    @property
    def location(self) -> Location:
        return self.image_root / self.normalized_path

    @property
    def key(self) -> str:
        return make_key(self.normalized_path, self.source_key)


def make_key(identity: str, readable: str | None = None) -> str:
    """A WebDataset key: stable, unique per identity, no dots or slashes (the key ends at the first dot).

    The readable part is ``readable`` (the source's own key) or the identity's path without its
    extension; a 64-bit hash of the identity keeps keys unique when sanitising or truncation makes
    two samples look alike.
    """
    stem = readable if readable is not None else posixpath.splitext(identity)[0]
    shown = _UNSAFE_KEY_CHARS.sub("_", stem).strip("_")[:_KEY_STEM_CHARS] or "image"
    digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
    return f"{shown}-{digest}"


def image_digest(data: bytes) -> bytes:
    """What --dedup compares: 16 bytes of blake2b over the image file's bytes."""
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "pixart" | "jsonl" | "folder" | "webdataset" | "parquet" | "hf"
    metadata: Location | None
    image_root: Location | None
    # webdataset / parquet / hf: the files read, in order (tar shards, Parquet or Arrow files).
    files: tuple[Location, ...] = ()
    image_column: str | None = None  # parquet / hf: the column named by --image-column
    # webdataset / parquet / hf: the most bytes an image member or cell may hold (--max-image-bytes).
    max_image_bytes: int = image_bound(DEFAULT_MAX_IMAGE_PIXELS)

    def describe(self) -> str:
        if self.kind == "hf" or not self.files:
            return f"{self.kind} source at {self.metadata or self.image_root}"
        more = f" and {len(self.files) - 1} more files" if len(self.files) > 1 else ""
        return f"{self.kind} source at {self.files[0]}{more}"


def nested_too_deep(value: Any, limit: int = MAX_METADATA_DEPTH) -> bool:
    """Whether lists and objects nest more than ``limit`` levels in ``value`` (walked without recursion)."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, (list, tuple)):
            if depth >= limit:
                return True
            pending.extend((child, depth + 1) for child in item)
    return False


def too_deep_problem(where: str) -> tuple[str, str]:
    return INVALID_METADATA, f"{where} nests lists or objects more than {MAX_METADATA_DEPTH} levels deep"


def json_value(value: Any) -> tuple[bool, Any]:
    """(usable, value) of a source value as JSON: bytes are not metadata, dates become ISO text,
    non-finite floats null (JSON has no NaN)."""
    if value is None or isinstance(value, (bool, int, str)):
        return True, value
    if isinstance(value, float):
        return True, value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return False, None
    if isinstance(value, decimal.Decimal):
        return True, float(value)
    if isinstance(value, (datetime.date, datetime.time, datetime.datetime)):
        return True, value.isoformat()
    if isinstance(value, datetime.timedelta):
        return True, value.total_seconds()
    if isinstance(value, dict):
        items = {str(k): json_value(v) for k, v in value.items()}
        return True, {k: v for k, (ok, v) in items.items() if ok}
    if isinstance(value, (list, tuple)):
        return True, [v for ok, v in map(json_value, value) if ok]
    return True, str(value)
