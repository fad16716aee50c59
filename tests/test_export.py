"""shardkit export --format pixart: PixArt-Σ's per-file layout, equal to the shards, named as its loader names them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from shardkit.cli import main
from shardkit.errors import ShardkitError
from shardkit.export import export_pixart, pixart_feature_name
from shardkit.reader import ShardReader
from test_reader import stored_samples, write_synthetic_build


def pixart_loader_name(path: str, ext: str) -> str:
    """What PixArt-Σ's multi-scale loader computes (written out here independently of shardkit)."""
    joined = path.rsplit("/", 1)
    joined = joined[0] + "_" + joined[1] if len(joined) == 2 else joined[0]
    for image_ext in (".png", ".jpg", ".webp", ".jpeg", ".JPEG", ".JPG"):
        joined = joined.replace(image_ext, ext)
    return joined


def pixart_loader_caption(npz_path: Path, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption features and mask as PixArt-Σ's loader makes them from an .npz ([1, L, D], [1, 1, L])."""
    with np.load(npz_path, allow_pickle=False) as data:
        feature = torch.from_numpy(data["caption_feature"])
        mask = torch.from_numpy(data["attention_mask"])[None]
    if feature.shape[1] != max_length:
        feature = torch.cat([feature, feature[:, -1:].repeat(1, max_length - feature.shape[1], 1)], dim=1)
        mask = torch.cat([mask, torch.zeros(1, 1, max_length - mask.shape[-1])], dim=-1)
    return feature, mask.to(torch.int16)


def test_export_holds_every_sample_as_pixart_loads_it(toy_build, toy_dataset, tmp_path):
    dest = tmp_path / "pixart"
    summary = export_pixart(toy_build, dest)
    stored = stored_samples(toy_build)
    manifest = json.loads((toy_build / "manifest.json").read_text())
    max_length, resolution = manifest["config"]["max_length"], manifest["resolution"]
    assert summary.samples == summary.latents == summary.images == len(stored) == 17

    data_info = json.loads((dest / "InternData" / "data_info.json").read_text())
    source_info = {item["path"]: item for item in json.loads((toy_dataset / "InternData" / "data_info.json").read_text())}
    assert [item["path"] for item in data_info] == list(source_info)  # the source's order
    by_path = {s["meta"]["path"]: s for s in stored.values()}
    batches = {}
    for batch in ShardReader(toy_build, batch_size=1, layout="dict", latent="mean", shuffle=False):
        batches[batch["keys"][0]] = batch

    for item in data_info:
        sample = by_path[item["path"]]
        meta = sample["meta"]
        height, width = meta["original_hw"]
        assert (item["height"], item["width"]) == (height, width) == (source_info[item["path"]]["height"],
                                                                     source_info[item["path"]]["width"])
        assert item["ratio"] == pytest.approx(height / width)
        assert item["prompt"] == meta["captions"]["prompt"] and item["sharegpt4v"] == meta["captions"]["sharegpt4v"]

        latent_file = dest / "InternData" / f"img_sdxl_vae_features_{resolution}resolution_ms_new" / pixart_loader_name(item["path"], ".npy")
        latent = np.load(latent_file, allow_pickle=False)
        np.testing.assert_array_equal(latent, sample["moments"])
        assert latent.dtype == sample["moments"].dtype and latent.shape[0] == 8

        for name, folder in (("prompt", "caption_features_new"), ("sharegpt4v", "sharegpt4v_caption_features_new")):
            npz = dest / "InternData" / folder / pixart_loader_name(item["path"], ".npz")
            with np.load(npz, allow_pickle=False) as data:
                assert data["caption_feature"].shape == (1, max_length, 32) and data["caption_feature"].dtype == np.float16
                assert data["attention_mask"].shape == (1, max_length) and data["attention_mask"].dtype == np.int16
            feature, mask = pixart_loader_caption(npz, max_length)
            stored_feature = sample["features"][name]
            length = stored_feature.shape[0]
            np.testing.assert_array_equal(feature[0, :length].numpy(), stored_feature)
            np.testing.assert_array_equal(feature[0, length:].numpy(), np.repeat(stored_feature[-1:], max_length - length, 0))
            assert int(mask.sum()) == length == meta["t5_lengths"][name]
            if name == "prompt":  # what PixArt's loader reads equals what the reader yields
                batch = batches[meta["key"]]
                assert torch.equal(batch["caption_feature"][0], feature)
                assert torch.equal(batch["attention_mask"][0], mask)

        image = dest / "InternImgs" / item["path"]
        assert image.read_bytes() == (toy_dataset / "InternImgs" / item["path"]).read_bytes()


@pytest.mark.parametrize("path, name", [
    ("a.png", "a.npy"),
    ("dir/x.jpg", "dir_x.npy"),
    ("x.webp", "x.npy"),
    ("x.jpeg", "x.npy"),
    ("x.JPEG", "x.npy"),
    ("X.JPG", "X.npy"),
    ("dir/sub/x.webp", "dir/sub_x.npy"),  # only the last folder is joined
    ("x.PNG", "x.PNG"),  # the loader knows no upper-case .png or .webp, nor mixed case
    ("x.WEBP", "x.WEBP"),
    ("x.Jpg", "x.Jpg"),
    ("x.tif", "x.tif"),
    ("a.jpg.d/b.png", "a.npy.d_b.npy"),  # every occurrence, anywhere
    ("photos.JPG/sub/x.jpeg", "photos.npy/sub_x.npy"),
    ("plain", "plain"),
])
def test_feature_names_follow_pixart_loader(path, name):
    assert pixart_feature_name(path, ".npy") == name == pixart_loader_name(path, ".npy")
    assert pixart_feature_name(path, ".npz") == pixart_loader_name(path, ".npz")


def test_nested_and_unreplaced_names_are_written_where_pixart_looks(tmp_path):
    paths = ["sub/dir/photo.jpeg", "top.png", "a/b.PNG"]
    build = tmp_path / "build"
    write_synthetic_build(build, {"1.0": [3]}, path_of=lambda i: paths[i], has_second=lambda i: i != 1, image=True)
    dest = tmp_path / "dest"
    summary = export_pixart(build, dest)
    latent_root = dest / "InternData" / "img_sdxl_vae_features_256resolution_ms_new"
    assert sorted(str(p.relative_to(latent_root)) for p in latent_root.rglob("*") if p.is_file()) == \
        ["a_b.PNG", "sub/dir_photo.npy", "top.npy"]
    assert (dest / "InternData" / "caption_features_new" / "sub" / "dir_photo.npz").is_file()
    assert not (dest / "InternData" / "sharegpt4v_caption_features_new" / "top.npz").exists()
    assert summary.caption_features == {"caption_features_new": 3, "sharegpt4v_caption_features_new": 2}
    assert (dest / "InternImgs" / "sub" / "dir" / "photo.jpeg").read_bytes() == b"image bytes 0"
    info = json.loads((dest / "InternData" / "data_info.json").read_text())
    assert "sharegpt4v" not in info[1] and info[0]["sharegpt4v"] == "sharegpt4v of sample 0"
    # --max-length pads (or cuts) to another length
    export_pixart(build, tmp_path / "short", max_length=2)
    with np.load(tmp_path / "short" / "InternData" / "caption_features_new" / "top.npz") as data:  # 3 tokens
        assert data["caption_feature"].shape == (1, 2, 4) and data["attention_mask"].tolist() == [[1, 1]]


@pytest.mark.parametrize("bad_path", ["../evil.png", "/tmp/absolute.png", "ok/../../evil.png", "ok\\..\\evil.png", "C:evil.png"])
def test_paths_that_leave_dest_are_refused(tmp_path, bad_path):
    build = tmp_path / "build"
    write_synthetic_build(build, {"1.0": [1]}, path_of=lambda i: bad_path, image=True)
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(ShardkitError, match="leaves its folder"):
        export_pixart(build, dest)
    assert not (tmp_path / "deep" / "evil.png").exists() and not (tmp_path / "evil.png").exists()
    assert not (dest / "InternData" / "data_info.json").exists()


def test_paths_that_pixart_would_confuse_are_refused(tmp_path):
    paths = ["a/b_c.png", "a_b/c.jpg"]  # both become a_b_c.npy
    write_synthetic_build(tmp_path / "build", {"1.0": [2]}, path_of=lambda i: paths[i])
    with pytest.raises(ShardkitError, match="same PixArt feature file"):
        export_pixart(tmp_path / "build", tmp_path / "dest")


def test_cli_export(toy_build, tmp_path):
    runner = CliRunner()
    dest = tmp_path / "dest"
    result = runner.invoke(main, ["export", str(toy_build), str(dest), "--format", "pixart", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "exported 17 samples" in result.output
    assert (dest / "InternData" / "data_info.json").is_file()

    again = runner.invoke(main, ["export", str(toy_build), str(dest), "--no-progress"])
    assert again.exit_code == 2 and "not empty" in again.output and "Traceback" not in again.output
    assert runner.invoke(main, ["export", str(toy_build), str(dest), "--overwrite", "--no-images",
                                "--no-progress"]).exit_code == 0
    missing = runner.invoke(main, ["export", str(tmp_path / "nowhere"), str(tmp_path / "d2"), "--no-progress"])
    assert missing.exit_code == 2 and "manifest" in missing.output
    bad_options = runner.invoke(main, ["export", str(toy_build), str(tmp_path / "d3"), "--storage-options", "{nope"])
    assert bad_options.exit_code == 2 and "--storage-options" in bad_options.output
    assert not os.path.exists(tmp_path / "d3" / "InternData")
