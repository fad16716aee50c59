"""Synthetic PixArt-layout datasets for the benchmarks.

Images are JPEGs that compress like photographs: a smooth colour field, a few soft-edged
shapes and sensor-like noise, at long sides of 384-1024 px (or one fixed long side) and
aspect ratios spread over the PixArt buckets, more of them near the common photo ratios.
Captions are drawn word by word from the tiny tokenizer's own corpus until they reach a
target token count, so their token lengths follow the distribution asked for exactly:
short prompts of 15-40 tokens and long captions around a median of 110 tokens.

Record ``i`` depends only on (seed, i): the dataset of N records is the first N records of
the dataset of 10 N, and a dataset already on disk is reused.

    python benchmarks/synth.py OUT --n 200 [--long-side 512] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Photographic ratios (height/width) that real datasets are full of; the rest of the records
# spread evenly over PixArt's table, so every bucket gets some.
_COMMON_RATIOS = (1.0, 0.75, 4 / 3, 0.5625, 16 / 9, 2 / 3, 1.5, 0.8, 1.25)
_COMMON_SHARE = 0.6

PROMPT_TOKENS = (15, 40)  # short prompts: uniform over this range, EOS included
LONG_MEDIAN_TOKENS = 110  # long captions: log-normal around this median ...
LONG_SIGMA = 0.35
LONG_TOKENS = (40, 300)  # ... clipped to this range (300 is PixArt's max_length)

# Bumped whenever the generator changes, so cached datasets are regenerated.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class DatasetSpec:
    n: int
    seed: int = 0
    long_side: int | None = None  # None: uniform in [384, 1024]

    @property
    def name(self) -> str:
        sides = f"ls{self.long_side}" if self.long_side else "ls384-1024"
        return f"synth-v{GENERATOR_VERSION}-{sides}-s{self.seed}-n{self.n}"


class CaptionMaker:
    """Captions with an exact token count under the given tokenizer (whitespace-split words)."""

    def __init__(self, tokenizer):
        from shardkit.testing.tiny_models import TOKENIZER_CORPUS

        words = TOKENIZER_CORPUS.split()
        # T5's pre-tokenizer splits on whitespace first, so a text's token count is the sum of
        # its words' counts plus the end-of-sequence token.
        self.words = words
        self.counts = np.array([len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words])

    def make(self, rng: np.random.Generator, tokens: int) -> str:
        budget = tokens - 1  # EOS
        start = int(rng.integers(len(self.words)))
        out: list[str] = []
        i = start
        while budget > 0:
            i = (i + 1) % len(self.words) if rng.random() < 0.8 else int(rng.integers(len(self.words)))
            count = int(self.counts[i])
            if count <= budget:
                out.append(self.words[i])
                budget -= count
            elif budget <= 2:
                # Finish with any word that fits exactly.
                fits = np.flatnonzero(self.counts == budget)
                out.append(self.words[int(rng.choice(fits))])
                budget = 0
        return " ".join(out)


def _ratio(rng: np.random.Generator, bucket_ratios: list[float]) -> float:
    if rng.random() < _COMMON_SHARE:
        base = float(rng.choice(_COMMON_RATIOS))
    else:
        base = float(rng.choice(bucket_ratios))
    return base * float(rng.uniform(0.98, 1.02))


def _size(rng: np.random.Generator, ratio: float, long_side: int | None) -> tuple[int, int]:
    side = long_side or int(rng.integers(384, 1025))
    if ratio >= 1.0:
        return side, max(16, round(side / ratio))
    return max(16, round(side * ratio)), side


def _picture(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Smooth colour field + soft shapes + noise: compresses like a photo, not like flat art."""
    grid = rng.uniform(20, 235, size=(int(rng.integers(2, 5)), int(rng.integers(2, 5)), 3)).astype(np.uint8)
    image = Image.fromarray(grid, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(rng.integers(0, width, size=2).tolist())
        y0, y1 = sorted(rng.integers(0, height, size=2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1 + 1, y1 + 1), fill=colour)
        else:
            points = [tuple(int(v) for v in (rng.integers(0, width), rng.integers(0, height))) for _ in range(3)]
            draw.polygon(points, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.8, 2.5))))
    pixels = np.asarray(image, dtype=np.float32)
    # Fine texture at two scales: pixel noise and a coarser grain.
    pixels += rng.normal(0.0, float(rng.uniform(3.0, 9.0)), size=pixels.shape).astype(np.float32)
    coarse = rng.normal(0.0, 6.0, size=(height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
    pixels += np.kron(coarse, np.ones((8, 8, 1), np.float32))[:height, :width]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def record(index: int, spec: DatasetSpec, bucket_ratios: list[float], captions: CaptionMaker) -> tuple[dict, Image.Image, int]:
    rng = np.random.default_rng([spec.seed, index])
    height, width = _size(rng, _ratio(rng, bucket_ratios), spec.long_side)
    prompt_tokens = int(rng.integers(PROMPT_TOKENS[0], PROMPT_TOKENS[1] + 1))
    long_tokens = int(np.clip(round(LONG_MEDIAN_TOKENS * math.exp(rng.normal(0.0, LONG_SIGMA))), *LONG_TOKENS))
    item = {
        "path": f"{index:07d}.jpg",
        "width": width,
        "height": height,
        "ratio": height / width,
        "prompt": captions.make(rng, prompt_tokens),
        "sharegpt4v": captions.make(rng, long_tokens),
    }
    quality = int(rng.integers(85, 96))
    return item, _picture(rng, height, width), quality


def make_dataset(spec: DatasetSpec, parent: Path, tokenizer_dir: Path, progress: bool = True) -> Path:
    """ROOT/InternImgs/*.jpg + ROOT/InternData/data_info.json; reused when already complete."""
    from transformers import AutoTokenizer

    from shardkit.buckets import aspect_table

    root = parent / spec.name
    info_path = root / "InternData" / "data_info.json"
    if info_path.is_file():
        return root
    images = root / "InternImgs"
    images.mkdir(parents=True, exist_ok=True)
    (root / "InternData").mkdir(exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    captions = CaptionMaker(tokenizer)
    bucket_ratios = [float(k) for k in aspect_table(512)]
    items = []
    for index in range(spec.n):
        item, picture, quality = record(index, spec, bucket_ratios, captions)
        target = images / item["path"]
        if not target.is_file():
            picture.save(target, "JPEG", quality=quality)
        items.append(item)
        if progress and (index + 1) % 200 == 0:
            print(f"  synth {spec.name}: {index + 1}/{spec.n}", file=sys.stderr, flush=True)
    temp = info_path.with_suffix(".tmp")
    temp.write_text(json.dumps(items, indent=1), encoding="utf-8")
    os.replace(temp, info_path)  # the json appears last: its presence means the dataset is whole
    return root


# LAION-style Parquet for the planning benchmark: this many distinct small JPEGs (aspect ratios
# spread over the buckets) recur down the rows, so a million rows stay a small file.
_PARQUET_IMAGES = 64
_PARQUET_ROW_GROUP = 10_000


def make_parquet(n: int, parent: Path, seed: int = 0) -> Path:
    """img2dataset-style Parquet of ``n`` rows (key, jpg bytes, caption, url, aesthetic, pwatermark),
    written one row group at a time; reused when already there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shardkit.buckets import aspect_table

    path = parent / f"laion-v{GENERATOR_VERSION}-s{seed}-n{n}.parquet"
    if path.is_file():
        return path
    parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ratios = sorted(float(k) for k in aspect_table(512))
    jpegs = []
    for i in range(_PARQUET_IMAGES):
        height, width = _size(rng, ratios[i * len(ratios) // _PARQUET_IMAGES], 256)
        out = io.BytesIO()
        Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3))).save(out, "JPEG")
        jpegs.append(out.getvalue())
    words = ("a photo of the red blue small large old new dog cat house tree river city street car person "
             "painting drawing sunset mountain beach forest night morning portrait view").split()
    temp = path.with_suffix(".tmp")
    with pq.ParquetWriter(temp, pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("caption", pa.string()),
                                            ("url", pa.string()), ("aesthetic", pa.float64()),
                                            ("pwatermark", pa.float64())])) as writer:
        for start in range(0, n, _PARQUET_ROW_GROUP):
            rows = range(start, min(n, start + _PARQUET_ROW_GROUP))
            lengths = rng.integers(5, 30, len(rows))
            writer.write_table(pa.table({
                "key": [f"{i:09d}" for i in rows],
                "jpg": pa.array([jpegs[i % _PARQUET_IMAGES] for i in rows], pa.binary()),
                "caption": [" ".join(rng.choice(words, length)) for length in lengths],
                "url": [f"https://example.com/images/{i}.jpg" for i in rows],
                "aesthetic": rng.uniform(3, 8, len(rows)),
                "pwatermark": rng.uniform(0, 1, len(rows)),
            }))
    os.replace(temp, path)
    return path


def describe(root: Path) -> dict:
    """Sizes and token lengths of a generated dataset, for the report."""
    items = json.loads((root / "InternData" / "data_info.json").read_text(encoding="utf-8"))
    sizes = [(root / "InternImgs" / it["path"]).stat().st_size for it in items]
    pixels = [it["width"] * it["height"] for it in items]
    return {
        "records": len(items),
        "jpeg_bytes_mean": float(np.mean(sizes)),
        "jpeg_bits_per_pixel": float(8 * np.sum(sizes) / np.sum(pixels)),
        "long_side_range": [min(max(it["width"], it["height"]) for it in items),
                            max(max(it["width"], it["height"]) for it in items)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="parent folder; the dataset goes in a subfolder named after its spec")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-side", type=int, default=None, help="fixed long side in px (default: 384-1024)")
    parser.add_argument("--tiny-models", type=Path, default=Path(".cache/tiny-models"))
    args = parser.parse_args()
    from shardkit.testing.tiny_models import write_tiny_models

    models = write_tiny_models(args.tiny_models)
    root = make_dataset(DatasetSpec(args.n, args.seed, args.long_side), args.out, models / "tokenizer")
    print(root)
    print(json.dumps(describe(root), indent=1))


if __name__ == "__main__":
    main()
