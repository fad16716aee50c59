"""Encoder stage: load the frozen VAE and T5 (hub id or local folder) and encode batches.

Both load through ``from_pretrained``, the same path for the real SDXL VAE / T5-XXL and for
the tiny offline models of ``shardkit tiny-models``.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
import torch

from .config import STORE_NUMPY_DTYPES, TINY_MODELS_HOME, BuildConfig
from .errors import ShardkitError
from .format import all_finite
from .images import to_model_input

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_STORE_TORCH_DTYPES = {STORE_NUMPY_DTYPES[name].name: _TORCH_DTYPES[name] for name in STORE_NUMPY_DTYPES}


def to_store_array(features: torch.Tensor, store_dtype: np.dtype | type) -> np.ndarray:
    """Encoder output as a numpy array in the store dtype, cast where it was computed.

    Casting on the device halves what crosses to the host for fp16 storage, and spares the host
    numpy's float32 -> float16 conversion (~8 ns per value here: ~5 ms per sample at T5-XXL's
    width), which on a GPU build would otherwise sit between two encoder calls. Both round to
    nearest even, so the stored bytes are the same (tests/test_encoder_output.py).
    """
    return features.to(_STORE_TORCH_DTYPES[np.dtype(store_dtype).name]).cpu().numpy()

T = TypeVar("T")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ShardkitError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(device)


def resolve_encoder_streams(streams: int, device: torch.device) -> int:
    """``streams`` as asked, or one for 0 (auto).

    More streams are an explicit opt-in (``--encoder-streams 2``) for CPU builds with small
    encoders: two batches of the tiny test encoders at once, on half the threads each, built
    1.2x faster on a 2-core CPU (19-22 vs 17-18 samples/s, BENCHMARKS.md section 1), their many
    small ops leaving intra-op threads waiting on each other. SDXL's VAE and T5-XXL run on GPUs,
    where one stream keeps the device busy.
    """
    del device  # one stream on every device unless asked
    return streams or 1


class EncoderStreams:
    """Runs encoder work for several batches at once, in submission order of results.

    With one stream the work runs inline, in the caller's thread (GPU builds: one CUDA stream is
    fed in order). With more, each runs on a thread of its own with ``torch`` intra-op threads
    split between them for as long as the ``with`` block lasts.
    """

    def __init__(self, streams: int):
        self.streams = streams
        self._pool: futures.ThreadPoolExecutor | None = None
        self._saved_threads: int | None = None

    def __enter__(self) -> "EncoderStreams":
        return self.open()

    def open(self) -> "EncoderStreams":
        if self.streams > 1 and self._pool is None:
            self._saved_threads = torch.get_num_threads()
            # Set before the pool's threads exist: torch gives each new thread the process-wide
            # count at its first parallel op.
            torch.set_num_threads(max(1, self._saved_threads // self.streams))
            self._pool = futures.ThreadPoolExecutor(max_workers=self.streams, thread_name_prefix="shardkit-encode")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def submit(self, fn: Callable[..., T], *args) -> "futures.Future[T]":
        """A future of ``fn(*args)``; inline work raises its errors here, pooled work from ``result()``."""
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        done: futures.Future = futures.Future()
        done.set_result(fn(*args))
        return done


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # Half precision only where it is fast; CPU kernels are best (and exact) in fp32.
        return torch.float16 if device.type == "cuda" else torch.float32
    return _TORCH_DTYPES[dtype]


def vae_precision(dtype: str, device: torch.device, force_upcast: bool) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights dtype, autocast dtype or None) of the VAE.

    SDXL's VAE overflows fp16 in places (its config sets ``force_upcast``), so with ``auto`` on a
    GPU it keeps fp32 weights and encodes under fp16 autocast, as PixArt-Σ's extractor does:
    convolutions run in fp16 on the tensor cores, normalisations and ``exp`` in fp32. A VAE
    without ``force_upcast`` (e.g. one fine-tuned for fp16) runs in plain fp16. An explicit
    ``--dtype`` is taken as given.
    """
    resolved = resolve_dtype(dtype, device)
    if dtype == "auto" and resolved == torch.float16 and force_upcast:
        return torch.float32, torch.float16
    return resolved, None


def non_finite_features(latent: np.ndarray, t5: dict[str, np.ndarray]) -> str | None:
    """What in one sample's stored features is NaN or infinite (None when all is finite).

    Checked after the cast to the store dtype, which is where values past fp16's range become
    infinite; a VAE or T5 that overflows its compute dtype gives NaN or inf already.
    """
    if not all_finite(latent):
        return "the VAE latent"
    for name, array in t5.items():
        if not all_finite(array):
            return f"the T5 features of caption field {name!r}"
    return None


@dataclass
class EncoderIdentity:
    """What the manifest records of an encoder, and what a resume must find unchanged."""

    source: str
    subfolder: str | None
    model_class: str
    revision: str | None
    config_sha256: str
    weights_fingerprint: str | None
    compute_dtype: str
    store_dtype: str
    scaling_factor: float | None = None
    latent_channels: int | None = None
    downsample_factor: int | None = None  # VAE spatial reduction: latents are [2C, H/f, W/f]
    hidden_size: int | None = None
    max_length: int | None = None
    vocab_size: int | None = None

    def as_json(self) -> dict:
        return asdict(self)

    def content_json(self) -> dict:
        """The fields that change what gets written (compute dtype is a runtime choice)."""
        data = self.as_json()
        data.pop("compute_dtype")
        return data


def _config_sha256(config: dict) -> str:
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()


def _weights_fingerprint(folder: Path) -> str | None:
    """A cheap fingerprint of a local model's weights: names, sizes and the first and last MiB.

    Hashing a 10 GB T5 on every run would cost minutes; this catches a swapped checkpoint.
    """
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".model", ".json") and p.is_file())
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(folder).as_posix()}:{size}".encode())
        with open(file, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > (2 << 20):
                fh.seek(-(1 << 20), 2)
                digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def _looks_local(source: str) -> bool:
    """A folder path rather than a Hugging Face id (org/name)."""
    return source.startswith(("/", ".", "~")) or source.count("/") != 1 or Path(source).exists()


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load_error(what: str, source: str, option: str, exc: Exception) -> ShardkitError:
    if _looks_local(source) and not Path(source).expanduser().exists():
        hint = ("; `shardkit tiny-models` writes the tiny test encoders there"
                if Path(source).expanduser() == Path(TINY_MODELS_HOME).expanduser() else "")
        return ShardkitError(f"cannot load the {what}: folder {source} does not exist; pass {option} an existing "
                             f"folder or a Hugging Face id (org/name){hint}")
    return ShardkitError(
        f"cannot load the {what} from {source!r} ({_first_line(exc)}); pass {option} a local folder "
        f"(e.g. one written by `shardkit tiny-models`) or a Hugging Face id that is in your cache or reachable")


# How long to wait for the hub to answer before calling it unreachable.
_HUB_PROBE_TIMEOUT_S = 5.0
_TRUE = ("1", "ON", "YES", "TRUE")


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used now, or None when it answers.

    One quick request instead of the hub client's retries, which take half a minute and print a
    warning per attempt before an error that names a missing config.json rather than the network.
    """
    if any(os.environ.get(name, "").strip().upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return "the hub is switched off (HF_HUB_OFFLINE is set)"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=_HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, a malformed HF_ENDPOINT
        return f"{endpoint} cannot be reached ({getattr(exc, 'reason', exc)})"
    return None


def check_hub_access(config: BuildConfig) -> bool:
    """For encoders named by hub id: True when they must load from the local cache only (the hub is
    offline or unreachable, and they are cached); raises, in one line, when they are not cached."""
    wanted = []  # (what, hub id, option, a file that must be cached)
    if not _looks_local(config.vae):
        config_file = f"{config.vae_subfolder}/config.json" if config.vae_subfolder else "config.json"
        wanted.append(("VAE", config.vae, "--vae DIR (with --vae-subfolder if it is in one)", config_file))
    if not _looks_local(config.t5):
        wanted.append(("T5", config.t5, "--t5 DIR (holding text_encoder/ and tokenizer/)", "text_encoder/config.json"))
    if not wanted:
        return False
    reason = _hub_unreachable()
    if reason is None:
        return False
    from huggingface_hub import try_to_load_from_cache

    missing = [(what, repo, option) for what, repo, option, file in wanted
               if not isinstance(try_to_load_from_cache(repo, file), str)]
    if missing:
        names = " and ".join(f"the {what} {repo!r}" for what, repo, _ in missing)
        options = " and ".join(option for _, _, option in missing)
        raise ShardkitError(f"cannot download {names}: {reason}, and the local Hugging Face cache does not hold "
                            f"{'it' if len(missing) == 1 else 'them'}; pass {options} "
                            f"{'as a local folder' if len(missing) == 1 else 'as local folders'}, or run where the "
                            f"hub is reachable")
    return True


@contextlib.contextmanager
def quiet_hub_logging():
    """Model libraries print advice meant for notebooks; keep the CLI output to what matters."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity(),
             transformers_logging.is_progress_bar_enabled())
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(saved[0])
        transformers_logging.set_verbosity(saved[1])
        if saved[2]:
            transformers_logging.enable_progress_bar()


def _split_on_oom(encode: Callable[[Sequence[T]], list], items: Sequence[T]) -> list:
    """Encode ``items``; on GPU out-of-memory, halve the batch and retry each half."""
    try:
        return encode(items)
    except torch.OutOfMemoryError:
        if len(items) <= 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(items) // 2
        log.warning("out of memory encoding a batch of %d; retrying as %d + %d", len(items), half, len(items) - half)
        return _split_on_oom(encode, items[:half]) + _split_on_oom(encode, items[half:])


class VaeEncoder:
    """AutoencoderKL -> PixArt's stored feature: concat([posterior.mean, posterior.std]) on channels."""

    def __init__(self, config: BuildConfig, device: torch.device, local_files_only: bool = False):
        from diffusers import AutoencoderKL

        self.device = device
        self.dtype = resolve_dtype(config.dtype, device)  # as asked for (check_encoders_match)
        self.store_dtype = STORE_NUMPY_DTYPES[config.store_dtype]
        try:
            with quiet_hub_logging():
                force_upcast = True
                if vae_precision(config.dtype, device, True)[1] is not None:  # then the config decides
                    vae_config = AutoencoderKL.load_config(config.vae, subfolder=config.vae_subfolder,
                                                           local_files_only=local_files_only)
                    force_upcast = bool(vae_config.get("force_upcast", True))
                self.weights_dtype, self.autocast_dtype = vae_precision(config.dtype, device, force_upcast)
                self.model = AutoencoderKL.from_pretrained(config.vae, subfolder=config.vae_subfolder,
                                                           torch_dtype=self.weights_dtype,
                                                           local_files_only=local_files_only)
        except Exception as exc:  # hub, file and format errors all mean "this is not a usable VAE"
            raise load_error("VAE", config.vae, "--vae (and --vae-subfolder)", exc) from None
        self.model.to(device).eval().requires_grad_(False)
        self.channels_last = use_channels_last(self.model, device)
        model_config = dict(self.model.config)
        local = Path(config.vae) / (config.vae_subfolder or "")
        self.identity = EncoderIdentity(
            source=config.vae, subfolder=config.vae_subfolder, model_class=type(self.model).__name__,
            revision=model_config.get("_commit_hash"), config_sha256=_config_sha256(model_config),
            weights_fingerprint=_weights_fingerprint(local), compute_dtype=self.compute_dtype_name,
            store_dtype=config.store_dtype, scaling_factor=float(model_config.get("scaling_factor") or 0.0) or None,
            latent_channels=int(model_config["latent_channels"]),
            downsample_factor=2 ** (len(model_config["block_out_channels"]) - 1))
        self.downsample = self.identity.downsample_factor

    @property
    def compute_dtype_name(self) -> str:
        if self.autocast_dtype is not None:
            return f"autocast-{str(self.autocast_dtype).replace('torch.', '')}"
        return str(self.weights_dtype).replace("torch.", "")

    def feature_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (2 * self.identity.latent_channels, height // self.downsample, width // self.downsample)

    def encode(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 [B, H, W, 3] -> [B, 2C, H/8, W/8] in the store dtype."""
        if not len(pixels):
            return np.zeros((0,))
        parts = _split_on_oom(self._encode, pixels)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def _encode(self, pixels: torch.Tensor) -> list[np.ndarray]:
        return vae_features(self, pixels, "mean_std")


def vae_features(vae, pixels: torch.Tensor, stored: str) -> list[np.ndarray]:
    """uint8 [B, H, W, 3] -> [what a build stores of ``vae``'s encoding, in its store dtype]:
    ``stored`` ``"mean_std"`` is the posterior's mean and std concatenated on channels, ``"latent"``
    a deterministic latent (DC-AE). ``vae`` has ``model``, ``device``, ``weights_dtype``,
    ``autocast_dtype``, ``channels_last`` and ``store_dtype``."""
    with torch.inference_mode():
        x = vae_input(pixels, vae.device, vae.weights_dtype, vae.channels_last)
        with torch.autocast(vae.device.type, dtype=vae.autocast_dtype or torch.float16,
                            enabled=vae.autocast_dtype is not None):
            encoded = vae.model.encode(x)
            if stored == "latent":
                features = encoded.latent
            else:
                features = torch.cat([encoded.latent_dist.mean, encoded.latent_dist.std], dim=1)
        return [to_store_array(features, vae.store_dtype)]


def use_channels_last(model: torch.nn.Module, device: torch.device) -> bool:
    """GPU only: cuDNN's convolutions are fastest on NHWC tensors under half precision, and
    page-locked input copies overlap with compute (measured on CPU: channels-last no gain)."""
    if device.type != "cuda":
        return False
    model.to(memory_format=torch.channels_last)
    return True


def vae_input(pixels: torch.Tensor, device: torch.device, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """uint8 [B, H, W, 3] (an NHWC view) -> the VAE's input on ``device``. On a CPU it is made
    NCHW: the channels-last GroupNorm kernel is far less exact there (up to 4e-5 of the largest
    latent value on the tiny VAE against 3e-6 from NCHW, fp64 as the reference)."""
    if channels_last:
        pixels = pixels.pin_memory().to(device, non_blocking=True)
    x = to_model_input(pixels.to(device)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class T5Encoder:
    """T5 encoder that stores only the valid tokens of each caption.

    Captions are sorted by token length, cut into batches that keep padding low
    (``length_batches``) and padded per batch; with the attention mask, T5's outputs on the
    valid tokens do not depend on how much padding follows.
    """

    def __init__(self, config: BuildConfig, device: torch.device, local_files_only: bool = False):
        from transformers import AutoTokenizer, T5EncoderModel

        self.device = device
        self.dtype = resolve_dtype(config.dtype, device)
        self.store_dtype = STORE_NUMPY_DTYPES[config.store_dtype]
        self.max_length = config.max_length
        subfolders = _t5_subfolders(config.t5)
        tokenizer_folder = _local_tokenizer_folder(config.t5, subfolders[0])
        try:
            with quiet_hub_logging():
                self.tokenizer = AutoTokenizer.from_pretrained(config.t5, subfolder=subfolders[0],
                                                               local_files_only=local_files_only)
        except Exception as exc:
            if tokenizer_folder is None:
                raise load_error("T5 tokenizer", config.t5, "--t5", exc) from None
            raise ShardkitError(f"cannot load the T5 tokenizer from {tokenizer_folder}/ ({_first_line(exc)}); it must "
                                f"hold a T5 tokenizer: tokenizer.json or spiece.model, with tokenizer_config.json") from None
        if tokenizer_folder is not None and _knows_no_words(self.tokenizer):
            # Without its vocabulary file, transformers builds a tokenizer of special tokens only.
            raise ShardkitError(f"the T5 tokenizer in {tokenizer_folder}/ turns every word into the unknown token: "
                                f"its vocabulary file is missing; it must hold tokenizer.json or spiece.model")
        try:
            with quiet_hub_logging():
                self.model = T5EncoderModel.from_pretrained(config.t5, subfolder=subfolders[1], torch_dtype=self.dtype,
                                                            local_files_only=local_files_only)
        except Exception as exc:
            raise load_error("T5 encoder", config.t5, "--t5", exc) from None
        self.model.to(device).eval().requires_grad_(False)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        model_config = self.model.config.to_dict()
        local = Path(config.t5)
        self.identity = EncoderIdentity(
            source=config.t5, subfolder=subfolders[1], model_class=type(self.model).__name__,
            revision=getattr(self.model.config, "_commit_hash", None), config_sha256=_config_sha256(model_config),
            weights_fingerprint=_weights_fingerprint(local), compute_dtype=str(self.dtype).replace("torch.", ""),
            store_dtype=config.store_dtype, hidden_size=int(self.model.config.d_model), max_length=config.max_length,
            vocab_size=len(self.tokenizer))

    @property
    def hidden_size(self) -> int:
        return self.identity.hidden_size

    @staticmethod
    def stored_members(field: str, features: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """The tar members of one caption field's features: ``t5_<field>.npy``."""
        return [(f"t5_{field}.npy", features)]

    @staticmethod
    def stored_length(features: np.ndarray) -> int:
        return int(features.shape[0])

    def tokenize(self, text: str) -> list[int]:
        """Token ids of one caption, truncated to max_length (the end-of-sequence token included)."""
        return self.tokenizer(text, max_length=self.max_length, truncation=True, add_special_tokens=True)["input_ids"]

    def encode(self, token_ids: Sequence[Sequence[int]], batch_size: int) -> list[np.ndarray]:
        """Each caption's valid-token features, [L, D] in the store dtype, in input order."""
        features: list[np.ndarray | None] = [None] * len(token_ids)
        for chunk in length_batches([len(ids) for ids in token_ids], batch_size):
            encoded = _split_on_oom(self._encode, [token_ids[i] for i in chunk])
            for i, array in zip(chunk, encoded):
                features[i] = array
        return features  # type: ignore[return-value]

    def encode_distinct(self, captions: Iterable[dict[str, np.ndarray]], batch_size: int) -> dict[bytes, np.ndarray]:
        """Features of every distinct caption among ``captions`` (field -> token ids per record),
        keyed by the token ids' bytes: a caption shared by records or fields is encoded once."""
        distinct: dict[bytes, np.ndarray] = {}
        for fields in captions:
            for ids in fields.values():
                distinct.setdefault(ids.tobytes(), ids)
        return dict(zip(distinct, self.encode(list(distinct.values()), batch_size)))

    def _encode(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            mask[row, :len(ids)] = 1
        with torch.inference_mode():
            hidden = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            hidden = to_store_array(hidden, self.store_dtype)
        # Views of the batch's array: its padding is small (length_batches), and rows are only
        # read from here on (serialised into the shard).
        return [hidden[row, :len(ids)] for row, ids in enumerate(batch)]


# What one more T5 call costs, in tokens of work: each call reads all of the weights again (a GPU
# reads memory ~300x slower than it computes, so a call is weight-bound below ~300 tokens) and
# launches hundreds of kernels.
T5_CALL_COST_TOKENS = 256


def length_batches(lengths: Sequence[int], max_batch: int, call_cost: int = T5_CALL_COST_TOKENS) -> list[list[int]]:
    """Indices of ``lengths`` cut into T5 batches of at most ``max_batch``, longest batch first.

    Sorted by length, the cut points are chosen (dynamic programming) to minimise the tokens
    computed, padding included, plus ``call_cost`` per batch: fixed-size cuts of sorted captions
    still pad a batch of long captions to its longest one, a tail that log-normal caption lengths
    always have.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    best = [0] + [float("inf")] * len(order)  # best[end]: cheapest cut of the `end` shortest
    cut_at = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        width = lengths[order[end - 1]]  # the batch's longest caption sets its padded width
        for start in range(max(0, end - max_batch), end):
            cost = best[start] + (end - start) * width + call_cost
            if cost < best[end]:
                best[end], cut_at[end] = cost, start
    batches = []
    end = len(order)
    while end:
        batches.append(order[cut_at[end]:end])
        end = cut_at[end]
    return batches


def _knows_no_words(tokenizer) -> bool:
    """True when ordinary words all become the unknown token (word-boundary markers aside)."""
    ids = tokenizer("a photo of a cat", add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return all(token == tokenizer.unk_token or not token.strip("\u2581 ") for token in tokens)


def _local_tokenizer_folder(source: str, subfolder: str | None) -> Path | None:
    """The local folder the tokenizer must be in (None for a hub id); missing, it is named."""
    local = Path(source).expanduser()
    if not local.is_dir():
        return None
    folder = local / subfolder if subfolder else local
    if not folder.is_dir():
        raise ShardkitError(f"the T5 folder {local} has text_encoder/ but no {subfolder}/ folder beside it; put the "
                            f"T5 tokenizer files (tokenizer.json or spiece.model, tokenizer_config.json) in "
                            f"{folder}/")
    return folder


def _t5_subfolders(source: str) -> tuple[str | None, str | None]:
    """PixArt's diffusers layout keeps tokenizer/ and text_encoder/ side by side; a plain T5 folder has neither."""
    local = Path(source)
    if local.is_dir() and not (local / "text_encoder").is_dir():
        return None, None
    return "tokenizer", "text_encoder"


@dataclass
class Encoders:
    """The image role (``vae``) and the text role (``t5``) of a build: PixArt-Σ's SDXL VAE and
    T5, or a diffusers pipeline's (``family``: ``families.PipelineEncoders``, in the same roles)."""

    vae: VaeEncoder
    t5: T5Encoder
    device: torch.device
    family: Any = None

    @property
    def text_role(self) -> str:
        """The manifest's name of the text role: "t5", or "text" for a pipeline's encoders."""
        return "t5" if self.family is None else "text"

    def identities(self, content_only: bool = False) -> dict:
        """What the manifest (or, ``content_only``, the plan and a resume) records of both roles."""
        as_json = (lambda identity: identity.content_json()) if content_only else (lambda identity: identity.as_json())
        return {"vae": as_json(self.vae.identity), self.text_role: as_json(self.t5.identity)}


def load_encoders(config: BuildConfig, device: str | None = None) -> Encoders:
    """Both encoders on ``device`` (e.g. a rank's ``cuda:LOCAL_RANK``), else on the config's device."""
    device = torch.device(device) if device else resolve_device(config.device)
    if config.pipeline:
        from .families.stage import load_family_encoders

        return load_family_encoders(config.pipeline, device, config.dtype, STORE_NUMPY_DTYPES[config.store_dtype])
    local_files_only = check_hub_access(config)
    return Encoders(vae=VaeEncoder(config, device, local_files_only), t5=T5Encoder(config, device, local_files_only),
                    device=device)


def check_encoders_match(encoders: Encoders, config: BuildConfig) -> None:
    """Encoders loaded for one config may serve another only if they would write the same things."""
    if encoders.family is not None or config.pipeline:
        if encoders.family is None or encoders.family.source != config.pipeline:
            raise ValueError(f"encoders were loaded for another pipeline than {config.pipeline!r}")
        return
    expected = load_identity_fields(config)
    actual = {"vae": encoders.vae.identity.source, "vae_subfolder": encoders.vae.identity.subfolder,
              "t5": encoders.t5.identity.source, "store_dtype": encoders.vae.identity.store_dtype,
              "max_length": encoders.t5.identity.max_length,
              "dtype": str(encoders.vae.dtype).replace("torch.", "")}
    if expected != actual:
        raise ValueError(f"encoders were loaded for {actual}, the config asks for {expected}")


def load_identity_fields(config: BuildConfig) -> dict:
    dtype = resolve_dtype(config.dtype, resolve_device(config.device))
    return {"vae": config.vae, "vae_subfolder": config.vae_subfolder, "t5": config.t5,
            "store_dtype": config.store_dtype, "max_length": config.max_length,
            "dtype": str(dtype).replace("torch.", "")}
