"""WebDataset tar shards (img2dataset's output): ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` per sample.

A sample is the run of adjacent members sharing a key, the key ending at the first dot of the
basename, as webdataset groups them. The image is the member whose extension is an image type
(its bytes are sniffed later: img2dataset names PNG and WebP bytes ``.jpg``); captions come from
members named by ``--captions`` (``txt``) or from keys of the ``json`` member, whose other keys are
the sample's metadata. Shards are read front to back as a stream, local or remote; only the
members a record needs are read, each with a size limit. A shard that ends early or has a broken
header yields the samples before the damage and then one ``damaged_shard`` record.
"""

from __future__ import annotations

import gzip
import json
import lzma
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import SourceError
from ..images import SourceUnavailable
from ..sourcefiles import FILE_TOO_LARGE, SourceFileSkip, open_regular, too_large
from ..storage import RemotePath, open_read
from .base import (CAPTION_LIMIT, CAPTION_MAX_BYTES, DAMAGED_SHARD, IMAGE_EXTENSIONS, INVALID_METADATA, Location, Record,
                   SourceSpec, nested_too_deep,
                   too_deep_problem)

# webdataset's split of a member name into key and extension: the key ends at the basename's first dot.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./][^./]*)\.([^/]*)$")
_IMAGE_EXTENSIONS = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS}
# Nothing in a shard is trusted: members larger than these are not read.
# (An image member is bounded by --max-image-bytes, a caption member as a caption file is.)
MAX_JSON_MEMBER_BYTES = 16 * 2**20
_JSON_LIMIT = f"json members are read up to {MAX_JSON_MEMBER_BYTES} bytes"


@dataclass
class _Sample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes, in member order
    problem: tuple[str, str] | None = None


def iter_records(spec: SourceSpec, caption_fields: tuple[str, ...]) -> Iterator[Record]:
    index = 0
    names = shard_names(spec.files)
    for shard, name in zip(spec.files, names):
        for sample in _samples(shard, name, caption_fields, spec.max_image_bytes):
            yield _record(sample, index, name, caption_fields)
            index += 1


def shard_names(files: tuple[Location, ...]) -> list[str]:
    """How records name their shard (and what their keys are derived from): the file name, or the
    whole location where two shards share a name."""
    names = [f.name for f in files]
    return names if len(set(names)) == len(names) else [str(f) for f in files]


def _bound(extension: str, caption_fields: tuple[str, ...], max_image_bytes: int) -> tuple[int, str] | None:
    """The most bytes a member worth reading may hold, with the option or rule that says so; None
    for members no record uses (they are skipped unread)."""
    last = extension.rsplit(".", 1)[-1].lower()
    if last in _IMAGE_EXTENSIONS:
        return max_image_bytes, "--max-image-bytes"
    if last == "json":
        return MAX_JSON_MEMBER_BYTES, _JSON_LIMIT
    if extension in caption_fields or last in caption_fields:
        return CAPTION_MAX_BYTES, CAPTION_LIMIT
    return None


def _samples(shard: Location, name: str, caption_fields: tuple[str, ...], max_image_bytes: int) -> Iterator[_Sample]:
    remote = isinstance(shard, RemotePath)
    try:
        handle = open_read(shard.url, shard.options) if remote else open_regular(shard)
    except SourceFileSkip as exc:
        raise SourceError(f"shard {exc.detail}; list tar files only") from None
    except FileNotFoundError:
        if remote:
            raise SourceUnavailable(f"shard {shard} does not exist") from None
        raise SourceError(f"shard {shard} does not exist; check the shard list or brace pattern") from None
    except OSError as exc:
        if remote:
            raise SourceUnavailable(f"cannot read shard {shard}: {exc}") from None
        raise SourceError(f"cannot read shard {shard}: {exc.strerror or exc}") from None
    current: _Sample | None = None
    read = 0
    with handle:
        try:
            with tarfile.open(fileobj=handle, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue  # folders, links and devices are never followed
                    match = _KEY_AND_EXTENSION.match(info.name)
                    if match is None:
                        continue
                    key, extension = match.groups()
                    if current is None or key != current.key:
                        if current is not None:
                            read += 1
                            yield current
                        current = _Sample(key)
                    bound = _bound(extension, caption_fields, max_image_bytes)
                    if bound is None:
                        continue
                    if info.size > bound[0]:  # refused by its header, before a byte of it is read
                        refusal = too_large(f"{name}/{info.name}", f"{info.size} bytes", *bound)
                        current.problem = (FILE_TOO_LARGE, refusal.detail)
                    elif extension in current.members:
                        current.problem = (DAMAGED_SHARD, f"{name}: member {info.name} appears twice in one sample")
                    else:
                        current.members[extension] = tar.extractfile(info).read()
        except (tarfile.TarError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as exc:
            detail = (f"{name} is damaged after {read} whole samples ({exc}); the rest of the shard cannot be read: "
                      f"restore the file, or rebuild with it removed")
            yield _Sample(current.key if current is not None else "damaged", problem=(DAMAGED_SHARD, detail))
            return
        except OSError as exc:
            if remote:
                raise SourceUnavailable(f"cannot read shard {shard}: {exc}") from None
            raise
        except Exception as exc:  # an HTTP client's own error types: storage trouble, never a record's fault
            if remote:
                raise SourceUnavailable(f"cannot read shard {shard}: {type(exc).__name__}: {exc}") from None
            raise
    if current is not None:
        yield current



def _record(sample: _Sample, index: int, shard_name: str, caption_fields: tuple[str, ...]) -> Record:
    path = f"{shard_name}/{sample.key}"
    record = Record(index=index, path=path, image_root=None, captions={}, embedded=True, source_key=sample.key)
    if sample.problem is not None:
        record.source_problem = sample.problem
        return record
    metadata: dict[str, Any] = {}
    image_ext = next((ext for ext in sample.members if ext.rsplit(".", 1)[-1].lower() in _IMAGE_EXTENSIONS), None)
    for extension, data in sample.members.items():
        last = extension.rsplit(".", 1)[-1].lower()
        if extension == image_ext or last in _IMAGE_EXTENSIONS:
            continue
        if last == "json":
            parsed = _json_member(data)
            if not isinstance(parsed, dict):
                record.source_problem = (INVALID_METADATA, f"{path}.{extension} is not a JSON object ({parsed})")
                return record
            if nested_too_deep(parsed):
                record.source_problem = too_deep_problem(f"{path}.{extension}")
                return record
            metadata = parsed
            continue
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            text = None  # recorded downstream as an invalid caption
        record.captions[extension if extension in caption_fields else last] = text
    record.captions = {**{k: v for k, v in metadata.items() if k in caption_fields}, **record.captions}
    record.metadata = {k: v for k, v in metadata.items() if k not in caption_fields}
    record.image_bytes = sample.members.get(image_ext) if image_ext is not None else None
    return record


def _json_member(data: bytes) -> Any:
    """The member's JSON, or a one-line description of why it is unusable."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except json.JSONDecodeError as exc:
        return f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
    except RecursionError:
        return "nested too deeply"
