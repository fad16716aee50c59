"""Shards to gradient steps: train a tiny PixArt transformer for a few steps on CPU.

    shardkit tiny-models
    shardkit build examples/toy-dataset /tmp/toy-out --config tiny-offline
    python examples/train_pixart_tiny.py /tmp/toy-out --steps 8

The reader yields PixArt's batch layout (latent, caption features, mask, data_info), one aspect
bucket per batch; each step noises the latents with a DDPM schedule and regresses the noise,
as PixArt-Σ's training does (without its learned-variance term). The model is tiny and
random, so the loss only shows that data flows and parameters move.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, PixArtTransformer2DModel
from torch.utils.data import DataLoader

from shardkit.reader import ShardReader


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", help="a shardkit build: OUTPUT folder, manifest.json or URL")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--real-prompt-ratio", type=float, default=0.5,
                        help="probability of the first caption field (else sharegpt4v)")
    return parser.parse_args(argv)


def tiny_pixart(latent_channels: int, caption_channels: int, latent_size: int) -> PixArtTransformer2DModel:
    # use_additional_conditions: the resolution and aspect-ratio embeddings PixArt's
    # multi-aspect models take from data_info (img_hw, aspect_ratio); they split the width
    # in thirds, so it is a multiple of 3. Captions are projected to the same width.
    width = 3 * 8
    return PixArtTransformer2DModel(num_attention_heads=3, attention_head_dim=width // 3, in_channels=latent_channels,
                                    out_channels=latent_channels, num_layers=2, cross_attention_dim=width,
                                    caption_channels=caption_channels, sample_size=latent_size, patch_size=2,
                                    use_additional_conditions=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dataset = ShardReader(args.build, batch_size=args.batch_size, seed=args.seed,
                           real_prompt_ratio=args.real_prompt_ratio, dtype=torch.float32)
    info = dataset.info
    # The shards hold unscaled latents (like PixArt's feature files); scale them as training does.
    scale = info.scaling_factor or 1.0
    loader = DataLoader(dataset, batch_size=None, num_workers=args.workers)

    model = tiny_pixart(info.latent_channels, info.caption_channels, info.resolution // 8)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()

    losses: list[float] = []
    epoch = 0
    while len(losses) < args.steps:
        dataset.set_epoch(epoch)  # a new shard order and shuffle each epoch
        for latent, caption_feature, mask, data_info in loader:
            clean = latent * scale
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],))
            noisy = scheduler.add_noise(clean, noise, timesteps)
            prediction = model(noisy,
                               encoder_hidden_states=caption_feature.squeeze(1),  # [B, max_length, D]
                               encoder_attention_mask=mask.squeeze(1).squeeze(1),  # [B, max_length]
                               timestep=timesteps,
                               added_cond_kwargs={"resolution": data_info["img_hw"],
                                                  "aspect_ratio": data_info["aspect_ratio"][:, None]}).sample
            loss = F.mse_loss(prediction, noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            h, w = latent.shape[-2:]
            print(f"step {len(losses):3d}  epoch {epoch}  bucket {data_info['aspect_ratio'][0].item():.2f} "
                  f"latent {h}x{w}  batch {latent.shape[0]}  loss {losses[-1]:.4f}", flush=True)
            if len(losses) >= args.steps:
                break
        epoch += 1

    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    finite = all(math.isfinite(loss) for loss in losses)
    print(f"{len(losses)} steps, losses finite: {finite}, parameters changed: {changed}")
    return {"losses": losses, "parameters_changed": changed, "epochs": epoch}


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["parameters_changed"] else 1)
