"""Index stage: describe a finished build for the loaders people already run.

``wids``: a ``wids-shard-index-v1`` JSON file (url, nsamples, filesize, md5sum per shard, URLs
relative to the index file) that ``wids.ShardListDataset`` reads for random access.

``energon``: Megatron-Energon's ``.nv-meta/`` (``dataset.yaml`` naming shardkit's sample type
and its field map, ``split.yaml``, ``.info.json`` with per-shard counts) plus a ``NAME.tar.idx``
beside every tar (little-endian uint64 offsets of each sample's first header, then the offset
where the last sample ends), so ``megatron.energon.get_train_dataset`` reads the build with no
``energon prepare`` step.

Nothing from the build is taken on trust: every shard is read once and checked as ``inspect
--verify`` checks it (size, sha256, count, headers, members, shapes) before an index names it.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

from .errors import ShardkitError
from .manifest import MANIFEST_NAME, Manifest, ShardEntry, ShardSet, open_shard_set
from .storage import Storage, is_url
from .tario import TAR_INDEX_SUFFIX, tar_index_bytes
from .verify import check_shard

INDEX_FORMATS = ("wids", "energon")
WIDS_INDEX_NAME = "wids-index.json"
ENERGON_FOLDER = ".nv-meta"
INDEX_FILES = (WIDS_INDEX_NAME, ENERGON_FOLDER)  # in OUTPUT, beside the NAME.tar.idx files in shards/
ENERGON_SAMPLE_TYPE = {"__module__": "shardkit.energon", "__class__": "ShardkitSample"}



@dataclass
class IndexedShard:
    """What one checked pass over a shard established."""

    path: str  # relative to OUTPUT
    samples: int
    filesize: int
    md5sum: str
    sample_offsets: list[int]  # first header of each sample, then the end of the last one


@dataclass
class IndexReport:
    kind: str
    written: list[str]  # locations written, for the user
    shards: int
    samples: int


def _index_shard(shard_set: ShardSet, entry: ShardEntry) -> IndexedShard:
    """The shard read once and checked as ``inspect --verify`` checks it; any finding refuses it."""
    run = check_shard(shard_set, entry, digests=("md5",))
    for _ in run.samples():
        pass
    if run.findings:
        first = run.findings[0]
        raise ShardkitError(f"{shard_set.url_of(entry.path)} is not sound ({first.kind}: {first.message}); "
                            f"run `shardkit inspect --verify` and rebuild it before indexing")
    check = run.check
    return IndexedShard(path=entry.path, samples=check.samples, filesize=check.bytes,
                        md5sum=check.digests["md5"], sample_offsets=check.sample_offsets)


def _finished_build(output: str, storage_options: dict[str, Any] | None) -> ShardSet:
    shard_set = open_shard_set(output, storage_options)
    if shard_set.manifest.status != "complete":
        raise ShardkitError(f"{shard_set.url_of(MANIFEST_NAME)} says the build is {shard_set.manifest.status}; "
                            f"finish it (rerun `shardkit build`) before indexing")
    if not shard_set.manifest.shards:
        raise ShardkitError(f"{shard_set.url} holds no shards; there is nothing to index")
    return shard_set


def _relative_url(index_location: str, shard_location: str) -> str:
    """The shard's URL as seen from the index file's folder: relative where both share a root."""
    if is_url(index_location) != is_url(shard_location):
        return shard_location
    if is_url(shard_location):
        index_scheme, _, _ = index_location.partition("://")
        shard_scheme, _, shard_rest = shard_location.partition("://")
        if index_scheme != shard_scheme:
            return shard_location
        index_rest = index_location.partition("://")[2]
        if index_rest.split("/", 1)[0] != shard_rest.split("/", 1)[0]:
            return shard_location
        return posixpath.relpath(shard_rest, posixpath.dirname(index_rest))
    return posixpath.relpath(shard_location, posixpath.dirname(index_location))


def wids_index(shards: list[IndexedShard], shard_set: ShardSet, index_location: str) -> dict[str, Any]:
    name = posixpath.basename(shard_set.url.rstrip("/")) or "shardkit"
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": name,
        "shardlist": [
            {"url": _relative_url(index_location, shard_set.url_of(shard.path)), "nsamples": shard.samples,
             "filesize": shard.filesize, "md5sum": shard.md5sum}
            for shard in shards
        ],
    }


def energon_field_map(manifest: Manifest) -> dict[str, str]:
    """Sample field -> member suffix, for the members every sample of the build carries."""
    captions = manifest.config.get("captions") or ["prompt"]
    return {
        "latent": "latent.npy",
        "caption_features": f"t5_{captions[0]}.npy",
        "caption": "txt",
        "metadata": "json",
    }


def _yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML of dicts, lists and strings (JSON-quoted scalars are valid YAML)."""
    pad = "  " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                lines.append(f"{pad}{key}:\n{_yaml(item, indent + 1)}")
            else:
                lines.append(f"{pad}{key}: {json.dumps(item)}")
    else:
        for item in value:
            lines.append(f"{pad}- {json.dumps(item)}")
    return "\n".join(lines)


def energon_files(manifest: Manifest, shards: list[IndexedShard], split_part: str) -> dict[str, bytes]:
    """Relative path -> bytes of every file energon needs besides the tars themselves."""
    from . import __version__

    files = {
        f"{ENERGON_FOLDER}/dataset.yaml": _yaml({"sample_type": ENERGON_SAMPLE_TYPE,
                                                 "field_map": energon_field_map(manifest)}) + "\n",
        f"{ENERGON_FOLDER}/split.yaml": _yaml({"split_parts": {split_part: [s.path for s in shards]}}) + "\n",
        f"{ENERGON_FOLDER}/.info.json": json.dumps({"energon_version": f"shardkit-{__version__}",
                                                    "shard_counts": {s.path: s.samples for s in shards}}, indent=2) + "\n",
    }
    encoded = {name: text.encode("utf-8") for name, text in files.items()}
    for shard in shards:
        encoded[shard.path + TAR_INDEX_SUFFIX] = tar_index_bytes(shard.sample_offsets)
    return encoded


def write_index(output: str, kind: str, *, destination: str | None = None, split_part: str = "train",
                storage_options: dict[str, Any] | None = None) -> IndexReport:
    """Index the finished build in OUTPUT as ``kind`` (``wids`` or ``energon``)."""
    if kind not in INDEX_FORMATS:
        raise ShardkitError(f"unknown index format {kind!r}; choose one of: {', '.join(INDEX_FORMATS)}")
    if kind == "energon" and destination is not None:
        raise ShardkitError("an energon index lives in OUTPUT beside the shards (.nv-meta/, NAME.tar.idx); drop --output")
    shard_set = _finished_build(output, storage_options)
    manifest, storage = shard_set.manifest, shard_set.storage
    shards = [_index_shard(shard_set, entry) for entry in sorted(manifest.shards, key=lambda e: e.path)]
    samples = sum(shard.samples for shard in shards)
    if kind == "wids":
        index_location = destination if destination is not None else shard_set.url_of(WIDS_INDEX_NAME)
        payload = json.dumps(wids_index(shards, shard_set, index_location), indent=2) + "\n"
        target, name = Storage.for_file(index_location, storage_options)
        target.write_atomic(name, payload.encode("utf-8"))
        return IndexReport(kind, [index_location], len(shards), samples)
    written = []
    for name, payload in energon_files(manifest, shards, split_part).items():
        storage.write_atomic(name, payload)
        written.append(storage.url_of(name))
    return IndexReport(kind, written, len(shards), samples)
