"""Where bytes live: local folders and object storage (s3:// and any other fsspec URL).

OUTPUT goes through a ``Storage``: ``LocalStorage`` keeps the temp-file + fsync + rename
discipline, ``FsspecStorage`` writes each file as one whole object (an S3 object becomes
visible only when its upload completes), retrying failed uploads with backoff. Either way a
final name only ever holds a complete file. SOURCE files in object storage are ``RemotePath``s:
the handful of ``pathlib.Path`` methods the source and image stages use, over fsspec.

Credentials come the standard way (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
instance roles; AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for S3-compatible services) or from
``storage_options``. They are never logged, printed or written anywhere: only URLs are.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import posixpath
import re
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from .errors import ShardkitError

log = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_S3_PROTOCOLS = ("s3", "s3a")
# botocore's names for missing credentials (matched by name: botocore is optional).
_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError")


def is_url(location: str | os.PathLike) -> bool:
    """True for object-storage URLs (``s3://bucket/prefix``, chained ``simplecache::s3://...``); ``file://`` is local."""
    text = str(location)
    return (bool(_URL.match(text)) or "::" in text) and not text.startswith("file://")


def local_path(location: str | os.PathLike) -> Path:
    text = str(location)
    return Path(text[len("file://"):]) if text.startswith("file://") else Path(text)


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """``--storage-options`` JSON (e.g. '{"client_kwargs": {"region_name": "eu-west-1"}}') -> dict."""
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ShardkitError(f"--storage-options is not valid JSON ({exc.msg}); pass an object like "
                            f"'{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}'") from None
    if not isinstance(options, dict):
        raise ShardkitError("--storage-options must be a JSON object")
    return options


def storage_options_for(url: str | os.PathLike, endpoint_url: str | None = None,
                        storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec options to open ``url`` with: ``storage_options`` plus, for s3:// URLs, the endpoint.

    Local paths need none. Without an endpoint, s3fs (botocore) reads AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL and the credentials from the environment or AWS_PROFILE.
    """
    if not is_url(url):
        return {}
    options = dict(storage_options or {})
    protocol = str(url).split("://", 1)[0].rsplit("::", 1)[-1].lower()
    if endpoint_url and protocol in _S3_PROTOCOLS:
        options.setdefault("endpoint_url", endpoint_url)
    return options


def _url_to_fs(url: str, options: dict[str, Any]):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise ShardkitError(f"cannot open {url}: {exc}; install the storage extra (pip install 'shardkit[s3]')") from None
    except (ValueError, TypeError) as exc:
        raise ShardkitError(f"cannot open {url}: {exc}; check the URL and the storage options") from None


def _storage_error(url: str, exc: BaseException) -> ShardkitError:
    """One line naming the URL and what went wrong; never the credentials (they are not in exceptions)."""
    name = type(exc).__name__
    if name in _CREDENTIAL_ERRORS:
        return ShardkitError(f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(exc, PermissionError):
        return ShardkitError(f"access to {url} was denied ({exc}); check the credentials and the bucket's policy")
    return ShardkitError(f"cannot reach {url} ({name}: {exc}); check the endpoint (--endpoint-url or "
                         f"AWS_ENDPOINT_URL) and the network, then run the same command again")


# ---- SOURCE files in object storage ------------------------------------------------------

@dataclass(frozen=True)
class RemoteStat:
    st_size: int


class RemotePath:
    """A file or folder in object storage, behaving like the ``Path`` methods sources.py and images.py use.

    It is handed to the decode worker threads with its options; fsspec caches one filesystem
    instance per set of options, so they share it.
    """

    __slots__ = ("url", "options")

    def __init__(self, url: str, options: dict[str, Any] | None = None):
        protocol, _, rest = url.partition("://")
        self.url = f"{protocol}://{rest.rstrip('/')}"
        self.options = dict(options or {})

    # ---- names ----------------------------------------------------------------------
    def __truediv__(self, other: str | os.PathLike) -> "RemotePath":
        return RemotePath(f"{self.url}/{str(other).lstrip('/')}", self.options)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"  # options may hold secrets: never shown

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> "RemotePath":
        protocol, _, rest = self.url.partition("://")
        head = posixpath.dirname(rest)
        return RemotePath(f"{protocol}://{head}", self.options) if head else self

    def with_suffix(self, suffix: str) -> "RemotePath":
        return RemotePath(f"{self.url[: -len(self.name)]}{PurePosixPath(self.name).with_suffix(suffix)}", self.options)

    # ---- filesystem -----------------------------------------------------------------
    def _fs(self):
        return _url_to_fs(self.url, self.options)

    def _call(self, method: str, *args, **kwargs):
        fs, path = self._fs()
        try:
            return getattr(fs, method)(path, *args, **kwargs)
        except (FileNotFoundError, IsADirectoryError):
            raise
        except PermissionError as exc:
            raise PermissionError(exc.errno or errno.EACCES, f"access denied to {self.url}") from None
        except OSError:
            raise
        except Exception as exc:  # botocore's own exception types: a read error like any other
            raise OSError(errno.EIO, f"{type(exc).__name__}: {exc}") from None

    def exists(self) -> bool:
        try:
            self._call("info")  # unlike fs.exists, says so when the store cannot be reached
        except FileNotFoundError:
            return False
        return True

    def is_file(self) -> bool:
        return bool(self._call("isfile"))

    def is_dir(self) -> bool:
        return bool(self._call("isdir"))

    def stat(self) -> RemoteStat:
        return RemoteStat(st_size=int(self._call("info")["size"]))

    def read_bytes(self) -> bytes:
        return self._call("cat_file")

    def read_start(self, length: int, need_size: bool = True) -> tuple[bytes, int | None]:
        """At least the first ``length`` bytes and the object's size: one ranged GET, plus a HEAD
        for the size only when the object is longer (and ``need_size``; else the size is None)."""
        try:
            data = self._call("cat_file", start=0, end=length)
        except ValueError:  # an HTTP server without range requests
            data = self.read_bytes()
        if len(data) != length:
            return data, len(data)  # the whole object (shorter, or a server that sent all of it)
        return data, int(self._call("info")["size"]) if need_size else None

    def read_text(self, encoding: str = "utf-8") -> str:
        return universal_newlines(self.read_bytes().decode(encoding))

    def open(self, mode: str = "r", encoding: str | None = None):
        if mode not in ("r", "rb"):
            raise ValueError(f"RemotePath opens for reading only, not {mode!r}")
        handle = self._call("open", "rb")
        return handle if mode == "rb" else io.TextIOWrapper(handle, encoding=encoding or "utf-8")

    def find(self) -> list[str]:
        """Every file below this folder, as paths relative to it (unordered)."""
        fs, root = self._fs()
        root = root.rstrip("/")
        try:
            found = fs.find(root)
        except FileNotFoundError:
            return []
        return [p[len(root) + 1:] for p in found if p.startswith(root + "/")]

    def read_many(self, relatives: Iterable[str]) -> dict[str, bytes]:
        """Several small files below this folder in one concurrent request batch (e.g. captions)."""
        relatives = list(relatives)
        if not relatives:
            return {}
        fs, root = self._fs()
        root = root.rstrip("/")
        paths = {f"{root}/{r}": r for r in relatives}
        blobs = fs.cat(list(paths))
        return {paths[p]: data for p, data in blobs.items()}


def universal_newlines(text: str) -> str:
    """What ``Path.read_text`` returns for the same bytes (text mode turns \\r\\n and \\r into \\n)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def as_location(location: str | os.PathLike | RemotePath,
                storage_options: dict[str, Any] | None = None) -> Path | RemotePath:
    """A ``Path`` for a local file or folder, a ``RemotePath`` for a URL."""
    if isinstance(location, (Path, RemotePath)):
        return location
    if is_url(location):
        return RemotePath(str(location), storage_options)
    return local_path(location)


# ---- OUTPUT ------------------------------------------------------------------------------

def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file, fsync, rename: readers see the old or the new file, never a mix."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temp, path)


class Storage(ABC):
    """OUTPUT: files addressed by paths relative to it ("manifest.json", "shards/256x256-00000.tar")."""

    url: str  # OUTPUT as the user gave it, without a trailing slash
    is_local: bool

    @staticmethod
    def for_url(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> "Storage":
        if is_url(url):
            return FsspecStorage(str(url), storage_options or {})
        return LocalStorage(local_path(url))

    @property
    def location(self) -> Path | str:
        """What to show the user and put in summaries: the Path of a local folder, else the URL."""
        return self.url

    def url_of(self, relative: str) -> str:
        return f"{self.url}/{relative}"

    @abstractmethod
    def prepare(self) -> None:
        """Make OUTPUT usable as a folder, or say why it is not."""

    @abstractmethod
    def exists(self, relative: str) -> bool:
        """Whether a file is there."""

    @abstractmethod
    def size(self, relative: str) -> int | None:
        """Bytes of a file, None when there is none."""

    @abstractmethod
    def read_bytes(self, relative: str) -> bytes:
        """The file's bytes; FileNotFoundError when it does not exist."""

    @abstractmethod
    def write_atomic(self, relative: str, payload: bytes) -> None:
        """Replace the file as a whole: readers see the old or the new content, never a mix."""

    @abstractmethod
    def put_file(self, local_path: Path, relative: str) -> None:
        """Publish a finished local file under its final name; the local file is gone afterwards."""

    @abstractmethod
    def list_sizes(self, relative: str = "") -> dict[str, int | None]:
        """Entries directly in a folder: name -> bytes for files, None for folders; {} when it does not exist."""

    def listdir(self, relative: str = "") -> list[str]:
        return sorted(self.list_sizes(relative))

    @abstractmethod
    def remove(self, relative: str) -> None:
        """Delete a file or folder if it is there."""


class LocalStorage(Storage):
    is_local = True

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    @property
    def location(self) -> Path:
        return self.root

    def url_of(self, relative: str) -> str:
        return str(self.root / relative)

    def prepare(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise ShardkitError(f"OUTPUT {self.root} is a file; pass a folder path")
        self.root.mkdir(parents=True, exist_ok=True)

    def exists(self, relative: str) -> bool:
        return (self.root / relative).exists()

    def size(self, relative: str) -> int | None:
        path = self.root / relative
        return path.stat().st_size if path.is_file() else None

    def read_bytes(self, relative: str) -> bytes:
        return (self.root / relative).read_bytes()

    def write_atomic(self, relative: str, payload: bytes) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, payload)

    def put_file(self, local_path: Path, relative: str) -> None:
        final = self.root / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(local_path, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Staged on another filesystem: copy beside the final name first, then rename.
            temp = final.with_name(f".{final.name}.tmp")
            with open(local_path, "rb") as src, open(temp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(temp, final)
            Path(local_path).unlink(missing_ok=True)
        fsync_dir(final.parent)

    def list_sizes(self, relative: str = "") -> dict[str, int | None]:
        try:
            entries = list(os.scandir(self.root / relative))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {e.name: (e.stat().st_size if e.is_file() else None) for e in entries}

    def remove(self, relative: str) -> None:
        path = self.root / relative
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class FsspecStorage(Storage):
    """OUTPUT in object storage. Every write is one whole object, retried with backoff on failure."""

    is_local = False
    # Waits before each retry of a failed upload (so len + 1 attempts in all).
    retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)

    def __init__(self, url: str, storage_options: dict[str, Any]):
        self.url = url.rstrip("/")
        self.options = dict(storage_options)
        self.fs, root = _url_to_fs(self.url, self.options)
        self.root = root.rstrip("/")
        self.protocol = self.url.split("://", 1)[0].rsplit("::", 1)[-1].lower()

    def _path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def _guard(self, what: str, fn, *args, **kwargs):
        """Run one storage call; errors become one clear line (credentials, endpoint, access)."""
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except ShardkitError:
            raise
        except Exception as exc:
            raise _storage_error(what, exc) from None

    def prepare(self) -> None:
        if self.protocol in _S3_PROTOCOLS:
            bucket = self.root.split("/", 1)[0]
            try:
                self.fs.call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError:
                raise ShardkitError(f"bucket {bucket} does not exist (endpoint: "
                                    f"{self.options.get('endpoint_url') or 'from the environment'}); create it first") from None
            except PermissionError:
                pass  # credentials scoped to a prefix may not see the bucket itself; the writes will tell
            except Exception as exc:  # endpoint unreachable, no credentials, ...
                raise _storage_error(f"s3://{bucket}", exc) from None
        if "/" in self.root and self._guard(self.url, self.fs.isfile, self.root):
            raise ShardkitError(f"OUTPUT {self.url} is an object, not a folder prefix; pass a folder URL")

    def exists(self, relative: str) -> bool:
        return self.size(relative) is not None

    def size(self, relative: str) -> int | None:
        path = self._path(relative)
        self.fs.invalidate_cache(path)  # another process (rank) may have written it since we last looked
        try:
            info = self._guard(self.url_of(relative), self.fs.info, path)
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") != "directory" else None

    def read_bytes(self, relative: str) -> bytes:
        return self._guard(self.url_of(relative), self.fs.cat_file, self._path(relative))

    def write_atomic(self, relative: str, payload: bytes) -> None:
        self._with_retries(relative, len(payload), lambda path: self.fs.pipe_file(path, payload))

    def put_file(self, local_path: Path, relative: str) -> None:
        size = os.path.getsize(local_path)
        self._with_retries(relative, size, lambda path: self.fs.put_file(str(local_path), path))
        Path(local_path).unlink(missing_ok=True)

    def _with_retries(self, relative: str, size: int, upload) -> None:
        """One whole-object upload, checked by its size, retried with backoff: a final name never
        holds part of a file (S3 shows an object only once its upload has completed)."""
        path, url = self._path(relative), self.url_of(relative)
        attempts = len(self.retry_delays) + 1
        for attempt in range(attempts):
            try:
                upload(path)
                self.fs.invalidate_cache(path)
                stored = int(self.fs.info(path)["size"])
                if stored == size:
                    return
                self.fs.rm_file(path)  # never leave a wrong-sized object under the final name
                raise OSError(errno.EIO, f"the store holds {stored} bytes of {size} after the upload")
            except FileNotFoundError:
                raise ShardkitError(f"cannot write {url}: its bucket or folder does not exist") from None
            except Exception as exc:
                if isinstance(exc, PermissionError) or type(exc).__name__ in _CREDENTIAL_ERRORS:
                    raise _storage_error(url, exc) from None  # retrying cannot fix these
                if attempt == attempts - 1:
                    raise ShardkitError(f"upload of {url} failed {attempts} times ({type(exc).__name__}: {exc}); "
                                        f"completed shards are kept: run the same command again to resume") from None
                delay = self.retry_delays[attempt]
                log.warning("upload of %s failed (%s: %s); retrying in %.1fs", url, type(exc).__name__, exc, delay)
                time.sleep(delay)

    def list_sizes(self, relative: str = "") -> dict[str, int | None]:
        path = self._path(relative)
        try:
            infos = self._guard(self.url_of(relative), self.fs.ls, path, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        entries: dict[str, int | None] = {}
        for info in infos:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if name:
                entries[name] = None if info.get("type") == "directory" else int(info["size"])
        return entries

    def remove(self, relative: str) -> None:
        path = self._path(relative)
        try:
            if self.fs.isdir(path):
                self.fs.rm(path, recursive=True)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)
