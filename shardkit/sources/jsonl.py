"""JSON Lines with the fields of PixArt's data_info.json; image paths are relative to the file's
folder, or to ``--image-root``."""

from __future__ import annotations

import json
from typing import Iterator

from ..errors import SourceError
from .base import Record, SourceSpec
from .pixart import JSON_TOO_DEEP, record_from_item


def iter_records(spec: SourceSpec, caption_fields: tuple[str, ...]) -> Iterator[Record]:
    with spec.metadata.open("rb") as fh:
        index = 0
        for line_number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{spec.metadata.name} line {line_number}"
            try:
                item = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise SourceError(f"{where}: not UTF-8 text ({exc.reason})") from None
            except json.JSONDecodeError as exc:
                raise SourceError(f"{where}: invalid JSON at column {exc.colno}: {exc.msg}") from None
            except RecursionError:
                raise SourceError(f"{where}: {JSON_TOO_DEEP}") from None
            yield record_from_item(item, index, where, spec.image_root, caption_fields)
            index += 1
