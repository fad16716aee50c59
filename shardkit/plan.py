"""Planning stage: records -> validated, bucketed, tokenised -> deterministic shard plans.

Width and height are known before any pixel is decoded (metadata or image header), so each
record's bucket is too. Records join an open plan for their bucket; a plan closes when it
reaches the sample or byte limit, and the rest close at the end of the stream. The plans
depend only on the input order and the config, so each shard is an idempotent unit of work:
a rerun produces the same plans, and a resume skips the ones already written.

What planning needs from storage (the image's size in bytes, its header when the metadata has
no width/height) is looked up by ``look_up_image`` — for object storage on worker threads a
window ahead of the planner, since each lookup is a network round trip.
"""

from __future__ import annotations

import concurrent.futures as futures
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .buckets import Bucket, BucketTable
from .config import DEFAULT_CAPTIONS, BuildConfig
from .digest_index import DigestIndex, digest_of
from .errors import SourceError
from .filters import parse_filter
from .images import ImageHeader, ImageSkip, file_size, header_from_bytes, image_file_bytes, read_header
from .lookahead import bounded_map
from .manifest import declare_source_fields
from .sourcefiles import PATH_OUTSIDE_ROOT
from .sources import IMAGE_EXTENSIONS, MISSING_IMAGE, Record, image_digest
from .storage import RemotePath

DUPLICATE_PATH = "duplicate_path"
DUPLICATE_KEY = "duplicate_key"
EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
INVALID_CAPTION = "invalid_caption"
DUPLICATE_IMAGE = "duplicate_image"

# Records read to check the caption fields against the source before any encoder loads.
CAPTION_CHECK_RECORDS = 1000
# Tar framing per member (header block + worst-case padding) and a generous JSON/text allowance,
# so that the byte limit is an upper bound on the shard's real size.
_TAR_MEMBER_OVERHEAD = 1024
_METADATA_ALLOWANCE = 2048
_NPY_HEADER = 128
_TAR_END = 10240
# Lookups in flight per lookup thread: enough to hide round trips without holding many records.
_LOOKAHEAD_PER_THREAD = 4


@dataclass
class Skip:
    """A record that will not be written, and why: a line of failures.jsonl."""

    index: int
    path: str
    reason: str
    detail: str

    def as_json(self) -> dict:
        return {"index": self.index, "source": self.path, "reason": self.reason, "detail": self.detail}


@dataclass
class PlannedRecord:
    record: Record
    key: str
    bucket: Bucket
    captions: dict[str, str]  # the caption fields to encode, validated
    # int32 arrays, not lists of Python ints: open plans hold these for up to
    # buckets x shard_max_count records, and a list costs ~9x the memory.
    token_ids: dict[str, np.ndarray]
    expected_hw: tuple[int, int] | None  # from the metadata, checked against the decoded image
    planned_bytes: int

    @property
    def source_metadata(self) -> dict:
        """The source's own fields, for the sample's metadata record (captions are there already)."""
        return {k: v for k, v in self.record.metadata.items() if k not in self.captions}


@dataclass
class ShardPlan:
    bucket: Bucket
    index: int  # per bucket, in order of closing
    records: list[PlannedRecord] = field(default_factory=list)
    planned_bytes: int = _TAR_END

    @property
    def name(self) -> str:
        return f"shards/{self.bucket.tag}-{self.index:05d}.tar"


@dataclass
class ImageFacts:
    """What storage says of a record's image before it is decoded."""

    file_bytes: int | None = None  # None: not needed, or not found (the decode stage records the miss)
    header: ImageHeader | None = None  # read only when the metadata gives no width/height
    header_skip: ImageSkip | None = None  # the header could not be read: the record's skip
    digest: bytes | None = None  # --dedup: the image bytes' digest (None: the bytes could not be read)


@dataclass(frozen=True)
class ReadLimits:
    """What a build lets the image stage read: pixels, bytes, and whether links may leave the root."""

    max_pixels: int
    max_bytes: int
    follow_symlinks_outside_root: bool = False

    @classmethod
    def of(cls, config: BuildConfig) -> "ReadLimits":
        return cls(config.max_image_pixels, config.image_byte_limit(), config.follow_symlinks_outside_root)

    def root_of(self, record: Record) -> Path | RemotePath | None:
        """The folder a record's image must really lie in; None when links may lead anywhere."""
        return None if self.follow_symlinks_outside_root else record.image_root


def look_up_image(record: Record, keep_images: bool, limits: ReadLimits, dedup: bool = False) -> ImageFacts:
    """The image's header (if the metadata lacks its size) and its size in bytes (if images are kept).

    A header read's remote storage errors other than a missing file propagate (SourceUnavailable):
    they say nothing about the record, so the build stops resumably instead of skipping it. The
    size lookup maps errors the same way: a missing or unreadable file leaves the size unknown and
    the decode stage records the skip, but a failed request never leaves a kept image's bytes out
    of the shard's byte bound.
    """
    facts = ImageFacts()
    if record.escapes_root or record.source_problem is not None:
        return facts  # skipped without touching storage
    if dedup and not record.embedded:
        # --dedup reads the whole file anyway: its header and size come from that one read.
        try:
            data = image_file_bytes(record.location, limits.max_bytes, limits.root_of(record))
        except ImageSkip as exc:
            if record.width is None or record.height is None:
                facts.header_skip = exc
            return facts  # with a size from the metadata, the decode stage records the skip
        facts.digest = image_digest(data)
        return _facts_from_bytes(facts, data, str(record.location), record, limits.max_pixels)
    if record.embedded:
        # The bytes are in memory: the header costs no I/O.
        if record.image_bytes is not None:
            facts.digest = image_digest(record.image_bytes) if dedup and record.image_bytes else None
            _facts_from_bytes(facts, record.image_bytes, record.path, record, limits.max_pixels)
        return facts
    if record.width is None or record.height is None:
        try:
            facts.header = read_header(record.location, limits.max_pixels, need_size=keep_images,
                                       max_bytes=limits.max_bytes, root=limits.root_of(record))
        except ImageSkip as exc:
            facts.header_skip = exc
            return facts
        facts.file_bytes = facts.header.file_bytes
    if keep_images and facts.file_bytes is None:
        try:
            facts.file_bytes = file_size(record.location)
        except ImageSkip:
            pass  # the decode stage meets the same problem and records the skip
    return facts


def _facts_from_bytes(facts: ImageFacts, data: bytes, where: str, record: Record, max_pixels: int) -> ImageFacts:
    facts.file_bytes = len(data)
    if record.width is None or record.height is None:
        try:
            facts.header = header_from_bytes(data, where, max_pixels)
        except ImageSkip as exc:
            facts.header_skip = exc
    return facts


@dataclass
class PlanStats:
    records_read: int = 0
    planned: int = 0
    skips: list[Skip] = field(default_factory=list)
    # The planned records' source metadata fields and their JSON types, declared in the manifest.
    source_fields: dict[str, list[str]] = field(default_factory=dict)


class Planner:
    """Records -> shard plans.

    ``lookup_threads``: how many threads look images up (``look_up_image``) ahead of the planner,
    in order; 0 looks them up inline (local files: a stat or a header read is cheap).
    ``on_skip`` is told of each record the planner skips (the build's progress bar).
    """

    def __init__(self, config: BuildConfig, table: BucketTable, tokenize: Callable[[str], list[int]],
                 latent_shape: Callable[[int, int], tuple[int, int, int]], hidden_size: int,
                 lookup_threads: int = 0,
                 on_skip: Callable[[Skip], None] | None = None,
                 caption_bytes: Callable[[np.ndarray], int] | None = None):
        self.config = config
        self.table = table
        self.tokenize = tokenize
        self.latent_shape = latent_shape
        self.hidden_size = hidden_size
        self.feature_itemsize = 2 if config.store_dtype == "fp16" else 4
        self.lookup_threads = lookup_threads
        self.on_skip = on_skip
        # Bytes one caption field takes in the tar; default: its T5 rows.
        self.caption_bytes = caption_bytes or (lambda ids: len(ids) * self.hidden_size * self.feature_itemsize
                                               + _NPY_HEADER + _TAR_MEMBER_OVERHEAD)
        self.stats = PlanStats()
        self.filters = [parse_filter(text) for text in config.filters]
        # Compact digests, not strings: these grow with the source (see digest_index.py).
        self._seen_paths = DigestIndex()
        self._seen_keys = DigestIndex()
        self._seen_images = DigestIndex()  # --dedup: image bytes -> the first record planned with them

    @property
    def index_bytes(self) -> int:
        """Memory of the tables that grow with the source (paths, keys, --dedup's images)."""
        return sum(index.nbytes for index in (self._seen_paths, self._seen_keys, self._seen_images))

    def plan(self, records: Iterable[Record]) -> Iterator[ShardPlan]:
        """Yield shard plans as they close; the stats hold every record's fate."""
        open_plans: dict[str, ShardPlan] = {}
        closed_per_bucket: dict[str, int] = {}
        for record, facts in self._looked_up(records):
            self.stats.records_read += 1
            planned = self._plan_record(record, facts)
            # The plan keeps source indices only (a shard's writer reads its records again): the
            # image bytes a tar or table held are not kept for the shards still open.
            record.image_bytes = None
            if isinstance(planned, Skip):
                self.stats.skips.append(planned)
                if self.on_skip is not None:
                    self.on_skip(planned)
                continue
            self.stats.planned += 1
            declare_source_fields(self.stats.source_fields, planned.source_metadata)
            bucket = planned.bucket
            plan = open_plans.get(bucket.key)
            if plan is not None and plan.records and plan.planned_bytes + planned.planned_bytes > self.config.shard_max_bytes:
                yield plan
                plan = None
            if plan is None:
                plan = ShardPlan(bucket=bucket, index=closed_per_bucket.get(bucket.key, 0))
                closed_per_bucket[bucket.key] = plan.index + 1
                open_plans[bucket.key] = plan
            plan.records.append(planned)
            plan.planned_bytes += planned.planned_bytes
            if len(plan.records) >= self.config.shard_max_count:
                yield plan
                del open_plans[bucket.key]
        # Whatever is left closes in bucket-table order, so the tail is deterministic too.
        for bucket in self.table.buckets:
            plan = open_plans.get(bucket.key)
            if plan is not None and plan.records:
                yield plan

    def _looked_up(self, records: Iterable[Record]) -> Iterator[tuple[Record, ImageFacts]]:
        keep_images, limits, dedup = self.config.keep_images, ReadLimits.of(self.config), self.config.dedup

        def look_up(record: Record) -> ImageFacts:
            return look_up_image(record, keep_images, limits, dedup)

        tagged = ((record, record) for record in records)
        if self.lookup_threads <= 0:
            yield from bounded_map(look_up, tagged, None, 1)
            return
        threads = futures.ThreadPoolExecutor(self.lookup_threads, thread_name_prefix="shardkit-lookup")
        try:
            yield from bounded_map(look_up, tagged, threads, _LOOKAHEAD_PER_THREAD * self.lookup_threads)
        finally:
            threads.shutdown(wait=False, cancel_futures=True)

    def _plan_record(self, record: Record, facts: ImageFacts) -> PlannedRecord | Skip:
        def skip(reason: str, detail: str) -> Skip:
            return Skip(record.index, record.path, reason, detail)

        if record.source_problem is not None:
            return skip(*record.source_problem)
        if record.escapes_root:
            return skip(PATH_OUTSIDE_ROOT, f"path {record.path!r} leaves the image root")
        norm = record.normalized_path
        if self._seen_paths.first_or_add(digest_of(norm), record.index) is not None:
            return skip(DUPLICATE_PATH, f"path {record.path!r} was already read earlier in the source")
        if record.refused_caption is not None:
            return skip(*record.refused_caption)
        key = record.key
        key_digest = digest_of(key)
        if self._seen_keys.first(key_digest) is not None:
            return skip(DUPLICATE_KEY, f"key {key} of {record.path!r} collides with an earlier record")
        if record.embedded and record.image_bytes is None:
            return skip(MISSING_IMAGE, f"{record.path} has no image bytes in the source (a failed download?)")
        for expression in self.filters:
            if not expression.holds(record.metadata):
                return skip(expression.reason, _filter_detail(expression, record))

        captions = self._captions(record)
        if isinstance(captions, tuple):
            return skip(*captions)

        expected_hw = None
        if record.width is not None and record.height is not None:
            width, height = record.width, record.height
            expected_hw = (height, width)
            if width * height > self.config.max_image_pixels:
                return skip("too_many_pixels", f"metadata says {width}x{height}, over the limit of {self.config.max_image_pixels} pixels")
        elif facts.header_skip is not None:
            return skip(facts.header_skip.reason, facts.header_skip.detail)
        else:
            width, height = facts.header.width, facts.header.height

        if min(width, height) < self.config.min_image_size:
            return skip(f"filtered: --min-image-size {self.config.min_image_size}",
                        f"{width}x{height} (WxH): the shorter side is under {self.config.min_image_size} pixels")
        ratio = height / width
        if max(ratio, 1.0 / ratio) > self.config.max_ratio:
            return skip(EXTREME_ASPECT_RATIO, f"{width}x{height} (WxH) has aspect {ratio:.3f}, beyond --max-ratio {self.config.max_ratio}")
        if self.config.dedup and facts.digest is not None:
            # The first record planned with these bytes keeps them: a duplicate of a skipped record is not lost.
            first = self._seen_images.first_or_add(facts.digest, record.index)
            if first is not None:
                return skip(DUPLICATE_IMAGE, f"image bytes equal those of record {first}, the first with them")

        self._seen_keys.first_or_add(key_digest, record.index)
        bucket = self.table.closest(height, width)
        token_ids = self._token_ids(captions)
        return PlannedRecord(record=record, key=key, bucket=bucket, captions=captions, token_ids=token_ids,
                             expected_hw=expected_hw,
                             planned_bytes=self._planned_bytes(record, facts, bucket, token_ids))

    def replan(self, record: Record, bucket: Bucket) -> PlannedRecord:
        """A record the plan already placed in ``bucket``, made ready to encode again from SOURCE:
        no lookup, no check (planning made them), the same captions and token ids."""
        captions = self._captions(record)
        assert isinstance(captions, dict), "a planned record lost its caption"
        token_ids = self._token_ids(captions)
        expected_hw = (record.height, record.width) if record.width is not None and record.height is not None else None
        return PlannedRecord(record=record, key=record.key, bucket=bucket, captions=captions, token_ids=token_ids,
                             expected_hw=expected_hw, planned_bytes=0)

    def _token_ids(self, captions: dict[str, str]) -> dict[str, np.ndarray]:
        return {name: np.asarray(self.tokenize(text), dtype=np.int32) for name, text in captions.items()}

    def _captions(self, record: Record) -> dict[str, str] | tuple[str, str]:
        """The caption fields to encode: the first configured field is required, the rest optional."""
        primary, *optional = self.config.captions
        chosen: dict[str, str] = {}
        if primary not in record.captions:
            if record.caption_file is not None:
                return MISSING_CAPTION, f"{record.caption_file} is missing (the image's same-stem caption file)"
            return MISSING_CAPTION, f"no {primary!r} caption"
        value = record.captions[primary]
        if not isinstance(value, str):
            return INVALID_CAPTION, f"{primary!r} caption is {type(value).__name__}, not text"
        if not value.strip():
            if self.config.empty_caption == "skip":
                return EMPTY_CAPTION, f"{primary!r} caption is empty or whitespace"
            value = ""
        chosen[primary] = value
        for name in optional:
            extra = record.captions.get(name)
            # Optional fields are encoded where present and non-empty (PixArt's sharegpt4v rule).
            if isinstance(extra, str) and extra.strip():
                chosen[name] = extra
        return chosen

    def _planned_bytes(self, record: Record, facts: ImageFacts, bucket: Bucket,
                       token_ids: dict[str, np.ndarray]) -> int:
        """An upper bound of the sample's bytes in the tar."""
        size = _METADATA_ALLOWANCE + 2 * _TAR_MEMBER_OVERHEAD
        size += sum(len(t.encode("utf-8")) for t in record.captions.values() if isinstance(t, str))
        if record.metadata:
            size += len(json.dumps(record.metadata, ensure_ascii=False).encode("utf-8"))
        if self.config.keep_images and facts.file_bytes is not None:
            size += facts.file_bytes + _TAR_MEMBER_OVERHEAD
        latent = math.prod(self.latent_shape(bucket.height, bucket.width)) * self.feature_itemsize
        size += latent + _NPY_HEADER + _TAR_MEMBER_OVERHEAD
        for ids in token_ids.values():
            size += self.caption_bytes(ids)
        return size


def check_caption_fields(records: Iterable[Record], captions: tuple[str, ...], source: str) -> None:
    """Stop before any encoding when the caption fields cannot match the source.

    The first field must be in some record; so must every other field that is not one of the
    default optional ones (a misspelt ``sharegtp4v`` would otherwise be silently left out). A
    large source is checked against its first ``CAPTION_CHECK_RECORDS`` records.
    """
    primary, *optional = captions
    seen = []
    for record in itertools.islice(records, CAPTION_CHECK_RECORDS):
        record.image_bytes = None  # only captions are checked: a tar's or table's images need not stay in memory
        seen.append(record)
    if not seen:
        raise SourceError(f"{source} holds no records (a folder source needs images ending in "
                          f"{', '.join(IMAGE_EXTENSIONS)}); check SOURCE")
    where = (f"in {source}" if len(seen) < CAPTION_CHECK_RECORDS else
             f"in the first {len(seen)} records of {source} (a large source is checked against its first records)")
    folder_record = next((record for record in seen if record.caption_file is not None), None)
    if folder_record is not None:
        if not any(primary in record.captions for record in seen):
            raise SourceError(f"no image {where} has a caption file: each image needs a same-stem .txt beside it "
                              f"(e.g. {folder_record.caption_file} for {folder_record.path})")
        named = [name for name in optional if name not in DEFAULT_CAPTIONS]
        if named:
            raise SourceError(f"a folder source has one caption per image (its .txt, read as {primary!r}); "
                              f"drop {', '.join(map(repr, named))} from --captions")
        return
    fields = sorted({name for record in seen for name in record.captions})
    found = f"fields there: {', '.join(fields)}" if fields else "no caption fields there at all"
    if not any(primary in record.captions for record in seen):
        raise SourceError(f"no record {where} has a {primary!r} caption field ({found}); "
                          f"put the field holding the captions first in --captions")
    for name in optional:
        if name not in DEFAULT_CAPTIONS and not any(name in record.captions for record in seen):
            raise SourceError(f"no record {where} has a {name!r} caption field ({found}); "
                              f"fix its name in --captions or leave it out")


def _filter_detail(expression, record: Record) -> str:
    """What the filter read: the values of its fields (or that the record lacks them)."""
    shown = ", ".join(f"{name}={record.metadata[name]!r}" if record.metadata.get(name) is not None else f"no {name}"
                      for name in sorted(expression.fields()))
    return f"{shown}: does not satisfy {expression.text}"
