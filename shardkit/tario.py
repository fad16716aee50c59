"""Tar: the deterministic USTAR writer of shards and the one strict reader of any tar.

Reading parses headers here rather than with ``tarfile``: a training step reads a few members of
each sample (the .json, the latent, one caption field's T5 rows) and a stream reader would read
every byte of the others (images, other caption fields) in small chunks. Local files are read
with ``os.pread`` at an offset kept here, so skipped members cost nothing; streams that cannot
seek (HTTP, decompressors) are read and dropped in large chunks.

Nothing in a tar is trusted. Every header is checked before it is used: its checksum, every
numeric field (octal or GNU base-256, never negative), its type, the ustar magic; PAX records
and GNU long names are bounded in size and parsed strictly; a member's size is checked against
the caller's bound before a byte of it is read; the read position only ever moves forward. Any
violation is a ``ShardFormatError`` (never retried); a tar that ends early is a
``ShardTruncatedError``.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import struct
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, NamedTuple

from .errors import ShardFormatError, ShardTruncatedError
from .format import split_member_name

BLOCK = 512
RECORD = 20 * BLOCK
_END_OF_ARCHIVE = bytes(BLOCK)
_SKIP_CHUNK = 1 << 20
_READ_AHEAD = 8192
_READ_AHEAD_STREAM = 1 << 16
_REGULAR_TYPES = (b"0", b"\0", b"7")  # regular, old-style regular, contiguous file
_DATALESS_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders, fifos: size counts no data
_PAX_TYPES = (b"x", b"g", b"X")  # pax extended header (per member, global, Solaris)
_GNU_TYPES = (b"L", b"K", b"S")  # GNU long name, long link, sparse file: no ustar prefix
_MAGICS = (b"ustar\x0000", b"ustar  \0", b"\0" * 8)  # POSIX, old GNU, v7
MAX_EXTENDED_HEADER = 1 << 20  # a PAX header or GNU long name past this is not a name
MAX_NAME = 4096


# ---- writing -------------------------------------------------------------------------------

class UstarWriter:
    """Writes USTAR members straight to ``out``: the bytes of tarfile's ``w|`` stream at a third
    of its cost (tarfile copies each payload through its buffer in 10 KiB slices). Members carry
    mtime 0, uid/gid 0, mode 0644: the same members give the same bytes. ``close()`` ends the
    archive as tarfile does: two zero blocks, then zeros up to a whole 10 KiB record."""

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
        padding = -len(payload) % BLOCK
        self._out.write(header)
        self._out.write(payload)
        if padding:
            self._out.write(bytes(padding))
        self._offset += len(header) + len(payload) + padding

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        end = 2 * BLOCK
        end += -(self._offset + end) % RECORD
        self._out.write(bytes(end))


# ---- the bytes of a tar --------------------------------------------------------------------

class _LocalTarBytes:
    """A tar in a local file, read with ``os.pread`` at an offset kept here: skipping a member
    only moves the offset. Small reads (headers, the .json) come from a read-ahead window.

    After ``map_payloads()``, reads bigger than the window (the arrays) are read-only memoryviews
    of a map of the file instead of copies; a view keeps the map alive."""

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
        size = max(0, min(size, self.end - self.position))  # never past the file's end (a huge claimed size)
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
    chunks of ``_READ_AHEAD_STREAM``, skipped bytes read and dropped."""

    def __init__(self, fileobj: BinaryIO):
        self.fileobj, self.start, self.position = fileobj, 0, 0
        self._buffer, self._at = b"", 0  # the bytes read ahead are self._buffer[self._at:]

    def _read_raw(self, size: int) -> bytes:
        # A stream may return fewer bytes than asked (aiohttp returns what has arrived).
        parts, got = [], 0
        while got < size:
            chunk = self.fileobj.read(min(size - got, _SKIP_CHUNK * 64))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _fill(self, size: int) -> None:
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
    """The tar's bytes from the file object's position, decompressed if the stream is gzip,
    bzip2 or xz (as ``tarfile``'s ``r|*`` detects them)."""
    try:
        fd = fileobj.fileno()
        status = os.fstat(fd)
        local = stat.S_ISREG(status.st_mode)
    except (AttributeError, OSError, ValueError):  # not an OS file (io.UnsupportedOperation is both)
        local = False
    source: _LocalTarBytes | _StreamTarBytes
    source = _LocalTarBytes(fd, fileobj.tell(), status.st_size) if local else _StreamTarBytes(fileobj)
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
    return _StreamTarBytes(opener(source))  # type: ignore[arg-type]


# ---- headers -------------------------------------------------------------------------------

def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


_OCTAL = re.compile(rb"[0-7]*")
_PLAIN_OCTAL_FIELD = re.compile(rb" *[0-7]* *[\0 ]*")  # how writers fill the fields: the fast path


def _number(field: bytes, what: str, offset: int) -> int:
    """A numeric header field: octal digits (space padded, ended by NUL as tarfile reads them),
    or GNU's positive base-256."""
    if _PLAIN_OCTAL_FIELD.fullmatch(field):
        return int(field.strip(b" \0") or b"0", 8)
    if field[0] == 0o200:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not _OCTAL.fullmatch(text):  # also GNU's negative base-256 (first byte 0o377)
        raise ShardFormatError(f"the tar header at byte {offset} is damaged: its {what} field is not a "
                               f"non-negative number")
    return int(text or b"0", 8)


def _check_header(block: bytes, offset: int) -> tuple[str, int, bytes]:
    """(name, size, type) of a 512-byte header, every field checked."""
    stored = block[148:156].split(b"\0", 1)[0].strip(b" ")
    checksum = int(stored, 8) if stored and _OCTAL.fullmatch(stored) else -1
    unsigned = 256 + sum(block) - sum(block[148:156])  # the field counts as eight spaces
    if checksum != unsigned and checksum != unsigned - 256 * sum(byte >= 128 for byte in block[:148] + block[156:]):
        what = "not a tar file (its first header is damaged)" if offset == 0 else f"the tar header at byte {offset} is damaged"
        raise ShardFormatError(f"{what}: bad checksum, the members from there on cannot be read")
    if block[257:265] not in _MAGICS:
        raise ShardFormatError(f"the tar header at byte {offset} is damaged: unknown magic {bytes(block[257:265])!r}")
    for what, start, end in (("mode", 100, 108), ("uid", 108, 116), ("gid", 116, 124), ("mtime", 136, 148)):
        _number(block[start:end], what, offset)
    size = _number(block[124:136], "size", offset)
    kind = block[156:157]
    name = _text(block[0:100])
    if block[345] and kind not in _GNU_TYPES and block[257:263] == b"ustar\x00":
        name = f"{_text(block[345:500])}/{name}"  # ustar: a long name is split into prefix/name
    return name, size, kind


def _pax_records(payload: bytes, offset: int) -> dict[str, str]:
    """The ``"%d %s=%s\\n"`` records of a pax extended header, each one checked."""
    records: dict[str, str] = {}
    position = 0
    while position < len(payload) and payload[position] != 0:
        space = payload.find(b" ", position, position + 20)
        digits = payload[position:space] if space > position else b""
        if not digits.isdigit():
            raise ShardFormatError(f"the pax header at byte {offset} is damaged: a record has no length")
        length = int(digits)
        record = payload[space + 1:position + length]
        if length <= space - position + 1 or position + length > len(payload) or not record.endswith(b"\n") \
                or b"=" not in record:
            raise ShardFormatError(f"the pax header at byte {offset} is damaged: a record's length is wrong")
        keyword, _, value = record[:-1].partition(b"=")
        records[keyword.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


class TarMember(NamedTuple):  # a tuple: one is made per member on the reader's hot path
    name: str
    size: int
    regular: bool  # False: a folder, link, device... (no payload to read)
    offset: int  # of its first header in the tar (a pax header or GNU long name, where it has one)


class TarMembers:
    """The members of a tar, front to back: ``next()`` gives each one; ``payload()`` reads the
    data of the regular member just given (once), and a member whose payload is not read is
    skipped. Names resolve as ``tarfile`` resolves them (ustar prefix, GNU long names, pax
    ``path``/``size``). ``map_payloads``: big payloads of a local, uncompressed tar come as
    read-only memoryviews of a map of the file."""

    def __init__(self, fileobj: BinaryIO, map_payloads: bool = False):
        self._bytes = _tar_bytes(fileobj, map_payloads)
        self._pending = 0  # bytes of the current member (data and padding) not consumed
        self._size = 0
        self._name = ""
        self._global_pax: dict[str, str] = {}
        self.ended = False
        self.end: int | None = None  # where the end-of-archive blocks start, once reached

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

    def _skip(self, size: int) -> None:
        if size < 0:  # never: sizes are checked non-negative; the position only moves forward
            raise ShardFormatError(f"the tar asks to move back {-size} bytes at byte {self.offset}")
        if self._bytes.skip(size) < size:
            raise self._cut_short()

    def _extended(self, size: int, offset: int) -> bytes:
        if size > MAX_EXTENDED_HEADER:
            raise ShardFormatError(f"the extended header at byte {offset} claims {size} bytes "
                                   f"(at most {MAX_EXTENDED_HEADER}); the tar is damaged")
        return bytes(self._consume(size + (-size) % BLOCK)[:size])

    def next(self) -> TarMember | None:
        """The next member, or None at the end of the archive (two zero blocks)."""
        long_name: str | None = None
        pax: dict[str, str] = {}
        first_header: int | None = None  # a member starts at its first (extended) header
        while True:
            if self._pending:
                self._skip(self._pending)
                self._pending = 0
            offset = self.offset
            first_header = offset if first_header is None else first_header
            block = self._bytes.read(BLOCK)
            if len(block) < BLOCK:
                if offset == 0 and not block:
                    raise ShardTruncatedError("the shard is empty")
                raise ShardTruncatedError(f"the tar stops at byte {offset + len(block)} without its end-of-archive "
                                          f"blocks: the shard was cut short")
            if block == _END_OF_ARCHIVE:
                second = self._bytes.read(BLOCK)
                if len(second) < BLOCK:
                    raise ShardTruncatedError(f"the tar stops at byte {offset + BLOCK + len(second)} inside its "
                                              f"end-of-archive blocks: the shard was cut short")
                if second != _END_OF_ARCHIVE:
                    raise ShardFormatError(f"the tar header at byte {offset} is damaged: a zero block is "
                                           f"followed by data")
                self.ended = True
                self.end = offset
                return None
            name, size, kind = _check_header(bytes(block), offset)
            self._name = name
            if kind in _PAX_TYPES:
                (self._global_pax if kind == b"g" else pax).update(_pax_records(self._extended(size, offset), offset))
                continue
            if kind == b"L":
                long_name = _text(self._extended(size, offset))
                continue
            if kind == b"K":  # a GNU long link name: it belongs to the next header
                self._extended(size, offset)
                continue
            if kind == b"S":
                raise ShardFormatError(f"member {name!r} is a sparse file, which shards never hold")
            extended = {**self._global_pax, **pax}
            name = extended.get("path", long_name if long_name is not None else name)
            if len(name) > MAX_NAME:
                raise ShardFormatError(f"the member at byte {offset} has a name of {len(name)} characters")
            if "size" in extended:
                value = extended["size"]
                if not value.isdigit():
                    raise ShardFormatError(f"the pax header before byte {offset} gives size {value!r}")
                size = int(value)
            regular = kind in _REGULAR_TYPES and not (kind == b"\0" and name.endswith("/"))
            dataless = kind in _DATALESS_TYPES or (kind == b"\0" and not regular)
            self._name, self._size = name, (size if regular else 0)
            self._pending = 0 if dataless else size + (-size) % BLOCK  # unknown types carry data, as tarfile reads them
            return TarMember(name, size, regular, first_header)

    def payload(self) -> bytes | memoryview:
        """The data of the regular member ``next()`` gave last (once)."""
        data = self._consume(self._size)
        self._pending -= self._size
        self._size = 0
        return data


# ---- sample offset index (NAME.tar.idx, as Megatron-Energon reads it) ------------------------

TAR_INDEX_SUFFIX = ".idx"  # appended to the shard's name


def tar_index_bytes(sample_offsets: list[int]) -> bytes:
    """Little-endian uint64 offsets of each sample's first header, then the end of the last sample."""
    return struct.pack(f"<{len(sample_offsets)}Q", *sample_offsets)


# ---- tar -> samples ------------------------------------------------------------------------

@dataclass
class TarSample:
    index: int  # position of the sample in its shard
    key: str
    members: dict[str, bytes | memoryview]  # suffix (lower case, after the key's dot) -> payload


def iter_tar_samples(fileobj: BinaryIO, start: int = 0, stop: int | None = None,
                     want: Callable[[str, str], bool] | None = None, map_payloads: bool = False,
                     max_bytes: Callable[[str], int] | None = None) -> Iterator[TarSample]:
    """The samples of a tar, grouped as WebDataset groups them: a run of adjacent members sharing
    a key. A key that comes back after another key is an error, as is a suffix repeated within a
    sample, or a member larger than ``max_bytes(suffix)`` (checked before it is read).

    Samples before ``start`` are counted but not read; reading stops once sample ``stop - 1`` is
    complete. ``want(key, suffix)`` selects the members whose bytes are kept; the others are
    skipped without being read where the file allows it (local files)."""
    seen: set[str] = set()
    key: str | None = None
    index = -1
    members: dict[str, bytes | memoryview] = {}
    suffixes: set[str] = set()
    tar = TarMembers(fileobj, map_payloads)
    while (member := tar.next()) is not None:
        parsed = split_member_name(member.name) if member.regular else None
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
        if max_bytes is not None and member.size > (limit := max_bytes(suffix)):
            raise ShardFormatError(f"member {member.name!r} claims {member.size} bytes, more than the "
                                   f"{limit} its build's format allows")
        if index >= start and (want is None or want(key, suffix)):
            members[suffix] = tar.payload()
    if key is not None and index >= start and (stop is None or index < stop):
        yield TarSample(index, key, members)
