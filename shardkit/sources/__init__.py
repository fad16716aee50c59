"""Dataset sources -> a stream of Records.

Three layouts are understood:
- PixArt-Σ: ``ROOT/InternImgs/<path>`` with ``ROOT/InternData/data_info.json`` (the SOURCE may be
  ROOT, the InternData folder or the json file itself);
- JSON Lines with the same fields as data_info.json (image paths relative to the file's folder,
  or to ``image_root``);
- a folder of images with same-stem ``.txt`` captions, searched recursively.

Any of them may live in object storage (``s3://bucket/prefix``): paths become ``RemotePath``s
and the same code reads them through fsspec.

Records carry what the metadata says; nothing here opens an image. Whether a record is usable
is decided downstream (plan.py), so that every record read is either written or skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import SourceError
from .sourcefiles import SourceFileSkip, read_source_file, too_large
from .storage import RemotePath, as_location, universal_newlines

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_STEM_CHARS = 64
# A caption file is read up to this size: T5 keeps a few hundred tokens of it, and a larger
# "caption" is a mistake or an attack on memory.
CAPTION_MAX_BYTES = 1024 * 1024
_CAPTION_LIMIT = f"caption files are read up to {CAPTION_MAX_BYTES} bytes"
_JSON_TOO_DEEP = "JSON nested too deeply to read; records are flat objects of path, size and captions"


@dataclass
class Record:
    """One image-caption pair as the source describes it."""

    index: int  # position in the source, for messages and failures.jsonl
    path: str  # the image path as written in the metadata (relative to the image root)
    image_root: Path | RemotePath
    captions: dict[str, Any]  # raw caption values: validated in plan.py
    width: int | None = None  # from the metadata; None means "read the image header"
    height: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Folder sources: the same-stem .txt the first caption field is read from (relative path).
    caption_file: str | None = None
    # (reason, detail) when the caption file was refused (not a regular file, too large, outside the root).
    refused_caption: tuple[str, str] | None = None

    @property
    def normalized_path(self) -> str:
        return posixpath.normpath(self.path.replace("\\", "/"))

    @property
    def escapes_root(self) -> bool:
        norm = self.normalized_path
        return posixpath.isabs(norm) or norm == ".." or norm.startswith("../")

    @property
    def location(self) -> Path | RemotePath:
        return self.image_root / self.normalized_path

    @property
    def key(self) -> str:
        return make_key(self.normalized_path)


def make_key(relative_path: str) -> str:
    """A WebDataset key: stable, unique per path, no dots or slashes (the key ends at the first dot).

    The readable part is the path without its extension; a 64-bit hash of the full path keeps
    keys unique when sanitising or truncation makes two paths look alike.
    """
    stem = posixpath.splitext(relative_path)[0]
    readable = _UNSAFE_KEY_CHARS.sub("_", stem).strip("_")[:_KEY_STEM_CHARS] or "image"
    digest = hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:16]
    return f"{readable}-{digest}"


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "pixart" | "jsonl" | "folder"
    metadata: Path | RemotePath | None
    image_root: Path | RemotePath

    def describe(self) -> str:
        return f"{self.kind} source at {self.metadata or self.image_root}"


def resolve_source(source: str | os.PathLike, image_root: str | None = None,
                   storage_options: dict[str, Any] | None = None) -> SourceSpec:
    """Work out which layout SOURCE is, or say clearly why it is none of them.

    SOURCE and ``image_root`` may be URLs (``s3://...``), opened with ``storage_options``.
    """
    try:
        return _resolve(source, image_root, storage_options)
    except OSError as exc:  # object storage: network, access or endpoint trouble
        raise SourceError(f"cannot read source {source}: {exc}; check the URL, the credentials and the endpoint") from None


def _resolve(source: str | os.PathLike, image_root: str | None, storage_options: dict[str, Any] | None) -> SourceSpec:
    path = as_location(source, storage_options)
    if not path.exists():
        raise SourceError(f"source {source} does not exist; pass a PixArt dataset folder, a data_info.json, a .jsonl file or an image folder")
    root_override = as_location(image_root, storage_options) if image_root else None
    if path.is_file():
        if path.suffix == ".jsonl":
            return SourceSpec("jsonl", path, root_override or path.parent)
        if path.suffix == ".json":
            # PixArt keeps images in InternImgs beside the InternData folder holding the json.
            guess = path.parent.parent / "InternImgs"
            return SourceSpec("pixart", path, root_override or (guess if guess.is_dir() else path.parent))
        raise SourceError(f"source file {source} is neither .json (PixArt data_info.json) nor .jsonl")
    if (path / "InternData" / "data_info.json").is_file():
        return SourceSpec("pixart", path / "InternData" / "data_info.json", root_override or path / "InternImgs")
    if (path / "data_info.json").is_file() and (path.parent / "InternImgs").is_dir():
        return SourceSpec("pixart", path / "data_info.json", root_override or path.parent / "InternImgs")
    return SourceSpec("folder", None, path)


def iter_records(spec: SourceSpec, caption_fields: tuple[str, ...],
                 follow_symlinks_outside_root: bool = False) -> Iterator[Record]:
    """The source's records in order; caption files of the folder layout are read only inside its
    root unless ``follow_symlinks_outside_root``."""
    if spec.kind == "pixart":
        yield from _iter_json_list(spec)
    elif spec.kind == "jsonl":
        yield from _iter_jsonl(spec)
    else:
        yield from _iter_folder(spec, caption_fields[0], follow_symlinks_outside_root)


def _iter_json_list(spec: SourceSpec) -> Iterator[Record]:
    try:
        with spec.metadata.open(encoding="utf-8") as fh:
            items = json.load(fh)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{spec.metadata}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise SourceError(f"{spec.metadata}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise SourceError(f"{spec.metadata}: {_JSON_TOO_DEEP}") from None
    if not isinstance(items, list):
        raise SourceError(f"{spec.metadata}: expected a JSON list of records, found {type(items).__name__}")
    for index, item in enumerate(items):
        yield _record_from_item(item, index, f"{spec.metadata.name}[{index}]", spec.image_root)


def _iter_jsonl(spec: SourceSpec) -> Iterator[Record]:
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
                raise SourceError(f"{where}: {_JSON_TOO_DEEP}") from None
            yield _record_from_item(item, index, where, spec.image_root)
            index += 1


def _record_from_item(item: Any, index: int, where: str, image_root: Path | RemotePath) -> Record:
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
    captions = {k: v for k, v in item.items() if k not in ("path", "width", "height", "ratio")}
    return Record(index=index, path=path, image_root=image_root, captions=captions,
                  width=size.get("width"), height=size.get("height"))


def _iter_folder(spec: SourceSpec, caption_field: str, follow_symlinks_outside_root: bool) -> Iterator[Record]:
    root = spec.image_root
    if isinstance(root, RemotePath):
        yield from _iter_remote_folder(root, caption_field)
        return
    index = 0
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()  # a deterministic walk gives deterministic shards
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            image = Path(directory) / name
            relative = image.relative_to(root).as_posix()
            caption_file = image.with_suffix(".txt")
            captions: dict[str, Any] = {}
            refused = _read_caption_file(caption_file, None if follow_symlinks_outside_root else root,
                                         caption_field, captions)
            yield Record(index=index, path=relative, image_root=root, captions=captions, refused_caption=refused,
                         caption_file=caption_file.relative_to(root).as_posix())
            index += 1


def _read_caption_file(path: Path, root: Path | None, caption_field: str,
                       captions: dict[str, Any]) -> tuple[str, str] | None:
    """Put the caption file's text into ``captions`` (None when it is not UTF-8 or cannot be read,
    nothing when there is no file); returns (reason, detail) when the file is refused."""
    if not os.path.lexists(path):
        return None
    try:
        data, _ = read_source_file(path, CAPTION_MAX_BYTES, root, limit_option=_CAPTION_LIMIT)
        captions[caption_field] = universal_newlines(data.decode("utf-8")).strip()
    except SourceFileSkip as refused:
        return refused.reason, refused.detail
    except (FileNotFoundError, IsADirectoryError):
        pass  # a dangling link or a folder named like a caption: no caption
    except (UnicodeDecodeError, OSError):
        captions[caption_field] = None  # recorded downstream as an invalid caption
    return None


# Captions fetched per request batch when the image folder is in object storage.
_CAPTION_BATCH = 256


def _walk_order(relative: str) -> tuple:
    """The order of the local walk above: a folder's files (sorted) before its subfolders (sorted)."""
    *folders, name = relative.split("/")
    return tuple((1, folder) for folder in folders) + ((0, name),)


def _iter_remote_folder(root: RemotePath, caption_field: str) -> Iterator[Record]:
    """The folder layout in object storage: one listing, captions fetched in concurrent batches."""
    sizes = root.find()
    images = sorted((f for f in sizes if f.lower().endswith(IMAGE_EXTENSIONS)), key=_walk_order)
    for start in range(0, len(images), _CAPTION_BATCH):
        chunk = images[start:start + _CAPTION_BATCH]
        caption_paths = [posixpath.splitext(relative)[0] + ".txt" for relative in chunk]
        texts = root.read_many(c for c in caption_paths if sizes.get(c, CAPTION_MAX_BYTES + 1) <= CAPTION_MAX_BYTES)
        for offset, (relative, caption_path) in enumerate(zip(chunk, caption_paths)):
            captions: dict[str, Any] = {}
            refused = None
            if caption_path in texts:
                try:
                    captions[caption_field] = universal_newlines(texts[caption_path].decode("utf-8")).strip()
                except UnicodeDecodeError:
                    captions[caption_field] = None  # recorded downstream as an invalid caption
            elif caption_path in sizes:  # listed, and over the bound: never fetched
                too_big = too_large(root / caption_path, f"{sizes[caption_path]} bytes", CAPTION_MAX_BYTES,
                                    _CAPTION_LIMIT)
                refused = (too_big.reason, too_big.detail)
            yield Record(index=start + offset, path=relative, image_root=root, captions=captions,
                         refused_caption=refused, caption_file=caption_path)
