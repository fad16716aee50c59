"""Dataset sources -> a stream of Records, one module per source kind.

- ``pixart``: ``ROOT/InternImgs/<path>`` with ``ROOT/InternData/data_info.json`` (the SOURCE may be
  ROOT, the InternData folder or the json file itself);
- ``jsonl``: JSON Lines with the same fields (image paths relative to the file's folder, or to
  ``image_root``);
- ``folder``: a folder of images with same-stem ``.txt`` captions, searched recursively;
- ``webdataset``: tar shards (img2dataset's output): a folder holding ``*.tar``, one ``.tar``, a
  brace pattern (``data/{00000..00127}.tar``) or a list file (``.txt``, one shard per line);
- ``parquet``: a ``.parquet`` file, a folder of them or a glob, the image in a column;
- ``hf``: a folder written by ``datasets.Dataset.save_to_disk``.

Any of them may live in object storage or behind ``http(s)://`` (fsspec URLs): paths become
``RemotePath``s and the same code reads them.

Records carry what the source says; nothing here decodes an image. Whether a record is usable
is decided downstream (plan.py), so that every record read is either written or skipped.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import replace
from typing import Any, Iterator

from ..errors import SourceError
from ..storage import RemotePath, as_location, is_url
from . import folder, hf, jsonl, parquet, pixart, webdataset
from .base import (DAMAGED_SHARD, IMAGE_EXTENSIONS, INVALID_METADATA, MISSING_IMAGE, Location, Record, SourceSpec,
                   image_digest, make_key)

__all__ = ["DAMAGED_SHARD", "IMAGE_EXTENSIONS", "INVALID_METADATA", "MISSING_IMAGE", "Record", "SourceSpec",
           "expand_braces", "image_digest", "iter_records", "make_key", "resolve_source"]

_READERS = {"pixart": pixart, "jsonl": jsonl, "folder": folder, "webdataset": webdataset, "parquet": parquet, "hf": hf}
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")
# A brace pattern may name at most this many shards (a typo like {0..99999999} is not a plan).
_MAX_EXPANDED = 1_000_000
_SHARD_LIST_SUFFIXES = (".txt", ".list")
_MAX_SHARD_LIST_BYTES = 64 * 2**20
_KINDS_HELP = ("a PixArt dataset folder, a data_info.json, a .jsonl file, an image folder, WebDataset .tar shards "
               "(folder, brace pattern or list file), Parquet files or a save_to_disk folder")


def resolve_source(source: str | os.PathLike, image_root: str | None = None,
                   storage_options: dict[str, Any] | None = None, image_column: str | None = None,
                   max_image_bytes: int | None = None) -> SourceSpec:
    """Work out which kind of source SOURCE is, or say clearly why it is none of them.

    SOURCE and ``image_root`` may be URLs (``s3://...``, ``https://...``), opened with ``storage_options``.
    ``max_image_bytes`` bounds the images a tar or table holds (default: as ``--max-image-bytes``).
    """
    try:
        spec = _resolve(str(source), image_root, storage_options or {})
    except OSError as exc:  # object storage: network, access or endpoint trouble
        raise SourceError(f"cannot read source {source}: {exc}; check the URL, the credentials and the endpoint") from None
    if image_column is not None and spec.kind not in ("parquet", "hf"):
        raise SourceError(f"--image-column names a column of a Parquet or save_to_disk source; {spec.describe()} has none")
    spec = replace(spec, image_column=image_column,
                   **({"max_image_bytes": max_image_bytes} if max_image_bytes is not None else {}))
    check = getattr(_READERS[spec.kind], "check", None)
    if check is not None:
        check(spec)
    return spec


def _resolve(source: str, image_root: str | None, options: dict[str, Any]) -> SourceSpec:
    root_override = as_location(image_root, options) if image_root else None
    if _BRACE_RANGE.search(source) or _BRACE_LIST.search(source):
        shards = tuple(as_location(name, options) for name in expand_braces(source))
        return _files_spec(shards, source, root_override)
    if not is_url(source) and glob.has_magic(source):
        matches = sorted(glob.glob(source))
        if not matches:
            raise SourceError(f"no file matches {source}; check the pattern")
        return _files_spec(tuple(as_location(m) for m in matches), source, root_override)
    path = as_location(source, options)
    if not path.exists():
        raise SourceError(f"source {source} does not exist; pass {_KINDS_HELP}")
    if path.is_file():
        return _file_spec(path, source, root_override, options)
    if not path.is_dir():
        raise SourceError(f"source {source} is neither a regular file nor a folder; pass {_KINDS_HELP}")
    return _folder_spec(path, root_override)


def _file_spec(path: Location, source: str, root_override: Location | None, options: dict[str, Any]) -> SourceSpec:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return SourceSpec("jsonl", path, root_override or path.parent)
    if suffix == ".json":
        # PixArt keeps images in InternImgs beside the InternData folder holding the json.
        guess = path.parent.parent / "InternImgs"
        return SourceSpec("pixart", path, root_override or (guess if guess.is_dir() else path.parent))
    if suffix in (".tar", ".tgz") or path.name.lower().endswith(".tar.gz"):
        return SourceSpec("webdataset", None, None, files=(path,))
    if suffix == ".parquet":
        return SourceSpec("parquet", None, root_override, files=(path,))
    if suffix in _SHARD_LIST_SUFFIXES:
        return _files_spec(_shard_list(path, options), source, root_override)
    raise SourceError(f"source file {source} is not .json, .jsonl, .tar, .parquet or a shard list (.txt); pass {_KINDS_HELP}")


def _files_spec(files: tuple[Location, ...], source: str, root_override: Location | None) -> SourceSpec:
    """A list of files from a pattern or a list file: all tar shards, or all Parquet files."""
    if not files:
        raise SourceError(f"{source} names no files")
    if all(f.name.lower().endswith((".tar", ".tgz", ".tar.gz")) for f in files):
        return SourceSpec("webdataset", None, None, files=files)
    if all(f.suffix.lower() == ".parquet" for f in files):
        return SourceSpec("parquet", None, root_override, files=files)
    odd = next(f for f in files if not f.name.lower().endswith((".tar", ".tgz", ".tar.gz", ".parquet")))
    raise SourceError(f"{source} names {odd}, which is neither a .tar shard nor a .parquet file; list one kind only")


def _folder_spec(path: Location, root_override: Location | None) -> SourceSpec:
    if (path / "InternData" / "data_info.json").is_file():
        return SourceSpec("pixart", path / "InternData" / "data_info.json", root_override or path / "InternImgs")
    if (path / "data_info.json").is_file() and (path.parent / "InternImgs").is_dir():
        return SourceSpec("pixart", path / "data_info.json", root_override or path.parent / "InternImgs")
    hf.refuse_dataset_dict(path)
    if hf.is_saved_dataset(path):
        return SourceSpec("hf", path, root_override, files=hf.data_files(path))
    names = _top_level_files(path)
    if any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names):
        return SourceSpec("folder", None, path)  # images at the top: an image folder, whatever lies beside them
    # img2dataset writes .parquet status files and _stats.json beside its tars: tars decide.
    tars = [n for n in names if n.lower().endswith((".tar", ".tgz", ".tar.gz"))]
    if tars:
        return SourceSpec("webdataset", None, None, files=tuple(path / n for n in tars))
    tables = [n for n in names if n.lower().endswith(".parquet")]
    if tables:
        return SourceSpec("parquet", None, root_override, files=tuple(path / n for n in tables))
    return SourceSpec("folder", None, path)


def _top_level_files(path: Location) -> list[str]:
    """The folder's own files (not its subfolders'), sorted by name."""
    if isinstance(path, RemotePath):
        return sorted(name for name in path.find() if "/" not in name)
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_file())


def _shard_list(path: Location, options: dict[str, Any]) -> tuple[Location, ...]:
    """A list file: one shard path or URL per line (relative paths from the list's folder), # comments."""
    if path.stat().st_size > _MAX_SHARD_LIST_BYTES:
        raise SourceError(f"{path} is larger than {_MAX_SHARD_LIST_BYTES} bytes; a shard list names one shard per line")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise SourceError(f"{path} is not UTF-8 text; a shard list names one shard per line") from None
    shards = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if is_url(entry) or os.path.isabs(entry):
            shards.append(as_location(entry, options))
        else:
            shards.append(path.parent / entry)
    return tuple(shards)


def expand_braces(pattern: str) -> list[str]:
    """``data/{00000..00002}.tar`` -> three names (zero padding kept); ``{a,b}`` lists too."""
    names = [pattern]
    while True:
        expanded: list[str] = []
        changed = False
        for name in names:
            # The leftmost brace first, as a shell expands them.
            found = [m for m in (_BRACE_RANGE.search(name), _BRACE_LIST.search(name)) if m is not None]
            match = min(found, key=lambda m: m.start()) if found else None
            if match is None:
                expanded.append(name)
                continue
            changed = True
            head, tail = name[:match.start()], name[match.end():]
            if match.re is _BRACE_RANGE:
                first, last = match.group(1), match.group(2)
                if int(last) < int(first):
                    raise SourceError(f"{pattern}: the range {{{first}..{last}}} counts down; write it low..high")
                width = len(first) if first.startswith("0") else 0
                if int(last) - int(first) + 1 > _MAX_EXPANDED:
                    raise SourceError(f"{pattern} names more than {_MAX_EXPANDED} shards; check the range")
                expanded.extend(f"{head}{str(n).zfill(width)}{tail}" for n in range(int(first), int(last) + 1))
            else:
                expanded.extend(f"{head}{part}{tail}" for part in match.group(1).split(","))
            if len(expanded) > _MAX_EXPANDED:
                raise SourceError(f"{pattern} names more than {_MAX_EXPANDED} shards; check the pattern")
        names = expanded
        if not changed:
            return names


def iter_records(spec: SourceSpec, caption_fields: tuple[str, ...],
                 follow_symlinks_outside_root: bool = False) -> Iterator[Record]:
    """The source's records in order; caption files of the folder layout are read only inside its
    root unless ``follow_symlinks_outside_root``."""
    if spec.kind == "folder":
        return folder.iter_records(spec, caption_fields, follow_symlinks_outside_root)
    return _READERS[spec.kind].iter_records(spec, caption_fields)
