"""Decode and transform: every colour mode to RGB, EXIF orientation, PixArt's resize/crop rule."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from shardkit.buckets import Bucket
from shardkit.images import (CORRUPT_IMAGE, NOT_AN_IMAGE, SIZE_MISMATCH, TOO_MANY_PIXELS, ImageSkip,
                             decode_and_fit, fit_to_bucket, read_header, to_model_input)

SQUARE = Bucket("1.0", 64, 64)


def _save(tmp_path, image: Image.Image, name: str, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    base = Image.linear_gradient("L").resize((80, 64)).convert(mode if mode != "I;16" else "I")
    if mode == "I;16":
        array = (np.asarray(Image.linear_gradient("L").resize((80, 64)), dtype=np.uint16) * 257)
        base = Image.fromarray(array)  # uint16 -> mode I;16
    name = "img.png" if mode != "CMYK" else "img.jpg"
    path = _save(tmp_path, base, name)
    result = decode_and_fit(path, SQUARE, "crop", 10**8, None, lanczos=False)
    assert result.pixels.shape == (64, 64, 3) and result.pixels.dtype == np.uint8
    if mode == "I;16":  # 16-bit is scaled to 8-bit, not clipped to white
        assert 100 < result.pixels.mean() < 160


def test_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    path = _save(tmp_path, image, "clear.png")
    result = decode_and_fit(path, SQUARE, "crop", 10**8, None, lanczos=False)
    assert (result.pixels == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 40, 40))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = _save(tmp_path, image, "rot.jpg", exif=exif, quality=95)
    header = read_header(path, 10**8)
    assert (header.width, header.height) == (40, 80)
    result = decode_and_fit(path, Bucket("2.0", 64, 32), "crop", 10**8, (80, 40), lanczos=False)
    assert result.original_hw == (80, 40)
    top, bottom = result.pixels[:16].mean(axis=(0, 1)), result.pixels[-16:].mean(axis=(0, 1))
    assert top[2] > 200 and bottom[0] > 200  # the blue half is on top after rotating


def test_crop_matches_pixart_rule():
    bucket = Bucket("0.57", 384, 672)
    resized, top, left = fit_to_bucket((1000, 1500), bucket, "crop")
    assert resized == (int(1000 * 672 / 1500), 672) or resized == (448, 672)
    # bucket.h / ori_h = 0.384 > bucket.w / ori_w = 0.448? no -> width-bound branch
    assert resized == (448, 672) and (top, left) == (32, 0)
    resized, top, left = fit_to_bucket((300, 1000), bucket, "crop")
    assert resized == (384, int(1000 * 384 / 300)) and left == int(round((1280 - 672) / 2.0)) and top == 0
    assert fit_to_bucket((300, 1000), bucket, "stretch") == ((384, 672), 0, 0)


def test_values_map_to_minus_one_one():
    pixels = torch.tensor([[[[0, 127, 255]]]], dtype=torch.uint8)
    x = to_model_input(pixels)
    expected = (torch.tensor([0, 127, 255]) / 255.0 - 0.5) / 0.5
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-6)


def test_stretch_resizes_straight_to_the_bucket(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (100, 30), (10, 20, 30)), "w.png")
    result = decode_and_fit(path, SQUARE, "stretch", 10**8, None, lanczos=True)
    assert result.resized_hw == (64, 64) and (result.crop_top, result.crop_left) == (0, 0)
    assert tuple(result.pixels[32, 32]) == (10, 20, 30)


def test_bad_files_raise_skips_with_reasons(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, "JPEG")
    truncated = tmp_path / "t.jpg"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    text = tmp_path / "n.jpg"
    text.write_text("hello, not an image")
    big = _save(tmp_path, Image.new("L", (200, 200)), "big.png")
    ok = _save(tmp_path, Image.new("RGB", (64, 64)), "ok.png")
    cases = [(truncated, None, CORRUPT_IMAGE), (text, None, NOT_AN_IMAGE), (ok, (60, 64), SIZE_MISMATCH)]
    for path, expected_hw, reason in cases:
        with pytest.raises(ImageSkip) as info:
            decode_and_fit(path, SQUARE, "crop", 10**8, expected_hw, lanczos=False)
        assert info.value.reason == reason
    with pytest.raises(ImageSkip) as info:
        decode_and_fit(big, SQUARE, "crop", 100 * 100, None, lanczos=False)
    assert info.value.reason == TOO_MANY_PIXELS


def _noisy(width: int, height: int) -> Image.Image:
    """Noise compresses badly, so the JPEG is far larger than the 64 KiB header read."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _rotated_exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _count_whole_reads(monkeypatch) -> list:
    import shardkit.images as images_module

    whole_reads = []
    read_bytes = images_module._read_bytes

    def counting(path, *limits):
        whole_reads.append(path)
        return read_bytes(path, *limits)

    monkeypatch.setattr(images_module, "_read_bytes", counting)
    return whole_reads


def test_header_of_a_large_jpeg_comes_from_its_first_bytes(tmp_path, monkeypatch):
    path = _save(tmp_path, _noisy(600, 300), "big.jpg", exif=_rotated_exif(6), quality=95)
    assert path.stat().st_size > 3 * 64 * 1024
    whole_reads = _count_whole_reads(monkeypatch)
    header = read_header(path, 10**8)
    assert (header.width, header.height, header.format) == (300, 600, "jpeg")  # EXIF turn applied
    assert header.file_bytes == path.stat().st_size
    assert whole_reads == []
    with pytest.raises(ImageSkip) as skip:  # the pixel limit is judged from the first bytes too
        read_header(path, 1000)
    assert skip.value.reason == TOO_MANY_PIXELS and whole_reads == []


def test_header_past_the_first_bytes_is_read_from_the_whole_file(tmp_path, monkeypatch):
    """A 200 KB ICC profile (APP2 segments) before the frame header: the first 64 KiB hold no size,
    so the whole file is read, and the EXIF turn is still applied."""
    rng = np.random.default_rng(1)
    icc = bytes(rng.integers(0, 256, 200_000, dtype=np.uint8))
    path = _save(tmp_path, _noisy(200, 100), "icc.jpg", exif=_rotated_exif(8), icc_profile=icc, quality=90)
    whole_reads = _count_whole_reads(monkeypatch)
    header = read_header(path, 10**8)
    assert (header.width, header.height) == (100, 200) and header.file_bytes == path.stat().st_size
    assert len(whole_reads) == 1


def test_header_of_a_large_png_reads_the_whole_file(tmp_path, monkeypatch):
    path = _save(tmp_path, _noisy(300, 200), "big.png")
    whole_reads = _count_whole_reads(monkeypatch)
    header = read_header(path, 10**8)
    assert (header.width, header.height, header.format) == (300, 200, "png") and len(whole_reads) == 1


def test_header_of_a_remote_jpeg_takes_one_ranged_read(tmp_path):
    import fsspec

    from shardkit.storage import RemotePath

    path = _save(tmp_path, _noisy(600, 300), "big.jpg", exif=_rotated_exif(6), quality=95)
    fs = fsspec.filesystem("memory")
    fs.pipe("/headers/big.jpg", path.read_bytes())
    remote = RemotePath("memory://headers/big.jpg")
    start, size = remote.read_start(64 * 1024)
    assert start == path.read_bytes()[:64 * 1024] and size == path.stat().st_size
    header = read_header(remote, 10**8)
    assert (header.width, header.height, header.file_bytes) == (300, 600, path.stat().st_size)
    small = RemotePath("memory://headers/small.jpg")
    fs.pipe("/headers/small.jpg", b"\xff\xd8\xff" + b"x" * 10)
    assert small.read_start(64 * 1024) == (b"\xff\xd8\xff" + b"x" * 10, 13)
    fs.rm("/headers", recursive=True)


def test_header_without_the_size_makes_no_size_request(tmp_path, monkeypatch):
    """A build without images needs no image sizes: a remote header is one ranged GET, no HEAD."""
    import fsspec

    from shardkit.storage import RemotePath

    path = _save(tmp_path, _noisy(600, 300), "big.jpg", quality=95)
    fs = fsspec.filesystem("memory")
    fs.pipe("/nosize/big.jpg", path.read_bytes())
    calls = []
    original = RemotePath._call
    monkeypatch.setattr(RemotePath, "_call", lambda self, method, *a, **k: calls.append(method) or original(self, method, *a, **k))
    header = read_header(RemotePath("memory://nosize/big.jpg"), 10**8, need_size=False)
    assert (header.width, header.height, header.file_bytes) == (600, 300, None) and calls == ["cat_file"]
    calls.clear()
    assert read_header(RemotePath("memory://nosize/big.jpg"), 10**8).file_bytes == path.stat().st_size
    assert calls == ["cat_file", "info"]
    fs.rm("/nosize", recursive=True)
