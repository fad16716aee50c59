"""SOURCE files in object storage: ``RemotePath``, the handful of ``pathlib.Path`` methods the
source and image stages use, over fsspec."""

from __future__ import annotations

import errno
import io
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from .urls import _url_to_fs, is_url, local_path


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
        except FileNotFoundError:
            raise
        except OSError:
            if self.stat().st_size == 0:
                return b"", 0  # an empty object has no range to read (S3 answers 416)
            raise
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

    def find(self) -> dict[str, int]:
        """Every file below this folder: path relative to it -> size in bytes (unordered)."""
        fs, root = self._fs()
        root = root.rstrip("/")
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        return {p[len(root) + 1:]: int(info.get("size") or 0) for p, info in found.items() if p.startswith(root + "/")}

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
