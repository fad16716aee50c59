"""The sample format: the one place that knows what a shard's sample is.

A sample is a run of adjacent tar members sharing a key (WebDataset's rule: the key is the member
path up to the first dot of its basename, so keys hold no dot). Its members:

- ``KEY.json``: the metadata record (``check_metadata`` says what a valid one holds);
- ``KEY.txt``: the first caption field's text;
- ``KEY.<image extension>``: the original image bytes, when the build keeps images;
- ``KEY.latent.npy``: ``[2*C, H/f, W/f]``, the VAE posterior mean and std;
- ``KEY.t5_<field>.npy``: ``[L, D]``, the valid T5 rows of a caption field, ``1 <= L <= max_length``.

``SampleFormat`` is the declaration of one build: the format version, the parameters (channels,
downsample factor, T5 width and length, store dtype, caption fields) and per member what made it,
its dtype and its shape rule. The manifest carries it (``sample_format``); a manifest written
before the declaration existed gets the same declaration derived from its config and encoders.
Arrays are stored as ``.npy`` and loaded without pickle, their header checked before any data is
touched.

Beside the samples, a build stores the encoding of the empty caption ``""`` once
(``OUTPUT/empty_caption/t5.npy``: its valid rows ``[L, D]``; a --pipeline build one file per
member of a caption, ``empty_caption/prompt_embeds.npy`` and so on), stored as every caption
is: trainers that drop captions swap it in. The declaration names it (``EmptyCaption``: path, dtype,
shape, sha256), and ``load_empty_caption`` checks it against that before it is used.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np

from .errors import ShardFormatError, ShardkitError

FORMAT_NAME = "shardkit-sample"
FORMAT_VERSION = 1
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
SUFFIX_PATTERN = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
# WebDataset's split: the key is the member path up to the first dot of its basename.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # WebDataset's "__key__"-style members, never samples

METADATA = "json"
TEXT = "txt"
LATENT = "latent.npy"
STORE_DTYPES = {"fp16": "float16", "fp32": "float32"}
DEFAULT_VAE_DOWNSAMPLE = 8  # manifests that predate the recorded factor were all made with 8x VAEs
# Bounds for members whose size no shape rule fixes: a metadata record or caption past these is
# not one shardkit wrote, and is refused before it is read.
MAX_TEXT_BYTES = 16 << 20
MAX_ARRAY_BYTES_UNDECLARED = 1 << 30  # arrays of shards read without their manifest
EMPTY_CAPTION_FOLDER = "empty_caption"
# SDXL's per-sample sizes (height, width) and crop (top, left), in a pipeline build's metadata record.
MICRO_CONDITIONING = ("original_size", "crop_coords_top_left", "target_size")
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's decompression-bomb limit, the build's default
NPY_HEADER_BYTES = 1 << 16  # np.save writes ~128; version 1 headers cannot pass 64 KiB


def caption_member(name: str) -> str:
    return f"t5_{name}.npy"


def family_member(field: str, member: str) -> str:
    """A pipeline build's member of one caption field: ``<field>.<member>.npy``."""
    return f"{field}.{member}.npy"


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, suffix) of a tar member as WebDataset splits it; None for a name without a dot or a
    WebDataset meta member (``__key__``)."""
    if _META_MEMBER.match(name):
        return None
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2)) if match else None


def safe_relative_path(path: Any, what: str = "path") -> str:
    """``path`` unchanged if it is a valid relative path: the one rule for sample paths (verify
    and export) and shard paths. Refused: non-strings, empty, NUL, backslashes, absolute paths,
    drive letters and ``..`` components."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ShardkitError(f"{what} {path!r} is not a usable relative path")
    if "\\" in path or path.startswith("/") or re.match(r"^[A-Za-z]:", path) or ".." in path.split("/"):
        raise ShardkitError(f"{what} {path!r} leaves its folder (absolute, a drive letter, '..' or a backslash); "
                            f"refusing to use it")
    return path


# ---- the declaration -----------------------------------------------------------------------

@dataclass(frozen=True)
class MemberSpec:
    """One member of every sample: its name after ``KEY.`` (``{field}``, ``{image_ext}``: per
    caption field, per sample), what made it, and for arrays the dtype and shape rule."""

    name: str
    made_by: str
    dtype: str | None = None
    shape: tuple[str, ...] | None = None  # dims: an int, a parameter, "a*b", "a/b" or a free dim "L"
    required: bool = True

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape) if self.shape is not None else None
        return data


@dataclass(frozen=True)
class EmptyCaption:
    """The stored encoding of the empty caption, one file of OUTPUT in the store dtype with its
    sha256: for ``t5`` its valid rows ``[length, D]``; in a --pipeline build one file per member
    a caption has (``prompt_embeds``, ``pooled_prompt_embeds``, ...), as every caption is stored."""

    encoder: str  # "t5", or the pipeline member it stands for
    path: str  # relative to OUTPUT
    dtype: str
    shape: tuple[int, ...]
    sha256: str

    @property
    def length(self) -> int:
        return self.shape[0]

    @property
    def max_bytes(self) -> int:
        """The most bytes its file may hold: checked before it is read."""
        return NPY_HEADER_BYTES + math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def as_json(self) -> dict[str, Any]:
        made_by = (f"{self.encoder}: valid token rows of the empty caption \"\"" if self.encoder == "t5" else
                   f"{self.encoder} of the empty caption \"\", encoded as every caption of the build")
        data = {"path": self.path, "dtype": self.dtype, "shape": list(self.shape), "sha256": self.sha256,
                "made_by": made_by}
        if len(self.shape) == 2:
            data["length"] = self.length
        return data

    @classmethod
    def from_json(cls, encoder: str, data: dict[str, Any]) -> "EmptyCaption":
        shape = tuple(int(d) for d in data["shape"])
        if (not 1 <= len(shape) <= 2 or (len(shape) == 2 and int(data["length"]) != shape[0])
                or not re.fullmatch(r"[0-9a-f]{64}", str(data["sha256"]))):
            raise ValueError(f"empty caption {encoder!r} has shape {list(shape)} and length {data.get('length')!r}")
        return cls(encoder=str(encoder), path=safe_relative_path(data["path"], "the empty caption's path"),
                   dtype=str(np.dtype(data["dtype"])), shape=shape, sha256=data["sha256"])

    @classmethod
    def of(cls, encoder: str, payload: bytes) -> "EmptyCaption":
        """The declaration of ``payload`` (a ``.npy`` of the encoding) stored at its usual path."""
        header = npy_header(payload, f"the empty caption's {encoder} encoding")
        return cls(encoder=encoder, path=f"{EMPTY_CAPTION_FOLDER}/{encoder}.npy", dtype=str(header.dtype),
                   shape=header.shape, sha256=hashlib.sha256(payload).hexdigest())


@dataclass(frozen=True)
class SampleFormat:
    """The declaration of one build's samples (see the module docstring)."""

    version: int
    params: dict[str, int]  # C, f, D, max_length
    store_dtype: str  # numpy dtype name of every array
    captions: tuple[str, ...]
    keep_images: bool
    members: tuple[MemberSpec, ...]
    free_dims: dict[str, tuple[int | str, int | str]] = field(default_factory=dict)  # "L": (1, "max_length")
    # Text encoder -> its stored empty-caption encoding; empty in builds made before they were stored.
    empty_captions: dict[str, EmptyCaption] = field(default_factory=dict)
    # A --pipeline build: the pipeline's identity (families.PipelineEncoders.identity()): its
    # class and family, its latents' normalisation, its text settings and members.
    pipeline: dict[str, Any] | None = None

    @property
    def primary(self) -> str:
        return self.captions[0]

    @property
    def micro_conditioning(self) -> bool:
        """Whether each metadata record holds SDXL's micro-conditioning (``MICRO_CONDITIONING``)."""
        return self.pipeline is not None and any(member["name"] in MICRO_CONDITIONING
                                                 for member in self.pipeline.get("members", ()))

    @property
    def text_members(self) -> tuple[MemberSpec, ...]:
        """The members stored per caption field (their names hold ``{field}``)."""
        return tuple(member for member in self.members if "{field}" in member.name)

    def spec(self, suffix: str) -> MemberSpec | None:
        for member in self.members:
            if member.name == suffix:
                return member
        for member in self.text_members:
            if _field_pattern(member.name).fullmatch(suffix):
                return member
        return None

    @property
    def empty_caption_specs(self) -> dict[str, MemberSpec]:
        """What the build stores of the empty caption, by name, each with the caption member it is
        stored as: ``t5`` (T5's rows), or each member a caption of a --pipeline build has
        (``prompt_embeds``, ``pooled_prompt_embeds``, ...)."""
        if self.pipeline is None:
            return {"t5": self.text_members[0]}
        return {spec.name[len("{field}."):-len(".npy")]: spec for spec in self.text_members}  # family_member names

    def field_members(self, field: str) -> list[tuple[str, MemberSpec]]:
        """(member name, its spec) of each array stored for caption field ``field``."""
        return [(member.name.replace("{field}", field), member) for member in self.text_members]

    def _value(self, term: str, env: dict[str, int]) -> int:
        return int(term) if term.isdigit() else int(env[term])

    def dim(self, expr: str, env: dict[str, int]) -> int:
        if "*" in expr:
            a, b = expr.split("*", 1)
            return self._value(a, env) * self._value(b, env)
        if "/" in expr:
            a, b = expr.split("/", 1)
            return self._value(a, env) // self._value(b, env)
        return self._value(expr, env)

    def shape_rule(self, spec: MemberSpec, bucket_hw: Iterable[int]) -> list[tuple[int, int]]:
        """Per dim the (least, most) size allowed for a sample of the bucket."""
        height, width = bucket_hw
        env = {**self.params, "H": int(height), "W": int(width)}
        bounds = []
        for expr in spec.shape or ():
            if expr in self.free_dims:
                low, high = self.free_dims[expr]
                bounds.append((self.dim(str(low), env), self.dim(str(high), env)))
            else:
                size = self.dim(expr, env)
                bounds.append((size, size))
        return bounds

    def max_member_bytes(self, suffix: str, bucket_hw: Iterable[int] | None) -> int:
        """The most bytes a member may hold: refused before it is read when it claims more. An
        array may be stored wider than declared (a dtype finding, not a size one): up to 8 bytes
        per item."""
        spec = self.spec(suffix)
        if spec is None or spec.made_by == "source image":
            return self.params.get("max_image_bytes") or image_bound(DEFAULT_MAX_IMAGE_PIXELS)
        if spec.shape is None:
            return MAX_TEXT_BYTES
        if bucket_hw is None:
            return MAX_ARRAY_BYTES_UNDECLARED
        items = math.prod(high for _, high in self.shape_rule(spec, bucket_hw))
        return NPY_HEADER_BYTES + items * 8

    def as_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": self.version, "key": "member path up to the first dot of its basename",
                "params": dict(self.params), "store_dtype": self.store_dtype, "captions": list(self.captions),
                "keep_images": self.keep_images, "free_dims": {k: list(v) for k, v in self.free_dims.items()},
                "members": [m.as_json() for m in self.members],
                **({"pipeline": self.pipeline} if self.pipeline is not None else {}),
                **({"empty_captions": {name: e.as_json() for name, e in self.empty_captions.items()}}
                   if self.empty_captions else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SampleFormat":
        try:
            if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
                raise ShardkitError(f"the manifest declares sample format {data.get('format')!r} version "
                                    f"{data.get('version')!r}; this shardkit reads {FORMAT_NAME} {FORMAT_VERSION}")
            members = tuple(MemberSpec(name=str(m["name"]), made_by=str(m["made_by"]), dtype=m.get("dtype"),
                                       shape=tuple(str(d) for d in m["shape"]) if m.get("shape") is not None else None,
                                       required=bool(m.get("required", True))) for m in data["members"])
            declared = cls(version=int(data["version"]), params={k: int(v) for k, v in data["params"].items()},
                           store_dtype=str(np.dtype(data["store_dtype"])), captions=tuple(map(str, data["captions"])),
                           keep_images=bool(data["keep_images"]), members=members,
                           free_dims={k: (v[0], v[1]) for k, v in (data.get("free_dims") or {}).items()},
                           empty_captions={str(k): EmptyCaption.from_json(k, v)
                                           for k, v in (data.get("empty_captions") or {}).items()},
                           pipeline=dict(data["pipeline"]) if data.get("pipeline") is not None else None)
        except ShardkitError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise ShardkitError(f"the manifest's sample_format is malformed ({exc!r}); rebuild with `shardkit build`") from None
        if not declared.captions:
            raise ShardkitError("the manifest's sample_format names no caption field")
        return declared


@functools.lru_cache(maxsize=64)
def _field_pattern(name: str) -> re.Pattern:
    """A member name with ``{field}`` as a pattern matching it for any caption field."""
    return re.compile(re.escape(name).replace(re.escape("{field}"), "[A-Za-z0-9_]+"))


def image_bound(max_image_pixels: int) -> int:
    """The most bytes an image file may hold, at the source and in a shard: 8 bytes per allowed
    pixel (16-bit RGBA stored uncompressed, the widest layout PIL decodes) plus 1 MiB for metadata
    (EXIF, ICC profile, XMP); the build refuses images over ``max_image_pixels``."""
    return 8 * int(max_image_pixels) + (1 << 20)


def member_bounds(fmt: SampleFormat | None, bucket_hw: Iterable[int] | None) -> Callable[[str], int]:
    """``suffix -> most bytes`` for the members of one shard (bucket); without a declaration
    (shards read without their manifest) arrays get a fixed bound."""
    if fmt is not None:
        return functools.lru_cache(maxsize=64)(lambda suffix: fmt.max_member_bytes(suffix, bucket_hw))

    def undeclared(suffix: str) -> int:
        if suffix in (METADATA, TEXT):
            return MAX_TEXT_BYTES
        return MAX_ARRAY_BYTES_UNDECLARED if suffix.endswith(".npy") else image_bound(DEFAULT_MAX_IMAGE_PIXELS)

    return undeclared


def declare(*, captions: Iterable[str], keep_images: bool, store_dtype: str, latent_channels: int,
            downsample: int, hidden_size: int, max_length: int, max_image_bytes: int | None = None) -> SampleFormat:
    """The declaration of a build of PixArt-Σ's kind (an AutoencoderKL posterior and T5 rows)."""
    dtype = STORE_DTYPES.get(store_dtype, store_dtype)
    members = [MemberSpec(METADATA, "shardkit metadata record (JSON object)"),
               MemberSpec(TEXT, "the first caption field (UTF-8 text)")]
    if keep_images:
        members.append(MemberSpec("{image_ext}", "source image", required=True))
    members.append(MemberSpec(LATENT, "vae: posterior mean and std, concatenated on channels", dtype, ("2*C", "H/f", "W/f")))
    members.append(MemberSpec("t5_{field}.npy", "t5: valid token rows of a caption field (first field required)",
                              dtype, ("L", "D")))
    params = {"C": int(latent_channels), "f": int(downsample), "D": int(hidden_size), "max_length": int(max_length)}
    if keep_images:
        params["max_image_bytes"] = int(max_image_bytes or image_bound(DEFAULT_MAX_IMAGE_PIXELS))
    return SampleFormat(version=FORMAT_VERSION, params=params,
                        store_dtype=str(np.dtype(dtype)), captions=tuple(captions), keep_images=bool(keep_images),
                        members=tuple(members), free_dims={"L": (1, "max_length")})


def declare_pipeline(*, captions: Iterable[str], keep_images: bool, store_dtype: str, pipeline: dict[str, Any],
                     max_image_bytes: int | None = None) -> SampleFormat:
    """The declaration of a --pipeline build, from the pipeline's identity: its latents
    (``families.LatentSpec``) and its members (``families.Member``), per caption field."""
    dtype = STORE_DTYPES.get(store_dtype, store_dtype)
    latents = pipeline["latents"]
    members = [MemberSpec(METADATA, "shardkit metadata record (JSON object)"),
               MemberSpec(TEXT, "the first caption field (UTF-8 text)")]
    if keep_images:
        members.append(MemberSpec("{image_ext}", "source image", required=True))
    if latents["stored"] == "mean_std":
        members.append(MemberSpec(LATENT, f"vae ({latents['vae_class']}): posterior mean and std, concatenated on "
                                          f"channels", dtype, ("2*C", "H/f", "W/f")))
    else:
        members.append(MemberSpec(LATENT, f"vae ({latents['vae_class']}): the latent", dtype, ("C", "H/f", "W/f")))
    max_rows = 1
    for member in pipeline["members"]:
        if member["dtype"] != "store":
            continue  # per sample, in the metadata record (SDXL's micro-conditioning)
        if member["max_rows"]:
            max_rows = max(max_rows, int(member["max_rows"]))
        members.append(MemberSpec(family_member("{field}", member["name"]), member["made_by"], dtype,
                                  tuple(str(d) for d in member["shape"])))
    params = {"C": int(latents["latent_channels"]), "f": int(latents["downsample"]), "max_length": max_rows}
    if keep_images:
        params["max_image_bytes"] = int(max_image_bytes or image_bound(DEFAULT_MAX_IMAGE_PIXELS))
    return SampleFormat(version=FORMAT_VERSION, params=params, store_dtype=str(np.dtype(dtype)),
                        captions=tuple(captions), keep_images=bool(keep_images), members=tuple(members),
                        free_dims={"L": (1, "max_length")}, pipeline=pipeline)


def declare_from_config(config: dict[str, Any], encoders: dict[str, dict]) -> SampleFormat:
    """The declaration implied by a build's config and encoder identities: what build writes, and
    what a manifest from before the declaration is read as."""
    if config.get("pipeline"):
        try:
            text = encoders["text"]
            return declare_pipeline(captions=tuple(config["captions"]), keep_images=bool(config["keep_images"]),
                                    store_dtype=config["store_dtype"], max_image_bytes=config.get("max_image_bytes")
                                    or image_bound(config.get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS),
                                    pipeline={k: text[k] for k in ("pipeline_class", "family", "source", "latents",
                                                                   "text", "members")})
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardkitError(f"the manifest lacks {exc} in its pipeline's identity; its sample format is "
                                f"unknown") from None
    try:
        store = config["store_dtype"]
        if store not in STORE_DTYPES:
            raise ShardkitError(f"manifest store_dtype {store!r} is not one of {sorted(STORE_DTYPES)}")
        return declare(captions=tuple(config["captions"]), keep_images=bool(config["keep_images"]), store_dtype=store,
                       latent_channels=int(encoders["vae"]["latent_channels"]),
                       downsample=int(encoders["vae"].get("downsample_factor") or DEFAULT_VAE_DOWNSAMPLE),
                       hidden_size=int(encoders["t5"]["hidden_size"]),
                       max_length=int(config.get("max_length") or encoders["t5"]["max_length"]),
                       max_image_bytes=config.get("max_image_bytes")
                       or image_bound(config.get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS))
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardkitError(f"the manifest lacks {exc} in its config or encoders; its sample format is unknown") from None


# ---- the metadata record -------------------------------------------------------------------

def json_bytes(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def parse_metadata(payload: bytes | memoryview | None, key: str) -> dict[str, Any]:
    """The JSON object of a sample's ``.json`` member, or a ShardFormatError."""
    if payload is None:
        raise ShardFormatError(f"sample {key!r} has no .json member")
    try:
        text = str(payload, "utf-8")
    except UnicodeDecodeError as exc:
        raise ShardFormatError(f"sample {key!r}: its .json member is not UTF-8 ({exc.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ShardFormatError(f"sample {key!r}: its .json member is not valid JSON ({exc})") from None
    except RecursionError:  # json's parser recurses per level of nesting
        raise ShardFormatError(f"sample {key!r}: its .json member nests too deep to be a metadata record") from None
    if not isinstance(data, dict):
        raise ShardFormatError(f"sample {key!r}: its .json member holds a {type(data).__name__}, not an object")
    return data


def metadata_problems(meta: dict[str, Any], key: str, fmt: SampleFormat | None) -> list[str]:
    """What is wrong with a metadata record (empty when it is valid). The record holds the key,
    the source path (a valid relative path), the original height and width, the bucket, the
    caption texts, the T5 fields stored and their lengths."""
    problems = []
    if meta.get("key") != key:
        problems.append(f"{key}.json names key {meta.get('key')!r}")
    try:
        safe_relative_path(meta.get("path"), "its path")
    except ShardkitError as exc:
        problems.append(f"{key}.json: {exc}")
    if not isinstance(meta.get("bucket"), str):
        problems.append(f"{key}.json names no bucket")
    hw = meta.get("original_hw")
    if not (isinstance(hw, list) and len(hw) == 2 and all(type(v) is int and v > 0 for v in hw)):
        problems.append(f"{key}.json original_hw is {hw!r}, not [height, width]")
    fields = meta.get("t5_fields")
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        problems.append(f"{key}.json t5_fields is {fields!r}, not a list of caption fields")
        fields = []
    if fmt is not None:
        unknown = [f for f in fields if f not in fmt.captions]
        if unknown:
            problems.append(f"t5_fields lists {unknown}, not caption fields of this build ({list(fmt.captions)})")
    lengths = meta.get("t5_lengths")
    if not isinstance(lengths, dict) or not all(type(v) is int for v in lengths.values()):
        problems.append(f"{key}.json t5_lengths is {lengths!r}, not a map of field to token count")
        lengths = {}
    captions = meta.get("captions")
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        problems.append(f"{key}.json captions is not a map of field to text")
        captions = {}
    for name in fields:
        if name not in lengths:
            problems.append(f"{key}.json has no t5_lengths entry for {name!r}")
        if name not in captions:
            problems.append(f"{key}.json has no caption text for {name!r}")
    if fmt is not None and fmt.micro_conditioning:
        micro = meta.get("micro_conditioning")
        if not (isinstance(micro, dict) and all(isinstance(micro.get(name), list) and len(micro[name]) == 2
                                                and all(type(v) is int and v >= 0 for v in micro[name])
                                                for name in MICRO_CONDITIONING)):
            problems.append(f"{key}.json micro_conditioning is {micro!r}, not {{{', '.join(MICRO_CONDITIONING)}}} "
                            f"as [int, int] each")
        elif micro["target_size"] != meta.get("bucket_hw"):
            problems.append(f"{key}.json target_size {micro['target_size']} is not its bucket {meta.get('bucket_hw')}")
    return problems


def check_metadata(meta: dict[str, Any], key: str, fmt: SampleFormat | None) -> dict[str, Any]:
    problems = metadata_problems(meta, key, fmt)
    if problems:
        raise ShardFormatError(f"sample {key!r}: malformed metadata ({problems[0]})")
    return meta


# ---- arrays --------------------------------------------------------------------------------

# IEEE exponent bits per float width: all of them set means NaN or Inf.
_EXPONENT_MASKS = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000), 8: (np.uint64, 0x7FF0000000000000)}


def all_finite(array: np.ndarray) -> bool:
    """Whether no value is NaN or infinite. For floats, by the exponent bits: numpy computes
    ``isfinite`` on fp16 through float32, 10x slower at the real sizes (T5-XXL rows [200, 4096]
    fp16: 0.42 vs 4.4 ms; an SDXL latent [8, 128, 128]: 0.04 vs 0.71 ms), which the build's
    check of every sample and verify's both pay."""
    if array.dtype.kind != "f" or not array.dtype.isnative or array.dtype.itemsize not in _EXPONENT_MASKS:
        return bool(np.isfinite(array).all())
    bits_type, mask = _EXPONENT_MASKS[array.dtype.itemsize]
    bits = np.ascontiguousarray(array).view(bits_type)
    return not np.any((bits & bits_type(mask)) == bits_type(mask))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class NpyHeader(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    offset: int  # where the data starts
    nbytes: int  # of the data the header claims


@functools.lru_cache(maxsize=4096)
def _parse_header(header: bytes) -> NpyHeader:
    # A shard repeats a few headers (one per latent shape and token length); parsing one costs
    # more than reading a T5 row block, so parsed headers are kept.
    major = header[6]
    reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = reader(io.BytesIO(header[8:]), max_header_size=NPY_HEADER_BYTES)
    shape = tuple(int(d) for d in shape)
    return NpyHeader(np.dtype(dtype), shape, bool(fortran_order), len(header), math.prod(shape) * np.dtype(dtype).itemsize)


def npy_header(payload: bytes | memoryview, what: str) -> NpyHeader:
    """The header of a ``.npy`` payload, checked: versions 1.0 and 2.0 only, no Python objects,
    and the data the header claims present in the payload (nothing is allocated from a header)."""
    def refuse(reason: str) -> ShardFormatError:
        return ShardFormatError(f"{what} is not a plain .npy array: {reason}")

    if len(payload) < 10 or bytes(payload[:6]) != b"\x93NUMPY":
        raise refuse("it does not start with the .npy magic string")
    major, minor = payload[6], payload[7]
    if (major, minor) not in ((1, 0), (2, 0)):
        raise refuse(f"format version {major}.{minor} is not one shardkit reads (1.0, 2.0)")
    width = 2 if major == 1 else 4
    offset = 8 + width + int.from_bytes(bytes(payload[8:8 + width]), "little")
    if offset > min(len(payload), NPY_HEADER_BYTES + 12):
        raise refuse("its header is cut short or oversized")
    try:
        header = _parse_header(bytes(payload[:offset]))
    except Exception as exc:  # numpy's header parser raises many types (even tokenize errors) for damaged text
        raise refuse(f"its header is damaged ({type(exc).__name__})") from None
    if header.dtype.hasobject:
        raise refuse("it holds Python objects, which only unpickling could load (shardkit never unpickles)")
    if header.dtype.itemsize == 0:
        raise refuse("its dtype has no size")
    if any(d < 0 for d in header.shape) or len(payload) - offset < header.nbytes:
        raise refuse(f"its data holds {len(payload) - offset} bytes, its header needs {header.nbytes}")
    return header


def read_npy(payload: bytes | memoryview, what: str) -> np.ndarray:
    """A ``.npy`` payload as an array: a read-only view of ``payload``, no copy, no pickle."""
    header = npy_header(payload, what)
    count = math.prod(header.shape)
    array = np.frombuffer(payload, dtype=header.dtype, count=count, offset=header.offset)
    return array.reshape(header.shape[::-1]).transpose() if header.fortran_order else array.reshape(header.shape)


def load_empty_caption(declared: EmptyCaption, payload: bytes, fmt: SampleFormat) -> np.ndarray:
    """The stored empty-caption encoding (``[L, D]`` for T5, a member's shape in a pipeline build), once its bytes match the declared sha256 and
    it is a finite array of the declared dtype and shape that fits the build's captions; else a
    ShardFormatError that says what is wrong (callers name the file)."""
    digest = hashlib.sha256(payload).hexdigest()
    if digest != declared.sha256:
        raise ShardFormatError(f"its sha256 is {digest[:12]}..., the manifest says {declared.sha256[:12]}...")
    array = read_npy(payload, "the file")
    if str(array.dtype) != declared.dtype or declared.dtype != fmt.store_dtype:
        raise ShardFormatError(f"it is {array.dtype}, the manifest says {declared.dtype} and the build stores "
                               f"{fmt.store_dtype}")
    if fmt.pipeline is not None:
        spec = fmt.empty_caption_specs.get(declared.encoder)
        if spec is None:
            raise ShardFormatError(f"the build's captions have no member {declared.encoder!r}")
        bounds = fmt.shape_rule(spec, (0, 0))  # caption members do not depend on the bucket
        if array.shape != declared.shape or array.ndim != len(bounds) or \
                not all(low <= d <= high for d, (low, high) in zip(array.shape, bounds)):
            raise ShardFormatError(f"it is {list(array.shape)}, the manifest says {list(declared.shape)}; "
                                   f"{declared.encoder} of this build is {list(spec.shape)}")
    else:
        hidden, max_length = fmt.params["D"], fmt.params["max_length"]
        if array.shape != declared.shape or array.shape[1:] != (hidden,) or not 1 <= array.shape[0] <= max_length:
            raise ShardFormatError(f"it is {list(array.shape)}, the manifest says {list(declared.shape)}; captions "
                                   f"of this build are [L, {hidden}] with 1 <= L <= {max_length}")
    if not np.isfinite(array).all():
        raise ShardFormatError("it holds NaN or Inf values")
    return array


# ---- caption padding -----------------------------------------------------------------------

def pad_caption_feature(feature: np.ndarray, max_length: int, out: np.ndarray | None = None) -> np.ndarray:
    """``[L, D]`` valid T5 rows -> ``[max_length, D]``, PixArt's loader rule: the rows past ``L``
    repeat the last valid row. Features longer than ``max_length`` keep their first rows.
    ``out`` (``[max_length, D]``) receives the result instead of a new array."""
    if feature.ndim != 2 or feature.shape[0] == 0:
        raise ValueError(f"caption features must be [L, D] with L >= 1, got shape {feature.shape}")
    if out is None:
        out = np.empty((max_length, feature.shape[1]), dtype=feature.dtype)
    length = min(feature.shape[0], max_length)
    out[:length] = feature[:length]
    out[length:] = feature[length - 1]
    return out


def caption_mask(length: int, max_length: int, dtype: np.dtype | type = np.int16) -> np.ndarray:
    """``[max_length]``: ones for the ``length`` valid tokens, zeros after."""
    mask = np.zeros(max_length, dtype=dtype)
    mask[: min(length, max_length)] = 1
    return mask


def members_table(fmt: SampleFormat) -> str:
    """The declaration's members as a Markdown table (docs/format.md shows the default build's)."""
    rows = ["| member | made by | dtype | shape |", "|---|---|---|---|"]
    for member in fmt.members:
        shape = f"[{', '.join(member.shape)}]" if member.shape is not None else "-"
        rows.append(f"| `KEY.{member.name}` | {member.made_by} | {member.dtype or '-'} | {shape} |")
    return "\n".join(rows)
