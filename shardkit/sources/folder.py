"""A folder of images with same-stem ``.txt`` captions, searched recursively (local or object storage)."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any, Iterator

from ..sourcefiles import SourceFileSkip, read_source_file, too_large
from ..storage import RemotePath, universal_newlines
from .base import CAPTION_LIMIT, CAPTION_MAX_BYTES, IMAGE_EXTENSIONS, Record, SourceSpec

# Captions fetched per request batch when the image folder is in object storage.
_CAPTION_BATCH = 256


def iter_records(spec: SourceSpec, caption_fields: tuple[str, ...],
                 follow_symlinks_outside_root: bool = False) -> Iterator[Record]:
    """Caption files are read only inside the folder unless ``follow_symlinks_outside_root``."""
    root = spec.image_root
    if isinstance(root, RemotePath):
        yield from _iter_remote_folder(root, caption_fields[0])
    else:
        yield from _iter_local_folder(root, caption_fields[0], follow_symlinks_outside_root)


def _iter_local_folder(root: Path, caption_field: str, follow_symlinks_outside_root: bool) -> Iterator[Record]:
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
        data, _ = read_source_file(path, CAPTION_MAX_BYTES, root, limit_option=CAPTION_LIMIT)
        captions[caption_field] = universal_newlines(data.decode("utf-8")).strip()
    except SourceFileSkip as refused:
        return refused.reason, refused.detail
    except (FileNotFoundError, IsADirectoryError):
        pass  # a dangling link or a folder named like a caption: no caption
    except (UnicodeDecodeError, OSError):
        captions[caption_field] = None  # recorded downstream as an invalid caption
    return None



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
                                    CAPTION_LIMIT)
                refused = (too_big.reason, too_big.detail)
            yield Record(index=start + offset, path=relative, image_root=root, captions=captions,
                         refused_caption=refused, caption_file=caption_path)
