"""The shard store: a build opened from anywhere, and its shards read as samples.

A build is a folder (local path or URL prefix), its ``manifest.json``, or a list / brace
pattern of shard URLs (scanned once to count samples). Shards are read through the storage
layer with its one retry rule (``storage.Retry``, ``storage.is_transient``), an optional
download cache checked against the manifest's sha256, member sizes bounded by the build's
declared sample format, and one policy for a shard that stays unreadable: raise, or skip it
with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

from ..errors import ShardFormatError, ShardIntegrityError, ShardkitError, ShardReadError
import numpy as np

from ..format import EmptyCaption, SampleFormat, load_empty_caption, member_bounds, parse_metadata, safe_relative_path
from ..manifest import MANIFEST_NAME, Manifest, parse_manifest
from ..storage import Retry, is_transient, is_url, join_url, local_path, open_read, read_url_bytes
from ..tario import TarSample, iter_tar_samples
from .epoch import ShardInfo

log = logging.getLogger(__name__)

ERROR_POLICIES = ("skip", "raise")
_COPY_CHUNK = 1 << 20


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class BuildInfo:
    """What the reader knows of the build (None where it read shards without their manifest)."""

    resolution: int | None
    max_length: int | None
    caption_fields: tuple[str, ...]
    latent_channels: int | None
    caption_channels: int | None
    scaling_factor: float | None
    store_dtype: str | None
    complete: bool
    sample_format: SampleFormat | None = None

    @property
    def pipeline(self) -> dict | None:
        """A --pipeline build's pipeline identity (class, family, latents, text settings); else None."""
        return self.sample_format.pipeline if self.sample_format is not None else None

    @property
    def family(self) -> str | None:
        return self.pipeline["family"] if self.pipeline is not None else None

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "BuildInfo":
        vae = manifest.encoders.get("vae", {})
        t5 = manifest.encoders.get("t5", {})
        try:
            declared: SampleFormat | None = manifest.declaration()
        except ShardkitError:  # a manifest too sparse to derive it from: arrays get the fixed bound
            declared = None
        return cls(resolution=manifest.resolution, max_length=manifest.config.get("max_length"),
                   caption_fields=tuple(manifest.config.get("captions") or ()),
                   latent_channels=vae.get("latent_channels"), caption_channels=t5.get("hidden_size"),
                   scaling_factor=vae.get("scaling_factor"), store_dtype=manifest.config.get("store_dtype"),
                   complete=manifest.status == "complete", sample_format=declared)


@dataclass
class ReaderStats:
    """Counts of one reader object (with DataLoader workers, each worker keeps its own)."""

    shards_read: int = 0
    shards_failed: int = 0
    failed_shards: list[str] = field(default_factory=list)  # "URL: error"
    retries: int = 0
    samples: int = 0
    batches: int = 0
    filled_batches: int = 0  # batches repeated to keep ranks equal after a shard was lost


@dataclass
class ShardStore:
    """Reads shards and manifests from local disk or fsspec URLs: timeouts, the storage layer's
    retry rule (``retries`` more attempts, ``retry_backoff * 2**n`` seconds with jitter), an
    optional download cache, member sizes bounded by ``sample_format``, and one policy for
    shards that stay unreadable."""

    storage_options: dict[str, Any] | None = None
    timeout: float | None = 60.0
    retries: int = 3
    retry_backoff: float = 1.0
    cache_dir: str | os.PathLike | None = None
    on_error: str = "raise"
    sample_format: SampleFormat | None = None
    stats: ReaderStats = field(default_factory=ReaderStats)

    def __post_init__(self) -> None:
        if self.on_error not in ERROR_POLICIES:
            raise ShardkitError(f"on_error must be one of {ERROR_POLICIES}, got {self.on_error!r}")
        if self.retries < 0 or self.retry_backoff < 0:
            raise ShardkitError("retries and retry_backoff must be >= 0")
        if self.timeout is not None and self.timeout <= 0:
            raise ShardkitError(f"timeout must be positive seconds or None, got {self.timeout}")

    # -- retries -----------------------------------------------------------------------------
    @property
    def retry(self) -> Retry:
        return Retry(self.retries, self.retry_backoff)

    def _before_retry(self, url: str) -> Callable[[int, BaseException, float], None]:
        def note(attempt: int, exc: BaseException, delay: float) -> None:
            self.stats.retries += 1
            log.warning("reading %s failed (%s); retry %d of %d in %.1fs", url, describe(exc), attempt, self.retries, delay)
            self._forget_cached(url)

        return note

    def _give_up(self, url: str, exc: BaseException) -> None:
        """The bad-shard policy: raise a clear error, or warn, count and carry on."""
        if self.on_error == "raise":
            raise ShardReadError(f"cannot read shard {url}: {describe(exc)}; check or rebuild the shard, "
                                 f"or pass on_error='skip' to train without it") from exc
        self.stats.shards_failed += 1
        self.stats.failed_shards.append(f"{url}: {describe(exc)}")
        log.warning("skipping shard %s: %s", url, describe(exc))

    # -- bytes -------------------------------------------------------------------------------
    def read_bytes(self, url: str) -> bytes:
        return self.retry.run(lambda: read_url_bytes(url, self.storage_options, self.timeout),
                              lambda exc: is_transient(exc, url), self._before_retry(url))

    def _cache_path(self, url: str) -> Path:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(url.rstrip("/"))) or "shard"
        return Path(self.cache_dir) / f"{hashlib.sha256(url.encode('utf-8')).hexdigest()[:16]}-{name}"

    def _forget_cached(self, url: str) -> None:
        if self.cache_dir is not None and is_url(url):
            self._cache_path(url).unlink(missing_ok=True)

    def _cached_copy(self, shard: ShardInfo) -> Path:
        """The shard downloaded once into ``cache_dir`` (checked against its manifest sha256 when
        known) and reused while its size matches."""
        path = self._cache_path(shard.url)
        if path.is_file() and (shard.size is None or path.stat().st_size == shard.size):
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.part")
        digest = hashlib.sha256()
        try:
            with open_read(shard.url, self.storage_options, self.timeout) as src, open(temp, "wb") as dst:
                while chunk := src.read(_COPY_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    if shard.size is not None and dst.tell() > shard.size:
                        raise ShardIntegrityError(f"the download is longer than the {shard.size} bytes "
                                                  f"the manifest records")
            if shard.sha256 and digest.hexdigest() != shard.sha256:
                raise ShardIntegrityError(f"downloaded bytes have sha256 {digest.hexdigest()[:12]}..., "
                                          f"the manifest says {shard.sha256[:12]}...")
            os.replace(temp, path)  # atomic: other workers see the whole file or none
        finally:
            temp.unlink(missing_ok=True)
        return path

    def open_shard(self, shard: ShardInfo) -> BinaryIO:
        if self.cache_dir is not None and is_url(shard.url):
            return open(self._cached_copy(shard), "rb")
        return open_read(shard.url, self.storage_options, self.timeout)

    # -- samples -----------------------------------------------------------------------------
    def samples(self, shard: ShardInfo, start: int = 0, stop: int | None = None,
                want: Callable[[str, str], bool] | None = None,
                decode: Callable[[TarSample], Any] | None = None, map_payloads: bool = False,
                sample_format: SampleFormat | None = None) -> Iterator[Any]:
        """Samples ``start`` .. ``stop - 1`` of a shard (all of them when ``stop`` is None),
        decoded by ``decode`` (``want``, ``map_payloads``: see ``tario.iter_tar_samples``). A
        transient failure reopens the shard and resumes after the last sample delivered; a shard
        that stays unreadable follows ``on_error``. Member sizes are bounded by ``sample_format``
        (default: the store's)."""
        delivered = 0
        attempt = 0
        bounds = member_bounds(sample_format or self.sample_format, shard.bucket_hw)
        while True:
            try:
                with self.open_shard(shard) as fileobj:
                    for raw in iter_tar_samples(fileobj, start + delivered, stop, want, map_payloads, bounds):
                        item = decode(raw) if decode is not None else raw
                        delivered += 1
                        yield item
                if stop is not None and start + delivered < stop:
                    raise ShardFormatError(f"the shard ends after {start + delivered} samples, "
                                           f"its manifest entry says {shard.samples}")
                self.stats.shards_read += 1
                return
            except Exception as exc:
                if attempt < self.retries and is_transient(exc, shard.url):
                    attempt += 1
                    delay = self.retry.delay(attempt)
                    self._before_retry(shard.url)(attempt, exc, delay)
                    time.sleep(delay)
                    continue
                self._give_up(shard.url, exc)
                return

    def scan(self, url: str) -> ShardInfo | None:
        """Count a shard's samples and find its bucket by reading it (a shard list without its
        manifest); None when the shard is unreadable and the policy is to skip."""
        def count() -> ShardInfo:
            buckets: set[str] = set()
            samples = 0
            with self.open_shard(ShardInfo(url, "", 0)) as fileobj:
                for raw in iter_tar_samples(fileobj, want=lambda key, suffix: suffix == "json",
                                            max_bytes=member_bounds(None, None)):
                    bucket = parse_metadata(raw.members.get("json"), raw.key).get("bucket")
                    if not isinstance(bucket, str):
                        raise ShardFormatError(f"sample {raw.key!r}: its .json names no bucket")
                    buckets.add(bucket)
                    samples += 1
            if len(buckets) > 1:
                raise ShardFormatError(f"the shard mixes buckets {sorted(buckets)}; shardkit shards hold one bucket each")
            if not samples:
                raise ShardFormatError("the shard holds no sample")
            return ShardInfo(url=url, bucket=buckets.pop(), samples=samples)

        try:
            return self.retry.run(count, lambda exc: is_transient(exc, url), self._before_retry(url))
        except Exception as exc:
            self._give_up(url, exc)
            return None


# ---- opening a build -----------------------------------------------------------------------

@dataclass
class ResolvedBuild:
    shards: list[ShardInfo]
    manifest: Manifest | None
    location: str  # what was read: the manifest URL or the shard list's first URL


def _expand_shard_urls(patterns: Iterable[str]) -> list[str]:
    import webdataset as wds

    urls: list[str] = []
    for pattern in patterns:
        urls.extend(wds.shardlists.expand_urls(os.fspath(pattern)))
    return urls


def resolve_build(source: str | os.PathLike | Sequence[str], store: ShardStore) -> ResolvedBuild:
    """Shards and manifest from a build folder (local or URL prefix), a manifest path/URL, or a
    list or brace pattern of shard URLs (``.../shards/{a,b}.tar``); a shard list is scanned once
    to count its samples, so prefer the manifest for large remote builds."""
    if isinstance(source, (list, tuple)):
        urls = _expand_shard_urls(source)
    else:
        text = os.fspath(source)
        if text.endswith(".json"):
            return _from_manifest(text, store)
        urls = _expand_shard_urls([text]) if ("{" in text or text.endswith(".tar")) else []
        if not urls:
            if not is_url(text) and local_path(text).is_dir():
                text = str(local_path(text) / MANIFEST_NAME)
            return _from_manifest(text if not is_url(text) else join_url(text, MANIFEST_NAME), store)
    if not urls:
        raise ShardkitError("the shard list is empty; pass a build folder, a manifest.json or shard URLs")
    log.info("scanning %d shards to count their samples (pass the build's manifest.json to skip this)", len(urls))
    shards = [info for info in (store.scan(url) for url in urls) if info is not None]
    if not shards:
        raise ShardkitError(f"none of the {len(urls)} shards could be read")
    return ResolvedBuild(shards=shards, manifest=None, location=urls[0])


def _from_manifest(location: str, store: ShardStore) -> ResolvedBuild:
    try:
        payload = store.read_bytes(location)
    except (FileNotFoundError, NotADirectoryError):
        raise ShardkitError(f"no {MANIFEST_NAME} at {location}; pass the OUTPUT folder of a `shardkit build`, "
                            f"its manifest.json or a list of shard URLs") from None
    except ShardkitError:
        raise
    except Exception as exc:
        raise ShardkitError(f"cannot read the manifest {location}: {describe(exc)}") from None
    manifest = parse_manifest(payload, location)[0]
    if manifest.status != "complete":
        log.warning("the build at %s is not complete (status %s): reading the shards written so far",
                    location, manifest.status)
    base = _folder_of(location)
    shards = [ShardInfo(url=join_url(base, safe_relative_path(e.path, "shard path")), bucket=e.bucket,
                        samples=e.samples, sha256=e.sha256, size=e.bytes,
                        bucket_hw=tuple(e.bucket_hw) if _is_hw(e.bucket_hw) else None)
              for e in manifest.shards if e.samples > 0]
    if not shards:
        raise ShardkitError(f"the build at {location} lists no shard with samples")
    return ResolvedBuild(shards=shards, manifest=manifest, location=location)


def empty_caption(resolved: ResolvedBuild, store: ShardStore) -> np.ndarray | dict[str, np.ndarray]:
    """The build's stored encoding of the empty caption, checked against its manifest: T5's rows
    ``[L, D]``, or for a --pipeline build each member a caption has, by name
    (``{"prompt_embeds": ..., "pooled_prompt_embeds": ...}``); else one ShardkitError that says what to do."""
    if resolved.manifest is None:
        raise ShardkitError("caption_dropout needs the build's stored empty caption: pass the build folder or its "
                            "manifest.json, not a list of shards")
    fmt = resolved.manifest.declaration()
    names = list(fmt.empty_caption_specs)
    missing = [name for name in names if name not in fmt.empty_captions]
    if missing:
        which = f" ({', '.join(missing)})" if fmt.pipeline is not None else ""
        raise ShardkitError(f"the build at {resolved.location} stores no empty caption{which} (it was made before "
                            f"shardkit stored one); run the same `shardkit build SOURCE OUTPUT` again: it keeps every "
                            f"shard and adds it")
    arrays = {name: _read_empty_caption(resolved, store, fmt, fmt.empty_captions[name]) for name in names}
    return arrays["t5"] if fmt.pipeline is None else arrays


def _read_empty_caption(resolved: ResolvedBuild, store: ShardStore, fmt: SampleFormat,
                        declared: EmptyCaption) -> np.ndarray:
    url = join_url(_folder_of(resolved.location), declared.path)

    def read() -> bytes:
        with open_read(url, store.storage_options, store.timeout) as fileobj:
            return fileobj.read(declared.max_bytes + 1)

    try:
        payload = store.retry.run(read, lambda exc: is_transient(exc, url), store._before_retry(url))
        if len(payload) > declared.max_bytes:
            raise ShardFormatError(f"it is bigger than its declared shape {list(declared.shape)} needs")
        return load_empty_caption(declared, payload, fmt)
    except (OSError, ShardFormatError) as exc:
        reason = str(exc) if isinstance(exc, ShardFormatError) else describe(exc)
        raise ShardkitError(f"cannot use the build's empty caption {url} for caption_dropout: {reason}; run the "
                            f"same `shardkit build SOURCE OUTPUT` again to write it anew") from None


def _folder_of(manifest_location: str) -> str:
    return posixpath.dirname(manifest_location) if is_url(manifest_location) else str(local_path(manifest_location).parent)


def _is_hw(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(type(v) is int and v > 0 for v in value)
