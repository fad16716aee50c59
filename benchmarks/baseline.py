"""The per-file way of PixArt-Σ's feature extraction and training loader, rebuilt for comparison.

What it reproduces (read from PixArt-Σ's ``tools/extract_features.py`` and
``diffusion/data/datasets/InternalData_ms.py``; written for this benchmark, not copied):

* VAE, multi-scale: decode workers convert each image to RGB, resize it straight to its bucket
  size (BICUBIC, a stretch) and normalise it to [-1, 1] as a float tensor; the main process
  encodes ONE image per VAE call, in a shuffled order, and saves ``concat(mean, std)`` as one
  fp32 ``.npy`` per image (see ``LATENT_SAVE_DTYPE``).
* T5: every caption is tokenised with ``padding="max_length"`` to 300 tokens and encoded one at a
  time (a pool of 20 threads shares one lock around the encoder); each result is saved with
  ``np.savez_compressed`` as ``caption_feature`` [1, 300, D] fp16 and ``attention_mask`` [1, 300]
  int16, one ``.npz`` per caption and caption field.
* Files: ``InternData/img_sdxl_vae_features_{res}resolution_ms_new/``,
  ``InternData/caption_features_new/`` and ``InternData/sharegpt4v_caption_features_new/``, each
  named from the image path with its last ``/`` replaced by ``_`` and the extension replaced.
* Reading: per sample ``np.load`` of the ``.npy`` (then ``mean + std * randn``) and of one
  ``.npz`` (padded to max_length if shorter), ``data_info`` with ``img_hw`` and ``aspect_ratio``;
  samples grouped into one-bucket batches and stacked.

The encoders are shardkit's own (same weights, same compute dtype), so any difference in speed
comes from how the work is organised, not from the models.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

VAE_DIR = "img_sdxl_vae_features_{resolution}resolution_ms_new"
CAPTION_DIRS = {"prompt": "caption_features_new", "sharegpt4v": "sharegpt4v_caption_features_new"}
MAX_RATIO = 4.5
T5_THREADS = 20  # PixArt's extractor starts 20 threads that take turns on the encoder
# PixArt-Σ's multi-scale extractor loads the VAE in fp32 and encodes under CUDA autocast: the convs
# run in fp16, but autocast runs ``exp`` in fp32 (PyTorch's AMP op list), so ``posterior.std`` is
# fp32 and ``torch.cat([mean, std])`` promotes the saved array to fp32. On a CPU the compute is
# fp32 to begin with. Either way the files hold fp32.
LATENT_SAVE_DTYPE = np.float32


def feature_name(image_path: str, extension: str) -> str:
    """PixArt's per-file name: last '/' -> '_', image extension -> ``extension``."""
    name = "_".join(image_path.rsplit("/", 1))
    for image_ext in (".png", ".jpg", ".webp"):
        name = name.replace(image_ext, extension)
    return name


@dataclass
class BaselineItem:
    path: str
    height: int
    width: int
    captions: dict[str, str]


def read_items(dataset_root: Path, fields: tuple[str, ...]) -> list[BaselineItem]:
    raw = json.loads((dataset_root / "InternData" / "data_info.json").read_text(encoding="utf-8"))
    return [BaselineItem(it["path"], it["height"], it["width"], {f: it[f] for f in fields if f in it})
            for it in raw if it["ratio"] <= MAX_RATIO]


def closest_bucket(height: float, width: float, table: dict[str, tuple[int, int]]) -> tuple[tuple[int, int], float]:
    ratio = height / width
    key = min(table, key=lambda k: abs(float(k) - ratio))
    return table[key], float(key)


def _decode_stretch(job: tuple[str, int, int]) -> np.ndarray:
    """Worker: RGB, resized straight to the bucket, ToTensor + Normalize(0.5, 0.5) -> float32 CHW."""
    path, bucket_h, bucket_w = job
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((bucket_w, bucket_h), Image.Resampling.BICUBIC)
    array = np.asarray(rgb, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1)) / 127.5 - 1.0


def _bounded_imap(pool, fn, jobs: list, window: int):
    """Results in order with at most ``window`` jobs in flight (a DataLoader's prefetch)."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(fn, (job,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def extract_vae(dataset_root: Path, out: Path, vae_model, resolution: int, workers: int,
                store_dtype=LATENT_SAVE_DTYPE, seed: int = 0, pool=None) -> int:
    """One image per VAE call; one .npy per image. Returns the number of images."""
    import torch

    from shardkit.buckets import aspect_table

    table = aspect_table(resolution)
    items = read_items(dataset_root, ())
    order = np.random.default_rng(seed).permutation(len(items))  # PixArt samples in random order
    save_dir = out / "InternData" / VAE_DIR.format(resolution=resolution)
    save_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in order:
        (bucket_h, bucket_w), _ = closest_bucket(items[i].height, items[i].width, table)
        jobs.append((str(dataset_root / "InternImgs" / items[i].path), bucket_h, bucket_w))
    dtype = next(vae_model.parameters()).dtype
    device = next(vae_model.parameters()).device
    results = (_bounded_imap(pool, _decode_stretch, jobs, 2 * workers) if pool is not None
               else map(_decode_stretch, jobs))
    for i, pixels in zip(order, results):
        # PixArt-Σ encodes under CUDA autocast (fp16 convolutions, fp32 normalisations and exp).
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            x = torch.from_numpy(pixels)[None].to(device=device, dtype=dtype)
            posterior = vae_model.encode(x).latent_dist
            feature = torch.cat([posterior.mean, posterior.std], dim=1).float().cpu().numpy()
        np.save(save_dir / feature_name(items[i].path, ".npy"), feature[0].astype(store_dtype))
    return len(items)


def extract_t5(dataset_root: Path, out: Path, tokenizer, text_encoder, field: str, max_length: int = 300) -> int:
    """Each caption padded to max_length and encoded alone; one compressed .npz per caption."""
    import torch

    items = [it for it in read_items(dataset_root, (field,)) if field in it.captions]
    save_dir = out / "InternData" / CAPTION_DIRS.get(field, f"{field}_caption_features_new")
    save_dir.mkdir(parents=True, exist_ok=True)
    device = next(text_encoder.parameters()).device
    lock = threading.Lock()

    def job(item: BaselineItem) -> None:
        with lock:
            token = tokenizer([item.captions[field].strip()], max_length=max_length, padding="max_length",
                              truncation=True, return_tensors="pt")
            with torch.no_grad():
                emb = text_encoder(token.input_ids.to(device), attention_mask=token.attention_mask.to(device))[0]
        np.savez_compressed(save_dir / feature_name(item.path, ".npz"),
                            caption_feature=emb.to(torch.float16).cpu().numpy(),
                            attention_mask=token.attention_mask.to(torch.int16).numpy())

    with ThreadPoolExecutor(max_workers=T5_THREADS) as threads:
        list(threads.map(job, items))
    return len(items)


def make_pool(workers: int):
    """Decode workers, started before any model is loaded (a DataLoader forks its workers)."""
    return multiprocessing.get_context("fork").Pool(workers) if workers > 0 else None


class PerFileReader:
    """Iterates one-bucket batches the way PixArt's feature loader reads the per-file layout."""

    def __init__(self, dataset_root: Path, features_root: Path, resolution: int, field: str,
                 batch_size: int, max_length: int = 300, seed: int = 0):
        from shardkit.buckets import aspect_table

        self.items = read_items(dataset_root, ())
        self.table = aspect_table(resolution)
        self.vae_dir = features_root / "InternData" / VAE_DIR.format(resolution=resolution)
        self.caption_dir = features_root / "InternData" / CAPTION_DIRS.get(field, f"{field}_caption_features_new")
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed

    def _sample(self, index: int):
        import torch

        item = self.items[index]
        _, ratio = closest_bucket(item.height, item.width, self.table)
        mean, std = torch.from_numpy(np.load(self.vae_dir / feature_name(item.path, ".npy"), allow_pickle=False)).chunk(2)
        latent = mean + std * torch.randn(mean.shape, dtype=mean.dtype)
        with np.load(self.caption_dir / feature_name(item.path, ".npz"), allow_pickle=False) as npz:
            feature = torch.from_numpy(npz["caption_feature"])
            mask = torch.from_numpy(npz["attention_mask"])[None]
        if feature.shape[1] != self.max_length:
            pad = self.max_length - feature.shape[1]
            feature = torch.cat([feature, feature[:, -1:].repeat(1, pad, 1)], dim=1)
            mask = torch.cat([mask, torch.zeros(1, 1, pad, dtype=mask.dtype)], dim=-1)
        hw = torch.tensor([item.height, item.width], dtype=torch.float32)
        return latent, feature, mask.to(torch.int16), hw, ratio

    def __iter__(self):
        # AspectRatioBatchSampler: shuffled indices, collected per bucket until a batch is full.
        order = np.random.default_rng(self.seed).permutation(len(self.items))
        waiting: dict[float, list[int]] = {}
        for index in order:
            item = self.items[index]
            _, ratio = closest_bucket(item.height, item.width, self.table)
            bucket = waiting.setdefault(ratio, [])
            bucket.append(int(index))
            if len(bucket) == self.batch_size:
                yield self._collate([self._sample(i) for i in bucket])
                waiting[ratio] = []
        for bucket in waiting.values():
            if bucket:
                yield self._collate([self._sample(i) for i in bucket])

    @staticmethod
    def _collate(samples):
        import torch

        latents, features, masks, hws, ratios = zip(*samples)
        return (torch.stack(latents), torch.stack(features), torch.stack(masks),
                {"img_hw": torch.stack(hws), "aspect_ratio": torch.tensor(ratios)})
