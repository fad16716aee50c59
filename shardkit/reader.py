"""Reader stage: shards -> the batches a PixArt-Σ training step takes.

``ShardReader`` is a torch ``IterableDataset`` that yields whole batches (use it with
``DataLoader(dataset, batch_size=None)``). Every batch holds samples of one aspect bucket, in
PixArt's layout: ``(latent, caption_feature, attention_mask, data_info)``.

How an epoch is shared out (the rule every rank follows, computed from the manifest alone):

1. The shards are put in the epoch's order (shuffled with ``seed`` and the epoch, or as listed).
2. Each bucket's samples, taken in that shard order, form the bucket's stream; the stream is cut
   into batches of ``batch_size`` (its tail is a partial batch).
3. The batches are listed in the order their first sample appears in the epoch's stream, and
   the list is cut into ``world_size`` equal contiguous blocks of
   ``floor(batches / world_size)`` batches; the few batches past the last block wait for a
   later epoch (with shuffling they are different ones each epoch). Partial batches count only
   when kept (``drop_last=False``; the default keeps them in single-process training only).
4. A rank's block is cut into one contiguous part per DataLoader worker (sizes differ by at
   most one), so the rank's total is exact whatever the number of workers.

Every sample is in at most one batch of one rank per epoch, every rank yields the same number
of batches, and a reader opens only the shards that hold its samples, stopping once it has
them. Samples are then mixed in a shuffle buffer and grouped per bucket: a reader is given a
whole number of batches per bucket, so it yields exactly its share whatever order they arrive
in.

Shards come from local paths or any fsspec URL (``http(s)://``, ``s3://``, ...) with timeouts,
retries with exponential backoff and an optional local cache. A shard that cannot be read is
skipped with a warning (``on_error="skip"``) or stops training with a clear error
(``on_error="raise"``). Nothing is ever unpickled: a ``.npy`` member holding Python objects is
refused (``allow_pickle=False`` semantics) and no other member is decoded. Only the members a
batch uses are read: from local files (and the download cache) the image, the ``.txt`` and the
caption fields not drawn are skipped unread.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import mmap
import os
import posixpath
import random
import re
import stat
import sys
import tarfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import worker_memory
from .errors import ShardkitError
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .storage import is_url, local_path

log = logging.getLogger(__name__)

LAYOUTS = ("tuple", "dict")
LATENT_MODES = ("sample", "mean")
CAPTION_PADDINGS = ("max_length", "longest")
_FLOAT32_EXACT = (torch.float16, torch.bfloat16, torch.float32)  # dtypes float32 holds exactly
ERROR_POLICIES = ("skip", "raise")

# WebDataset's rule: the key is the member path up to the first dot of its basename.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")
_COPY_CHUNK = 1 << 20


class ShardReadError(ShardkitError):
    """A shard could not be read or decoded and the policy is ``on_error="raise"``."""


class ShardFormatError(Exception):
    """A shard's content breaks the shard format (missing member, bad array, split sample)."""


class ShardIntegrityError(Exception):
    """A downloaded shard does not match the sha256 its manifest records."""


# ---- small shared helpers ------------------------------------------------------------------

def safe_relative_path(path: str, what: str = "path") -> str:
    """``path`` unchanged if it stays below the folder it is relative to, else a ShardkitError.

    Metadata read from shards or a remote manifest is not trusted: an absolute path, a drive
    letter or a ``..`` component (with either separator) is refused.
    """
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ShardkitError(f"{what} {path!r} is not a usable relative path")
    parts = re.split(r"[/\\]", path)
    if path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path) or ".." in parts:
        raise ShardkitError(f"{what} {path!r} leaves its folder (absolute or '..'); refusing to use it")
    return path


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, suffix) of a tar member as WebDataset splits it, or None for a name without a dot."""
    match = _MEMBER_NAME.match(name)
    if not match:
        return None
    return match.group(1), match.group(2)


def pad_caption_feature(feature: np.ndarray, max_length: int, out: np.ndarray | None = None) -> np.ndarray:
    """``[L, D]`` valid T5 rows -> ``[max_length, D]``, PixArt's loader rule: the rows past ``L``
    repeat the last valid row. Features longer than ``max_length`` keep their first rows.
    ``out`` (``[max_length, D]``) receives the result instead of a new array."""
    if feature.ndim != 2 or feature.shape[0] == 0:
        raise ValueError(f"caption features must be [L, D] with L >= 1, got shape {feature.shape}")
    if out is None:
        out = np.empty((max_length, feature.shape[1]), dtype=feature.dtype)
    length = min(feature.shape[0], max_length)
    out[:length] = feature[:length]
    out[length:] = feature[length - 1]
    return out


def caption_mask(length: int, max_length: int, dtype: np.dtype | type = np.int16) -> np.ndarray:
    """``[max_length]``: ones for the ``length`` valid tokens, zeros after."""
    mask = np.zeros(max_length, dtype=dtype)
    mask[: min(length, max_length)] = 1
    return mask


# Parsed .npy headers, keyed by the header's bytes: a shard repeats a few headers (one per
# latent shape and per token length), and parsing one costs more than reading the array.
_NPY_LAYOUTS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}
_NPY_LAYOUTS_LIMIT = 4096


def _npy_layout(payload: bytes | memoryview, what: str) -> tuple[np.dtype, tuple[int, ...], bool, int] | None:
    """(dtype, shape, fortran_order, data offset) of a ``.npy`` payload, from its header; None
    for a format version this does not parse (numpy then reads the payload)."""
    if payload[:6] != b"\x93NUMPY" or len(payload) < 10:
        raise ShardFormatError(f"{what} is not a plain .npy array: it does not start with the .npy magic string")
    major = payload[6]
    if major == 1:
        offset = 10 + int.from_bytes(payload[8:10], "little")
    elif len(payload) >= 12:
        offset = 12 + int.from_bytes(payload[8:12], "little")
    else:
        offset = len(payload) + 1
    header = bytes(payload[:offset])  # bytes, not a view: a cached key must not hold a shard's map
    layout = _NPY_LAYOUTS.get(header)
    if layout is None:
        if len(header) < offset:
            raise ShardFormatError(f"{what} is not a plain .npy array: its header is cut short")
        version = (major, payload[7])
        if version not in ((1, 0), (2, 0)):  # 3.0 (utf-8 field names) and unknown versions
            return None
        try:
            reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = reader(io.BytesIO(header[8:]))
        except (ValueError, OSError, EOFError) as exc:
            raise ShardFormatError(f"{what} is not a plain .npy array: {exc}") from None
        layout = (dtype, tuple(shape), bool(fortran_order), offset)
        if len(_NPY_LAYOUTS) >= _NPY_LAYOUTS_LIMIT:
            _NPY_LAYOUTS.clear()
        _NPY_LAYOUTS[header] = layout
    return layout


def read_npy_uncached(payload: bytes | memoryview, what: str) -> np.ndarray:
    """``read_npy`` by ``numpy.lib.format.read_array``: every header parsed anew."""
    try:
        return np.lib.format.read_array(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ShardFormatError(f"{what} is not a plain .npy array: {exc}") from None


def read_npy(payload: bytes | memoryview, what: str) -> np.ndarray:
    """A ``.npy`` payload as an array (a read-only view of ``payload``); pickled (object)
    arrays, malformed headers and short data are refused with a ShardFormatError."""
    layout = _npy_layout(payload, what)
    if layout is None:
        return read_npy_uncached(payload, what)
    dtype, shape, fortran_order, offset = layout
    if dtype.hasobject:
        raise ShardFormatError(f"{what} is not a plain .npy array: it holds Python objects, "
                               f"which only unpickling could load (shardkit never unpickles)")
    count = math.prod(shape)
    needed = count * dtype.itemsize
    if len(payload) - offset < needed:
        raise ShardFormatError(f"{what} is not a plain .npy array: its data holds {len(payload) - offset} bytes, "
                               f"its header needs {needed}")
    try:
        array = np.frombuffer(payload, dtype=dtype, count=count, offset=offset)
    except ValueError as exc:  # e.g. a zero-size dtype
        raise ShardFormatError(f"{what} is not a plain .npy array: {exc}") from None
    return array.reshape(shape[::-1]).transpose() if fortran_order else array.reshape(shape)


def _derive_seed(*parts: Any) -> int:
    """A 64-bit seed from any parts: the same parts give the same seed in every process."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def split_evenly(count: int, parts: int, index: int) -> tuple[int, int]:
    """(start, length) of part ``index`` when ``count`` items are cut into ``parts`` contiguous
    parts whose lengths differ by at most one (the first ones are longer)."""
    base, extra = divmod(count, parts)
    return index * base + min(index, extra), base + (1 if index < extra else 0)


# ---- opening URLs --------------------------------------------------------------------------

def is_local(url: str) -> bool:
    return not is_url(url)


def join_url(base: str, relative: str) -> str:
    if is_local(base):
        return str(Path(local_path(base)) / relative)
    return base.rstrip("/") + "/" + relative


def _with_timeouts(protocol: str, options: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Storage options with connect/read timeouts added where the user set none: a stalled
    server then raises (and is retried) instead of hanging a training job."""
    if timeout is None:
        return options
    if protocol in ("http", "https"):
        import aiohttp

        client_kwargs = dict(options.get("client_kwargs") or {})
        client_kwargs.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout))
        options["client_kwargs"] = client_kwargs
    elif protocol in ("s3", "s3a"):
        config_kwargs = dict(options.get("config_kwargs") or {})
        config_kwargs.setdefault("connect_timeout", timeout)
        config_kwargs.setdefault("read_timeout", timeout)
        options["config_kwargs"] = config_kwargs
    return options


def open_url(url: str, storage_options: dict[str, Any] | None = None, timeout: float | None = 60.0) -> BinaryIO:
    """A binary file object for a local path or any fsspec URL (``storage_options`` go to fsspec)."""
    if is_local(url):
        return open(local_path(url), "rb")
    import fsspec

    protocol = fsspec.utils.get_protocol(url)
    options = _with_timeouts(protocol, dict(storage_options or {}), timeout)
    fs, path = fsspec.core.url_to_fs(url, **options)
    if protocol in ("http", "https"):
        # A plain stream: shards are read front to back, and many servers ignore Range requests.
        return fs.open(path, "rb", block_size=0)
    return fs.open(path, "rb")


def _transient_errors() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [OSError, EOFError, TimeoutError, tarfile.TarError, ShardIntegrityError]
    with contextlib.suppress(ImportError):
        import aiohttp

        kinds.append(aiohttp.ClientError)
    with contextlib.suppress(ImportError):
        import botocore.exceptions

        kinds.append(botocore.exceptions.BotoCoreError)
    return tuple(kinds)


_TRANSIENT = _transient_errors()
_PERMANENT = (ShardFormatError, ShardkitError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException, url: str) -> bool:
    """Whether reading ``url`` again may succeed: network and stream errors of remote shards
    (a cut connection looks like a truncated tar), and checksum mismatches of a download.
    Content errors and local files are never retried."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, ShardIntegrityError):
        return True
    return not is_local(url) and isinstance(exc, _TRANSIENT)


# ---- tar streams -> samples ----------------------------------------------------------------
#
# Tar headers are parsed here rather than by ``tarfile``: a training step reads a few members
# of each sample (the .json, the latent and one caption field's T5 rows) and its stream reader
# would read every byte of the others (images, other caption fields) in small chunks. Local
# files are read with ``os.pread`` at offsets kept here, so skipped members cost nothing;
# streams that cannot seek (HTTP) are read and discarded in large chunks.

_BLOCK = 512
_END_OF_ARCHIVE = bytes(_BLOCK)
_SKIP_CHUNK = 1 << 20
_READ_AHEAD = 8192
_READ_AHEAD_STREAM = 1 << 16
_REGULAR_TYPES = (b"0", b"\0", b"7")  # regular, old-style regular, contiguous file
_DATALESS_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders, fifos: size counts no data
_PAX_TYPES = (b"x", b"g", b"X")  # pax extended header (per member, global, Solaris)
_GNU_TYPES = (b"L", b"K", b"S")  # GNU long name, long link, sparse file: no ustar prefix


class ShardTruncatedError(EOFError):
    """A tar ends inside a member or before its end-of-archive blocks (cut short). An EOFError:
    for a remote shard it may be a dropped connection, so it is retried."""


class _LocalTarBytes:
    """A tar in a local file, read with ``os.pread`` at an offset kept here: skipping a member
    only moves the offset, so its bytes are never read. Small reads (headers, the .json) come
    from a read-ahead window, so a run of small members costs one system call.

    After ``map_payloads()``, reads bigger than the window (the arrays) are read-only
    memoryviews of a map of the file instead of copies: the caller's one copy (into a batch)
    then reads the page cache directly. A view keeps the map alive; the map ends with the last
    view. A file that cannot be mapped is read with ``pread``."""

    def __init__(self, fd: int, start: int, end: int):
        self.fd, self.start, self.position, self.end = fd, start, start, end
        self._window, self._window_start = b"", start
        self._map: memoryview | None = None

    def map_payloads(self) -> None:
        if self.end > self.start:
            try:
                self._map = memoryview(mmap.mmap(self.fd, self.end, access=mmap.ACCESS_READ))
            except (OSError, ValueError):  # e.g. a file system without mmap support
                self._map = None

    def peek(self, size: int) -> bytes:
        return os.pread(self.fd, size, self.position)

    def read(self, size: int) -> bytes | memoryview:
        if size <= 0:
            return b""
        at = self.position - self._window_start
        if 0 <= at and at + size <= len(self._window):
            data = self._window[at:at + size]
        elif size > _READ_AHEAD and self._map is not None:
            data = self._map[self.position:min(self.position + size, self.end)]  # short at the end: cut short
        elif size >= _READ_AHEAD:
            data = self._pread(size)
        else:
            self._window, self._window_start = self._pread(_READ_AHEAD), self.position
            data = self._window[:size]
        self.position += len(data)
        return data

    def _pread(self, size: int) -> bytes:
        data = os.pread(self.fd, size, self.position)
        if 0 < len(data) < size:  # a regular file reads short only at its end; make sure
            data += os.pread(self.fd, size - len(data), self.position + len(data))
        return data

    def skip(self, size: int) -> int:
        skipped = max(0, min(size, self.end - self.position))
        self.position += skipped
        return skipped


class _StreamTarBytes:
    """A tar on a stream that cannot seek (an HTTP body, a decompressor): read front to back in
    chunks of ``_READ_AHEAD_STREAM`` (headers and small members come from the chunk already
    read; each read of a remote stream has a fixed cost), skipped bytes read and dropped."""

    def __init__(self, fileobj: BinaryIO):
        self.fileobj, self.start, self.position = fileobj, 0, 0
        self._buffer, self._at = b"", 0  # the bytes read ahead are self._buffer[self._at:]

    def _read_raw(self, size: int) -> bytes:
        # A stream may return fewer bytes than asked (aiohttp returns what has arrived).
        parts, got = [], 0
        while got < size:
            chunk = self.fileobj.read(size - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _fill(self, size: int) -> None:
        """At least ``size`` bytes read ahead, unless the stream ends first."""
        ahead = len(self._buffer) - self._at
        if ahead < size:
            self._buffer = self._buffer[self._at:] + self._read_raw(max(size - ahead, _READ_AHEAD_STREAM))
            self._at = 0

    def peek(self, size: int) -> bytes:
        self._fill(size)
        return self._buffer[self._at:self._at + size]

    def read(self, size: int) -> bytes:
        ahead = len(self._buffer) - self._at
        if size > ahead and size >= _READ_AHEAD_STREAM:  # a big member: what is ahead, then the rest
            data = self._buffer[self._at:] + self._read_raw(size - ahead)
            self._buffer, self._at = b"", 0
        else:
            self._fill(size)
            data = self._buffer[self._at:self._at + size]
            self._at += len(data)
        self.position += len(data)
        return data

    def skip(self, size: int) -> int:
        taken = min(size, len(self._buffer) - self._at)
        self._at += taken
        left = size - taken
        while left > 0:
            chunk = self.fileobj.read(min(left, _SKIP_CHUNK))
            if not chunk:
                break
            left -= len(chunk)
        self.position += size - left
        return size - left


def _tar_bytes(fileobj: BinaryIO, map_payloads: bool = False) -> _LocalTarBytes | _StreamTarBytes:
    """The tar's bytes from the file object's current position, decompressed if the stream is
    gzip, bzip2 or xz (as ``tarfile``'s ``r|*`` mode detects them). ``map_payloads``: see
    ``_LocalTarBytes`` (local, uncompressed files only)."""
    source: _LocalTarBytes | _StreamTarBytes
    try:
        fd = fileobj.fileno()
        status = os.fstat(fd)
        local = stat.S_ISREG(status.st_mode)
    except (AttributeError, OSError, ValueError):  # not an OS file (io.UnsupportedOperation is both)
        local = False
    if local:
        source = _LocalTarBytes(fd, fileobj.tell(), status.st_size)
    else:
        source = _StreamTarBytes(fileobj)
    magic = source.peek(10)
    if magic.startswith(b"\x1f\x8b\x08"):
        import gzip

        opener: Callable[[BinaryIO], BinaryIO] = lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")
    elif magic[:3] == b"BZh" and magic[4:10] == b"1AY&SY":
        import bz2

        opener = bz2.BZ2File
    elif magic.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        import lzma

        opener = lzma.LZMAFile
    else:
        if map_payloads and isinstance(source, _LocalTarBytes):
            source.map_payloads()
        return source
    # The decompressor reads the compressed bytes through ``source`` (which replays what was peeked).
    return _StreamTarBytes(opener(source))  # type: ignore[arg-type]


def _header_text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _header_number(field: bytes) -> int:
    """A numeric header field: octal digits, or GNU's base-256 (first byte 0x80 or 0xff)."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)  # ValueError when damaged


def _parse_header(block: bytes, offset: int) -> tuple[str, int, bytes]:
    """(name, size, type) of a 512-byte tar header whose checksum is right."""
    try:
        checksum = _header_number(block[148:156])
    except ValueError:
        checksum = -1
    # The checksum counts its own field as eight spaces; some tars sum signed bytes.
    unsigned = 256 + sum(block) - sum(block[148:156])
    if checksum != unsigned and checksum != unsigned - 256 * sum(byte >= 128 for byte in block[:148] + block[156:]):
        what = "not a tar file (its first header is damaged)" if offset == 0 else f"the tar header at byte {offset} is damaged"
        raise ShardFormatError(f"{what}: bad checksum, the members from there on cannot be read")
    try:
        size = _header_number(block[124:136])
    except ValueError:
        size = -1
    if size < 0:
        raise ShardFormatError(f"the tar header at byte {offset} gives no usable member size")
    kind = block[156:157]
    name = _header_text(block[0:100])
    if block[345] and kind not in _GNU_TYPES:  # ustar: a long name is split into prefix/name
        name = f"{_header_text(block[345:500])}/{name}"
    return name, size, kind


def _pax_records(payload: bytes, offset: int) -> dict[str, str]:
    """The ``"%d %s=%s\\n"`` records of a pax extended header."""
    records: dict[str, str] = {}
    position = 0
    try:
        while position < len(payload) and payload[position] != 0:
            space = payload.index(b" ", position)
            length = int(payload[position:space])
            record = payload[space + 1:position + length]
            if length <= 0 or not record.endswith(b"\n"):
                raise ValueError("bad record length")
            keyword, _, value = record[:-1].partition(b"=")
            records[keyword.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
            position += length
    except ValueError:
        raise ShardFormatError(f"the pax header at byte {offset} is damaged") from None
    return records


class TarMembers:
    """The regular members of a tar, front to back: ``next()`` gives each one's (name, size);
    ``payload()`` reads the data of the member just given, and a member whose payload is not
    read is skipped. Names are resolved as ``tarfile`` resolves them (ustar prefix, GNU long
    names, pax ``path``/``size``); folders, links and the like are passed over.

    A damaged header (its checksum does not match) is a ShardFormatError; a tar that ends inside
    a member, inside a header, or before its end-of-archive block is a ShardTruncatedError.
    ``map_payloads``: payloads of a local, uncompressed tar bigger than the read-ahead window
    come as read-only memoryviews of a map of the file (see ``_LocalTarBytes``).
    """

    def __init__(self, fileobj: BinaryIO, map_payloads: bool = False):
        self._bytes = _tar_bytes(fileobj, map_payloads)
        self._pending = 0  # bytes of the current member (data and padding) not consumed
        self._size = 0
        self._name = ""
        self._global_pax: dict[str, str] = {}

    @property
    def offset(self) -> int:
        """Bytes of the tar consumed so far."""
        return self._bytes.position - self._bytes.start

    def _cut_short(self) -> ShardTruncatedError:
        return ShardTruncatedError(f"the tar ends inside member {self._name!r} at byte {self.offset}: "
                                   f"the shard was cut short")

    def _consume(self, size: int) -> bytes | memoryview:
        data = self._bytes.read(size)
        if len(data) < size:
            raise self._cut_short()
        return data

    def next(self) -> tuple[str, int] | None:
        """The next regular member's (name, size), or None at the end of the archive."""
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            if self._pending:
                if self._bytes.skip(self._pending) < self._pending:
                    raise self._cut_short()
                self._pending = 0
            offset = self.offset
            block = self._bytes.read(_BLOCK)
            if len(block) < _BLOCK:
                if offset == 0 and not block:
                    raise ShardTruncatedError("the shard is empty")
                raise ShardTruncatedError(f"the tar stops at byte {offset + len(block)} without its end-of-archive "
                                          f"block: the shard was cut short")
            if block == _END_OF_ARCHIVE:
                return None
            name, size, kind = _parse_header(block, offset)
            self._name = name
            padded = size + (-size) % _BLOCK
            if kind in _REGULAR_TYPES and not (kind == b"\0" and name.endswith("/")):
                extended = {**self._global_pax, **pax}
                if long_name is not None:
                    name = long_name
                if "path" in extended:
                    name = extended["path"]
                if "size" in extended:
                    try:
                        size = int(extended["size"])
                    except ValueError:
                        raise ShardFormatError(f"the pax header before byte {offset} gives size "
                                               f"{extended['size']!r}") from None
                    padded = size + (-size) % _BLOCK
                self._name, self._size, self._pending = name, size, padded
                return name, size
            if kind in _PAX_TYPES:
                records = _pax_records(self._consume(padded)[:size], offset)
                (self._global_pax if kind == b"g" else pax).update(records)
            elif kind == b"L":
                long_name = _header_text(self._consume(padded)[:size])
            elif kind == b"S":
                raise ShardFormatError(f"member {name!r} is a sparse file, which shards never hold")
            elif kind == b"K":  # a GNU long link name: it belongs to the next header
                self._pending = padded
            else:  # a folder, link, device or unknown type: passed over with its long name or pax records
                long_name, pax = None, {}
                if kind not in _DATALESS_TYPES and kind != b"\0":  # (b"\0" here: an old-style folder, "name/")
                    self._pending = padded  # unknown types are read as data-carrying, as tarfile reads them

    def payload(self) -> bytes | memoryview:
        """The data of the member ``next()`` gave last (once)."""
        data = self._consume(self._size)
        self._pending -= self._size
        self._size = 0
        return data


@dataclass
class TarSample:
    index: int  # position of the sample in its shard
    key: str
    members: dict[str, bytes | memoryview]  # suffix (lower case, after the key's dot) -> payload


def iter_tar_samples(fileobj: BinaryIO, start: int = 0, stop: int | None = None,
                     want: Callable[[str, str], bool] | None = None, map_payloads: bool = False) -> Iterator[TarSample]:
    """The samples of a tar stream, grouped as WebDataset groups them: a sample is a run of
    adjacent members sharing a key. A key that comes back after another key is an error (its
    members are not adjacent), as is a suffix repeated within a sample.

    Samples before ``start`` are counted but not read; reading stops once sample ``stop - 1``
    is complete. ``want(key, suffix)`` selects the members whose bytes are kept; the others are
    skipped without being read where the file allows it (local files). ``map_payloads``: big
    payloads of local files may be read-only memoryviews instead of bytes (``TarMembers``).
    """
    seen: set[str] = set()
    key: str | None = None
    index = -1
    members: dict[str, bytes | memoryview] = {}
    suffixes: set[str] = set()
    tar = TarMembers(fileobj, map_payloads)
    while (member := tar.next()) is not None:
        name = member[0]
        if _META_MEMBER.match(name):
            continue
        parsed = split_member_name(name)
        if parsed is None:
            continue
        member_key, suffix = parsed[0], parsed[1].lower()
        if member_key != key:
            if key is not None and index >= start:
                yield TarSample(index, key, members)
            if member_key in seen:
                raise ShardFormatError(f"the members of sample {member_key!r} are not adjacent in the tar")
            seen.add(member_key)
            key, index, members, suffixes = member_key, index + 1, {}, set()
            if stop is not None and index >= stop:
                return
        if suffix in suffixes:
            raise ShardFormatError(f"sample {key!r} has two members with suffix {suffix!r}")
        suffixes.add(suffix)
        if index >= start and (want is None or want(key, suffix)):
            members[suffix] = tar.payload()
    if key is not None and index >= start and (stop is None or index < stop):
        yield TarSample(index, key, members)


# ---- where shards come from ----------------------------------------------------------------

@dataclass(frozen=True)
class ShardInfo:
    url: str
    bucket: str  # "" while unknown (a shard list being scanned)
    samples: int
    sha256: str | None = None
    size: int | None = None


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

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "BuildInfo":
        vae = manifest.encoders.get("vae", {})
        t5 = manifest.encoders.get("t5", {})
        return cls(resolution=manifest.resolution, max_length=manifest.config.get("max_length"),
                   caption_fields=tuple(manifest.config.get("captions") or ()),
                   latent_channels=vae.get("latent_channels"), caption_channels=t5.get("hidden_size"),
                   scaling_factor=vae.get("scaling_factor"), store_dtype=manifest.config.get("store_dtype"),
                   complete=manifest.status == "complete")


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
    """Reads shards and manifests from local disk or fsspec URLs, with timeouts, retries with
    exponential backoff (``retry_backoff * 2**attempt`` seconds), an optional download cache,
    and one policy for shards that stay unreadable."""

    storage_options: dict[str, Any] | None = None
    timeout: float | None = 60.0
    retries: int = 3
    retry_backoff: float = 1.0
    cache_dir: str | os.PathLike | None = None
    on_error: str = "raise"
    stats: ReaderStats = field(default_factory=ReaderStats)

    def __post_init__(self) -> None:
        if self.on_error not in ERROR_POLICIES:
            raise ShardkitError(f"on_error must be one of {ERROR_POLICIES}, got {self.on_error!r}")
        if self.retries < 0 or self.retry_backoff < 0:
            raise ShardkitError("retries and retry_backoff must be >= 0")
        if self.timeout is not None and self.timeout <= 0:
            raise ShardkitError(f"timeout must be positive seconds or None, got {self.timeout}")

    # -- retries -----------------------------------------------------------------------------
    def _pause_before_retry(self, url: str, attempt: int, exc: BaseException) -> None:
        delay = self.retry_backoff * 2 ** (attempt - 1)
        self.stats.retries += 1
        log.warning("reading %s failed (%s); retry %d of %d in %.1fs", url, _describe(exc), attempt, self.retries, delay)
        self._forget_cached(url)
        time.sleep(delay)

    def _retrying(self, url: str, action: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return action()
            except Exception as exc:
                if attempt < self.retries and is_transient(exc, url):
                    attempt += 1
                    self._pause_before_retry(url, attempt, exc)
                    continue
                raise

    def _give_up(self, url: str, exc: BaseException) -> None:
        """The bad-shard policy: raise a clear error, or warn, count and carry on."""
        if self.on_error == "raise":
            raise ShardReadError(f"cannot read shard {url}: {_describe(exc)}; check or rebuild the shard, "
                                 f"or pass on_error='skip' to train without it") from exc
        self.stats.shards_failed += 1
        self.stats.failed_shards.append(f"{url}: {_describe(exc)}")
        log.warning("skipping shard %s: %s", url, _describe(exc))

    # -- bytes -------------------------------------------------------------------------------
    def read_bytes(self, url: str) -> bytes:
        def fetch() -> bytes:
            with open_url(url, self.storage_options, self.timeout) as fh:
                return fh.read()

        return self._retrying(url, fetch)

    def _cache_path(self, url: str) -> Path:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(url.rstrip("/"))) or "shard"
        return Path(self.cache_dir) / f"{hashlib.sha256(url.encode('utf-8')).hexdigest()[:16]}-{name}"

    def _forget_cached(self, url: str) -> None:
        if self.cache_dir is not None and not is_local(url):
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
            with open_url(shard.url, self.storage_options, self.timeout) as src, open(temp, "wb") as dst:
                while chunk := src.read(_COPY_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
            if shard.sha256 and digest.hexdigest() != shard.sha256:
                raise ShardIntegrityError(f"downloaded bytes have sha256 {digest.hexdigest()[:12]}..., "
                                          f"the manifest says {shard.sha256[:12]}...")
            os.replace(temp, path)  # atomic: other workers see the whole file or none
        finally:
            temp.unlink(missing_ok=True)
        return path

    def open_shard(self, shard: ShardInfo) -> BinaryIO:
        if self.cache_dir is not None and not is_local(shard.url):
            return open(self._cached_copy(shard), "rb")
        return open_url(shard.url, self.storage_options, self.timeout)

    # -- samples -----------------------------------------------------------------------------
    def samples(self, shard: ShardInfo, start: int = 0, stop: int | None = None,
                want: Callable[[str, str], bool] | None = None,
                decode: Callable[[TarSample], Any] | None = None, map_payloads: bool = False) -> Iterator[Any]:
        """Samples ``start`` .. ``stop - 1`` of a shard (all of them when ``stop`` is None),
        decoded by ``decode`` (``map_payloads``: see ``iter_tar_samples``). A transient failure reopens the shard and resumes after the last
        sample delivered; a shard that stays unreadable follows ``on_error``."""
        delivered = 0
        attempt = 0
        while True:
            try:
                with self.open_shard(shard) as fileobj:
                    for raw in iter_tar_samples(fileobj, start + delivered, stop, want, map_payloads):
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
                    self._pause_before_retry(shard.url, attempt, exc)
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
                for raw in iter_tar_samples(fileobj, want=lambda key, suffix: suffix == "json"):
                    bucket = _metadata(raw).get("bucket")
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
            return self._retrying(url, count)
        except Exception as exc:
            self._give_up(url, exc)
            return None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _metadata(raw: TarSample) -> dict[str, Any]:
    payload = raw.members.get("json")
    if payload is None:
        raise ShardFormatError(f"sample {raw.key!r} has no .json member")
    try:
        data = json.loads(str(payload, "utf-8"))  # bytes, or a memoryview for a big .json
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardFormatError(f"sample {raw.key!r}: unreadable .json member ({exc})") from None
    if not isinstance(data, dict):
        raise ShardFormatError(f"sample {raw.key!r}: the .json member is not an object")
    return data


# ---- resolving a source --------------------------------------------------------------------

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
            return _from_manifest(text if is_local(text) else join_url(text, MANIFEST_NAME), store)
    if not urls:
        raise ShardkitError("the shard list is empty; pass a build folder, a manifest.json or shard URLs")
    log.info("scanning %d shards to count their samples (pass the build's manifest.json to skip this)", len(urls))
    shards = [info for info in (store.scan(url) for url in urls) if info is not None]
    if not shards:
        raise ShardkitError(f"none of the {len(urls)} shards could be read")
    return ResolvedBuild(shards=shards, manifest=None, location=urls[0])


def _from_manifest(location: str, store: ShardStore) -> ResolvedBuild:
    if is_local(location):
        path = Path(local_path(location))
        manifest = read_manifest(path)  # a build folder or the manifest file itself
        location = str(path / MANIFEST_NAME if path.is_dir() else path)
    else:
        try:
            payload = store.read_bytes(location)
        except FileNotFoundError:
            raise ShardkitError(f"no manifest at {location}; pass the OUTPUT folder of a `shardkit build`, "
                                f"its manifest.json or a list of shard URLs") from None
        except Exception as exc:
            raise ShardkitError(f"cannot read the manifest {location}: {_describe(exc)}") from None
        try:
            manifest = Manifest.from_json(json.loads(payload.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardkitError(f"{location} is not valid JSON ({exc}); is it a shardkit manifest?") from None
    if manifest.status != "complete":
        log.warning("the build at %s is not complete (status %s): reading the shards written so far",
                    location, manifest.status)
    base = posixpath.dirname(location) if not is_local(location) else str(Path(local_path(location)).parent)
    shards = [ShardInfo(url=join_url(base, safe_relative_path(e.path, "shard path")), bucket=e.bucket,
                        samples=e.samples, sha256=e.sha256, size=e.bytes)
              for e in manifest.shards if e.samples > 0]
    if not shards:
        raise ShardkitError(f"the build at {location} lists no shard with samples")
    return ResolvedBuild(shards=shards, manifest=manifest, location=location)


# ---- the epoch plan ------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedBatch:
    bucket: str
    start: int  # first position in the bucket's stream for this epoch
    size: int  # batch_size, or less for a bucket's partial tail


@dataclass(frozen=True)
class ShardPiece:
    shard: ShardInfo
    start: int  # first sample of the shard to read
    stop: int  # one past the last


@dataclass
class ReaderPlan:
    """What one reader (a rank's DataLoader worker) reads and yields in one epoch."""

    pieces: list[ShardPiece]
    batches: list[PlannedBatch]

    def full_batches(self, batch_size: int) -> Counter:
        return Counter(b.bucket for b in self.batches if b.size == batch_size)

    def partial_samples(self, batch_size: int) -> dict[str, int]:
        return {b.bucket: b.size for b in self.batches if b.size < batch_size}


def epoch_shard_order(shards: Sequence[ShardInfo], epoch: int, seed: int, shuffle: bool) -> list[ShardInfo]:
    ordered = list(shards)
    if shuffle:
        random.Random(_derive_seed(seed, epoch, "shards")).shuffle(ordered)
    return ordered


def epoch_batches(ordered: Sequence[ShardInfo], batch_size: int, keep_partial: bool) -> list[PlannedBatch]:
    """Every batch of the epoch, in the order its first sample comes in the epoch's stream."""
    totals: Counter = Counter()
    for shard in ordered:
        totals[shard.bucket] += shard.samples
    offsets: Counter = Counter()
    batches: list[PlannedBatch] = []
    for shard in ordered:
        bucket, offset = shard.bucket, offsets[shard.bucket]
        total = totals[bucket]
        full_end = total - total % batch_size
        start = -(-offset // batch_size) * batch_size  # first batch that starts in this shard
        while start < offset + shard.samples:
            if start < full_end:
                batches.append(PlannedBatch(bucket, start, batch_size))
            elif keep_partial:
                batches.append(PlannedBatch(bucket, start, total - start))
            start += batch_size
        offsets[bucket] += shard.samples
    return batches


def count_batches(shards: Sequence[ShardInfo], batch_size: int, keep_partial: bool) -> int:
    totals: Counter = Counter()
    for shard in shards:
        totals[shard.bucket] += shard.samples
    return sum(n // batch_size + (1 if keep_partial and n % batch_size else 0) for n in totals.values())


def batches_per_rank(shards: Sequence[ShardInfo], batch_size: int, world_size: int, keep_partial: bool) -> int:
    """The rule: ``floor(batches in the epoch / world_size)`` for every rank."""
    return count_batches(shards, batch_size, keep_partial) // world_size


def plan_reader(shards: Sequence[ShardInfo], *, batch_size: int, epoch: int, seed: int, shuffle: bool,
                rank: int, world_size: int, worker: int, num_workers: int, keep_partial: bool) -> ReaderPlan:
    """The batches and shard pieces of one reader for one epoch (see the module docstring)."""
    ordered = epoch_shard_order(shards, epoch, seed, shuffle)
    batches = epoch_batches(ordered, batch_size, keep_partial)
    per_rank = len(batches) // world_size
    rank_batches = batches[rank * per_rank:(rank + 1) * per_rank]
    first, count = split_evenly(len(rank_batches), num_workers, worker)
    mine = rank_batches[first:first + count]

    # A contiguous run of the batch list is, per bucket, a contiguous range of the bucket's stream.
    ranges: dict[str, list[int]] = {}
    for batch in mine:
        low_high = ranges.setdefault(batch.bucket, [batch.start, batch.start + batch.size])
        low_high[0] = min(low_high[0], batch.start)
        low_high[1] = max(low_high[1], batch.start + batch.size)
    pieces: list[ShardPiece] = []
    offsets: Counter = Counter()
    for shard in ordered:
        offset = offsets[shard.bucket]
        offsets[shard.bucket] += shard.samples
        if shard.bucket not in ranges:
            continue
        low, high = ranges[shard.bucket]
        start, stop = max(low, offset), min(high, offset + shard.samples)
        if start < stop:
            pieces.append(ShardPiece(shard, start - offset, stop - offset))
    return ReaderPlan(pieces=pieces, batches=mine)


# ---- samples -> batches --------------------------------------------------------------------

@dataclass
class DecodedSample:
    key: str
    bucket: str
    original_hw: tuple[int, int]
    moments: np.ndarray  # [2C, h, w]: the posterior mean and std, as stored
    caption_field: str
    prompt: str
    caption_feature: np.ndarray  # [L, D]: the valid tokens only


def choose_caption_field(fields: Sequence[str], available: Iterable[str], real_prompt_ratio: float, draw: float) -> str:
    """PixArt-Σ's rule: the first field with probability ``real_prompt_ratio``, else the second
    where the sample has it; the first field otherwise."""
    if len(fields) > 1 and draw >= real_prompt_ratio and fields[1] in set(available):
        return fields[1]
    return fields[0]


def _shuffled(items: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer: once ``buffer_size`` items are held, each new item replaces a random one."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def _full_batches(samples: Iterator[DecodedSample], batch_size: int,
                  buffers: dict[str, list[DecodedSample]]) -> Iterator[list[DecodedSample]]:
    """One-bucket batches as soon as a bucket has ``batch_size`` samples; the rest stay in ``buffers``."""
    for sample in samples:
        buffer = buffers[sample.bucket]
        buffer.append(sample)
        if len(buffer) == batch_size:
            yield list(buffer)
            buffer.clear()


class BatchBuffers:
    """Where the big tensors of a batch are allocated.

    - In a DataLoader worker: in shared memory, so sending the batch to the training process
      copies nothing. Tensors of ``pool_min_bytes`` or more come from this worker's pooled
      blocks (``worker_memory``), refilled once the training process has let go of them;
      torch's own collate takes a fresh segment per tensor, and the kernel's allocating and
      zeroing its pages cost a worker ~3x its reading (BENCHMARKS.md section 4).
    - Elsewhere, buffers of ``pool_min_bytes`` or more are cut from a few pooled blocks: a
      block is used again once nothing refers to it any more (no batch, view, storage or numpy
      array made from it), and a smaller batch (a bucket's tail) takes the front of a bigger
      free block. A fresh buffer of tens of MB is mapped page by page and zero-filled by the
      kernel, which costs several times more than filling it.
    """

    def __init__(self, pool_size: int = 6, pool_min_bytes: int = 1 << 20, worker_pool_size: int = 8):
        self.pool_size = pool_size
        self.pool_min_bytes = pool_min_bytes
        self.worker_pool_size = worker_pool_size  # blocks: ~4 batches (2 prefetched, 1 held, 1 filling)
        self._worker_pool: worker_memory.WorkerBlockPool | None = None
        self._worker_pool_pid = 0
        self._pool: list[np.ndarray] = []  # flat uint8 blocks
        self._lock = threading.Lock()  # a block is chosen and taken (viewed) in one step
        holder = [object()]
        self._free_refs = sys.getrefcount(holder[0])  # the count of a pooled block nobody else holds

    def reused(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array, cut from a free pooled block when one is big enough."""
        dtype = np.dtype(dtype)
        size = math.prod(shape) * dtype.itemsize
        if size < self.pool_min_bytes:
            return np.empty(shape, dtype)
        with self._lock:
            fit = spare = None
            for index in range(len(self._pool)):
                if sys.getrefcount(self._pool[index]) != self._free_refs:
                    continue  # a batch (or something made from it) still holds this block
                block_size = self._pool[index].size
                if block_size >= size and (fit is None or block_size < self._pool[fit].size):
                    fit = index
                elif block_size < size:
                    spare = index
            if fit is not None:
                block = self._pool[fit]
            else:
                block = np.empty(size, np.uint8)
                if len(self._pool) < self.pool_size:
                    self._pool.append(block)
                elif spare is not None:
                    self._pool[spare] = block  # a free block too small for this makes room
            return block[:size].view(dtype).reshape(shape)  # a view: it holds the block while in use

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor for a batch: shared in a DataLoader worker, else reused."""
        if get_worker_info() is not None:
            return self._worker_tensor(shape, dtype)
        try:
            return torch.from_numpy(self.reused(shape, torch.empty(0, dtype=dtype).numpy().dtype))
        except TypeError:  # a dtype numpy lacks (bfloat16): same-sized integers, reinterpreted
            return torch.from_numpy(self.reused(shape, np.dtype(f"u{dtype.itemsize}"))).view(dtype)

    def _worker_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """In a DataLoader worker: big tensors from this worker's pooled shared blocks
        (``worker_memory``), the rest in fresh shared memory as torch's collate allocates it."""
        if worker_memory.AVAILABLE and math.prod(shape) * dtype.itemsize >= self.pool_min_bytes:
            if self._worker_pool is None or self._worker_pool_pid != os.getpid():  # (a forked copy is not ours)
                self._worker_pool, self._worker_pool_pid = worker_memory.WorkerBlockPool(self.worker_pool_size), os.getpid()
            try:
                return self._worker_pool.tensor(shape, dtype)
            except OSError:  # e.g. out of memory for a new block: torch's route may still fit
                pass
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)


class ShardReader(IterableDataset):
    """Batches of one aspect bucket each, from a shardkit build, ready for a PixArt-Σ training step.

    Use with ``DataLoader(dataset, batch_size=None, num_workers=N)``. Each batch is, by default
    (``layout="tuple"``), PixArt's layout:

    - ``batch[0]`` latent ``[B, C, h, w]``: ``mean + std * noise`` drawn from the stored posterior
      (``latent="sample"``) or its mean (``latent="mean"``); unscaled unless ``scale_factor``;
    - ``batch[1]`` caption features ``[B, 1, max_length, D]``, padded by repeating the last valid
      row as PixArt's loader pads (``caption_padding="longest"``: to the batch's longest caption);
    - ``batch[2]`` attention mask ``[B, 1, 1, max_length]`` (``mask_dtype``, int16 by default);
    - ``batch[3]`` ``{"img_hw": float32 [B, 2] original (height, width),
      "aspect_ratio": float32 [B] bucket ratio}``.

    ``layout="dict"`` gives ``{"latent", "caption_feature", "attention_mask", "data_info",
    "keys", "prompt", "caption_field", "bucket"}``.

    Args:
        source: a build folder (local path or URL prefix), its ``manifest.json`` (path or URL),
            or a list / brace pattern of shard URLs (scanned once to count samples).
        batch_size: samples per batch.
        latent: ``"sample"`` or ``"mean"``.
        scale_factor: multiply latents by this (PixArt's train.py scales them itself).
        dtype: float dtype of latents and features; None keeps the stored dtype (fp16 by default).
        mask_dtype: dtype of the attention mask.
        max_length: token length to pad to; default the build's T5 ``max_length``.
        caption_padding: ``"max_length"`` (PixArt's layout: every batch is ``max_length`` tokens
            long; PixArt's own models need it, their caption dropout swaps in a
            ``max_length``-row null embedding) or ``"longest"``: pad to the batch's longest
            caption (at most ``max_length``), for models that take any length with an
            attention mask (diffusers' ``PixArtTransformer2DModel``): smaller batches, less to
            copy and to attend over.
        caption_fields: one or two caption fields; default the build's first two.
        real_prompt_ratio: probability of the first caption field per sample (PixArt-Σ's
            ``real_prompt_ratio``); the second field is used otherwise, where the sample has it.
        layout: ``"tuple"`` or ``"dict"``.
        shuffle: shuffle the shard order per epoch and samples through a buffer.
        shuffle_buffer: samples held by the shuffle buffer (memory: that many decoded samples).
        seed: seeds every random choice; with ``set_epoch`` the stream is reproducible. Latent
            noise and caption choice depend on (seed, epoch, sample key) only.
        drop_last: drop each bucket's partial tail batch; default drops them when training on
            several ranks and keeps them in a single process.
        rank, world_size: this process's rank; default from torch.distributed when initialised,
            else the RANK and WORLD_SIZE environment variables, else a single process.
        resampled: draw shards at random with replacement forever (weighted by sample count);
            each rank then yields ``batches_per_epoch`` batches per epoch (None: endless).
        storage_options: fsspec options for remote URLs (endpoint, credentials, ...).
        cache_dir: download remote shards once into this folder (sha256-checked) and reuse them.
        retries, retry_backoff, timeout: transient failures are retried ``retries`` times after
            ``retry_backoff * 2**n`` seconds; remote reads time out after ``timeout`` seconds.
        on_error: ``"raise"`` stops on an unreadable shard with a ShardReadError; ``"skip"``
            logs a warning, counts it in ``stats`` and goes on (ranks stay equal: a rank that lost
            samples repeats some to keep its batch count).
        memory_map: read the arrays of local shards (and of ``cache_dir`` copies) through a
            read-only memory map of the file, which saves copying them out of the page cache
            before they are copied into a batch. A mapped file must not be cut short or
            rewritten in place while it is read (the OS would stop the process with SIGBUS);
            shardkit's own writers replace files by renaming. Pass False for shards on
            storage that rewrites files in place.
    """

    # train_scripts/train.py reads these to know that batch[0] and batch[1] are features.
    load_vae_feat = True
    load_t5_feat = True

    def __init__(self, source: str | os.PathLike | Sequence[str], batch_size: int, *, latent: str = "sample",
                 scale_factor: float | None = None, dtype: torch.dtype | None = None,
                 mask_dtype: torch.dtype = torch.int16, max_length: int | None = None,
                 caption_padding: str = "max_length", caption_fields: Sequence[str] | None = None,
                 real_prompt_ratio: float = 1.0, layout: str = "tuple", shuffle: bool = True, shuffle_buffer: int = 128, seed: int = 0,
                 drop_last: bool | None = None, rank: int | None = None, world_size: int | None = None,
                 resampled: bool = False, batches_per_epoch: int | None = None,
                 storage_options: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                 retries: int = 3, retry_backoff: float = 1.0, timeout: float | None = 60.0,
                 on_error: str = "raise", memory_map: bool = True):
        super().__init__()
        _require(isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be a positive integer, got {batch_size!r}")
        _require(latent in LATENT_MODES, f"latent must be one of {LATENT_MODES}, got {latent!r}")
        _require(layout in LAYOUTS, f"layout must be one of {LAYOUTS}, got {layout!r}")
        _require(caption_padding in CAPTION_PADDINGS,
                 f"caption_padding must be one of {CAPTION_PADDINGS}, got {caption_padding!r}")
        _require(0.0 <= real_prompt_ratio <= 1.0, f"real_prompt_ratio must be within [0, 1], got {real_prompt_ratio}")
        _require(shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        _require((rank is None) == (world_size is None), "pass both rank and world_size, or neither")
        if world_size is not None:
            _require(world_size >= 1 and 0 <= rank < world_size, f"rank must be within [0, world_size), got {rank} of {world_size}")
        _require(batches_per_epoch is None or batches_per_epoch >= 0, "batches_per_epoch must be >= 0")
        _require(batches_per_epoch is None or resampled, "batches_per_epoch applies to resampled=True only")
        self.store = ShardStore(storage_options=storage_options, timeout=timeout, retries=retries,
                                retry_backoff=retry_backoff, cache_dir=cache_dir, on_error=on_error)
        resolved = resolve_build(source, self.store)
        self.shards = resolved.shards
        self.info = (BuildInfo.from_manifest(resolved.manifest) if resolved.manifest is not None else
                     BuildInfo(None, None, (), None, None, None, None, complete=False))
        self.max_length = max_length or self.info.max_length
        _require(self.max_length is not None and self.max_length >= 1,
                 "pass max_length (the T5 token length the trainer uses) when reading shards without their manifest")
        fields = tuple(caption_fields) if caption_fields else (self.info.caption_fields[:2] or ("prompt", "sharegpt4v"))
        _require(1 <= len(fields) <= 2, f"caption_fields takes one or two fields, got {list(fields)}")
        self.caption_fields = fields
        self.caption_padding = caption_padding
        self.batch_size = batch_size
        self.latent = latent
        self.scale_factor = scale_factor
        self.dtype = dtype
        self.mask_dtype = mask_dtype
        self.real_prompt_ratio = real_prompt_ratio
        self.layout = layout
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.seed = seed
        self.drop_last = drop_last
        self.resampled = resampled
        self.batches_per_epoch = batches_per_epoch
        self.memory_map = memory_map
        self.epoch = 0
        self._rank = rank
        self._world_size = world_size
        self._buffers = BatchBuffers()

    # -- public ------------------------------------------------------------------------------
    @property
    def stats(self) -> ReaderStats:
        return self.store.stats

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch (before iterating the DataLoader) for a new shuffle."""
        self.epoch = int(epoch)

    def distributed(self) -> tuple[int, int]:
        """(rank, world_size) this reader splits by."""
        if self._rank is not None:
            return self._rank, self._world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        try:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        except ValueError:
            raise ShardkitError("RANK and WORLD_SIZE must be integers; pass rank= and world_size= explicitly") from None
        _require(world >= 1 and 0 <= rank < world, f"RANK {rank} is not within WORLD_SIZE {world}")
        return rank, world

    def keep_partial(self, world_size: int) -> bool:
        return (not self.drop_last) if self.drop_last is not None else world_size == 1

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the total over its DataLoader workers)."""
        if self.resampled:
            if self.batches_per_epoch is None:
                raise TypeError("a resampled ShardReader without batches_per_epoch is endless and has no length")
            return self.batches_per_epoch
        _, world = self.distributed()
        return batches_per_rank(self.shards, self.batch_size, world, self.keep_partial(world))

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DataLoader workers may not see the process group: pin the parent's rank.
        state = self.__dict__.copy()
        state["_rank"], state["_world_size"] = self.distributed()
        del state["_buffers"]  # each process pools its own batch buffers
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._buffers = BatchBuffers()

    def __iter__(self) -> Iterator[Any]:
        rank, world = self.distributed()
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch = self.epoch
        rng = random.Random(_derive_seed(self.seed, epoch, rank, worker, "buffer"))
        if self.resampled:
            yield from self._iter_resampled(epoch, rank, worker, num_workers, rng)
            return
        plan = plan_reader(self.shards, batch_size=self.batch_size, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
                           rank=rank, world_size=world, worker=worker, num_workers=num_workers,
                           keep_partial=self.keep_partial(world))
        if not plan.batches and worker == 0 and rank == 0 and len(self) == 0:
            log.warning("the build has fewer batches of %d than ranks (%d): every rank yields nothing", self.batch_size, world)
        yield from self._iter_plan(plan, epoch, rank, world, rng)

    # -- reading -----------------------------------------------------------------------------
    def _decode(self, raw: TarSample, shard: ShardInfo, epoch: int) -> DecodedSample:
        meta = _metadata(raw)
        try:
            if meta.get("key", raw.key) != raw.key:
                raise ShardFormatError(f"sample {raw.key!r}: its .json names key {meta.get('key')!r}")
            bucket = str(meta["bucket"])
            if shard.bucket and bucket != shard.bucket:
                raise ShardFormatError(f"sample {raw.key!r} is in bucket {bucket}, its shard holds bucket {shard.bucket}")
            if "latent.npy" not in raw.members:
                raise ShardFormatError(f"sample {raw.key!r} has no latent.npy member")
            moments = read_npy(raw.members["latent.npy"], f"{raw.key}.latent.npy")
            if moments.ndim != 3 or moments.shape[0] % 2 or list(moments.shape) != list(meta["latent_shape"]):
                raise ShardFormatError(f"sample {raw.key!r}: latent shape {list(moments.shape)}, "
                                       f"its .json says {meta['latent_shape']} ([2C, h, w])")
            available = [name for name in meta.get("t5_fields", []) if f"t5_{name}.npy" in raw.members]
            chosen = choose_caption_field(self.caption_fields, available, self.real_prompt_ratio,
                                          self._caption_draw(raw.key, epoch))
            if chosen not in available:
                raise ShardFormatError(f"sample {raw.key!r} has no T5 features for caption field {chosen!r}")
            feature = read_npy(raw.members[f"t5_{chosen}.npy"], f"{raw.key}.t5_{chosen}.npy")
            length = meta["t5_lengths"][chosen]
            if feature.ndim != 2 or feature.shape[0] != length or length < 1:
                raise ShardFormatError(f"sample {raw.key!r}: T5 features of shape {list(feature.shape)}, "
                                       f"its .json says {length} tokens")
            height, width = (int(v) for v in meta["original_hw"])
            prompt = str(meta["captions"][chosen])
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardFormatError(f"sample {raw.key!r}: malformed metadata ({_describe(exc)})") from None
        return DecodedSample(key=raw.key, bucket=bucket, original_hw=(height, width), moments=moments,
                             caption_field=chosen, prompt=prompt, caption_feature=feature)

    def _caption_draw(self, key: str, epoch: int) -> float:
        """The sample's draw for ``choose_caption_field``; with one field, or a ratio of 0 or 1,
        the draw cannot change the choice and 0.0 stands for it."""
        if len(self.caption_fields) < 2 or not 0.0 < self.real_prompt_ratio < 1.0:
            return 0.0
        # The hash's top 53 bits as a float in [0, 1): as uniform as Random(seed).random(), and
        # 10x cheaper than seeding a generator (the draw is taken for the filter and for _decode).
        return (_derive_seed(self.seed, epoch, key, "caption") >> 11) * 2.0 ** -53

    def _member_filter(self, epoch: int) -> Callable[[str, str], bool]:
        """The members ``_decode`` may use: the .json, the latent, the first caption field's T5
        rows, and the second field's only where the sample's draw may choose it. The image,
        the .txt and the other caption fields are skipped unread."""
        first = f"t5_{self.caption_fields[0]}.npy"
        second = f"t5_{self.caption_fields[1]}.npy" if len(self.caption_fields) > 1 else None
        ratio = self.real_prompt_ratio

        def want(key: str, suffix: str) -> bool:
            if suffix == "json" or suffix == "latent.npy" or suffix == first:
                return True
            return suffix == second and self._caption_draw(key, epoch) >= ratio

        return want

    def _piece_samples(self, pieces: Iterable[ShardPiece], epoch: int) -> Iterator[DecodedSample]:
        want = self._member_filter(epoch)
        for piece in pieces:
            shard = piece.shard
            yield from self.store.samples(shard, piece.start, piece.stop, want,
                                          lambda raw, shard=shard: self._decode(raw, shard, epoch), self.memory_map)

    def _emit(self, samples: list[DecodedSample], epoch: int) -> Any:
        self.stats.batches += 1
        self.stats.samples += len(samples)
        return self.collate(samples, epoch)

    def _iter_plan(self, plan: ReaderPlan, epoch: int, rank: int, world: int, rng: random.Random) -> Iterator[Any]:
        buffers: dict[str, list[DecodedSample]] = defaultdict(list)
        emitted: Counter = Counter()
        last: list[DecodedSample] | None = None
        with contextlib.closing(self._piece_samples(plan.pieces, epoch)) as stream:
            for last in _full_batches(_shuffled(stream, self.shuffle_buffer, rng), self.batch_size, buffers):
                emitted[last[0].bucket] += 1
                yield self._emit(last, epoch)

        full = plan.full_batches(self.batch_size)
        partial = plan.partial_samples(self.batch_size)
        for bucket in sorted(set(full) | set(partial) | set(buffers), key=float):
            rest = buffers.get(bucket, [])
            owed = [self.batch_size] * (full.get(bucket, 0) - emitted[bucket]) + ([partial[bucket]] if bucket in partial else [])
            if world == 1:
                # One process: nothing to keep in step; the tail is yielded as it is, if kept.
                if rest and self.keep_partial(world):
                    yield self._emit(rest, epoch)
                continue
            if owed == ([len(rest)] if rest else []):
                if rest:
                    yield self._emit(rest, epoch)
                continue
            # Samples were lost with a skipped shard. Every rank must step the same number of
            # times, so the batches owed are made up from samples this reader already holds.
            for size in owed:
                if rest:
                    batch = [rest[i % len(rest)] for i in range(size)]
                    rest = []
                elif last is not None:
                    batch = last
                else:
                    raise ShardReadError(f"rank {rank} read no sample this epoch (every shard it was given failed: "
                                         f"{'; '.join(self.stats.failed_shards[-3:])}); fix or rebuild those shards")
                self.stats.filled_batches += 1
                yield self._emit(batch, epoch)

    def _iter_resampled(self, epoch: int, rank: int, worker: int, num_workers: int, rng: random.Random) -> Iterator[Any]:
        quota = None
        if self.batches_per_epoch is not None:
            _, quota = split_evenly(self.batches_per_epoch, num_workers, worker)
            if quota == 0:
                return
        draws = random.Random(_derive_seed(self.seed, epoch, rank, worker, "resample"))
        weights = [shard.samples for shard in self.shards]

        def endless() -> Iterator[DecodedSample]:
            failures_in_a_row = 0
            while True:
                shard = draws.choices(self.shards, weights)[0]
                got_any = False
                for sample in self._piece_samples([ShardPiece(shard, 0, shard.samples)], epoch):
                    got_any = True
                    yield sample
                failures_in_a_row = 0 if got_any else failures_in_a_row + 1
                if failures_in_a_row > len(self.shards):
                    raise ShardReadError(f"{failures_in_a_row} shards in a row could not be read "
                                         f"({'; '.join(self.stats.failed_shards[-3:])}); fix the shards")

        done = 0
        with contextlib.closing(endless()) as stream:
            for batch in _full_batches(_shuffled(stream, self.shuffle_buffer, rng), self.batch_size, defaultdict(list)):
                yield self._emit(batch, epoch)
                done += 1
                if quota is not None and done >= quota:
                    return

    # -- batches -----------------------------------------------------------------------------
    def collate(self, samples: Sequence[DecodedSample], epoch: int | None = None) -> Any:
        """One batch from samples of one bucket, in the layout chosen."""
        epoch = self.epoch if epoch is None else epoch
        if len({s.bucket for s in samples}) != 1:
            raise ValueError("a batch must hold samples of one bucket")
        count = len(samples)
        moments = torch.from_numpy(np.stack([s.moments for s in samples]))
        channels = moments.shape[1] // 2
        float_dtype = self.dtype or moments.dtype
        buffers = self._buffers
        latent = buffers.tensor((count, channels, *moments.shape[2:]), float_dtype)
        # The arithmetic runs in float32 one sample at a time: no batch-sized float32 copy, and
        # up to 512-px buckets a sample is under torch's parallel grain, so no intra-op threads
        # are woken (on a busy machine waking them costs more than the work).
        in_place = float_dtype == torch.float32
        work = None if in_place else torch.empty(latent.shape[1:], dtype=torch.float32)
        generator = torch.Generator() if self.latent == "sample" else None
        direct_mean = generator is None and self.scale_factor is None and moments.dtype in _FLOAT32_EXACT
        for i, sample in enumerate(samples):
            mean = moments[i, :channels]
            if direct_mean:
                latent[i].copy_(mean)  # one conversion, the same values as by way of float32
                continue
            value = latent[i] if in_place else work
            if generator is not None:
                # Each sample's noise comes from its own seed (seed, epoch, key): the same sample
                # gets the same noise whatever batch, worker or rank it lands in. Re-seeding one
                # generator gives the values a fresh one would.
                value.normal_(generator=generator.manual_seed(_derive_seed(self.seed, epoch, sample.key, "noise")))
                value.mul_(moments[i, channels:].float()).add_(mean.float())
            else:
                value.copy_(mean)
            if self.scale_factor is not None:
                value.mul_(self.scale_factor)
            if not in_place:
                latent[i].copy_(value)
        # Filled in place: at PixArt's sizes a padded batch is tens of MB, so no extra copies.
        lengths = [min(s.caption_feature.shape[0], self.max_length) for s in samples]
        padded_length = self.max_length if self.caption_padding == "max_length" else max(lengths)
        width = samples[0].caption_feature.shape[1]
        stored_dtype = samples[0].caption_feature.dtype
        shape = (count, 1, padded_length, width)
        stored_torch_dtype = torch.from_numpy(np.empty(0, stored_dtype)).dtype
        convert = self.dtype is not None and self.dtype != stored_torch_dtype
        if convert:  # padded at the stored dtype, then converted by torch in one pass
            features = buffers.reused(shape, stored_dtype)
        else:
            caption_feature = buffers.tensor(shape, stored_torch_dtype)
            features = caption_feature.numpy()
        mask = torch.zeros((count, 1, 1, padded_length), dtype=self.mask_dtype)
        try:
            mask_rows = mask.numpy()[:, 0, 0]  # a view: setting numpy slices costs less than torch indexing
        except TypeError:  # a dtype numpy lacks (bfloat16)
            mask_rows = mask[:, 0, 0]
        for i, sample in enumerate(samples):
            pad_caption_feature(sample.caption_feature, padded_length, out=features[i, 0])
            mask_rows[i, :lengths[i]] = 1
        if convert:
            caption_feature = buffers.tensor(shape, self.dtype).copy_(torch.from_numpy(features))
        data_info = {
            "img_hw": torch.tensor([s.original_hw for s in samples], dtype=torch.float32),
            "aspect_ratio": torch.full((count,), float(samples[0].bucket), dtype=torch.float32),
        }
        if self.layout == "tuple":
            return latent, caption_feature, mask, data_info
        return {"latent": latent, "caption_feature": caption_feature, "attention_mask": mask, "data_info": data_info,
                "keys": [s.key for s in samples], "prompt": [s.prompt for s in samples],
                "caption_field": [s.caption_field for s in samples], "bucket": samples[0].bucket}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ShardkitError(message)
