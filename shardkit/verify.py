"""Verify: every byte of a build read once and checked against its manifest and its declared
sample format.

Each shard streams once through the strict tar reader (``tario``) while every byte is hashed and
counted, so checksums, tar structure and every sample's content are checked on a single pass.
Findings have stable kinds (docs/inspect.md). ``check_shard`` is the same check one shard at a
time, sample by sample, for a caller that uses the samples as they pass (export).
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from .errors import ShardFormatError, ShardkitError, ShardTruncatedError
from .format import (KEY_PATTERN, all_finite, LATENT, METADATA, TEXT, SampleFormat, load_empty_caption,
                     member_bounds, metadata_problems, parse_metadata, read_npy)
from .manifest import FAILURES_NAME, ShardEntry, ShardSet
from .shards import TEMP_PREFIX
from .tario import TAR_INDEX_SUFFIX, TarMembers, tar_index_bytes

# Finding kinds: stable names a CI pipeline may match on (docs/inspect.md explains each).
SHA256_MISMATCH = "sha256_mismatch"
SIZE_MISMATCH = "size_mismatch"
MISSING_SHARD = "missing_shard"
UNLISTED_SHARD = "unlisted_shard"
UNREADABLE_SHARD = "unreadable_shard"
TRUNCATED_TAR = "truncated_tar"
UNREADABLE_MEMBER = "unreadable_member"
INCOMPLETE_SAMPLE = "incomplete_sample"
UNEXPECTED_MEMBER = "unexpected_member"
NON_ADJACENT_MEMBERS = "non_adjacent_members"
DUPLICATE_KEY = "duplicate_key"
DOTTED_KEY = "dotted_key"
INVALID_KEY = "invalid_key"
BAD_METADATA = "bad_metadata"
BUCKET_MISMATCH = "bucket_mismatch"
LATENT_SHAPE = "latent_shape"
T5_SHAPE = "t5_shape"
DTYPE = "dtype"
NON_FINITE = "non_finite"
NEGATIVE_STD = "negative_std"
COUNT_MISMATCH = "count_mismatch"
TOKEN_LENGTHS_MISMATCH = "token_lengths_mismatch"
OVERSIZED_MEMBER = "oversized_member"
BUILD_INCOMPLETE = "build_incomplete"
EMPTY_BUILD = "empty_build"
BAD_EMPTY_CAPTION = "bad_empty_caption"
# Warnings: worth knowing, no reason to distrust the set.
PARTIAL_SHARD = "partial_shard"
STALE_TAR_INDEX = "stale_tar_index"


@dataclass
class Finding:
    """One thing wrong (or worth a warning) in a shard set."""

    kind: str
    shard: str | None  # path relative to OUTPUT, None for set-wide findings
    key: str | None  # sample key, None for shard- or set-wide findings
    message: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)



# ---- reading shards ----------------------------------------------------------------------

_READ_CHUNK = 1 << 20


class _HashingReader:
    """The one pass over a shard: the tar reader reads through it while every byte is hashed and counted."""

    def __init__(self, fh: BinaryIO, on_bytes: Callable[[int], Any], digests: tuple[str, ...] = ()):
        self._fh = fh
        self._on_bytes = on_bytes
        self.sha256 = hashlib.sha256()
        self.digests = {name: hashlib.new(name) for name in digests}  # more than the manifest's sha256
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        if data:
            self.sha256.update(data)
            for digest in self.digests.values():
                digest.update(data)
            self.size += len(data)
            self._on_bytes(len(data))
        return data

    def drain(self) -> None:
        while self.read(_READ_CHUNK):
            pass


@dataclass
class MemberRun:
    """Adjacent tar members sharing a WebDataset key (the name up to the first dot of its basename)."""

    key: str
    offset: int  # of the run's first header in the tar
    members: list[tuple[str, bytes | None]] = field(default_factory=list)  # (name, payload); None: not a file


def webdataset_key(name: str) -> str:
    head, slash, base = name.rpartition("/")
    return head + slash + base.partition(".")[0]


def declared_key(run: MemberRun) -> str:
    """The key the sample's metadata member names (KEY.json); it differs from the run's key only
    when the key holds a dot."""
    for name, _ in run.members:
        if name.endswith(".json"):
            return name[: -len(".json")]
    return run.key


def _member_runs(tar: TarMembers, bounds: Callable[[str], int], oversized: Callable[[str, str], None]) -> Iterator[MemberRun]:
    """Runs of adjacent members; a run is yielded once the next one begins, so one cut short by a
    read error is never yielded. A member larger than its bound is reported and not read."""
    current: MemberRun | None = None
    while (member := tar.next()) is not None:
        key = webdataset_key(member.name)
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = MemberRun(key, member.offset)
        payload = None
        if member.regular:
            suffix = member.name.rpartition("/")[2].partition(".")[2].lower()
            if member.size > (limit := bounds(suffix)):
                oversized(key, f"{member.name} claims {member.size} bytes, more than the {limit} its build's "
                               f"format allows; it was not read")
                continue
            payload = bytes(tar.payload())
        current.members.append((member.name, payload))
    if current is not None:
        yield current


# ---- verification ------------------------------------------------------------------------

@dataclass
class _SampleResult:
    key: str
    findings: list[Finding]
    token_lengths: dict[str, int]  # caption field -> stored T5 length


class _SampleChecker:
    def __init__(self, fmt: SampleFormat):
        self.fmt = fmt

    def check(self, entry: ShardEntry, run: MemberRun) -> _SampleResult:
        key = declared_key(run)
        findings: list[Finding] = []

        def problem(kind: str, message: str) -> None:
            findings.append(Finding(kind, entry.path, key, message))

        if "." in key:
            problem(DOTTED_KEY, f"key {key!r} holds a dot: WebDataset cuts keys at the first dot and would read "
                                f"it as {run.key!r} with mixed-up members")
        elif not KEY_PATTERN.match(key):
            problem(INVALID_KEY, f"key {key!r} has characters outside [A-Za-z0-9_-]")

        members: dict[str, bytes] = {}
        for name, payload in run.members:
            if not name.startswith(key + "."):
                problem(UNEXPECTED_MEMBER, f"{name} sits inside sample {key} but belongs to another key")
                continue
            suffix = name[len(key) + 1:]
            if payload is None:
                problem(UNREADABLE_MEMBER, f"{name} is not a regular file in the tar")
            elif suffix in members:
                problem(UNEXPECTED_MEMBER, f"{name} appears twice in the sample")
            else:
                members[suffix] = payload

        meta = self._metadata(members, key, problem)
        t5_lengths: dict[str, int] = {}
        if meta is not None:
            t5_fields, t5_lengths = self._check_metadata(meta, entry, key, problem)
        else:
            t5_fields = [s[len("t5_"):-len(".npy")] for s in members if s.startswith("t5_") and s.endswith(".npy")]
        self._check_members(members, meta, t5_fields, key, problem)
        if "txt" in members:
            try:
                members["txt"].decode("utf-8")
            except UnicodeDecodeError as exc:
                problem(UNREADABLE_MEMBER, f"{key}.txt is not UTF-8 ({exc.reason} at byte {exc.start})")
        self._check_latent(members, entry, key, problem)
        stored = self._check_text(members, entry, t5_fields, t5_lengths, key, problem)
        return _SampleResult(key=key, findings=findings, token_lengths=stored)

    # ---- parts of one sample -------------------------------------------------------------
    @staticmethod
    def _metadata(members: dict[str, bytes], key: str, problem) -> dict | None:
        if METADATA not in members:
            return None
        try:
            return parse_metadata(members[METADATA], key)
        except ShardFormatError as exc:
            problem(UNREADABLE_MEMBER, str(exc))
            return None

    def _check_metadata(self, meta: dict, entry: ShardEntry, key: str, problem) -> tuple[list[str], dict[str, int]]:
        for message in metadata_problems(meta, key, self.fmt):
            problem(BAD_METADATA, message)
        if meta.get("bucket") != entry.bucket:
            problem(BUCKET_MISMATCH, f"the sample says bucket {meta.get('bucket')!r}, its shard holds bucket {entry.bucket!r}")
        t5_fields = meta.get("t5_fields")
        lengths = meta.get("t5_lengths")
        valid_fields = isinstance(t5_fields, list) and all(isinstance(f, str) for f in t5_fields)
        valid_lengths = isinstance(lengths, dict) and all(type(v) is int for v in lengths.values())
        return (t5_fields if valid_fields else []), (lengths if valid_lengths else {})

    def _check_members(self, members: dict[str, bytes], meta: dict | None, t5_fields: list[str], key: str, problem) -> None:
        primary = self.fmt.primary
        expected = {METADATA, TEXT, LATENT} | {name for f in dict.fromkeys([primary, *t5_fields])
                                               for name, _ in self.fmt.field_members(f)}
        if meta is not None and primary not in t5_fields:
            problem(INCOMPLETE_SAMPLE, f"the primary caption field {primary!r} is not in t5_fields {t5_fields}")
        if self.fmt.keep_images:
            image_ext = meta.get("image_ext") if meta is not None else None
            if meta is not None and not image_ext:
                problem(INCOMPLETE_SAMPLE, "the build keeps images but the metadata's image_ext is empty")
            elif image_ext:
                expected.add(str(image_ext))
        missing = sorted(expected - set(members))
        if missing:
            problem(INCOMPLETE_SAMPLE, "missing " + ", ".join(f"{key}.{suffix}" for suffix in missing))
        if meta is not None:
            extra = sorted(set(members) - expected)
            if extra:
                problem(UNEXPECTED_MEMBER, "unexpected " + ", ".join(f"{key}.{suffix}" for suffix in extra))

    @staticmethod
    def _load(members: dict[str, bytes], suffix: str, key: str, problem) -> np.ndarray | None:
        if suffix not in members:
            return None
        try:
            return read_npy(members[suffix], f"{key}.{suffix}")  # the header checked before anything is loaded
        except ShardFormatError as exc:
            problem(UNREADABLE_MEMBER, f"{key}.{suffix} is not a readable .npy array ({exc})")
            return None

    def _check_values(self, array: np.ndarray, what: str, problem) -> None:
        if array.dtype != np.dtype(self.fmt.store_dtype):
            problem(DTYPE, f"{what} is {array.dtype}, the build stores {self.fmt.store_dtype}")
        if array.dtype.kind not in "fc" or all_finite(array):
            return
        nan = int(np.count_nonzero(np.isnan(array)))
        inf = int(np.count_nonzero(np.isinf(array)))
        if nan or inf:
            first = np.unravel_index(int(np.flatnonzero(~np.isfinite(array))[0]), array.shape)
            problem(NON_FINITE, f"{what} holds {nan} NaN and {inf} Inf values (first at index {list(map(int, first))})")

    def _check_latent(self, members: dict[str, bytes], entry: ShardEntry, key: str, problem) -> None:
        latent = self._load(members, "latent.npy", key, problem)
        if latent is None:
            return
        channels = self.fmt.params["C"]
        height, width = entry.bucket_hw
        spec = self.fmt.spec(LATENT)
        expected = tuple(low for low, _ in self.fmt.shape_rule(spec, entry.bucket_hw))
        if latent.shape != expected:
            what = f"mean and std of {channels} channels" if spec.shape[0] == "2*C" else f"{channels} channels"
            problem(LATENT_SHAPE, f"latent is {list(latent.shape)}, bucket {entry.bucket} ({height}x{width}) "
                                  f"needs {list(expected)} ({what})")
        self._check_values(latent, "latent", problem)
        if latent.dtype.kind == "f" and latent.ndim == 3 and latent.shape[0] == 2 * channels:
            negative = int(np.count_nonzero(latent[channels:] < 0))
            if negative:
                problem(NEGATIVE_STD, f"the std half of the latent (channels {channels}-{2 * channels - 1}) "
                                      f"holds {negative} negative values")

    def _check_text(self, members: dict[str, bytes], entry: ShardEntry, t5_fields: list[str],
                    t5_lengths: dict[str, int], key: str, problem) -> dict[str, int]:
        """Each caption field's arrays against the declaration's shape rules; returns the stored
        T5 lengths (the manifest's token histogram; pipeline builds keep none)."""
        stored: dict[str, int] = {}
        for name in dict.fromkeys([self.fmt.primary, *t5_fields]):
            for position, (member, spec) in enumerate(self.fmt.field_members(name)):
                features = self._load(members, member, key, problem)
                if features is None:
                    continue
                what = member[:-len(".npy")]
                bounds = self.fmt.shape_rule(spec, entry.bucket_hw)
                if features.ndim != len(bounds) or not all(low <= d <= high for d, (low, high)
                                                           in zip(features.shape, bounds)):
                    rule = ", ".join(str(low) if low == high else f"{low}..{high}" for low, high in bounds)
                    problem(T5_SHAPE, f"{what} is {list(features.shape)}, needs [{rule}]")
                elif position == 0 and name in t5_lengths and t5_lengths[name] != features.shape[0]:
                    problem(T5_SHAPE, f"{what} has {features.shape[0]} rows, the metadata's t5_lengths says "
                                      f"{t5_lengths[name]}")
                elif position == 0 and self.fmt.pipeline is None:
                    stored[name] = int(features.shape[0])
                self._check_values(features, what, problem)
        return stored


@dataclass
class ShardCheck:
    path: str
    bucket: str
    samples: int  # distinct sample keys read
    bytes: int
    keys: list[str]
    sample_offsets: list[int] = field(default_factory=list)  # each sample's first header, then the tar's end
    digests: dict[str, str] = field(default_factory=dict)  # hex digests asked for beside the sha256


@dataclass
class Verification:
    shards_checked: int
    samples_checked: int
    bytes_read: int
    seconds: float
    findings: list[Finding]
    warnings: list[Finding]
    samples_per_bucket: dict[str, int]  # as read from the shards

    @property
    def sound(self) -> bool:
        return not self.findings

    def kinds(self) -> set[str]:
        return {f.kind for f in self.findings}


@dataclass
class _ShardResult:
    """One shard's verification, made on a worker thread and merged in shard order."""

    check: ShardCheck | None
    findings: list[Finding]


@dataclass
class CheckedSample:
    key: str
    members: dict[str, bytes]  # suffix -> payload
    findings: list[Finding]


class ShardCheckRun:
    """One shard read once and checked: ``samples()`` yields each sample with its findings as it
    passes; once it is exhausted, ``findings`` holds every finding of the shard (its samples',
    its tar's, its checksum, size and count against the manifest) and ``check`` what it holds."""

    def __init__(self, shard_set: ShardSet, checker: _SampleChecker, entry: ShardEntry,
                 on_bytes: Callable[[int], Any] = lambda count: None, digests: tuple[str, ...] = ()):
        self.shard_set, self.checker, self.entry, self.on_bytes = shard_set, checker, entry, on_bytes
        self.digests = digests
        self.sample_offsets: list[int] = []
        self.findings: list[Finding] = []
        self.check: ShardCheck | None = None

    def _problem(self, kind: str, key: str | None, message: str) -> None:
        self.findings.append(Finding(kind, self.entry.path, key, message))

    def samples(self) -> Iterator[CheckedSample]:
        entry, problem = self.entry, self._problem
        expected_hw = self.shard_set.manifest.buckets.get(entry.bucket)
        if expected_hw is not None and list(expected_hw) != list(entry.bucket_hw):
            problem(BUCKET_MISMATCH, None, f"the manifest lists bucket {entry.bucket} as {entry.bucket_hw}, "
                                           f"its bucket table says {expected_hw}")
        keys: list[str] = []
        lengths: dict[str, Counter] = {}
        before = len(self.findings)
        read_whole = False
        try:
            with self.shard_set.open(entry.path) as fh:
                reader = _HashingReader(fh, self.on_bytes, self.digests)
                try:
                    read_whole = yield from self._read_tar(reader, keys, lengths)
                finally:
                    reader.drain()
        except FileNotFoundError:
            problem(MISSING_SHARD, None, "listed in the manifest but gone when read")
            return
        except OSError as exc:
            problem(UNREADABLE_SHARD, None, f"cannot read the file: {exc}")
            return
        stated = {name: {str(k): int(v) for k, v in hist.items()} for name, hist in entry.token_lengths.items()}
        observed = {name: {str(k): v for k, v in counter.items()} for name, counter in lengths.items()}
        # Only a shard whose samples all read cleanly can be compared; other findings already name the damage.
        if read_whole and len(self.findings) == before and stated and stated != observed:
            problem(TOKEN_LENGTHS_MISMATCH, None, "the T5 lengths stored in the shard differ from the "
                                                  "manifest's token_lengths histogram for this shard")
        if reader.size != entry.bytes:
            problem(SIZE_MISMATCH, None, f"the file is {reader.size} bytes, the manifest says {entry.bytes}")
        digest = reader.sha256.hexdigest()
        if digest != entry.sha256:
            problem(SHA256_MISMATCH, None, f"sha256 is {digest}, the manifest says {entry.sha256}")
        if len(keys) != entry.samples:
            problem(COUNT_MISMATCH, None, f"holds {len(keys)} samples, the manifest says {entry.samples}")
        self.check = ShardCheck(path=entry.path, bucket=entry.bucket, samples=len(keys), bytes=reader.size, keys=keys,
                                sample_offsets=self.sample_offsets if read_whole else [],
                                digests={name: digest.hexdigest() for name, digest in reader.digests.items()})

    def _read_tar(self, reader: _HashingReader, keys: list[str], lengths: dict[str, Counter]):
        """Check every sample on the single streaming pass; returns True if the tar read to its proper end."""
        problem = self._problem
        seen: set[str] = set()
        bounds = member_bounds(self.checker.fmt, self.entry.bucket_hw)
        tar = TarMembers(reader)
        try:
            for run in _member_runs(tar, bounds, lambda key, message: problem(OVERSIZED_MEMBER, key, message)):
                result = self.checker.check(self.entry, run)
                self.findings.extend(result.findings)
                if result.key in seen:
                    problem(NON_ADJACENT_MEMBERS, result.key, "members of this key are split by another sample's: "
                                                              "WebDataset would read them as separate, incomplete samples")
                    continue
                seen.add(result.key)
                keys.append(result.key)
                self.sample_offsets.append(run.offset)
                for name, length in result.token_lengths.items():
                    lengths.setdefault(name, Counter())[str(length)] += 1
                members = {name[len(result.key) + 1:]: payload for name, payload in run.members
                           if payload is not None and name.startswith(result.key + ".")}
                yield CheckedSample(result.key, members, result.findings)
        except ShardTruncatedError as exc:
            problem(TRUNCATED_TAR, None, f"after {len(keys)} whole samples: {exc}")
            return False
        except ShardFormatError as exc:
            problem(UNREADABLE_MEMBER, None, f"not a readable tar after {len(keys)} samples: {exc}")
            return False
        self.sample_offsets.append(tar.end)
        return True


class _Verifier:
    def __init__(self, shard_set: ShardSet, progress: bool, allow_incomplete: bool, jobs: int):
        self.shard_set = shard_set
        self.manifest = shard_set.manifest
        try:
            self.fmt = shard_set.manifest.declaration()
        except ShardkitError as exc:
            raise ShardkitError(f"{exc}; the build cannot be verified") from None
        self.checker = _SampleChecker(self.fmt)
        self.progress = progress
        self.jobs = jobs
        # An interrupted build is resumable, not broken: with allow_incomplete its unfinished state is
        # a warning, and only damage to what it has written is a problem.
        self.incomplete_ok = allow_incomplete and shard_set.manifest.status != "complete"
        self.findings: list[Finding] = []
        self.warnings: list[Finding] = []
        self.key_owner: dict[str, str] = {}  # key -> the shard it was first seen in
        self.tar_indexes: dict[str, int] = {}  # shard -> size of the NAME.tar.idx beside it (shardkit index)

    def problem(self, kind: str, shard: str | None, key: str | None, message: str) -> None:
        self.findings.append(Finding(kind, shard, key, message))

    def run(self) -> Verification:
        from tqdm import tqdm

        start = time.perf_counter()
        manifest = self.manifest
        if manifest.status != "complete":
            message = (f"the manifest's status is {manifest.status!r}: the build has not finished, so shards are "
                       f"still to come; rerun `shardkit build`")
            if self.incomplete_ok:
                self.warnings.append(Finding(BUILD_INCOMPLETE, None, None, message))
            else:
                self.problem(BUILD_INCOMPLETE, None, None, message)
        elif not manifest.shards:
            self.problem(EMPTY_BUILD, None, None, f"the build holds no samples: every record was skipped (reasons in "
                                                  f"{FAILURES_NAME}); fix the source or the options and rebuild")
        self._check_empty_captions()
        on_disk = self._list_shard_folder()
        entries = sorted(manifest.shards, key=lambda e: e.path)
        checks: list[ShardCheck] = []
        bar_lock = threading.Lock()
        with tqdm(total=sum(e.bytes for e in entries), unit="B", unit_scale=True, unit_divisor=1024,
                  desc="verify", disable=not self.progress, dynamic_ncols=True) as bar, \
                futures.ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="shardkit-verify") as pool:
            def on_bytes(count: int) -> None:
                with bar_lock:
                    bar.update(count)

            # Shards are read and checked on `jobs` threads (hashing, decompression and numpy let go
            # of the GIL; object storage reads wait on the network); results merge in shard order,
            # so the report does not depend on the thread count.
            results = pool.map(lambda entry: self._verify_shard(entry, on_bytes),
                               [entry for entry in entries if entry.path in on_disk])
            for entry in entries:
                if entry.path not in on_disk:
                    self.problem(MISSING_SHARD, entry.path, None, "listed in the manifest but not in the shard folder")
                    on_bytes(entry.bytes)
                    continue
                result = next(results)
                self.findings.extend(result.findings)
                if result.check is not None:
                    self._check_keys_across_shards(result.check)
                    checks.append(result.check)
        self._check_counts(checks)
        return Verification(shards_checked=len(checks), samples_checked=sum(c.samples for c in checks),
                            bytes_read=sum(c.bytes for c in checks), seconds=time.perf_counter() - start,
                            findings=self.findings, warnings=self.warnings,
                            samples_per_bucket=self._per_bucket(checks))

    def _list_shard_folder(self) -> set[str]:
        """Shard files present (relative to OUTPUT); reports unlisted ones and leftover temp files."""
        listed = {e.path for e in self.manifest.shards}
        present = set()
        for name, size in sorted(self.shard_set.storage.list_sizes("shards").items()):
            relative = "shards/" + name
            if relative.endswith(TAR_INDEX_SUFFIX) and relative[:-len(TAR_INDEX_SUFFIX)] in listed and size is not None:
                self.tar_indexes[relative[:-len(TAR_INDEX_SUFFIX)]] = size  # checked with its shard
            elif size is None:
                self.problem(UNLISTED_SHARD, relative, None, "a folder inside shards/, which holds only shard files")
            elif name.startswith(TEMP_PREFIX):
                self.warnings.append(Finding(PARTIAL_SHARD, relative, None, "temporary file of an interrupted or running "
                                             "build; the next `shardkit build` of OUTPUT removes it"))
            elif relative not in listed and self.incomplete_ok:
                self.warnings.append(Finding(UNLISTED_SHARD, relative, None, "completed after the last manifest update "
                                             "of an unfinished build; the next `shardkit build` of OUTPUT rewrites it"))
            elif relative not in listed:
                self.problem(UNLISTED_SHARD, relative, None, "in the shard folder but not listed in the manifest: "
                                                             "a reader globbing shards/*.tar would train on it")
            else:
                present.add(relative)
        return present

    def _check_empty_captions(self) -> None:
        """The empty caption's stored encoding: there, no bigger than its shape needs, and matching
        the declared sha256, dtype and shape, with finite values."""
        for declared in self.fmt.empty_captions.values():
            try:
                size = self.shard_set.storage.size(declared.path)
                if size is None:
                    raise ShardFormatError("it is missing")
                if size > declared.max_bytes:
                    raise ShardFormatError(f"it is {size} bytes, more than its declared shape needs")
                load_empty_caption(declared, self.shard_set.storage.read_bytes(declared.path), self.fmt)
            except (OSError, ShardFormatError) as exc:
                self.problem(BAD_EMPTY_CAPTION, declared.path, None, f"the empty caption's {declared.encoder} "
                                                                     f"encoding: {exc}; run the same `shardkit build` "
                                                                     f"again to write it anew")

    def _check_keys_across_shards(self, check: ShardCheck) -> None:
        for key in check.keys:
            owner = self.key_owner.setdefault(key, check.path)
            if owner != check.path:
                self.problem(DUPLICATE_KEY, check.path, key, f"the same key is already in {owner}")

    def _verify_shard(self, entry: ShardEntry, on_bytes) -> _ShardResult:
        """One shard on its own (a worker thread): its findings are collected, not recorded."""
        run = ShardCheckRun(self.shard_set, self.checker, entry, on_bytes)
        for _ in run.samples():
            pass
        if entry.path in self.tar_indexes and run.check is not None and run.check.sample_offsets:
            self._check_tar_index(entry.path, run)
        return _ShardResult(run.check, run.findings)

    def _check_tar_index(self, path: str, run: ShardCheckRun) -> None:
        """A NAME.tar.idx beside a shard must hold exactly that shard's sample offsets, or a loader
        using it (Megatron-Energon) would read samples from the wrong bytes."""
        index_path = path + TAR_INDEX_SUFFIX
        expected = tar_index_bytes(run.check.sample_offsets)
        if self.tar_indexes[path] != len(expected):
            stale = True  # not read: its size already says it does not describe this shard
        else:
            stale = self.shard_set.storage.read_bytes(index_path) != expected
        if stale:
            run.findings.append(Finding(STALE_TAR_INDEX, index_path, None, "the sample offsets it holds are not those "
                                        "of the shard beside it; run `shardkit index OUTPUT --format energon` again"))

    def _per_bucket(self, checks: list[ShardCheck]) -> dict[str, int]:
        counts: Counter = Counter()
        for entry in self.manifest.shards:
            counts[entry.bucket] += 0
        for check in checks:
            counts[check.bucket] += check.samples
        return {k: counts[k] for k in sorted(counts, key=float)}

    def _check_counts(self, checks: list[ShardCheck]) -> None:
        """The manifest's totals against what the shards really hold."""
        totals = self.shard_set.raw.get("totals") or self.manifest.totals()
        stated = {key: int(info.get("samples", 0)) for key, info in totals.get("per_bucket", {}).items()}
        real = self._per_bucket(checks)
        bucket_mismatch = False
        for bucket in sorted(set(stated) | set(real), key=float):
            if stated.get(bucket, 0) != real.get(bucket, 0):
                bucket_mismatch = True
                self.problem(COUNT_MISMATCH, None, None, f"bucket {bucket}: its shards hold {real.get(bucket, 0)} "
                                                         f"samples, the manifest's totals say {stated.get(bucket, 0)}")
        real_total = sum(real.values())
        if not bucket_mismatch and int(totals.get("samples", real_total)) != real_total:
            self.problem(COUNT_MISMATCH, None, None, f"the shards hold {real_total} samples, the manifest's totals "
                                                     f"say {totals.get('samples')}")


# Shards verified at once: enough to overlap object-storage reads and use a few cores for hashing.
DEFAULT_VERIFY_JOBS = 4


def verify(shard_set: ShardSet, progress: bool = False, allow_incomplete: bool = False,
           jobs: int = DEFAULT_VERIFY_JOBS) -> Verification:
    """Read every shard end to end once and check it against the manifest and the shard format,
    ``jobs`` shards at a time."""
    return _Verifier(shard_set, progress, allow_incomplete, jobs).run()




def check_shard(shard_set: ShardSet, entry: ShardEntry, digests: tuple[str, ...] = ()) -> ShardCheckRun:
    """One shard checked as ``verify`` checks it, sample by sample (see ``ShardCheckRun``);
    ``digests`` names hashlib digests of the whole file to compute on the same pass."""
    try:
        fmt = shard_set.manifest.declaration()
    except ShardkitError as exc:
        raise ShardkitError(f"{exc}; the build cannot be verified") from None
    return ShardCheckRun(shard_set, _SampleChecker(fmt), entry, digests=digests)
