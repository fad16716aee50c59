"""OUTPUT: local folders and object storage behind one ``Storage`` interface.

``LocalStorage`` keeps the temp-file + fsync + rename discipline, ``FsspecStorage`` writes each
file as one whole object (an S3 object becomes visible only when its upload completes),
retrying failed uploads under the one retry rule. Either way a final name only ever holds a
complete file.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ShardkitError
from .urls import _CREDENTIAL_ERRORS, _S3_PROTOCOLS, Retry, _url_to_fs, is_url, local_path, storage_error

log = logging.getLogger(__name__)


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
    """Write to a temporary file, fsync, rename: readers see the old or the new file, never a mix.

    The temporary name is the writer's own: workers of one build may write the manifest at once.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
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

    @staticmethod
    def for_file(location: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> tuple["Storage", str]:
        """The storage of a file's folder, and the file's name in it."""
        text = str(location).rstrip("/")
        if is_url(text):
            folder, _, name = text.rpartition("/")
            return Storage.for_url(folder, storage_options), name
        return Storage.for_url(Path(text).parent, storage_options), Path(text).name

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
    def open(self, relative: str) -> BinaryIO:
        """The file opened for reading; FileNotFoundError when it does not exist."""

    @abstractmethod
    def write_atomic(self, relative: str, payload: bytes) -> None:
        """Replace the file as a whole: readers see the old or the new content, never a mix."""

    @abstractmethod
    def put_file(self, local_path: Path, relative: str) -> None:
        """Publish a finished local file under its final name; the local file is gone afterwards."""

    @abstractmethod
    def list_sizes(self, relative: str = "") -> dict[str, int | None]:
        """Entries directly in a folder: name -> bytes for files (-1 where the store does not say),
        None for folders; {} when it does not exist."""

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

    def open(self, relative: str) -> BinaryIO:
        return open(self.root / relative, "rb")

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
        sizes: dict[str, int | None] = {}
        for entry in entries:
            try:
                sizes[entry.name] = entry.stat().st_size if entry.is_file() else None
            except FileNotFoundError:
                continue  # gone since the listing: another process's temporary file (a rank's, a lock's)
        return sizes

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
            raise storage_error(what, exc) from None

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
                raise storage_error(f"s3://{bucket}", exc) from None
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

    def open(self, relative: str) -> BinaryIO:
        return self._guard(self.url_of(relative), self.fs.open, self._path(relative), "rb")

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

        def attempt() -> None:
            upload(path)
            self.fs.invalidate_cache(path)
            stored = int(self.fs.info(path)["size"])
            if stored != size:
                self.fs.rm_file(path)  # never leave a wrong-sized object under the final name
                raise OSError(errno.EIO, f"the store holds {stored} bytes of {size} after the upload")

        def uploadable(exc: BaseException) -> bool:  # missing buckets and refused access stay refused
            return not isinstance(exc, (FileNotFoundError, PermissionError)) and type(exc).__name__ not in _CREDENTIAL_ERRORS

        def warn(attempt_number: int, exc: BaseException, delay: float) -> None:
            log.warning("upload of %s failed (%s: %s); retrying in %.1fs", url, type(exc).__name__, exc, delay)

        try:
            Retry(delays=tuple(self.retry_delays)).run(attempt, uploadable, warn)
        except FileNotFoundError:
            raise ShardkitError(f"cannot write {url}: its bucket or folder does not exist") from None
        except Exception as exc:
            if not uploadable(exc):
                raise storage_error(url, exc) from None
            raise ShardkitError(f"upload of {url} failed {len(self.retry_delays) + 1} times ({type(exc).__name__}: "
                                f"{exc}); completed shards are kept: run the same command again to resume") from None

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
                size = info.get("size")  # an HTTP folder listing gives no sizes: -1, unknown
                entries[name] = None if info.get("type") == "directory" else (-1 if size is None else int(size))
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
