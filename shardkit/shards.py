"""Shard stage: samples -> reproducible WebDataset tar files, committed atomically.

A sample is a run of adjacent members sharing a key (``KEY.json``, ``KEY.txt``, the image,
``KEY.latent.npy``, ``KEY.t5_<field>.npy``). Member metadata is fixed (mtime 0, uid/gid 0,
mode 0644) so the same input and config give byte-identical shards. A shard is written to a
hidden temporary name, fsynced and renamed (uploaded whole when OUTPUT is in object storage), so
a final name always means a complete shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .storage import LocalStorage, Storage

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
_SUFFIX_PATTERN = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
TEMP_PREFIX = ".partial-"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def json_bytes(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass
class Sample:
    key: str
    members: list[tuple[str, bytes]]  # (suffix after "KEY.", payload), in the order written

    def __post_init__(self) -> None:
        # Member names are built only from checked keys and suffixes: nothing from the input
        # can add a path separator or a dot to a key.
        if not KEY_PATTERN.match(self.key):
            raise ValueError(f"invalid sample key {self.key!r}")
        for suffix, _ in self.members:
            if not _SUFFIX_PATTERN.match(suffix):
                raise ValueError(f"invalid member suffix {suffix!r} for key {self.key}")


@dataclass
class WrittenShard:
    path: str  # relative to OUTPUT
    samples: int
    bytes: int
    sha256: str
    keys: list[str] = field(default_factory=list)


class _HashingFile(io.RawIOBase):
    """Counts and hashes bytes on their way to disk, so a shard is never read back to checksum it."""

    def __init__(self, fh):
        self._fh = fh
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        self._fh.write(view)
        self.sha256.update(view)
        self.size += len(view)
        return len(view)


class _TarStream:
    """Writes USTAR members straight to ``out``: the bytes of tarfile's ``w|`` stream, at less cost.

    tarfile copies each payload through its stream buffer in 10 KiB slices; here a member is its
    header, the payload as given and the zero padding to the next 512-byte block. ``close()`` ends
    the archive as tarfile does: two zero blocks, then zeros up to a whole 10 KiB record.
    """

    def __init__(self, out):
        self._out = out
        self._offset = 0
        self._closed = False

    def add(self, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        header = info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
        padding = -len(payload) % tarfile.BLOCKSIZE
        self._out.write(header)
        self._out.write(payload)
        if padding:
            self._out.write(bytes(padding))
        self._offset += len(header) + len(payload) + padding

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        end = 2 * tarfile.BLOCKSIZE
        end += -(self._offset + end) % tarfile.RECORDSIZE
        self._out.write(bytes(end))


class ShardWriter:
    """Writes one shard. Use as a context manager; ``commit()`` makes it visible under its final name.

    The tar is written locally under ``output`` (OUTPUT itself for a local build, a staging
    folder when OUTPUT is in object storage) and ``storage`` publishes it whole on commit.
    """

    def __init__(self, output: Path, relative_path: str, storage: Storage | None = None):
        self.output = output
        self.relative_path = relative_path
        self.storage = storage if storage is not None else LocalStorage(output)
        self.final_path = output / relative_path
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        self.temp_path = self.final_path.with_name(TEMP_PREFIX + self.final_path.name)
        self._fh = open(self.temp_path, "wb")
        self._hashing = _HashingFile(self._fh)
        self._tar = _TarStream(self._hashing)
        self._keys: list[str] = []
        self._committed = False

    def add(self, sample: Sample) -> None:
        for suffix, payload in sample.members:
            self._tar.add(f"{sample.key}.{suffix}", payload)
        self._keys.append(sample.key)

    def commit(self) -> WrittenShard:
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self.storage.put_file(self.temp_path, self.relative_path)
        self._committed = True
        self._tar = None  # a committed shard holds no buffers
        return WrittenShard(path=self.relative_path, samples=self.samples, bytes=self._hashing.size,
                            sha256=self._hashing.sha256.hexdigest(), keys=list(self._keys))

    @property
    def samples(self) -> int:
        return len(self._keys)

    @property
    def committed(self) -> bool:
        return self._committed

    def abort(self) -> None:
        if self._committed:
            return
        try:
            self._fh.close()  # the tar stream holds no buffer of its own: nothing else to close
        finally:
            self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def remove_partial_shards(output: Path, belongs: Callable[[str], bool] | None = None) -> list[Path]:
    """Temporary shards left by an interrupted build: never complete, always safe to delete.

    ``belongs(name)`` limits it to this process's own (ranks of one launch share a folder).
    """
    removed = []
    for path in sorted(output.glob(f"shards/{TEMP_PREFIX}*")):
        if belongs is not None and not belongs(path.name):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
