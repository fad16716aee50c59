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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .format import KEY_PATTERN, SUFFIX_PATTERN
from .storage import LocalStorage, Storage
from .tario import UstarWriter

TEMP_PREFIX = ".partial-"


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
            if not SUFFIX_PATTERN.match(suffix):
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
        self._tar = UstarWriter(self._hashing)
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
