"""Table rows -> Records, for the columnar sources (Parquet files, Hugging Face datasets).

The image is in one column: bytes (img2dataset's ``jpg``), a Hugging Face ``Image`` struct
``{"bytes", "path"}``, or a path relative to the image root. Captions are the columns named by
``--captions``; every other column except the image is the sample's metadata.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from ..errors import SourceError
from ..images import SourceUnavailable
from ..sourcefiles import FILE_TOO_LARGE, SourceFileSkip, too_large
from ..storage import RemotePath
from .base import IMAGE_EXTENSIONS, Location, Record, json_value, nested_too_deep, too_deep_problem

# Columns whose text is taken as an image path when no column holds image bytes.
_PATH_COLUMNS = ("image", "image_path", "path", "file_name", "filepath")
_IMAGE_EXTENSION_NAMES = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
# The column img2dataset and LAION use for the sample's key.
_KEY_COLUMN = "key"


@dataclass(frozen=True)
class ImageColumn:
    name: str
    kind: str  # "bytes" | "struct" | "path"


def _kind(column_type: pa.DataType) -> str | None:
    if pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type):
        return "bytes"
    if pa.types.is_struct(column_type) and column_type.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_string(column_type) or pa.types.is_large_string(column_type):
        return "path"
    return None


def hf_features(schema: pa.Schema) -> dict[str, Any]:
    """The Hugging Face feature declaration a Parquet or Arrow file written by ``datasets`` carries."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        features = json.loads(raw.decode("utf-8")).get("info", {}).get("features", {})
    except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return {}  # unreadable declaration: the columns' own types decide
    return features if isinstance(features, dict) else {}


def find_image_column(schema: pa.Schema, named: str | None, features: dict[str, Any], where: str) -> ImageColumn:
    """The column holding each row's image: ``named`` (--image-column), else the first of a Hugging
    Face ``Image`` feature, a binary column named by an image extension, an ``{"bytes", "path"}``
    struct, or a text column named like a path."""
    kinds = {name: _kind(schema.field(name).type) for name in schema.names}
    if named is not None:
        if named not in kinds:
            raise SourceError(f"{where} has no column {named!r} (columns: {', '.join(schema.names)}); fix --image-column")
        if kinds[named] is None:
            raise SourceError(f"column {named!r} of {where} is {schema.field(named).type}, not image bytes, an "
                              f"{{bytes, path}} struct or a path; choose another --image-column")
        return ImageColumn(named, kinds[named])
    candidates = [name for name, feature in features.items()
                  if isinstance(feature, dict) and feature.get("_type") == "Image" and kinds.get(name)]
    candidates += [name for name in schema.names if kinds[name] == "bytes" and name.lower() in _IMAGE_EXTENSION_NAMES]
    candidates += [name for name in schema.names if kinds[name] == "struct"]
    candidates += [name for name in _PATH_COLUMNS if kinds.get(name)]
    if not candidates:
        raise SourceError(f"{where} has no image column (columns: {', '.join(schema.names)}); name the column of "
                          f"image bytes or paths with --image-column")
    return ImageColumn(candidates[0], kinds[candidates[0]])


@contextlib.contextmanager
def table_errors(path: Location, kind: str, hint: str) -> Iterator[None]:
    """Reading ``path`` (a ``kind`` file): one line saying what is wrong with it, ending in ``hint``;
    object-storage trouble stops the build resumably instead."""
    try:
        yield
    except SourceFileSkip as exc:  # a FIFO or device named like a table
        raise SourceError(f"{exc.detail}; {hint}") from None
    except FileNotFoundError:
        raise SourceError(f"{path} does not exist; {hint}") from None
    except pa.ArrowInvalid as exc:
        raise SourceError(f"{path} is not a readable {kind} ({exc}); {hint}") from None
    except OSError as exc:
        if isinstance(path, RemotePath):
            raise SourceUnavailable(f"cannot read {path}: {exc}") from None
        raise SourceError(f"cannot read {path}: {exc}; {hint}") from None


def table_records(batches: Iterator[pa.RecordBatch], image: ImageColumn, file_name: str, image_root: Location,
                  caption_fields: tuple[str, ...], first_index: int, max_image_bytes: int) -> Iterator[Record]:
    """One Record per row, in order; ``first_index`` is the source index of the file's first row.
    An image cell over ``max_image_bytes`` is the record's FILE_TOO_LARGE problem (its bytes let go)."""
    stem = posixpath.splitext(file_name)[0]
    row = 0
    for batch in batches:
        for values in batch.to_pylist():
            yield _record(values, image, file_name, stem, row, image_root, caption_fields, first_index + row,
                          max_image_bytes)
            row += 1


def _record(values: dict[str, Any], image: ImageColumn, file_name: str, stem: str, row: int,
            image_root: Location, caption_fields: tuple[str, ...], index: int, max_image_bytes: int) -> Record:
    cell = values.pop(image.name)
    captions = {name: values[name] for name in caption_fields if values.get(name) is not None}  # null: missing
    metadata = {}
    problem = too_deep_problem(f"row {row} of {file_name}") if nested_too_deep(values) else None
    for name, value in values.items() if problem is None else ():
        usable, value = json_value(value)
        if usable and name not in caption_fields:
            metadata[name] = value
    key = values.get(_KEY_COLUMN)
    source_key = str(key) if isinstance(key, (str, int)) and not isinstance(key, bool) else None
    data, path = cell, None
    if image.kind == "struct":
        data, path = (cell or {}).get("bytes"), (cell or {}).get("path")
    elif image.kind == "path":
        data, path = None, cell
    if data is not None and len(data) > max_image_bytes:
        problem = problem or (FILE_TOO_LARGE, too_large(f"{file_name}#{row}", f"{len(data)} bytes", max_image_bytes).detail)
        data = b""  # never held, nor read as a path instead
    if data is None and isinstance(path, str) and path.strip():
        # An image stored as a path: read from the image root like a JSONL source's.
        return Record(index=index, path=path, image_root=image_root, captions=captions, metadata=metadata,
                      source_problem=problem)
    if source_key is None:
        source_key = posixpath.splitext(posixpath.basename(path))[0] if isinstance(path, str) and path else f"{stem}_{row}"
    return Record(index=index, path=f"{file_name}#{row}", image_root=None, captions=captions, metadata=metadata,
                  embedded=True, image_bytes=data if data else None, source_key=source_key, source_problem=problem)
