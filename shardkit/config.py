"""Every build option in one dataclass, with TOML presets from configs/.

Precedence: dataclass defaults < preset (``--config``) < command-line flags.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .buckets import RESOLUTIONS
from .errors import ConfigError
from .format import DEFAULT_MAX_IMAGE_PIXELS, image_bound
from .filters import parse_filter

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib

DEFAULT_VAE = "madebyollin/sdxl-vae-fp16-fix"
DEFAULT_T5 = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"
# Where `shardkit tiny-models` writes by default and the tiny-offline preset reads: a fixed place,
# so the preset works from any working directory.
TINY_MODELS_HOME = "~/.cache/shardkit/tiny-models"
# Options that name a file or folder: in a preset, "~" is expanded, and a path starting with
# "./" or "../" is taken relative to the .toml file (hub ids like "org/name" are left alone).
PATH_FIELDS = ("vae", "t5", "pipeline", "image_root", "staging_dir")
# Options of the PixArt-Σ encoder pair; a --pipeline build takes its encoders from the pipeline instead.
ENCODER_PAIR_FIELDS = ("vae", "vae_subfolder", "t5", "max_length")

RESIZE_MODES = ("crop", "stretch")
DEVICES = ("auto", "cpu", "cuda")
COMPUTE_DTYPES = ("auto", "fp16", "bf16", "fp32")
STORE_DTYPES = ("fp16", "fp32")
# What each store dtype is on disk (the .npy dtype of latents and T5 features).
STORE_NUMPY_DTYPES = {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}
EMPTY_CAPTION_POLICIES = ("skip", "encode")
# PixArt-Σ's two captions. The first is required; a later field that is one of these is optional
# and may be absent from a source, any other must be in it (a misspelt field is an error).
DEFAULT_CAPTIONS = ("prompt", "sharegpt4v")


@dataclass
class BuildConfig:
    # What the shards contain.
    resolution: int = 512
    max_ratio: float = 4.5
    resize_mode: str = "crop"
    captions: tuple[str, ...] = DEFAULT_CAPTIONS
    empty_caption: str = "skip"
    keep_images: bool = True
    store_dtype: str = "fp16"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_bytes: int | None = None  # None: derived from max_image_pixels (image_byte_limit)
    image_root: str | None = None
    # Read images through symlinks that lead out of the image root (symlink farms); off, such
    # records are skipped as path_outside_root.
    follow_symlinks_outside_root: bool = False
    image_column: str | None = None  # Parquet / save_to_disk sources: the column holding the image
    # Which records are kept, decided while planning (each one dropped is a recorded skip).
    filters: tuple[str, ...] = ()  # expressions over the source's metadata (shardkit/filters.py)
    min_image_size: int = 0  # shorter side in pixels; 0 keeps every size
    dedup: bool = False  # skip records whose image bytes equal an earlier record's
    # Encoders.
    vae: str = DEFAULT_VAE
    vae_subfolder: str | None = None
    t5: str = DEFAULT_T5
    max_length: int = 300
    # A diffusers pipeline (Hugging Face id or folder with model_index.json): its VAE and text
    # encoders replace vae/t5, encoding as the pipeline does (shardkit.families).
    pipeline: str | None = None
    dtype: str = "auto"
    # Batching and shard limits.
    batch_size: int = 16
    t5_batch_size: int = 64
    shard_max_count: int = 1000
    shard_max_bytes: int = 1_000_000_000
    # How the work runs; these never change the bytes written.
    device: str = "auto"
    workers: int = 2
    encoder_streams: int = 0  # batches encoded at once; 0 = auto (1); 2 helps small encoders on a CPU
    progress: bool = True
    # Object storage (s3:// SOURCE or OUTPUT). Credentials never go here: they come from the
    # environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...), since the config is written to the manifest.
    endpoint_url: str | None = None
    staging_dir: str | None = None  # local folder where shards bound for object storage are written first
    # Most bytes of source images (tar and Parquet sources) a worker holds while it gathers its
    # shards' records; past it they wait in files under staging_dir until their shard is complete.
    gather_memory: int = 1 << 30

    # Fields that do not affect the shards' content: a resume may change them freely.
    RUNTIME_FIELDS = ("device", "workers", "encoder_streams", "progress", "endpoint_url", "staging_dir",
                      "gather_memory")

    def __post_init__(self) -> None:
        self.captions = tuple(self.captions)
        self.filters = tuple(self.filters)
        self.validate()

    def validate(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        require(self.resolution in RESOLUTIONS, f"resolution must be one of {list(RESOLUTIONS)}, got {self.resolution}")
        require(self.max_ratio >= 1.0, f"max_ratio must be >= 1 (it bounds max(h/w, w/h)), got {self.max_ratio}")
        require(self.resize_mode in RESIZE_MODES, f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        require(len(self.captions) > 0, "captions must name at least one caption field, e.g. 'prompt'")
        require(all(_is_field_name(c) for c in self.captions),
                f"caption fields must be letters, digits and underscores, got {list(self.captions)}")
        require(len(set(self.captions)) == len(self.captions), f"caption fields repeat: {list(self.captions)}")
        require(self.empty_caption in EMPTY_CAPTION_POLICIES,
                f"empty_caption must be one of {EMPTY_CAPTION_POLICIES}, got {self.empty_caption!r}")
        require(self.store_dtype in STORE_DTYPES, f"store_dtype must be one of {STORE_DTYPES}, got {self.store_dtype!r}")
        require(self.dtype in COMPUTE_DTYPES, f"dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
        require(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        require(self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}")
        require(self.max_image_pixels > 0, "max_image_pixels must be positive")
        require(self.max_image_bytes is None or self.max_image_bytes > 0, "max_image_bytes must be positive")
        require(self.min_image_size >= 0, f"min_image_size must be >= 0 (0 keeps every size), got {self.min_image_size}")
        require(all(isinstance(f, str) for f in self.filters), "filters must be expressions (text)")
        for expression in self.filters:
            parse_filter(expression)  # a ConfigError naming the column at fault
        for name in ("batch_size", "t5_batch_size", "shard_max_count", "shard_max_bytes"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        require(self.gather_memory >= 0, f"gather_memory must be >= 0 bytes, got {self.gather_memory}")
        require(self.encoder_streams >= 0, f"encoder_streams must be >= 0 (0 = auto), got {self.encoder_streams}")
        if self.endpoint_url is not None:
            scheme, _, rest = self.endpoint_url.partition("://")
            require(scheme in ("http", "https") and rest,
                    f"endpoint_url must be an http:// or https:// URL, got {self.endpoint_url!r}")
            require("@" not in rest.split("/", 1)[0],
                    "endpoint_url must not carry credentials (it is recorded in the manifest); "
                    "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE instead")

    def image_byte_limit(self) -> int:
        """The most bytes an image file may hold: --max-image-bytes, else derived from the pixel limit."""
        if self.max_image_bytes is not None:
            return self.max_image_bytes
        return image_bound(self.max_image_pixels)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["captions"] = list(self.captions)
        if self.pipeline is None:
            del data["pipeline"]  # builds of the encoder pair record what they always recorded
        data["filters"] = list(self.filters)
        return data

    def content_fields(self) -> dict[str, Any]:
        """The options that decide the shards' bytes: a resume must find them unchanged."""
        return {k: v for k, v in self.to_json().items() if k not in self.RUNTIME_FIELDS}

    @classmethod
    def recorded_content(cls, recorded: dict[str, Any]) -> dict[str, Any]:
        """The content fields an earlier build recorded, options added since counting as their
        defaults (what that build did)."""
        return {k: v for k, v in {**cls().content_fields(), **recorded}.items() if k not in cls.RUNTIME_FIELDS}

    def fingerprint(self) -> str:
        blob = json.dumps(self.content_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _is_field_name(name: str) -> bool:
    return bool(name) and all(ch.isalnum() or ch == "_" for ch in name) and name.isascii()


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(BuildConfig)]


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in resources.files("shardkit.configs").iterdir()
                  if p.name.endswith(".toml"))


def read_preset(name_or_path: str) -> dict[str, Any]:
    """Options from a preset name (``configs/NAME.toml``) or a TOML file path."""
    path = Path(name_or_path)
    base = None
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path} does not exist; pass a preset name ({', '.join(preset_names())}) or a .toml path")
        text = path.read_text(encoding="utf-8")
        origin = str(path)
        base = path.resolve().parent
    else:
        candidate = resources.files("shardkit.configs").joinpath(f"{name_or_path}.toml")
        if not candidate.is_file():
            raise ConfigError(f"unknown config preset {name_or_path!r}; choose one of {', '.join(preset_names())} or pass a .toml path")
        text = candidate.read_text(encoding="utf-8")
        origin = f"preset {name_or_path}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot read {origin}: {exc}; fix the TOML syntax") from None
    # A preset may nest its options under [build]; plain top-level keys work too.
    data = data.get("build", data)
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        raise ConfigError(f"{origin} has unknown option(s) {', '.join(unknown)}; valid options: {', '.join(field_names())}")
    return {name: _preset_path(value, base) if name in PATH_FIELDS else value for name, value in data.items()}


def _preset_path(value: Any, base: Path | None) -> Any:
    """A preset's path as an absolute one, so that it means the same from any working directory."""
    if not isinstance(value, str):
        return value
    if value.startswith("~"):
        return str(Path(value).expanduser())
    if base is not None and value.startswith(("./", "../")):
        return str((base / value).resolve())
    return value


def make_config(preset: str | None = None, **overrides: Any) -> BuildConfig:
    """Defaults, then the preset, then every override that is not None."""
    values: dict[str, Any] = {}
    if preset:
        values.update(read_preset(preset))
    values.update({k: v for k, v in overrides.items() if v is not None})
    pair = [name for name in ENCODER_PAIR_FIELDS if values.get(name) is not None]
    if values.get("pipeline") and pair:
        raise ConfigError(f"--pipeline takes the VAE and text encoders from the pipeline; drop "
                          f"{', '.join('--' + name.replace('_', '-') for name in pair)} (flags or preset), or drop "
                          f"--pipeline")
    try:
        return BuildConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid option: {exc}") from None
