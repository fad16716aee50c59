"""Full-size encoders without a download: random weights in the real architectures, and their FLOPs.

* ``write_full_size_models(dest, device)`` writes ``vae/`` (an AutoencoderKL with the SDXL VAE's
  configuration), ``text_encoder/`` (a T5EncoderModel with T5 v1.1 XXL's configuration, as in
  PixArt-Σ) and ``tokenizer/`` (the tiny offline tokenizer: the synthetic captions' token counts
  are calibrated to it, and its ids fit the XXL embedding table). Random weights cost exactly
  what trained ones cost, so throughput measured with them is the real models' throughput.
* ``vae_encode_flops`` / ``t5_encode_flops`` count the FLOPs of one forward pass on the meta
  device (no memory, no weights), for the FLOP-floor table.

The configurations are the public ones: SDXL VAE block_out_channels (128, 256, 512, 512), two
layers per block, 4 latent channels, 32 norm groups, scaling factor 0.13025; T5 v1.1 XXL
d_model 4096, d_ff 10240, 24 layers, 64 heads of d_kv 64, vocabulary 32128, gated-GELU.
"""

from __future__ import annotations

import shutil
from functools import lru_cache
from pathlib import Path

SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, scaling_factor=0.13025,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, act_fn="silu",
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    force_upcast=False,
)
T5_XXL_CONFIG = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, dropout_rate=0.0,
    is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
)

# Dense fp16/bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, for the floor.
PEAK_TFLOPS = {"H100 SXM": 989.4, "H200 SXM": 989.4, "H100 PCIe": 756.0, "A100 SXM": 312.0}


def peak_tflops(gpu_name: str | None) -> tuple[str, float] | None:
    """The data-sheet entry for a GPU as nvidia-smi names it (e.g. 'NVIDIA H100 80GB HBM3')."""
    if not gpu_name:
        return None
    if "H100" in gpu_name:
        key = "H100 PCIe" if "PCIe" in gpu_name else "H100 SXM"
    elif "H200" in gpu_name:
        key = "H200 SXM"
    elif "A100" in gpu_name:
        key = "A100 SXM"
    else:
        return None
    return key, PEAK_TFLOPS[key]


def write_full_size_models(dest: Path, tiny_models: Path, device: str = "cuda") -> Path:
    """Random-init full-size VAE + T5-XXL in PixArt's diffusers layout; reused when already there."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    dest = Path(dest)
    if (dest / "text_encoder" / "config.json").is_file() and (dest / "vae" / "config.json").is_file():
        return dest
    torch.manual_seed(0)
    with torch.device(device):
        AutoencoderKL(**SDXL_VAE_CONFIG).save_pretrained(dest / "vae")
        # fp16 on the device: 4.8 B parameters are 9.5 GB of weights instead of 19 GB.
        t5 = T5EncoderModel(T5Config(**T5_XXL_CONFIG)).to(torch.float16)
        t5.save_pretrained(dest / "text_encoder", max_shard_size="2GB")
        del t5
    shutil.copytree(Path(tiny_models) / "tokenizer", dest / "tokenizer", dirs_exist_ok=True)
    return dest


def _flops(run) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


@lru_cache(maxsize=None)
def _meta_models():
    import torch
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        return AutoencoderKL(**SDXL_VAE_CONFIG).eval(), T5EncoderModel(T5Config(**T5_XXL_CONFIG)).eval()


@lru_cache(maxsize=None)
def vae_encode_flops(height: int, width: int) -> int:
    """FLOPs of the SDXL VAE encoder (encoder + quant conv) on one image of height x width."""
    import torch

    vae, _ = _meta_models()
    return _flops(lambda: vae.encode(torch.zeros(1, 3, height, width, device="meta")))


@lru_cache(maxsize=None)
def _t5_coefficients() -> tuple[float, float]:
    """T5's FLOPs are a*L + b*L^2 (projections, then attention scores): fitted exactly from two lengths."""
    import torch

    _, t5 = _meta_models()

    def at(length: int) -> int:
        # No mask: building one calls .item(), which meta tensors refuse; the matmuls are the same.
        return _flops(lambda: t5(input_ids=torch.zeros(1, length, dtype=torch.long, device="meta")))

    f1, f2 = at(100), at(200)
    b = (f2 - 2 * f1) / (200 * 200 - 2 * 100 * 100)
    a = (f1 - b * 100 * 100) / 100
    return a, b


def t5_encode_flops(length: int) -> float:
    a, b = _t5_coefficients()
    return a * length + b * length * length


def padded_row_sources(length: int, max_length: int = 300, num_buckets: int = 32, max_distance: int = 128) -> list[int]:
    """For each position of a T5 encoder output padded to ``max_length`` (``length`` valid tokens),
    the first position whose output row is identical to it.

    Padding tokens attend only to the valid ones, so two padding positions produce the same row
    when every valid token falls in the same relative-position bucket as seen from both: their
    inputs and attention are identical at every layer. ``np.savez_compressed`` (deflate) stores a
    repeated row almost for free, which is what shrinks PixArt's padded ``.npz`` files.
    """
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    positions = torch.arange(max_length)[:, None]
    valid = torch.arange(length)[None, :]
    buckets = T5Attention._relative_position_bucket(valid - positions, bidirectional=True,
                                                    num_buckets=num_buckets, max_distance=max_distance)
    first: dict[tuple, int] = {}
    return list(range(length)) + [first.setdefault(tuple(buckets[i].tolist()), i) for i in range(length, max_length)]


def distinct_padded_rows(length: int, max_length: int = 300) -> int:
    """How many different rows a padded T5-XXL output of ``length`` valid tokens has."""
    return len(set(padded_row_sources(length, max_length)))
