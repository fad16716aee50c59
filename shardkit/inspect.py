"""Inspect stage: what a shard set holds, and whether every byte of it is sound.

The summary reads only ``manifest.json``. Verification streams each shard once: tarfile reads
it in stream mode through a wrapper that hashes and counts the same bytes, so checksums,
tar structure and every sample's content are all checked on a single pass. Every file is
opened through fsspec, so OUTPUT may be a local folder or a URL.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import io
import json
import logging
import tarfile
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import fsspec
import numpy as np

from .config import STORE_NUMPY_DTYPES
from .errors import ShardkitError
from .manifest import FAILURES_NAME, MANIFEST_NAME, Manifest, ShardEntry, parse_manifest
from .report import human_bytes
from .shards import KEY_PATTERN, TEMP_PREFIX

log = logging.getLogger(__name__)

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
BUILD_INCOMPLETE = "build_incomplete"
EMPTY_BUILD = "empty_build"
# Warnings: worth knowing, no reason to distrust the set.
PARTIAL_SHARD = "partial_shard"

# The VAEs shardkit encodes with (SDXL's and the tiny test model) downsample by 8.
# Manifests that predate the recorded downsample factor were all made with 8x VAEs.
DEFAULT_VAE_DOWNSAMPLE = 8
_BLOCK = tarfile.BLOCKSIZE
_READ_CHUNK = 1 << 20  # tarfile pulls the stream in chunks of this size


@dataclass
class Finding:
    """One thing wrong (or worth a warning) in a shard set."""

    kind: str
    shard: str | None  # path relative to OUTPUT, None for set-wide findings
    key: str | None  # sample key, None for shard- or set-wide findings
    message: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


# ---- opening a shard set through fsspec --------------------------------------------------

@dataclass
class ShardSet:
    """An OUTPUT folder (local path or URL) and its manifest."""

    url: str  # OUTPUT as given, without a trailing slash
    fs: Any  # the fsspec filesystem behind url
    root: str  # url in the filesystem's own path form
    manifest: Manifest
    raw: dict[str, Any]  # manifest.json as stored: its totals are checked against the shards

    def url_of(self, relative: str) -> str:
        return f"{self.url}/{relative}"

    def open(self, relative: str):
        # Through the filesystem object, so endpoint and credential options apply to every read.
        return self.fs.open(f"{self.root}/{relative}", "rb")

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.config


def open_shard_set(output: str, storage_options: dict[str, Any] | None = None) -> ShardSet:
    """Read OUTPUT/manifest.json (OUTPUT is a path or an fsspec URL such as s3://bucket/prefix).

    ``storage_options`` go to fsspec (e.g. the endpoint of an S3-compatible store).
    """
    url = str(output).rstrip("/") or str(output)
    if url.endswith("/" + MANIFEST_NAME):
        url = url[: -len(MANIFEST_NAME) - 1]
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError) as exc:
        raise ShardkitError(f"cannot open {output}: {exc}; pass a local folder or a URL fsspec knows "
                            f"(install s3fs for s3://)") from None
    manifest_url = f"{url}/{MANIFEST_NAME}"
    try:
        with fs.open(f"{root.rstrip('/')}/{MANIFEST_NAME}", "rb") as fh:
            payload = fh.read()
    except FileNotFoundError:
        raise ShardkitError(f"no {MANIFEST_NAME} in {output}; is it the OUTPUT folder of a `shardkit build`?") from None
    except OSError as exc:
        raise ShardkitError(f"cannot read {manifest_url}: {exc}") from None
    manifest, raw = parse_manifest(payload, manifest_url)
    return ShardSet(url=url, fs=fs, root=root.rstrip("/"), manifest=manifest, raw=raw)


# ---- summary (manifest only) -------------------------------------------------------------

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


# ---- reading shards ----------------------------------------------------------------------

class _HashingReader:
    """The one pass over a shard: tarfile reads through it while every byte is hashed and counted.

    It keeps the last few chunks read, so the end-of-archive blocks that tarfile consumes
    without reporting can be checked afterwards.
    """

    def __init__(self, fh, on_bytes: Callable[[int], Any]):
        self._fh = fh
        self._on_bytes = on_bytes
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._recent: deque[tuple[int, bytes]] = deque()
        self._recent_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        if data:
            self.sha256.update(data)
            self._recent.append((self.size, data))
            self._recent_bytes += len(data)
            while self._recent_bytes - len(self._recent[0][1]) >= 2 * _READ_CHUNK + 4 * _BLOCK:
                self._recent_bytes -= len(self._recent.popleft()[1])
            self.size += len(data)
            self._on_bytes(len(data))
        return data

    def read_until(self, end: int) -> None:
        while self.size < end and self.read(_READ_CHUNK):
            pass

    def drain(self) -> None:
        while self.read(_READ_CHUNK):
            pass

    def bytes_at(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) if still held (shorter where the file ends first)."""
        if not self._recent or offset < self._recent[0][0]:
            return b""
        joined = b"".join(chunk for _, chunk in self._recent)
        start = offset - self._recent[0][0]
        return joined[start:start + length]


@dataclass
class MemberRun:
    """Adjacent tar members sharing a WebDataset key (the name up to the first dot of its basename)."""

    key: str
    members: list[tuple[str, bytes | None]] = field(default_factory=list)  # (name, payload); None: not a file


def webdataset_key(name: str) -> str:
    head, slash, base = name.rpartition("/")
    return head + slash + base.partition(".")[0]


def iter_member_runs(tar: tarfile.TarFile) -> Iterator[MemberRun]:
    """Runs of a tar opened in stream mode; a run is yielded once the next one begins, so one
    cut short by a read error is never yielded."""
    current: MemberRun | None = None
    for member in tar:
        payload = tar.extractfile(member).read() if member.isfile() else None
        key = webdataset_key(member.name)
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = MemberRun(key)
        current.members.append((member.name, payload))
    if current is not None:
        yield current


def declared_key(run: MemberRun) -> str:
    """The key the sample's metadata member names (KEY.json); it differs from the run's key only
    when the key holds a dot."""
    for name, _ in run.members:
        if name.endswith(".json"):
            return name[: -len(".json")]
    return run.key


def iter_samples(shard_set: ShardSet, entry: ShardEntry) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: payload}) per sample of a shard, streamed: stop early to read only the first few."""
    with shard_set.open(entry.path) as fh:
        with tarfile.open(fileobj=fh, mode="r|", bufsize=_READ_CHUNK) as tar:
            for run in iter_member_runs(tar):
                key = declared_key(run)
                members = {name[len(key) + 1:]: payload for name, payload in run.members
                           if payload is not None and name.startswith(key + ".")}
                yield key, members


# ---- verification ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Expectations:
    """What every sample must look like, from the manifest's config and encoder identities."""

    captions: tuple[str, ...]
    keep_images: bool
    store_dtype: np.dtype
    latent_channels: int
    downsample: int
    hidden_size: int
    max_length: int

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "_Expectations":
        config, encoders = manifest.config, manifest.encoders
        try:
            store = config["store_dtype"]
            if store not in STORE_NUMPY_DTYPES:
                raise ShardkitError(f"manifest store_dtype {store!r} is not one of {sorted(STORE_NUMPY_DTYPES)}")
            return cls(captions=tuple(config["captions"]), keep_images=bool(config["keep_images"]),
                       store_dtype=STORE_NUMPY_DTYPES[store], latent_channels=int(encoders["vae"]["latent_channels"]),
                       downsample=int(encoders["vae"].get("downsample_factor") or DEFAULT_VAE_DOWNSAMPLE),
                       hidden_size=int(encoders["t5"]["hidden_size"]),
                       max_length=int(config.get("max_length") or encoders["t5"]["max_length"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardkitError(f"the manifest lacks {exc} in its config or encoders; it cannot be verified") from None

    @property
    def primary(self) -> str:
        return self.captions[0]


# IEEE exponent bits per float width: all of them set means NaN or Inf. Testing the bits is
# many times faster than np.isfinite on fp16, which numpy computes through float32.
_EXPONENT_MASKS = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000), 8: (np.uint64, 0x7FF0000000000000)}


def _all_finite(array: np.ndarray) -> bool:
    if array.dtype.kind != "f" or not array.dtype.isnative or array.dtype.itemsize not in _EXPONENT_MASKS:
        return bool(np.isfinite(array).all())
    bits_type, mask = _EXPONENT_MASKS[array.dtype.itemsize]
    bits = np.ascontiguousarray(array).view(bits_type)
    return not np.any((bits & bits_type(mask)) == bits_type(mask))


@dataclass
class _SampleResult:
    key: str
    findings: list[Finding]
    token_lengths: dict[str, int]  # caption field -> stored T5 length


class _SampleChecker:
    def __init__(self, expect: _Expectations):
        self.expect = expect

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
        stored = self._check_t5(members, t5_fields, t5_lengths, key, problem)
        return _SampleResult(key=key, findings=findings, token_lengths=stored)

    # ---- parts of one sample -------------------------------------------------------------
    @staticmethod
    def _metadata(members: dict[str, bytes], key: str, problem) -> dict | None:
        if "json" not in members:
            return None
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem(UNREADABLE_MEMBER, f"{key}.json is not valid JSON ({exc})")
            return None
        if not isinstance(meta, dict):
            problem(UNREADABLE_MEMBER, f"{key}.json holds a {type(meta).__name__}, not an object")
            return None
        return meta

    def _check_metadata(self, meta: dict, entry: ShardEntry, key: str, problem) -> tuple[list[str], dict[str, int]]:
        if meta.get("key") != key:
            problem(BAD_METADATA, f"{key}.json names key {meta.get('key')!r}")
        if meta.get("bucket") != entry.bucket:
            problem(BUCKET_MISMATCH, f"the sample says bucket {meta.get('bucket')!r}, its shard holds bucket {entry.bucket!r}")
        t5_fields = meta.get("t5_fields")
        if not isinstance(t5_fields, list) or not all(isinstance(f, str) for f in t5_fields):
            problem(BAD_METADATA, f"{key}.json t5_fields is {t5_fields!r}, not a list of caption fields")
            t5_fields = []
        unknown = [f for f in t5_fields if f not in self.expect.captions]
        if unknown:
            problem(BAD_METADATA, f"t5_fields lists {unknown}, not caption fields of this build ({list(self.expect.captions)})")
        lengths = meta.get("t5_lengths")
        if not isinstance(lengths, dict) or not all(isinstance(v, int) for v in lengths.values()):
            problem(BAD_METADATA, f"{key}.json t5_lengths is {lengths!r}, not a map of field to token count")
            lengths = {}
        for name in t5_fields:
            if name not in lengths:
                problem(BAD_METADATA, f"{key}.json has no t5_lengths entry for {name!r}")
        return t5_fields, lengths

    def _check_members(self, members: dict[str, bytes], meta: dict | None, t5_fields: list[str], key: str, problem) -> None:
        primary = self.expect.primary
        expected = {"json", "txt", "latent.npy", f"t5_{primary}.npy"} | {f"t5_{f}.npy" for f in t5_fields}
        if meta is not None and primary not in t5_fields:
            problem(INCOMPLETE_SAMPLE, f"the primary caption field {primary!r} is not in t5_fields {t5_fields}")
        if self.expect.keep_images:
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
            return np.load(io.BytesIO(members[suffix]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            problem(UNREADABLE_MEMBER, f"{key}.{suffix} is not a readable .npy array ({exc})")
            return None

    def _check_values(self, array: np.ndarray, what: str, problem) -> None:
        if array.dtype != self.expect.store_dtype:
            problem(DTYPE, f"{what} is {array.dtype}, the build stores {self.expect.store_dtype}")
        if array.dtype.kind not in "fc" or _all_finite(array):
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
        channels = self.expect.latent_channels
        height, width = entry.bucket_hw
        expected = (2 * channels, height // self.expect.downsample, width // self.expect.downsample)
        if latent.shape != expected:
            problem(LATENT_SHAPE, f"latent is {list(latent.shape)}, bucket {entry.bucket} ({height}x{width}) "
                                  f"needs {list(expected)} (mean and std of {channels} channels)")
        self._check_values(latent, "latent", problem)
        if latent.dtype.kind == "f" and latent.ndim == 3 and latent.shape[0] == 2 * channels:
            negative = int(np.count_nonzero(latent[channels:] < 0))
            if negative:
                problem(NEGATIVE_STD, f"the std half of the latent (channels {channels}-{2 * channels - 1}) "
                                      f"holds {negative} negative values")

    def _check_t5(self, members: dict[str, bytes], t5_fields: list[str], t5_lengths: dict[str, int],
                  key: str, problem) -> dict[str, int]:
        stored: dict[str, int] = {}
        hidden, max_length = self.expect.hidden_size, self.expect.max_length
        for name in dict.fromkeys([self.expect.primary, *t5_fields]):
            features = self._load(members, f"t5_{name}.npy", key, problem)
            if features is None:
                continue
            what = f"t5_{name}"
            if features.ndim != 2 or features.shape[1] != hidden or not 1 <= features.shape[0] <= max_length:
                problem(T5_SHAPE, f"{what} is {list(features.shape)}, needs [L, {hidden}] with 1 <= L <= {max_length}")
            elif name in t5_lengths and t5_lengths[name] != features.shape[0]:
                problem(T5_SHAPE, f"{what} has {features.shape[0]} tokens, the metadata's t5_lengths says {t5_lengths[name]}")
            else:
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


class _Verifier:
    def __init__(self, shard_set: ShardSet, progress: bool, allow_incomplete: bool, jobs: int):
        self.shard_set = shard_set
        self.manifest = shard_set.manifest
        self.checker = _SampleChecker(_Expectations.from_manifest(shard_set.manifest))
        self.progress = progress
        self.jobs = jobs
        # An interrupted build is resumable, not broken: with allow_incomplete its unfinished state is
        # a warning, and only damage to what it has written is a problem.
        self.incomplete_ok = allow_incomplete and shard_set.manifest.status != "complete"
        self.findings: list[Finding] = []
        self.warnings: list[Finding] = []
        self.key_owner: dict[str, str] = {}  # key -> the shard it was first seen in

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
        fs, root = self.shard_set.fs, self.shard_set.root
        listed = {e.path for e in self.manifest.shards}
        try:
            infos = fs.ls(f"{root}/shards", detail=True)
        except FileNotFoundError:
            return set()
        present = set()
        for info in infos:
            name = info["name"].rstrip("/")
            relative = "shards/" + name.rsplit("/", 1)[-1]
            if info.get("type") == "directory":
                self.problem(UNLISTED_SHARD, relative, None, "a folder inside shards/, which holds only shard files")
            elif relative.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
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

    def _check_keys_across_shards(self, check: ShardCheck) -> None:
        for key in check.keys:
            owner = self.key_owner.setdefault(key, check.path)
            if owner != check.path:
                self.problem(DUPLICATE_KEY, check.path, key, f"the same key is already in {owner}")

    def _verify_shard(self, entry: ShardEntry, on_bytes) -> _ShardResult:
        """One shard on its own (a worker thread): its findings are collected, not recorded."""
        path = entry.path
        found: list[Finding] = []

        def problem(kind: str, key: str | None, message: str) -> None:
            found.append(Finding(kind, path, key, message))

        expected_hw = self.manifest.buckets.get(entry.bucket)
        if expected_hw is not None and list(expected_hw) != list(entry.bucket_hw):
            problem(BUCKET_MISMATCH, None, f"the manifest lists bucket {entry.bucket} as {entry.bucket_hw}, "
                                           f"its bucket table says {expected_hw}")
        keys_in_order: list[str] = []
        lengths: dict[str, Counter] = {}
        findings_before = len(found)
        read_whole = False
        try:
            with self.shard_set.open(path) as fh:
                reader = _HashingReader(fh, on_bytes)
                try:
                    read_whole = self._read_tar(entry, reader, keys_in_order, lengths, found, problem)
                finally:
                    reader.drain()
        except FileNotFoundError:
            problem(MISSING_SHARD, None, "listed in the manifest but gone when read")
            return _ShardResult(None, found)
        except OSError as exc:
            problem(UNREADABLE_SHARD, None, f"cannot read the file: {exc}")
            return _ShardResult(None, found)
        stated = {name: {str(k): int(v) for k, v in hist.items()} for name, hist in entry.token_lengths.items()}
        observed = {name: {str(k): v for k, v in counter.items()} for name, counter in lengths.items()}
        # Only a shard whose samples all read cleanly can be compared; other findings already name the damage.
        if read_whole and len(found) == findings_before and stated and stated != observed:
            problem(TOKEN_LENGTHS_MISMATCH, None, "the T5 lengths stored in the shard differ from the "
                                                  "manifest's token_lengths histogram for this shard")
        if reader.size != entry.bytes:
            problem(SIZE_MISMATCH, None, f"the file is {reader.size} bytes, the manifest says {entry.bytes}")
        digest = reader.sha256.hexdigest()
        if digest != entry.sha256:
            problem(SHA256_MISMATCH, None, f"sha256 is {digest}, the manifest says {entry.sha256}")
        if len(keys_in_order) != entry.samples:
            problem(COUNT_MISMATCH, None, f"holds {len(keys_in_order)} samples, the manifest says {entry.samples}")
        check = ShardCheck(path=path, bucket=entry.bucket, samples=len(keys_in_order), bytes=reader.size, keys=keys_in_order)
        return _ShardResult(check, found)

    def _read_tar(self, entry: ShardEntry, reader: _HashingReader, keys_in_order: list[str],
                  lengths: dict[str, Counter], found: list[Finding], problem) -> bool:
        """Check every sample on the single streaming pass; True if the tar read to its proper end."""
        seen_here: set[str] = set()
        try:
            tar = tarfile.open(fileobj=reader, mode="r|", bufsize=_READ_CHUNK)
            for run in iter_member_runs(tar):
                result = self.checker.check(entry, run)
                found.extend(result.findings)
                key = result.key
                if key in seen_here:
                    problem(NON_ADJACENT_MEMBERS, key, "members of this key are split by another sample's: "
                                                       "WebDataset would read them as separate, incomplete samples")
                    continue
                seen_here.add(key)
                keys_in_order.append(key)
                for name, length in result.token_lengths.items():
                    lengths.setdefault(name, Counter())[str(length)] += 1
        except tarfile.ReadError as exc:
            if str(exc) in ("unexpected end of data", "empty file"):
                problem(TRUNCATED_TAR, None, f"the tar ends inside a member after {len(keys_in_order)} "
                                             f"whole samples ({exc}): the file was cut short")
            else:
                problem(UNREADABLE_MEMBER, None, f"not a readable tar after {len(keys_in_order)} samples: {exc}")
            return False
        except tarfile.TarError as exc:
            problem(UNREADABLE_MEMBER, None, f"tar error after {len(keys_in_order)} samples: {exc}")
            return False
        # tarfile ends its iteration quietly at a damaged header or at the end of the data;
        # a sound tar ends with two zero blocks where iteration stopped.
        end = tar.offset
        reader.read_until(end + 2 * _BLOCK)
        marker = reader.bytes_at(end, 2 * _BLOCK)
        if len(marker) < 2 * _BLOCK:
            problem(TRUNCATED_TAR, None, f"the tar stops at byte {end + len(marker)} without its "
                                         f"end-of-archive blocks: the file was cut short")
            return False
        if marker.strip(b"\0"):
            problem(UNREADABLE_MEMBER, None, f"the tar header at byte {end} is damaged: the members "
                                             f"after it cannot be read")
            return False
        return True

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


# ---- the report --------------------------------------------------------------------------

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
                   storage_options: dict[str, Any] | None = None, jobs: int | None = None) -> InspectReport:
    """The whole `shardkit inspect`: summary from the manifest, then the optional verification and preview."""
    shard_set = open_shard_set(output, storage_options)
    report = InspectReport(summary=summarize(shard_set))
    if verify_shards:
        report.verification = verify(shard_set, progress=progress, allow_incomplete=allow_incomplete,
                                     jobs=jobs or DEFAULT_VERIFY_JOBS)
    if preview:
        from .preview import render_preview

        report.preview = render_preview(shard_set, preview, thumbs_per_bucket=thumbs_per_bucket,
                                        decode_with=decode_with, decode_subfolder=decode_subfolder)
    return report


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


def format_report(report: InspectReport) -> str:
    s = report.summary
    config = s.config
    lines = [
        f"{s.output}: shardkit build, status {s.status} (written by shardkit {s.shardkit_version})",
        f"  {s.samples} samples in {s.shards} shards, {human_bytes(s.bytes)}, {len(s.buckets)} buckets; "
        f"{s.records_read} records read, {s.records_skipped} skipped"
        + ("" if s.status == "complete" else " so far (unfinished: rerun `shardkit build` to resume)"),
        f"  resolution {s.resolution}, resize {config.get('resize_mode')}, captions {', '.join(config.get('captions', []))}, "
        f"max_length {config.get('max_length')}, stored as {config.get('store_dtype')}, "
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
