"""Reading local source files without trusting them: regular files only, inside their root, bounded.

A scraped dataset can hold anything under a name like ``b.jpg``: a FIFO (reading it blocks
forever), a link to ``/dev/zero`` (a read that never ends), a link out of the image root
(someone else's file would be stored in a shard), a file of many gigabytes. Every local read
of an image or a caption goes through ``read_source_file``, which refuses each of these with a
``SourceFileSkip`` (a reason for failures.jsonl and a one-line detail) before reading a byte
more than the bound allows.
"""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path
from typing import BinaryIO

NOT_A_REGULAR_FILE = "not_a_regular_file"
FILE_TOO_LARGE = "file_too_large"
PATH_OUTSIDE_ROOT = "path_outside_root"

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


class SourceFileSkip(Exception):
    """This source file is not read; ``reason`` is one of the constants above (or a subclass's)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@functools.lru_cache(maxsize=256)
def _real_root(root: str) -> str:
    return os.path.realpath(root)


def check_inside_root(path: Path, root: Path | None) -> None:
    """Refuse ``path`` when its real location (every symlink resolved) lies outside ``root``'s.

    ``root`` None allows links to lead anywhere (symlink farms, by the user's choice).
    """
    if root is None:
        return
    real_root = _real_root(str(root))
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise SourceFileSkip(PATH_OUTSIDE_ROOT, f"{path} resolves to {real}, outside the image root {real_root}; "
                                                f"pass --follow-symlinks-outside-root to read links that leave it")


def _require_regular(status: os.stat_result, path: Path) -> None:
    if stat.S_ISDIR(status.st_mode):
        raise IsADirectoryError(path)  # the callers' "is a directory"
    if not stat.S_ISREG(status.st_mode):
        raise SourceFileSkip(NOT_A_REGULAR_FILE, f"{path} is a {_kind(status.st_mode)}, not a regular file; "
                                                 f"only regular files are read")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def read_source_file(path: Path, max_bytes: int, root: Path | None, length: int | None = None,
                     limit_option: str = "--max-image-bytes") -> tuple[bytes, int]:
    """The first ``length`` bytes of a regular file (all of it when None) and its size in bytes.

    Refused, as a ``SourceFileSkip``: a path whose real location leaves ``root``; anything but a
    regular file (checked before opening, since opening a FIFO or a device can block or act,
    and again on the open file, in case it was swapped); a file over ``max_bytes``, by its size
    and by what a read returns (a file may grow). Missing files and read errors raise OSError.
    """
    check_inside_root(path, root)
    _require_regular(os.stat(path), path)
    descriptor = os.open(path, _OPEN_FLAGS)
    with os.fdopen(descriptor, "rb") as handle:
        status = os.fstat(descriptor)
        _require_regular(status, path)
        if status.st_size > max_bytes:
            raise too_large(path, f"{status.st_size} bytes", max_bytes, limit_option)
        want = max_bytes + 1 if length is None else min(length, max_bytes + 1)
        data = handle.read(want)
    if len(data) > max_bytes:
        raise too_large(path, f"more than {max_bytes} bytes", max_bytes, limit_option)
    return data, max(status.st_size, len(data))


def open_regular(path: Path) -> BinaryIO:
    """A local source file opened for streaming (a tar shard, a Parquet or Arrow file), only when it is
    a regular file (a FIFO would block the build forever, a device never end); else a ``SourceFileSkip``."""
    _require_regular(os.stat(path), path)
    descriptor = os.open(path, _OPEN_FLAGS)
    try:
        _require_regular(os.fstat(descriptor), path)
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def too_large(path: object, size: str, max_bytes: int, limit_option: str = "--max-image-bytes") -> SourceFileSkip:
    """The FILE_TOO_LARGE refusal of a file holding ``size`` (its byte count, or "more than N bytes")."""
    return SourceFileSkip(FILE_TOO_LARGE, f"{path} holds {size}, over the limit of {max_bytes} bytes ({limit_option})")
