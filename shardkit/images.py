"""Image stage: header probing, decoding to RGB and the resize/crop to a bucket.

Runs in the decode workers, so it only touches PIL and numpy; the float conversion to
[-1, 1] happens on the encoder's device (``to_model_input``).
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .buckets import Bucket
from .format import image_bound
from .sourcefiles import FILE_TOO_LARGE, SourceFileSkip, read_source_file, too_large
from .storage import RemotePath, as_location

# Reasons a record is skipped at this stage (they end up in failures.jsonl).
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
CORRUPT_IMAGE = "corrupt_image"
TOO_MANY_PIXELS = "too_many_pixels"
SIZE_MISMATCH = "size_mismatch"

_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_OPEN_LOCK = threading.Lock()
# How much of a JPEG the planner reads for its header. Everything PIL parses before the image
# data (SOF, and EXIF: one APP1 segment is at most 64 KiB) almost always lies within it; when
# not (large ICC profiles), the whole file is read.
_HEADER_PREFIX_BYTES = 64 * 1024
_JPEG_MAGIC = b"\xff\xd8\xff"


class SourceUnavailable(Exception):
    """The source storage could not be read (network, service): the build must stop, not skip records."""


class ImageSkip(SourceFileSkip):
    """This record's image cannot be used; ``reason`` is one of the constants above or sourcefiles'."""


@dataclass
class ImageHeader:
    width: int  # after EXIF orientation
    height: int
    format: str
    file_bytes: int | None  # size of the file, read with the header; None when not asked for


@dataclass
class TransformedImage:
    """A decoded image resized to its bucket, plus what training needs to know about it."""

    pixels: np.ndarray  # uint8 [H, W, 3], H, W = bucket size
    original_hw: tuple[int, int]  # after EXIF orientation
    resized_hw: tuple[int, int]  # before the centre crop
    crop_top: int
    crop_left: int
    image_bytes: bytes  # the file as read, stored unchanged in the shard
    extension: str  # lower-case, without the dot


@contextlib.contextmanager
def _reading(path: Path | RemotePath):
    """Read errors as skips of this record, or as SourceUnavailable for object storage."""
    try:
        yield
    except ImageSkip:
        raise
    except SourceFileSkip as exc:  # not a regular file, outside the image root, too large
        raise ImageSkip(exc.reason, exc.detail) from None
    except FileNotFoundError:
        raise ImageSkip(MISSING_FILE, f"{path} does not exist") from None
    except IsADirectoryError:
        raise ImageSkip(NOT_AN_IMAGE, f"{path} is a directory") from None
    except OSError as exc:
        if isinstance(path, RemotePath):
            # A network or service error says nothing about the record: stop (resumably), never skip.
            raise SourceUnavailable(f"cannot read {path}: {exc}") from None
        raise ImageSkip(MISSING_FILE, f"cannot read {path}: {exc.strerror or exc}") from None


def _read_bytes(path: Path | RemotePath | str, max_bytes: int, root: Path | None = None) -> bytes:
    """The file's bytes, at most ``max_bytes`` of them (a larger file is a FILE_TOO_LARGE skip).

    A local file must be a regular file whose real location lies inside ``root`` (None: anywhere);
    a URL (s3://...) or RemotePath is read through fsspec, with one ranged GET of at most
    ``max_bytes + 1`` bytes.
    """
    data, _ = _read_start(path, max_bytes + 1, False, max_bytes, root)
    if len(data) > max_bytes:
        raise ImageSkip(FILE_TOO_LARGE, too_large(path, f"more than {max_bytes} bytes", max_bytes).detail)
    return data


def image_file_bytes(path: Path | RemotePath | str, max_bytes: int, root: Path | None) -> bytes:
    """The whole image file, read as for decoding (--dedup hashes it while planning)."""
    return _read_bytes(path, max_bytes, root)


def _read_start(path: Path | RemotePath | str, length: int, need_size: bool, max_bytes: int,
                root: Path | None) -> tuple[bytes, int | None]:
    """At least the file's first ``length`` bytes (all of a smaller file) and its size in bytes.

    Without ``need_size`` the size of an object longer than ``length`` is None: object storage
    then answers with one ranged GET and no HEAD. A file known to hold more than ``max_bytes``
    is a FILE_TOO_LARGE skip; a local one is read as ``read_source_file`` allows.
    """
    path = as_location(path)
    with _reading(path):
        if isinstance(path, RemotePath):
            data, size = path.read_start(length, need_size)
        else:
            data, size = read_source_file(path, max_bytes, root, length=length)
    if size is not None and size > max_bytes:
        raise ImageSkip(FILE_TOO_LARGE, too_large(path, f"{size} bytes", max_bytes).detail)
    if not data:
        raise ImageSkip(EMPTY_FILE, f"{path} is empty (0 bytes)")
    return data, size


def file_size(path: Path | RemotePath | str) -> int:
    """The file's size in bytes; read errors map as for the image's bytes (a skip, or
    SourceUnavailable for object storage)."""
    path = as_location(path)
    with _reading(path):
        return path.stat().st_size


def _open(data: bytes, path: Path, max_pixels: int) -> Image.Image:
    try:
        # PIL's limit and the warning filters are process-wide: the lock keeps decode threads from
        # seeing each other's temporary settings (only the header is read while it is held).
        with _OPEN_LOCK, warnings.catch_warnings():
            # We check the pixel count ourselves, against the configured limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                image = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
    except UnidentifiedImageError:
        raise ImageSkip(NOT_AN_IMAGE, f"{path} is not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageSkip(CORRUPT_IMAGE, f"{path}: {exc}") from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise ImageSkip(TOO_MANY_PIXELS, f"{path} has {image.width}x{image.height} = {pixels} pixels, over the limit of {max_pixels}")
    return image


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header alone."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block does not make the image unusable
        orientation = 1
    if orientation in _SWAPS_AXES:
        return image.height, image.width
    return image.width, image.height


def read_header(path: Path, max_pixels: int, need_size: bool = True, *, max_bytes: int | None = None,
                root: Path | None = None) -> ImageHeader:
    """Size and format without decoding pixels (PIL reads only the header here).

    Of a JPEG larger than 64 KiB only the start is read: for object storage one ranged read
    instead of the whole image, which the decode stage reads anyway. ``need_size=False`` (a build
    that does not keep images) leaves ``file_bytes`` None where learning it would cost a request.
    Files are read within ``max_bytes`` (default: derived from ``max_pixels``) and, locally,
    only inside ``root`` (``_read_bytes``).
    """
    max_bytes = max_bytes or image_bound(max_pixels)
    data, size = _read_start(path, _HEADER_PREFIX_BYTES, need_size, max_bytes, root)
    if size is None or len(data) < size:
        header = _header_from_jpeg_start(data, size, path, max_pixels)
        if header is not None:
            return header
        data = _read_bytes(path, max_bytes, root)
        size = len(data)
    return _header(_open(data, path, max_pixels), size)


def header_from_bytes(data: bytes, where: str, max_pixels: int) -> ImageHeader:
    """The header of an image held in memory (a tar member, a Parquet cell)."""
    if not data:
        raise ImageSkip(EMPTY_FILE, f"{where} is empty (0 bytes)")
    return _header(_open(data, where, max_pixels), len(data))


def _header(image: Image.Image, file_bytes: int | None) -> ImageHeader:
    width, height = _oriented_size(image)
    return ImageHeader(width=width, height=height, format=(image.format or "").lower(), file_bytes=file_bytes)


def _header_from_jpeg_start(start: bytes, size: int | None, path: Path, max_pixels: int) -> ImageHeader | None:
    """The header from a JPEG's first bytes, or None when they do not hold all of it (or it is not a
    JPEG). PIL parses a JPEG's markers up to the start of scan and fails on a cut segment, so a
    successful open has read every segment before the pixels, EXIF included."""
    if not start.startswith(_JPEG_MAGIC):
        return None
    try:
        image = _open(start, path, max_pixels)
    except ImageSkip as skip:
        if skip.reason == TOO_MANY_PIXELS:
            raise  # the size came from a whole SOF segment: a verdict, not a cut
        return None
    return _header(image, size)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparent areas become white rather than whatever lies under alpha."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.uint32 if image.mode == "I" else np.uint16).astype(np.float64)
        peak = 65535.0 if image.mode != "I" else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def fit_to_bucket(original_hw: tuple[int, int], bucket: Bucket, resize_mode: str) -> tuple[tuple[int, int], int, int]:
    """Size to resize to, and the crop's top/left, as PixArt's training loader computes them.

    crop: scale so the image covers the bucket, then centre-crop (torchvision's rounding).
    stretch: resize straight to the bucket, as PixArt's extract_features.py does.
    """
    if resize_mode == "stretch":
        return (bucket.height, bucket.width), 0, 0
    ori_h, ori_w = original_hw
    if bucket.height / ori_h > bucket.width / ori_w:
        resized = (bucket.height, int(ori_w * bucket.height / ori_h))
    else:
        resized = (int(ori_h * bucket.width / ori_w), bucket.width)
    # Float rounding can land one pixel short of the bucket; never crop outside the image.
    resized = (max(resized[0], bucket.height), max(resized[1], bucket.width))
    top = int(round((resized[0] - bucket.height) / 2.0))
    left = int(round((resized[1] - bucket.width) / 2.0))
    return resized, top, left


# libjpeg can scale by 1/2, 1/4 or 1/8 while decoding (PIL's draft), which skips most of the work
# for large photos. It is used only while the decoded image stays at least this many times the
# resize target, so the BICUBIC/LANCZOS filter still does a >= 2x antialiased reduction after it:
# the pixels stay within a few levels of a full decode (measured in BENCHMARKS.md).
_DRAFT_MARGIN = 2


def _draft_reduction(image: Image.Image, resized_hw: tuple[int, int], swaps_axes: bool) -> int:
    """Ask a JPEG to decode at a reduced scale where that is safe; returns the reduction (1 = full size)."""
    if image.format != "JPEG":
        return 1
    target_h, target_w = (resized_hw[1], resized_hw[0]) if swaps_axes else resized_hw  # stored orientation
    if min(image.width // (target_w * _DRAFT_MARGIN), image.height // (target_h * _DRAFT_MARGIN)) < 2:
        return 1
    stored_width = image.width
    drafted = image.draft(image.mode, (target_w * _DRAFT_MARGIN, target_h * _DRAFT_MARGIN))
    if drafted is None:
        return 1
    _, box = drafted  # (0, 0, width / reduction, height / reduction)
    return round(stored_width / box[2])


def decode_and_fit(path: Path, bucket: Bucket, resize_mode: str, max_pixels: int,
                   expected_hw: tuple[int, int] | None, lanczos: bool, *, max_bytes: int | None = None,
                   root: Path | None = None, data: bytes | None = None) -> TransformedImage:
    """The image at ``path`` decoded and fitted to ``bucket``; reads as ``read_header`` does.

    ``data``: the image's bytes when the source holds them (``path`` then only names it), held
    to the same bound.
    """
    embedded = data is not None
    max_bytes = max_bytes or image_bound(max_pixels)
    if data is None:
        data = _read_bytes(path, max_bytes, root)
    elif not data:
        raise ImageSkip(EMPTY_FILE, f"{path} is empty (0 bytes)")
    elif len(data) > max_bytes:
        raise ImageSkip(FILE_TOO_LARGE, too_large(path, f"{len(data)} bytes", max_bytes).detail)
    image = _open(data, path, max_pixels)
    pil_format = image.format
    # The geometry comes from the header, so a size mismatch is found before any pixel is decoded.
    width, height = _oriented_size(image)
    original_hw = (height, width)
    if expected_hw is not None and expected_hw != original_hw:
        raise ImageSkip(SIZE_MISMATCH, f"{path}: metadata says {expected_hw[0]}x{expected_hw[1]} (HxW), "
                                       f"the image is {original_hw[0]}x{original_hw[1]} after EXIF orientation")
    resized_hw, top, left = fit_to_bucket(original_hw, bucket, resize_mode)
    try:
        reduction = _draft_reduction(image, resized_hw, swaps_axes=(image.height, image.width) != original_hw)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when there is nothing to turn
        rgb = to_rgb(image)
    except ImageSkip:
        raise
    except Exception as exc:  # PIL raises many types for truncated or malformed data
        raise ImageSkip(CORRUPT_IMAGE, f"{path}: cannot decode ({type(exc).__name__}: {exc})") from None
    decoded_hw = (-(-height // reduction), -(-width // reduction))
    if (rgb.height, rgb.width) != decoded_hw:
        raise ImageSkip(CORRUPT_IMAGE, f"{path}: decodes to {rgb.width}x{rgb.height}, its header says "
                                       f"{width}x{height} (scaled by 1/{reduction})")
    if (rgb.height, rgb.width) != resized_hw or reduction != 1:
        resample = Image.Resampling.LANCZOS if lanczos else Image.Resampling.BICUBIC
        # A reduced decode rounds its size up; the box is exactly the original picture's area in it.
        whole = (0, 0, width / reduction, height / reduction)
        rgb = rgb.resize((resized_hw[1], resized_hw[0]), resample=resample, box=whole)
    if (top, left) != (0, 0) or resized_hw != (bucket.height, bucket.width):
        rgb = rgb.crop((left, top, left + bucket.width, top + bucket.height))
    pixels = np.array(rgb, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays
    # An embedded image's name promises nothing (img2dataset names PNG and WebP bytes .jpg): its format does.
    extension = _format_extension(pil_format) if embedded else _extension(path, pil_format)
    return TransformedImage(pixels=pixels, original_hw=original_hw, resized_hw=resized_hw,
                            crop_top=top, crop_left=left, image_bytes=data, extension=extension)


def _extension(path: Path, pil_format: str | None) -> str:
    ext = as_location(path).suffix.lower().lstrip(".")
    if ext == "jpeg":
        ext = "jpg"
    return ext if ext.isalnum() and ext else (pil_format or "img").lower()


_FORMAT_EXTENSIONS = {"jpeg": "jpg", "tiff": "tif"}


def _format_extension(pil_format: str | None) -> str:
    name = (pil_format or "img").lower()
    return _FORMAT_EXTENSIONS.get(name, name)


def to_model_input(pixels_uint8):
    """uint8 [B, H, W, 3] tensor -> float [B, 3, H, W] in [-1, 1] (ToTensor then Normalize(0.5, 0.5)),
    still laid out channels-last in memory: the caller picks the layout its kernels want."""
    return pixels_uint8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class DecodeJob:
    """Everything a decode worker needs, and nothing that is costly to send to it."""

    path: Path | RemotePath
    bucket: Bucket
    resize_mode: str
    max_pixels: int
    expected_hw: tuple[int, int] | None
    lanczos: bool
    max_bytes: int | None = None  # None: derived from max_pixels
    root: Path | None = None  # a local image must lie inside it (symlinks resolved); None: anywhere
    data: bytes | None = None  # the image's bytes, when the source holds them


@dataclass
class DecodeResult:
    image: TransformedImage | None
    skip_reason: str | None = None
    skip_detail: str | None = None
    unavailable: str | None = None  # the source storage failed: the build stops, resumable


def run_decode_job(job: DecodeJob) -> DecodeResult:
    """Worker entry point: never raises for a bad image, so one broken file cannot stop a build."""
    try:
        return DecodeResult(decode_and_fit(job.path, job.bucket, job.resize_mode, job.max_pixels,
                                           job.expected_hw, job.lanczos, max_bytes=job.max_bytes, root=job.root,
                                           data=job.data))
    except ImageSkip as exc:
        return DecodeResult(None, exc.reason, exc.detail)
    except SourceUnavailable as exc:
        return DecodeResult(None, unavailable=str(exc))
    except Exception as exc:  # e.g. MemoryError or a PIL bug on a hostile file: a skip, not a crash
        return DecodeResult(None, CORRUPT_IMAGE, f"{job.path}: {type(exc).__name__}: {exc}")
