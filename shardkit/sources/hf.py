"""A folder written by ``datasets.Dataset.save_to_disk``: Arrow stream files listed in ``state.json``,
features in ``dataset_info.json``. Read with pyarrow alone (no ``datasets`` import, no pickle), one
record batch at a time."""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

import pyarrow as pa

from ..errors import SourceError
from ..sourcefiles import SourceFileSkip, open_regular, read_source_file
from ..storage import RemotePath, open_read
from .base import Location, Record, SourceSpec
from .columns import find_image_column, table_errors, table_records

STATE_FILE = "state.json"
INFO_FILE = "dataset_info.json"
DICT_FILE = "dataset_dict.json"
# The folder's small JSON files are read whole; larger ones are not what datasets writes.
_MAX_JSON_BYTES = 16 * 2**20
_JSON_LIMIT = f"a save_to_disk folder's JSON files are read up to {_MAX_JSON_BYTES} bytes"


def _read_json(path: Location) -> Any:
    try:
        if isinstance(path, RemotePath):
            if path.stat().st_size > _MAX_JSON_BYTES:
                raise SourceError(f"{path} is larger than {_MAX_JSON_BYTES} bytes; it is not a datasets file")
            data = path.read_bytes()
        else:
            data, _ = read_source_file(path, _MAX_JSON_BYTES, None, limit_option=_JSON_LIMIT)
        return json.loads(data.decode("utf-8"))
    except SourceFileSkip as exc:
        raise SourceError(f"{exc.detail}; it is not a datasets file") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SourceError(f"{path} is not valid JSON ({exc}); is the folder a complete save_to_disk output?") from None


def is_saved_dataset(folder: Location) -> bool:
    return (folder / STATE_FILE).is_file() and (folder / INFO_FILE).is_file()


def data_files(folder: Location) -> tuple[Location, ...]:
    """The Arrow files of a save_to_disk folder, in order; names must stay inside the folder."""
    state = _read_json(folder / STATE_FILE)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not entries:
        raise SourceError(f"{folder / STATE_FILE} lists no data files; is the folder a save_to_disk output?")
    files = []
    for entry in entries:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise SourceError(f"{folder / STATE_FILE} names a data file {name!r} outside the folder; refusing to read it")
        files.append(folder / name)
    return tuple(files)


def refuse_dataset_dict(folder: Location) -> None:
    """A DatasetDict folder holds one dataset per split: the user picks one."""
    if (folder / DICT_FILE).is_file():
        splits = _read_json(folder / DICT_FILE)
        names = splits.get("splits") if isinstance(splits, dict) else None
        shown = ", ".join(str(n) for n in names) if isinstance(names, list) else "its splits"
        raise SourceError(f"{folder} holds a DatasetDict ({shown}); pass one split's folder, e.g. {folder}/train")


def _features(folder: Location) -> dict[str, Any]:
    info = _read_json(folder / INFO_FILE)
    features = info.get("features") if isinstance(info, dict) else None
    return features if isinstance(features, dict) else {}


def iter_records(spec: SourceSpec, caption_fields: tuple[str, ...]) -> Iterator[Record]:
    folder = spec.metadata
    features = _features(folder)
    index = 0
    for path in spec.files:
        with _arrow_stream(path) as stream:
            image = find_image_column(stream.schema, spec.image_column, features, path.name)
            for record in table_records(iter(stream), image, path.name, spec.image_root or folder, caption_fields, index,
                                        spec.max_image_bytes):
                yield record
                index += 1


def check(spec: SourceSpec) -> None:
    """Fail before any model loads when the first file has no usable image column."""
    with _arrow_stream(spec.files[0]) as stream:
        find_image_column(stream.schema, spec.image_column, _features(spec.metadata), spec.files[0].name)


@contextlib.contextmanager
def _arrow_stream(path: Location) -> Iterator[pa.ipc.RecordBatchStreamReader]:
    """One Arrow stream file of the folder, or one line saying why it cannot be read."""
    with table_errors(path, "Arrow stream", "is the save_to_disk folder complete?"):
        handle = open_read(path.url, path.options) if isinstance(path, RemotePath) else open_regular(path)
        with handle, pa.ipc.open_stream(handle) as stream:
            yield stream
