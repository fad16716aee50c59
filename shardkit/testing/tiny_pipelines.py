"""Tiny random diffusers pipelines, one per supported family, for the offline demo and the tests.

`write_tiny_pipeline(dest, family)` writes the folder ``PipelineClass.save_pretrained`` writes
(``model_index.json`` plus one subfolder per component) for a pipeline whose every component is
randomly initialised and a few kilobytes large: the VAE, the text encoders, tokenizers built
locally (no download), and a tiny transformer/UNet and scheduler so that
``PipelineClass.from_pretrained(dest)`` works and the tests can call the pipeline's own
``encode_prompt`` as the reference. shardkit itself never loads the transformer/UNet.

The geometry is the real one where shardkit depends on it: PixArt, SDXL, SD3 and Flux VAEs
downsample 8x, Sana's DC-AE 32x; SD3 and Flux VAEs have 16 channels and a ``shift_factor``; CLIP
keeps its 77-token limit. Everything else is as small as it can be. The features are
meaningless; never train on them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable

from .tiny_models import (SPACE, TOKENIZER_CORPUS, _build_tokenizer, _match_umask, _move_into_place,
                          _quiet_libraries, _round_up, _seeded, _write_text_encoder)

__all__ = ["TINY_FAMILIES", "write_tiny_pipeline"]

_MARK = "_shardkit_tiny"
CLIP_MAX_LENGTH = 77
_GEMMA_WORDS = 600  # whole-word pieces of the tiny Gemma tokenizer


def write_tiny_pipeline(dest: Path, family: str, seed: int = 0, force: bool = False) -> Path:
    """Write the tiny pipeline of ``family`` (a key of ``TINY_FAMILIES``) into ``dest``; return ``dest``.

    A folder already holding this family's tiny pipeline is kept unless ``force``; another
    family's is replaced only with ``force``; a folder that is neither empty nor written by
    shardkit never is. Written in a sibling folder and renamed into
    place, so an interrupted call leaves nothing half-written.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; tiny pipelines exist for: {', '.join(TINY_FAMILIES)}")
    dest = Path(dest).absolute()
    present = _written_family(dest)
    if present == family and not force:
        return dest
    if present not in (None, family) and not force:
        raise FileExistsError(f"{dest} holds the tiny {present} models; pass force (--force) to replace them")
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and present is None:
        raise FileExistsError(f"{dest} is not empty and was not written by shardkit tiny-models; refusing to replace it")

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with _quiet_libraries(), _seeded(seed):
            pipeline = TINY_FAMILIES[family](seed)
            pipeline.save_pretrained(staging, safe_serialization=True)
        index_path = staging / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index[_MARK] = family
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _match_umask(staging)
        _move_into_place(staging, dest, force=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _written_family(folder: Path) -> str | None:
    """The family named in ``folder``'s model_index.json when this module wrote it, else None."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict):
        return None
    mark = index.get(_MARK)
    # write_tiny_models marks its folders with True; those may be replaced too.
    return mark if isinstance(mark, str) else ("pixart-encoders" if mark is True else None)


# ------------------------------------------------------------------------- tokenizers


def _clip_tokenizer():
    """A CLIP BPE tokenizer over the byte-level alphabet with no merges: one token per character,
    CLIP's normaliser and pre-tokeniser, start/end tokens last as in CLIP's own vocabulary."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({char + "</w>": len(alphabet) + i for i, char in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def _gemma_tokenizer():
    """A Gemma BPE tokenizer: the special tokens, the 256 byte-fallback tokens, every character of
    the corpus, and the most frequent words of the corpus and of Sana's instruction prefix as
    whole pieces (built by prefix merges), so that English text, and the prefix Sana puts before
    every caption, take about one token per word as with Gemma's own (a character-level prefix
    would make every tiny Sana encode several times longer). Adds <bos> and pads on the right."""
    from transformers import GemmaTokenizer

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab.update({f"<0x{byte:02X}>": len(vocab) + byte for byte in range(256)})
    text = TOKENIZER_CORPUS + _sana_instruction()
    for char in sorted(set(text.replace(" ", SPACE)) - {"\n"}):
        vocab.setdefault(char, len(vocab))
    words = Counter(SPACE + word for word in re.findall(r"[A-Za-z]+", text))
    merges = []
    for word in sorted(words, key=lambda w: (-words[w], w))[:_GEMMA_WORDS]:
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append((word[:end - 1], word[end - 1]))
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, padding_side="right")


def _sana_instruction() -> str:
    import inspect

    from diffusers import SanaPipeline

    return "\n".join(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default or [])


# ---------------------------------------------------------------------- text encoders


def _clip_text_model(tokenizer, hidden: int, projection: bool, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=_round_up(len(tokenizer), 8), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=hidden, hidden_act=act, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5_text_model(tokenizer, seed: int):
    """The same tiny T5 encoder as `shardkit tiny-models` writes, built in memory."""
    import tempfile

    from transformers import T5EncoderModel

    with tempfile.TemporaryDirectory() as folder:
        _write_text_encoder(Path(folder), seed=seed, vocab_size=len(tokenizer))
        return T5EncoderModel.from_pretrained(folder)


def _gemma_text_model(tokenizer):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=_round_up(len(tokenizer), 8), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        sliding_window=512, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    return Gemma2Model(config)


# -------------------------------------------------------------------------- VAEs


def _kl_vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None):
    """AutoencoderKL with 8x downsampling, as every family's KL VAE; SD3/Flux ones with a shift."""
    from diffusers import AutoencoderKL

    extra = {} if shift_factor is None else dict(shift_factor=shift_factor, use_quant_conv=False,
                                                 use_post_quant_conv=False)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=64, scaling_factor=scaling_factor, **extra)


def _dc_vae():
    """AutoencoderDC with six stages, 32x downsampling like Sana's DC-AE, 8 channels each."""
    from diffusers import AutoencoderDC

    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    multiscales = ((),) * 3 + ((5,),) * 3
    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types=blocks, decoder_block_types=blocks,
        encoder_block_out_channels=(8,) * 6, decoder_block_out_channels=(8,) * 6, encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6, encoder_qkv_multiscales=multiscales, decoder_qkv_multiscales=multiscales,
        downsample_block_type="Conv", upsample_block_type="interpolate", scaling_factor=0.41407)


# ---------------------------------------------------------------------- pipelines


def _pixart(pipeline_class_name: str):
    def make(seed: int):
        import diffusers
        from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

        tokenizer = _build_tokenizer()
        text_encoder = _t5_text_model(tokenizer, seed)
        transformer = PixArtTransformer2DModel(
            sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
            caption_channels=text_encoder.config.d_model, in_channels=4, cross_attention_dim=16, out_channels=8,
            attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
        return getattr(diffusers, pipeline_class_name)(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=_kl_vae(4, 0.13025), transformer=transformer,
            scheduler=DPMSolverMultistepScheduler())
    return make


def _sana(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    tokenizer = _gemma_tokenizer()
    text_encoder = _gemma_text_model(tokenizer)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8,
        caption_channels=text_encoder.config.hidden_size, sample_size=32)
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_dc_vae(), transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler())


def _sdxl(seed: int):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    text_encoder = _clip_text_model(tokenizer, hidden=8, projection=False)
    text_encoder_2 = _clip_text_model(tokenizer_2, hidden=16, projection=True, act="gelu")
    time_embed_dim = 4
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * time_embed_dim + 16, cross_attention_dim=8 + 16, norm_num_groups=4)
    return StableDiffusionXLPipeline(
        vae=_kl_vae(4, 0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(), image_encoder=None,
        feature_extractor=None)


def _sd3(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(), _build_tokenizer()
    text_encoder = _clip_text_model(tokenizer, hidden=8, projection=True)
    text_encoder_2 = _clip_text_model(tokenizer_2, hidden=16, projection=True, act="gelu")
    text_encoder_3 = _t5_text_model(tokenizer_3, seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=text_encoder_3.config.d_model, pooled_projection_dim=8 + 16,
        out_channels=16)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(16, 1.5305, 0.0609),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def _flux(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _build_tokenizer()
    text_encoder = _clip_text_model(tokenizer, hidden=8, projection=False)
    text_encoder_2 = _t5_text_model(tokenizer_2, seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_encoder_2.config.d_model, pooled_projection_dim=8,
        axes_dims_rope=(4, 4, 8))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(16, 0.3611, 0.1159),
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


# Family name -> a function of the seed building the tiny pipeline in memory.
TINY_FAMILIES: dict[str, Callable] = {
    "pixart-alpha": _pixart("PixArtAlphaPipeline"),
    "pixart-sigma": _pixart("PixArtSigmaPipeline"),
    "sana": _sana,
    "sdxl": _sdxl,
    "sd3": _sd3,
    "flux": _flux,
}
