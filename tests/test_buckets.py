"""Bucket tables and the closest-bucket rule must equal PixArt-Σ's."""

from __future__ import annotations

import itertools

import pytest

from shardkit.buckets import BucketTable, aspect_table
from shardkit.config import BuildConfig
from shardkit.plan import EXTREME_ASPECT_RATIO, ImageFacts, Planner
from shardkit.sources import Record

KEYS_COMMON = ["0.25", "0.26", "0.27", "0.28", "0.32", "0.33", "0.35", "0.4", "0.42", "0.48", "0.5", "0.52",
               "0.57", "0.6", "0.68", "0.72", "0.78", "0.82", "0.88", "0.94", "1.0", "1.07", "1.13", "1.21",
               "1.29", "1.38", "1.46", "1.67", "1.75", "2.0", "2.09", "2.4", "2.5", "2.89", "3.0", "3.11",
               "3.62", "3.75", "3.88", "4.0"]
KEYS_2880 = ["0.25", "0.26", "0.27", "0.28", "0.32", "0.33", "0.34", "0.4", "0.42", "0.47", "0.49", "0.51",
             "0.55", "0.59", "0.68", "0.72", "0.78", "0.83", "0.89", "0.93", "1.0", "1.07", "1.12", "1.21",
             "1.28", "1.39", "1.47", "1.7", "1.82", "2.03", "2.13", "2.39", "2.5", "2.92", "3.0", "3.12",
             "3.68", "3.82", "3.95", "4.0"]
# Spot values read off PixArt-Σ's diffusion/data/datasets/utils.py: (resolution, key) -> [height, width].
PIXART_VALUES = {
    (256, "0.25"): (128, 512), (256, "0.6"): (192, 320), (256, "1.0"): (256, 256), (256, "2.89"): (416, 144),
    (512, "0.26"): (256, 992), (512, "0.94"): (480, 512), (512, "1.46"): (608, 416), (512, "4.0"): (1024, 256),
    (1024, "0.35"): (576, 1664), (1024, "1.0"): (1024, 1024), (1024, "1.75"): (1344, 768), (1024, "3.62"): (1856, 512),
    (2048, "0.48"): (1408, 2944), (2048, "1.21"): (2176, 1792), (2048, "3.88"): (3968, 1024),
    (2880, "0.25"): (1408, 5760), (2880, "0.93"): (2688, 2880), (2880, "1.0"): (2880, 2880),
    (2880, "1.7"): (3584, 2112), (2880, "3.95"): (5568, 1408), (2880, "4.0"): (5760, 1408),
}


@pytest.mark.parametrize("resolution", [256, 512, 1024, 2048])
def test_table_keys_match_pixart(resolution):
    assert list(aspect_table(resolution)) == KEYS_COMMON


def test_2880_keys_match_pixart():
    assert list(aspect_table(2880)) == KEYS_2880


@pytest.mark.parametrize("resolution,key", sorted(PIXART_VALUES))
def test_table_values_match_pixart(resolution, key):
    assert aspect_table(resolution)[key] == PIXART_VALUES[(resolution, key)]


def test_every_bucket_is_a_multiple_of_the_vae_patch():
    for resolution in (256, 512, 1024, 2048, 2880):
        assert all(h % 16 == 0 and w % 16 == 0 for h, w in aspect_table(resolution).values())


@pytest.mark.parametrize("resolution", [256, 512, 1024, 2048, 2880])
def test_closest_bucket_over_a_grid(resolution):
    """PixArt's rule: min over keys (in table order) of |float(key) - h/w|."""
    table = BucketTable(resolution)
    raw = aspect_table(resolution)
    sizes = list(range(64, 4097, 97))
    for height, width in itertools.product(sizes, sizes):
        expected = min(raw, key=lambda k: abs(float(k) - height / width))
        assert table.closest(height, width).key == expected
        assert (table.closest(height, width).height, table.closest(height, width).width) == raw[expected]


def _exact_ties(resolution: int) -> list[tuple[int, int, str]]:
    """(height, width, first key) where two keys are exactly equally close in floating point."""
    keys = list(aspect_table(resolution))
    ties = []
    for width in range(1, 400):
        for height in range(width // 4, 4 * width + 1):
            ratio = height / width
            distances = sorted((abs(float(k) - ratio), i) for i, k in enumerate(keys))
            if distances[0][0] == distances[1][0]:
                ties.append((height, width, keys[min(distances[0][1], distances[1][1])]))
    return ties


def test_tie_goes_to_the_first_key():
    ties = _exact_ties(512)
    assert ties, "the grid should contain exact ties"
    table = BucketTable(512)
    for height, width, first_key in ties:
        assert table.closest(height, width).key == first_key


def test_unknown_resolution_is_rejected():
    with pytest.raises(ValueError):
        aspect_table(768)


@pytest.mark.parametrize("width,height,kept", [(100, 450, True), (100, 451, False), (451, 100, False),
                                               (450, 100, True), (100, 100, True)])
def test_ratio_filter(width, height, kept, tmp_path):
    config = BuildConfig(max_ratio=4.5)
    planner = Planner(config, BucketTable(512), tokenize=lambda text: [1], latent_shape=lambda h, w: (8, h // 8, w // 8),
                      hidden_size=4)
    record = Record(index=0, path="a.jpg", image_root=tmp_path, captions={"prompt": "x"}, width=width, height=height)
    result = planner._plan_record(record, ImageFacts())
    if kept:
        assert result.bucket.key == BucketTable(512).closest(height, width).key
    else:
        assert result.reason == EXTREME_ASPECT_RATIO
