"""Tiny random encoders for the offline demo and the tests, and nothing else.

`write_tiny_models` writes a folder laid out like PixArt-Σ's diffusers repository
(``vae/``, ``tokenizer/``, ``text_encoder/`` and ``model_index.json``) holding:

* a randomly initialised ``AutoencoderKL`` with the SDXL VAE's geometry (8x spatial
  downsampling, 4 latent channels) but only a few channels per layer;
* a real T5-style Unigram tokenizer whose vocabulary is built from a small English
  corpus embedded below, so it is created locally without any download;
* a randomly initialised two-layer ``T5EncoderModel`` (gated-GELU, like T5 v1.1 and
  the T5-XXL PixArt uses) with a 32-wide hidden state.

The folder loads through the same ``from_pretrained(path, subfolder=...)`` calls as the
real models, so every code path runs offline in seconds. The features these models
produce are meaningless; never train on them.

The same seed always gives byte-identical files (same library versions assumed).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import unicodedata
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator

__all__ = ["write_tiny_models", "is_complete"]

# Total tokenizer size, special tokens and sentinels included. A multiple of 8 so the
# text encoder's embedding table needs no padding.
VOCAB_SIZE = 2000
EXTRA_IDS = 100
MODEL_MAX_LENGTH = 512

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPACE = "\u2581"  # "▁", SentencePiece's word-boundary mark
EXTRA_TOKENS = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]

# Longest sub-word piece worth proposing; whole words may be longer.
_MAX_SUBWORD_LEN = 10

# Characters that always get a piece of their own, so ordinary Latin text never maps
# to <unk> even when a letter is missing from the corpus.
_BASE_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿœßÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÑÒÓÔÕÖØÙÚÛÜÝŒ"
    "–—‘’“”…°"
)

# Written for this module: varied descriptive English in the style of image captions.
TOKENIZER_CORPUS = """\
A quiet mountain lake at sunrise, with mist drifting over the still water and pine trees along the shore.
The snow-capped peaks glow pink and orange in the first light of the morning.
A wide green valley stretches toward distant hills under a pale blue sky dotted with white clouds.
Golden wheat fields sway in the wind beside a narrow dirt road and an old wooden fence.
A rocky coastline with waves crashing against dark cliffs; seagulls circle above the foam.
A sandy beach at sunset, the sky streaked with purple, crimson and gold, palm trees in silhouette.
Dense tropical rainforest, thick with ferns, vines and moss, sunlight filtering through the canopy.
A frozen river winds through a silent birch forest covered in fresh powdery snow.
Red desert dunes under a blazing midday sun, their long shadows sharp and curved.
A thunderstorm rolls across the prairie: heavy grey clouds, a bolt of lightning, rain on the horizon.
Autumn leaves in shades of amber, rust and scarlet carpet a winding path in the park.
A waterfall tumbles down a cliff of black volcanic rock into a turquoise pool.
Rolling vineyards in Tuscany, with cypress trees and a stone farmhouse on the hill.
A field of lavender in Provence, neat purple rows fading into a hazy violet distance.
The northern lights ripple green and blue above a snowy cabin with a warm yellow window.

A fluffy orange cat sleeps curled up on a sunny windowsill next to a potted plant.
A golden retriever puppy runs across the grass with a red ball in its mouth.
Two horses graze in a misty meadow at dawn, their breath visible in the cold air.
A majestic lion rests under an acacia tree on the African savanna.
A small grey rabbit sits among clover and daisies, ears raised and alert.
A flock of flamingos wades through shallow pink water, reflected perfectly below.
An owl perches on a mossy branch, its round yellow eyes staring at the camera.
A herd of elephants walks slowly across the dry plain, raising clouds of dust.
A bright green tree frog clings to a wet leaf after the rain.
A school of silver fish swims around a colourful coral reef in clear blue water.
A brown bear catches a salmon in a rushing river surrounded by evergreen trees.
A hummingbird hovers beside a red hibiscus flower, wings blurred with motion.
A black and white dog with a blue collar sits patiently by the front door.
Three ducklings follow their mother across a calm pond covered with lily pads.
A tiny hedgehog curled into a ball on a bed of dry autumn leaves.
A zebra and a giraffe stand side by side near a watering hole.

A steaming cup of coffee on a rustic wooden table beside an open book and reading glasses.
A bowl of fresh fruit: red apples, green pears, ripe bananas, purple grapes and a lemon.
An antique brass clock with Roman numerals, its glass face slightly cracked.
A vintage red bicycle leans against a white brick wall covered in ivy.
A glass vase filled with sunflowers stands on a kitchen counter in soft morning light.
A leather backpack, a camera, a map and a compass laid out on a wooden floor.
A ceramic teapot painted with blue flowers, next to two small porcelain cups.
A shiny silver sports car parked on a wet city street at night, neon lights reflected on the hood.
An old stone lighthouse on a rocky point, its lamp shining through the fog.
A wooden rowing boat tied to a jetty on a calm lake.
A slice of chocolate cake with raspberries and a sprig of mint on a white plate.
A stack of old books with worn spines, a candle and a quill pen on a desk.
A red umbrella lying open on cobblestones in the rain.
A pair of worn hiking boots covered in mud, resting on a rock beside a trail.
A modern glass skyscraper reflecting the clouds and the sunset.

A young woman with curly brown hair smiles while reading a book in a café by the window.
An elderly man with a white beard plays chess in the park on a sunny afternoon.
A group of children laugh and splash in a fountain on a hot summer day.
A chef in a white apron slices vegetables in a busy restaurant kitchen.
A street musician plays the violin under a stone archway in the old town.
A woman in a yellow raincoat walks her dog along a foggy beach.
A portrait of a smiling girl with freckles, soft natural light, shallow depth of field.
A man in a dark suit waits at a crowded train station, holding a newspaper.
A farmer in a straw hat carries a basket of tomatoes through the garden.
A dancer in a flowing red dress spins on an empty stage lit by a single spotlight.
Two friends share a pizza on the balcony, the city lights twinkling behind them.
A climber reaches for the next hold on a steep granite wall high above the valley.
A grandmother knits a striped scarf in a cosy armchair beside the fireplace.

The colours are vivid and saturated: deep blue, emerald green, bright yellow, hot pink.
Muted pastel tones of mint, peach, lilac and pale grey give the scene a calm mood.
The photo is black and white, with strong contrast and deep shadows.
Warm golden hour lighting, long soft shadows, a gentle lens flare near the top.
Cold blue twilight, street lamps just switching on, the sky fading to indigo.
Dramatic side lighting carves the face out of a dark background.
Soft diffuse light from an overcast sky, no harsh shadows anywhere.
Backlit leaves glow translucent green against the bright sky.
A close-up macro photograph with a blurred background and crisp detail in focus.
A wide-angle aerial view, shot from a drone high above the city.
An oil painting in the style of the impressionists, with thick visible brush strokes.
A watercolour illustration with loose washes of colour and white paper showing through.
A detailed pencil sketch, cross-hatched shading, on cream-coloured paper.
A 3D render of a cute robot, glossy plastic, studio lighting, isometric view.
A cinematic still, anamorphic, 35mm film grain, moody teal and orange colour grading.

She ordered a crème brûlée and an espresso at the little café on the corner.
His naïve plan was to cross the glacier alone, without a map or a rope.
The old façade of the hotel is painted in faded rose and cream.
A piñata shaped like a star hangs above a birthday table with jalapeño salsa and tortillas.
A postcard from São Paulo, another from Zürich, and a faded photo from Kraków.
The fiancée wore a simple lace dress; the groom wore a navy blue suit.
It felt like déjà vu: the same street, the same rain, the same song.
Is it a fox, or a dog? Nobody knows - the picture is too dark!
The sign reads "Open 24 hours" (except on Sundays).
Price: $12.50; weight: 3.2 kg; size: 40 x 60 cm; 100% cotton.
Note: the image is 1024x768 pixels, taken at f/2.8, 1/250 s, ISO 400.
"""


def is_complete(dest: Path) -> bool:
    """True when `dest` already holds every file `write_tiny_models` writes."""
    dest = Path(dest)
    required = (
        "model_index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    )
    return all((dest / name).is_file() for name in required)


def write_tiny_models(dest: Path, seed: int = 0, force: bool = False) -> Path:
    """Write the tiny VAE, tokenizer and T5 encoder into `dest` and return `dest`.

    If `dest` already holds a complete set it is left untouched (whatever seed wrote
    it) unless `force` is true. Files are first written into a temporary sibling
    folder that is renamed into place at the end, so an interrupted call never leaves
    a half-written `dest`. Only an empty folder or one this function wrote (its
    model_index.json says so) is ever replaced, even with `force`, so a wrong path
    cannot wipe unrelated files.
    """
    dest = Path(dest).absolute()
    if is_complete(dest) and not force:
        return dest
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not _written_by_us(dest):
        raise FileExistsError(f"{dest} is not empty and was not written by write_tiny_models; refusing to replace it")

    dest.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp, so the folder gets the usual umask-based mode rather than 0700.
    staging = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        with _quiet_libraries():
            tokenizer = _build_tokenizer()
            tokenizer.save_pretrained(staging / "tokenizer")
            _write_vae(staging / "vae", seed)
            _write_text_encoder(staging / "text_encoder", seed, vocab_size=len(tokenizer))
        _write_model_index(staging / "model_index.json")
        _match_umask(staging)
        _move_into_place(staging, dest, force=force)
    finally:
        # Leftovers only exist if something failed before or during the move.
        shutil.rmtree(staging, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------- tokenizer


def _build_tokenizer():
    """A T5-style Unigram tokenizer over a vocabulary counted from `TOKENIZER_CORPUS`.

    We count pieces ourselves instead of running a `tokenizers` trainer: the trainers
    run multi-threaded and do not promise byte-identical output across thread counts or
    versions, while a fully sorted frequency count is exact and takes milliseconds.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0)]
    vocab += _count_pieces(TOKENIZER_CORPUS, VOCAB_SIZE - len(vocab) - EXTRA_IDS)
    # T5 keeps its sentinels at the very end, <extra_id_0> last.
    vocab += [(token, 0.0) for token in reversed(EXTRA_TOKENS)]

    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    # The same pre-tokenizer, decoder and model settings transformers rebuilds a T5
    # tokenizer with when it loads one, so this tokenizer behaves identically whether
    # a transformers version uses tokenizer.json as-is or reconstructs it. No
    # normalizer for the same reason: only SentencePiece's precompiled one survives
    # that reconstruction.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}",
        pair=f"$A {EOS} $B {EOS}",
        special_tokens=[(EOS, 1)],
    )

    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_ids=EXTRA_IDS,
        additional_special_tokens=list(EXTRA_TOKENS),
        model_max_length=MODEL_MAX_LENGTH,
    )


def _count_pieces(corpus: str, budget: int) -> list[tuple[str, float]]:
    """Pick `budget` pieces from `corpus` and score them as Unigram log-probabilities.

    Each whitespace-separated chunk becomes "▁chunk" (what the pre-tokenizer emits) and
    is cut into runs of word characters and single punctuation marks. The vocabulary
    holds: every base character, then every whole run (most frequent first), then the
    most useful sub-word fragments (frequency x length) so unseen words still split
    into sensible pieces. Every sort has a full tie-break, so the result is exact.
    """
    corpus = unicodedata.normalize("NFC", corpus)
    runs: Counter[str] = Counter()
    for chunk in corpus.split():
        for i, run in enumerate(re.findall(r"\w+|[^\w\s]", chunk)):
            runs[SPACE + run if i == 0 else run] += 1

    char_counts: Counter[str] = Counter()
    fragment_counts: Counter[str] = Counter()
    for run, count in runs.items():
        for char in run:
            char_counts[char] += count
        for start in range(len(run)):
            for end in range(start + 2, min(len(run), start + _MAX_SUBWORD_LEN) + 1):
                fragment_counts[run[start:end]] += count

    chars = sorted(set(_BASE_CHARS) | set(char_counts) | {SPACE})
    chosen: dict[str, int] = {char: max(char_counts[char], 1) for char in chars}
    whole_runs = sorted((r for r in runs if len(r) > 1), key=lambda r: (-runs[r], r))
    fragments = sorted(
        (f for f in fragment_counts if f not in runs),
        key=lambda f: (-fragment_counts[f] * len(f), f),
    )
    for piece in whole_runs + fragments:
        if len(chosen) >= budget:
            break
        chosen[piece] = fragment_counts[piece] if piece in fragment_counts else runs[piece]
    if len(chosen) > budget:
        raise ValueError(f"{len(chosen)} base characters do not fit a budget of {budget}")

    total = sum(chosen.values())
    scored = [(piece, round(math.log(count / total), 6)) for piece, count in chosen.items()]
    # Like SentencePiece: most probable first, ties in a fixed order.
    scored.sort(key=lambda item: (-item[1], item[0]))
    return scored


# ------------------------------------------------------------------------ the models


def _write_vae(folder: Path, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL

    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            # Four blocks give three downsamplings: 8x, like the SDXL VAE.
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.13025,
        ).to(torch.float32)
    vae.save_pretrained(folder, safe_serialization=True)


def _write_text_encoder(folder: Path, seed: int, vocab_size: int) -> None:
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=_round_up(vocab_size, 8),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with _seeded(seed):
        model = T5EncoderModel(config).to(torch.float32)
    # transformers writes safetensors by default (and only safetensors from v5 on).
    model.save_pretrained(folder)
    # transformers v5 always stores True here (the False we passed survives as
    # "scale_decoder_outputs"); write False back, as T5 v1.1's own config has it, so
    # older transformers versions read the same setting.
    config_path = folder / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    if saved.get("tie_word_embeddings") is not False:
        saved["tie_word_embeddings"] = False
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_model_index(path: Path) -> None:
    index = {
        "_class_name": "PixArtSigmaPipeline",
        "_shardkit_tiny": True,
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
    }
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- helpers


def _move_into_place(staging: Path, dest: Path, force: bool) -> None:
    """Rename the finished `staging` folder to `dest`."""
    if not force and is_complete(dest):
        return  # another process finished the same folder meanwhile; keep theirs
    if dest.is_dir() and any(dest.iterdir()):
        # A rename cannot replace a non-empty folder: move the old one aside first, so
        # `dest` is at every moment either the old set, absent, or the new set.
        trash = dest.parent / f".{dest.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(dest, trash)
        try:
            os.replace(staging, dest)
        except OSError:
            os.replace(trash, dest)
            raise
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.replace(staging, dest)  # also replaces an empty folder, on POSIX
    except OSError:
        # Another process may have put a complete set there first; that is fine.
        if not is_complete(dest):
            raise


def _written_by_us(folder: Path) -> bool:
    """True when `folder` holds a model_index.json this module wrote."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("_shardkit_tiny") is True


def _match_umask(folder: Path) -> None:
    """Give every file the mode a freshly created file gets.

    safetensors writes its files as 0600; the folder may be a shared cache.
    """
    probe = folder / ".mode-probe"
    probe.touch()
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator without disturbing the caller's random state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Hide transformers/diffusers logs, warnings and progress bars for this call only.

    Everything is put back afterwards, so the caller's own settings are untouched.
    """
    # Through the libraries' own logging helpers: they configure their root loggers
    # lazily and would otherwise reset a level set from outside.
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as transformers_logging

    modules = (transformers_logging, diffusers_logging)
    verbosities = [module.get_verbosity() for module in modules]
    # transformers v5 draws a "Writing model shards" bar on save.
    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    hub_bars_were_disabled = are_progress_bars_disabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for module in modules:
                module.set_verbosity_error()
            transformers_logging.disable_progress_bar()
            yield
        finally:
            for module, verbosity in zip(modules, verbosities):
                module.set_verbosity(verbosity)
            if bar_was_enabled:
                # This also switches huggingface_hub's bars back on; undo that if
                # they were off before.
                transformers_logging.enable_progress_bar()
                if hub_bars_were_disabled:
                    disable_progress_bars()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
