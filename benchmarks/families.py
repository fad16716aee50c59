"""Per model family: the FLOP floor of its encoders and the bytes it stores, per sample at 1024 px.

    /work/main/.venv/bin/python benchmarks/families.py            # Markdown table + results/families-1024.json
    python benchmarks/families.py --resolution 512 --caption-tokens 60

Computed, not measured: every encoder is built at its public full-size configuration on the
meta device (no weights, no memory) and one forward pass is counted by torch's FlopCounterMode,
as the PixArt-Σ FLOP floor in run_all.py's flops section is. Per sample = the VAE on one
square image at --resolution plus each text encoder on one caption, encoded as the family's
pipeline does: PixArt's T5 and Sana's Gemma-2 on the valid tokens only (--caption-tokens; for
Sana plus the pipeline's instruction prefix, whose length is estimated with the tiny T5
tokenizer), every CLIP at 77 tokens, SD3's T5 at 256 and Flux's at 512 (those pipelines pad).
Bytes per sample are what a `shardkit build --pipeline` shard holds in fp16 for one caption and one
latent, from the family's declared members and latent spec written with shardkit's tar writer
(`stored_bytes`): latent and text members with their .npy headers and tar framing, and the whole
sample with its .json and .txt (no image).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fullsize import SDXL_VAE_CONFIG, T5_XXL_CONFIG, _flops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Public configurations (the models' config.json on the hub).
KL16_VAE_CONFIG = dict(SDXL_VAE_CONFIG, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
DC_AE_F32C32_CONFIG = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024], decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]], decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    downsample_block_type="Conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407)
CLIP_L_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
GEMMA2_2B_CONFIG = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096)


def _meta(build):
    import torch

    with torch.device("meta"):
        return build().eval()


def vae_flops(kind: str, size: int) -> int:
    import torch
    from diffusers import AutoencoderDC, AutoencoderKL

    build = {"kl4": lambda: AutoencoderKL(**SDXL_VAE_CONFIG), "kl16": lambda: AutoencoderKL(**KL16_VAE_CONFIG),
             "dc": lambda: AutoencoderDC(**DC_AE_F32C32_CONFIG)}[kind]
    vae = _meta(build)
    return _flops(lambda: vae.encode(torch.zeros(1, 3, size, size, device="meta")))


def text_flops(kind: str, length: int) -> int:
    """One caption of ``length`` tokens through a full-size text encoder (no mask: same matmuls)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, Gemma2Config, Gemma2Model, T5Config, T5EncoderModel

    build = {"t5": lambda: T5EncoderModel(T5Config(**T5_XXL_CONFIG)),
             "clip_l": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_CONFIG)),
             "clip_g": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_CONFIG)),
             "gemma": lambda: Gemma2Model(Gemma2Config(**GEMMA2_2B_CONFIG))}[kind]
    model = _meta(build)
    ids = torch.zeros(1, length, dtype=torch.long, device="meta")
    return _flops(lambda: model(input_ids=ids))


def instruction_tokens() -> int:
    """Sana's instruction prefix in tokens, estimated with the tiny T5 tokenizer (word pieces of English)."""
    import inspect

    from diffusers import SanaPipeline

    from shardkit.testing.tiny_models import _build_tokenizer

    lines = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    return len(_build_tokenizer()("\n".join(lines)).input_ids)


# Per family: its VAE's config and class, and the config of each text encoder it loads (model_index.json names).
STORE_LAYOUTS = {
    "pixart-sigma": (("AutoencoderKL", SDXL_VAE_CONFIG), {"text_encoder": ("t5", T5_XXL_CONFIG)}),
    "sana": (("AutoencoderDC", DC_AE_F32C32_CONFIG), {"text_encoder": ("gemma", GEMMA2_2B_CONFIG)}),
    "sdxl": (("AutoencoderKL", SDXL_VAE_CONFIG), {"text_encoder": ("clip", CLIP_L_CONFIG),
                                                 "text_encoder_2": ("clip", CLIP_G_CONFIG)}),
    "sd3": (("AutoencoderKL", KL16_VAE_CONFIG), {"text_encoder": ("clip", CLIP_L_CONFIG),
                                                "text_encoder_2": ("clip", CLIP_G_CONFIG),
                                                "text_encoder_3": ("t5", T5_XXL_CONFIG)}),
    "flux": (("AutoencoderKL", KL16_VAE_CONFIG), {"text_encoder": ("clip", CLIP_L_CONFIG),
                                                 "text_encoder_2": ("t5", T5_XXL_CONFIG)}),
}


def stored_bytes(family_name: str, size: int, rows: int) -> dict:
    """Bytes one sample takes in a shard as `shardkit build --pipeline` writes it (fp16, no image):
    the family's declared members at full size (``rows`` valid rows where it stores "L" rows),
    serialised as ``.npy`` members of a USTAR tar with shardkit's own writer, plus the .json and
    .txt members. Built from the family's ``members`` and ``LatentSpec``, so the figures follow
    the store layout rather than a formula of it."""
    import io
    from types import SimpleNamespace

    import numpy as np
    import torch
    from transformers import CLIPTextConfig, Gemma2Config, T5Config

    from shardkit.families import LatentSpec, TextParts, family_by_name
    from shardkit.format import json_bytes, npy_bytes
    from shardkit.tario import UstarWriter

    family = family_by_name(family_name)
    (vae_class, vae_config), encoders = STORE_LAYOUTS[family_name]
    configs = {"t5": T5Config, "clip": CLIPTextConfig, "gemma": Gemma2Config}
    components = {name: SimpleNamespace(config=configs[kind](**config)) for name, (kind, config) in encoders.items()}
    components.update(tokenizer=SimpleNamespace(model_max_length=77), tokenizer_2=SimpleNamespace(model_max_length=77))
    members = [m for m in family.members(TextParts(components, torch.device("meta"), torch.float16)) if m.dtype == "store"]
    spec = LatentSpec.from_config(vae_class, vae_config)
    arrays = {f"prompt.{m.name}.npy": np.zeros([rows if d == "L" else int(d) for d in m.shape], np.float16)
              for m in members}
    latent = npy_bytes(np.zeros(spec.stored_shape(size, size), np.float16))
    caption = ("word " * rows).strip()
    metadata = {"key": "images_000123-0123456789abcdef", "path": "images/000123.jpg", "source_index": 123,
                "original_hw": [size, size], "resized_hw": [size, size], "crop_top": 0, "crop_left": 0,
                "resize_mode": "crop", "bucket": "1.0", "bucket_hw": [size, size], "aspect_ratio": 1.0,
                "latent_shape": list(spec.stored_shape(size, size)), "captions": {"prompt": caption},
                "t5_fields": ["prompt"], "t5_lengths": {"prompt": rows}, "image_ext": None}
    if family.micro_conditioning:
        metadata["micro_conditioning"] = {"original_size": [size, size], "crop_coords_top_left": [0, 0],
                                          "target_size": [size, size]}

    def tar_bytes(named: dict[str, bytes]) -> int:
        out = io.BytesIO()
        writer = UstarWriter(out)
        for name, payload in named.items():
            writer.add(f"{metadata['key']}.{name}", payload)
        return out.tell()  # before the archive's end blocks: what one more sample adds

    text = tar_bytes({name: npy_bytes(array) for name, array in arrays.items()})
    return {"latent_bytes": tar_bytes({"latent.npy": latent}), "text_bytes": text,
            "sample_bytes": tar_bytes({"json": json_bytes(metadata), "txt": caption.encode(), "latent.npy": latent,
                                       **{name: npy_bytes(array) for name, array in arrays.items()}})}


def families(size: int, caption_tokens: int) -> list[dict]:
    chi = instruction_tokens()
    clip = text_flops("clip_l", 77) + text_flops("clip_g", 77)
    rows = [
        dict(family="PixArt-α / PixArt-Σ", vae="SDXL VAE (KL, 4 ch, 8x)", vae_flops=vae_flops("kl4", size),
             text="T5-XXL on the valid tokens", text_flops=text_flops("t5", caption_tokens),
             **stored_bytes("pixart-sigma", size, caption_tokens)),
        dict(family="Sana", vae="DC-AE f32c32 (32x)", vae_flops=vae_flops("dc", size),
             text=f"Gemma-2-2B on instruction (~{chi}) + caption tokens", text_flops=text_flops("gemma", chi + caption_tokens),
             **stored_bytes("sana", size, caption_tokens + 2)),  # <bos> + the caption's tokens and its end
        dict(family="SDXL", vae="SDXL VAE (KL, 4 ch, 8x)", vae_flops=vae_flops("kl4", size),
             text="CLIP-L + CLIP-G at 77", text_flops=clip, **stored_bytes("sdxl", size, 77)),
        dict(family="SD3", vae="SD3 VAE (KL, 16 ch, 8x, shift)", vae_flops=vae_flops("kl16", size),
             text="CLIP-L + CLIP-G at 77, T5-XXL at 256", text_flops=clip + text_flops("t5", 256),
             **stored_bytes("sd3", size, 77)),
        dict(family="Flux", vae="Flux VAE (KL, 16 ch, 8x, shift)", vae_flops=vae_flops("kl16", size),
             text="CLIP-L at 77, T5-XXL at 512", text_flops=text_flops("clip_l", 77) + text_flops("t5", 512),
             **stored_bytes("flux", size, 77)),
    ]
    for row in rows:
        row["total_flops"] = row["vae_flops"] + row["text_flops"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=1024, help="square image side in pixels")
    parser.add_argument("--caption-tokens", type=int, default=120,
                        help="valid caption tokens where the pipeline masks padding (PixArt, Sana)")
    args = parser.parse_args()
    rows = families(args.resolution, args.caption_tokens)
    header = ["family", "VAE", "VAE TFLOP", "text encoders", "text TFLOP", "total TFLOP",
              "latent KB", "text KB", "stored KB/sample", "samples/s at 989 TFLOP/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([
            row["family"], row["vae"], f"{row['vae_flops'] / 1e12:.2f}", row["text"], f"{row['text_flops'] / 1e12:.2f}",
            f"{row['total_flops'] / 1e12:.2f}", f"{row['latent_bytes'] / 1e3:.0f}", f"{row['text_bytes'] / 1e3:.0f}", f"{row['sample_bytes'] / 1e3:.0f}",
            f"{989.4e12 / row['total_flops']:.0f}"]) + " |")
    print(f"FLOP floor and stored bytes per sample at {args.resolution} px, {args.caption_tokens} caption tokens "
          f"where masked (computed on the meta device, NOT measured)\n")
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"families-{args.resolution}.json"
    out.write_text(json.dumps({"resolution": args.resolution, "caption_tokens": args.caption_tokens, "rows": rows},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
