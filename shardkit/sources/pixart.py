"""PixArt-Σ's layout: ``ROOT/InternImgs/<path>`` with ``ROOT/InternData/data_info.json``, a JSON list
of ``{"path", "width", "height", "ratio", "prompt", "sharegpt4v"}``."""

from __future__ import annotations

import json
from typing import Any, Iterator

from ..errors import SourceError
from .base import Location, Record, SourceSpec

JSON_TOO_DEEP = "JSON nested too deeply to read; records are flat objects of path, size and captions"
# Fields that say where the image is and how big: not captions, not metadata.
_GEOMETRY_FIELDS = ("path", "width", "height", "ratio")


def iter_records(spec: SourceSpec, caption_fields: tuple[str, ...]) -> Iterator[Record]:
    try:
        with spec.metadata.open(encoding="utf-8") as fh:
            items = json.load(fh)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{spec.metadata}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise SourceError(f"{spec.metadata}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise SourceError(f"{spec.metadata}: {JSON_TOO_DEEP}") from None
    if not isinstance(items, list):
        raise SourceError(f"{spec.metadata}: expected a JSON list of records, found {type(items).__name__}")
    for index, item in enumerate(items):
        yield record_from_item(item, index, f"{spec.metadata.name}[{index}]", spec.image_root, caption_fields)


def record_from_item(item: Any, index: int, where: str, image_root: Location,
                     caption_fields: tuple[str, ...]) -> Record:
    """Wrong types in the metadata are a broken file, not a bad record: fail fast, naming the entry."""
    if not isinstance(item, dict):
        raise SourceError(f"{where}: expected an object with 'path' and captions, found {type(item).__name__}")
    path = item.get("path")
    if not isinstance(path, str) or not path.strip():
        raise SourceError(f"{where}: 'path' must be a non-empty string, found {path!r}")
    size = {}
    for name in ("width", "height"):
        value = item.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value <= 0:
            raise SourceError(f"{where}: '{name}' must be a positive whole number, found {value!r}")
        size[name] = int(value)
    if len(size) == 1:
        raise SourceError(f"{where}: give both 'width' and 'height', or neither (then the image header is read)")
    captions = {k: v for k, v in item.items() if k not in _GEOMETRY_FIELDS}
    metadata = {k: v for k, v in captions.items() if k not in caption_fields}
    return Record(index=index, path=path, image_root=image_root, captions=captions,
                  width=size.get("width"), height=size.get("height"), metadata=metadata)
