"""Export stage: a build -> PixArt-Σ's per-file feature layout, for its unmodified training loader.

``DEST/InternData/data_info.json`` lists every sample (path, width, height, ratio = height/width,
prompt, sharegpt4v when present). Beside it:

- ``img_sdxl_vae_features_{resolution}resolution_ms_new/NAME.npy``: the stored ``[2C, h, w]``
  posterior mean and std, unchanged;
- ``caption_features_new/NAME.npz`` (the first caption field) and
  ``sharegpt4v_caption_features_new/NAME.npz`` (the second, where the sample has it):
  ``caption_feature`` ``[1, max_length, D]`` float16 and ``attention_mask`` ``[1, max_length]``
  int16, as PixArt's extractor saves them. The extractor runs T5 over pad tokens and stores
  those outputs past the caption; shards keep only the valid tokens, so the rows past them are
  the last valid row repeated (the rule PixArt's loader uses to pad shorter features). The
  mask, zero over those rows, keeps them out of attention either way.
- ``DEST/InternImgs/<path>``: the original image bytes, when the build kept them.

NAME is what PixArt's multi-scale loader derives from the path (``pixart_feature_name``).
Every shard is checked as ``inspect --verify`` checks it (checksum, size, sample count, tar
headers, members, array headers and shapes, metadata and paths) on the same single pass that
exports it; a shard verify would flag stops the export with one line, before data_info.json is
written. Nothing is written outside DEST. numpy only: exporting needs no torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ShardFormatError, ShardkitError
from .format import (LATENT, METADATA, caption_mask, pad_caption_feature, parse_metadata, read_npy,
                     safe_relative_path)
from .manifest import MANIFEST_NAME, open_shard_set
from .verify import Finding, check_shard

# What PixArt-Σ's loader replaces, in its order (InternalData.py, replace_img_ext); other
# extensions, e.g. ".PNG" or ".tif", stay in the name.
PIXART_IMAGE_EXTENSIONS = (".png", ".jpg", ".webp", ".jpeg", ".JPEG", ".JPG")
CAPTION_FOLDERS = ("caption_features_new", "sharegpt4v_caption_features_new")
# A new file or nothing: a symbolic link or a file created meanwhile is never written through.
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


# Pipeline builds whose features PixArt's per-file layout holds (T5 rows, an SDXL-VAE posterior).
PIXART_FAMILIES = ("pixart-alpha", "pixart-sigma")


def pixart_feature_name(path: str, extension: str) -> str:
    """The feature file name PixArt-Σ's multi-scale loader (InternalDataMSSigma) looks for.

    It joins the path's LAST folder to the file name with ``_`` (``a/b/c.jpg`` -> ``a/b_c.jpg``,
    so deeper folders stay folders), then replaces every occurrence, anywhere in the string, of
    ``.png``, ``.jpg``, ``.webp``, ``.jpeg``, ``.JPEG`` and ``.JPG``, in that order, by
    ``extension``. Its quirks are kept on purpose, since the loader will look for exactly this
    name: other extensions (``.PNG``, ``.Jpg``, ``.tif``) are left as they are, and a folder name
    holding one of these is rewritten too (``a.jpg.d/b.png`` -> ``a.npy.d_b.npy``).
    """
    name = "_".join(path.rsplit("/", 1))
    for image_extension in PIXART_IMAGE_EXTENSIONS:
        name = name.replace(image_extension, extension)
    return name


@dataclass
class ExportSummary:
    dest: Path
    samples: int = 0
    latents: int = 0
    caption_features: dict[str, int] = field(default_factory=lambda: {folder: 0 for folder in CAPTION_FOLDERS})
    images: int = 0
    data_info: Path | None = None


def _inside(root: Path, relative: str, what: str) -> Path:
    """``root / relative``, refusing anything that would land outside ``root``."""
    safe_relative_path(relative, what)
    target = Path(os.path.normpath(root / relative))
    if os.path.commonpath([root, target]) != str(root) or target == root:
        raise ShardkitError(f"{what} {relative!r} would be written outside {root}; refusing it")
    return target


def _write_file(dest: Path, target: Path, write: Callable[[Any], None]) -> None:
    """Write ``target``, a path below ``dest``, never through a symbolic link: a folder on the way
    that is a link leading out of DEST is refused, a link (or any file) at ``target`` is replaced."""
    real_dest = os.path.realpath(dest)
    real_folder = os.path.realpath(target.parent)
    if os.path.commonpath([real_dest, real_folder]) != real_dest:
        raise ShardkitError(f"{target.parent} leads out of DEST {dest} through a symbolic link (to {real_folder}); "
                            f"export writes only inside DEST: remove the link or choose an empty DEST")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.is_file():
        target.unlink()  # the link itself, never what it points to
    try:
        descriptor = os.open(target, _NEW_FILE_FLAGS, 0o644)
    except (FileExistsError, IsADirectoryError):
        raise ShardkitError(f"{target} exists and is not a file export may replace; choose an empty DEST") from None
    with os.fdopen(descriptor, "wb") as fh:  # a file object: numpy would append .npy/.npz to a bare name
        write(fh)


def _write_synced(fh, payload: bytes) -> None:
    fh.write(payload)
    fh.flush()
    os.fsync(fh.fileno())


def _prepare_dest(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise ShardkitError(f"DEST {dest} is a file; pass a folder path")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ShardkitError(f"DEST {dest} is not empty; choose an empty folder or pass --overwrite")
    dest.mkdir(parents=True, exist_ok=True)


class PixArtExport:
    """One export: checks the build and DEST when made, writes everything on ``run()``."""

    def __init__(self, source: str | os.PathLike, dest: str | os.PathLike, *, max_length: int | None = None,
                 images: bool = True, overwrite: bool = False, compress: bool = False,
                 storage_options: dict[str, Any] | None = None, timeout: float | None = 60.0):
        if isinstance(source, (list, tuple)) or str(source).endswith(".tar") or "{" in str(source):
            raise ShardkitError("export needs the build's manifest: pass the OUTPUT folder or its manifest.json")
        self.shard_set = open_shard_set(str(source), storage_options, timeout)
        manifest = self.shard_set.manifest
        if manifest.status != "complete":
            raise ShardkitError(f"the build at {self.shard_set.url_of(MANIFEST_NAME)} is not complete (status "
                                f"{manifest.status}); finish it with `shardkit build` before exporting")
        declared = manifest.declaration()
        if declared.pipeline is not None and declared.pipeline.get("family") not in PIXART_FAMILIES:
            raise ShardkitError(f"export writes PixArt's per-file layout; this is a {declared.pipeline.get('pipeline_class')} "
                                f"build: read it with ShardReader(OUTPUT, batch_size, layout='diffusers') instead")
        self.fields = list(declared.captions)[:2]
        # Each field's T5 rows: t5_<field>.npy, or a PixArt pipeline build's <field>.prompt_embeds.npy.
        self.members = {name: declared.field_members(name)[0][0] for name in self.fields}
        self.max_length = max_length or (declared.params["max_length"] if declared.pipeline is not None
                                         else manifest.config.get("max_length"))
        if not self.max_length or self.max_length < 1:
            raise ShardkitError("pass --max-length: the build's manifest records no T5 max_length")
        self.images = images
        self.save_npz = np.savez_compressed if compress else np.savez
        self.dest = Path(os.path.abspath(dest))
        _prepare_dest(self.dest, overwrite)
        self.data_root = self.dest / "InternData"
        self.image_root = self.dest / "InternImgs"
        self.latent_root = self.data_root / f"img_sdxl_vae_features_{manifest.resolution}resolution_ms_new"
        self.caption_roots = {name: self.data_root / folder for name, folder in zip(self.fields, CAPTION_FOLDERS)}

    @property
    def total_samples(self) -> int:
        return sum(entry.samples for entry in self.shard_set.manifest.shards)

    def run(self, progress: Callable[[int], None] | None = None) -> ExportSummary:
        summary = ExportSummary(dest=self.dest)
        entries: list[tuple[int, dict[str, Any]]] = []
        names: dict[str, str] = {}  # feature name -> the image path it came from
        for shard in sorted(self.shard_set.manifest.shards, key=lambda e: e.path):
            check = check_shard(self.shard_set, shard)
            for sample in check.samples():
                if check.findings:
                    _refuse(check.findings[0])
                entries.append(self._export_sample(sample.key, sample.members, names, summary))
                summary.samples += 1
                if progress is not None:
                    progress(1)
            if check.findings:
                _refuse(check.findings[0])
        # data_info.json last: its presence means every file it lists is written.
        payload = json.dumps([entry for _, entry in sorted(entries, key=lambda e: e[0])], indent=2, ensure_ascii=False)
        summary.data_info = self.data_root / "data_info.json"
        temp = summary.data_info.with_name(f".{summary.data_info.name}.tmp")
        _write_file(self.dest, temp, lambda fh: _write_synced(fh, (payload + "\n").encode("utf-8")))
        os.replace(temp, summary.data_info)  # replaces a link there, never writes through it
        return summary

    def _export_sample(self, key: str, members: dict[str, bytes], names: dict[str, str],
                       summary: ExportSummary) -> tuple[int, dict[str, Any]]:
        try:
            meta = parse_metadata(members.get(METADATA), key)
            path = meta["path"]
            height, width = (int(v) for v in meta["original_hw"])
            captions = meta["captions"]
            order = int(meta.get("source_index", 0))
        except (KeyError, TypeError, ValueError, ShardFormatError) as exc:
            raise ShardkitError(f"sample {key!r} has unusable metadata ({exc}); rebuild its shard") from None
        safe_relative_path(path, f"image path of sample {key}")
        npy_name = pixart_feature_name(path, ".npy")
        if npy_name in names:
            raise ShardkitError(f"images {names[npy_name]!r} and {path!r} map to the same PixArt feature file "
                                f"{npy_name!r} (PixArt's loader joins the last folder with '_' and replaces "
                                f"{'/'.join(PIXART_IMAGE_EXTENSIONS)}); rename one of them and rebuild")
        names[npy_name] = path

        moments = read_npy(members[LATENT], f"{key}.{LATENT}")  # verified: present and well-formed
        _write_file(self.dest, _inside(self.latent_root, npy_name, "feature file"),
                    lambda fh: np.save(fh, moments, allow_pickle=False))
        summary.latents += 1

        npz_name = pixart_feature_name(path, ".npz")
        for name, root in self.caption_roots.items():
            member = self.members[name]
            if member not in members:
                continue
            feature = read_npy(members[member], f"{key}.{member}")
            padded = pad_caption_feature(feature, self.max_length)[None].astype(np.float16)
            mask = caption_mask(feature.shape[0], self.max_length, np.int16)[None]
            _write_file(self.dest, _inside(root, npz_name, "feature file"),
                        lambda fh: self.save_npz(fh, caption_feature=padded, attention_mask=mask))
            summary.caption_features[root.name] += 1

        extension = meta.get("image_ext")
        if self.images and extension and extension in members:
            payload = members[extension]
            _write_file(self.dest, _inside(self.image_root, path, "image path"), lambda fh: fh.write(payload))
            summary.images += 1

        entry: dict[str, Any] = {"path": path, "width": width, "height": height, "ratio": height / width,
                                 "prompt": captions.get(self.fields[0], "")}
        if len(self.fields) > 1 and self.fields[1] in captions:
            entry["sharegpt4v"] = captions[self.fields[1]]
        return order, entry


def _refuse(finding: Finding) -> None:
    where = " ".join(part for part in (finding.shard, finding.key) if part)
    raise ShardkitError(f"refusing to export: {where} fails verification ({finding.kind}: {finding.message}); "
                        f"`shardkit inspect OUTPUT --verify` lists every problem; rebuild the build or that shard")


def export_pixart(source: str | os.PathLike, dest: str | os.PathLike, *, max_length: int | None = None,
                  images: bool = True, overwrite: bool = False, compress: bool = False,
                  storage_options: dict[str, Any] | None = None,
                  progress: Callable[[int], None] | None = None, timeout: float | None = 60.0) -> ExportSummary:
    """Write PixArt-Σ's per-file layout for every sample of the build at ``source`` (an OUTPUT
    folder or manifest, local or remote) into ``dest``; remote reads that stall end after
    ``timeout`` seconds."""
    return PixArtExport(source, dest, max_length=max_length, images=images, overwrite=overwrite,
                        compress=compress, storage_options=storage_options, timeout=timeout).run(progress)
