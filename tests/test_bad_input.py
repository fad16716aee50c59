"""A corpus of broken inputs mixed with good ones: nothing is lost, every skip has its reason."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from shardkit.build import build

UNICODE_CAPTIONS = {
    "emoji.jpg": "a cat 🐱 on a sofa 🛋️ at sunset 🌅",
    "arabic.jpg": "قطة تجلس على الأريكة",
    "hebrew.jpg": "חתול יושב על הספה",
    "cjk.jpg": "沙发上的猫，日落时分",
}


def _photo(path: Path, size=(96, 64), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(path, quality=90)
    return path.read_bytes()


def _corpus(root: Path) -> tuple[Path, list[dict], dict[str, str]]:
    """A PixArt dataset; returns (root, items, expected reason per path, '' for good)."""
    images = root / "InternImgs"
    images.mkdir(parents=True)
    (root / "InternData").mkdir()
    items, expected = [], {}

    def add(path, reason, caption="a photo", width=96, height=64, with_size=True, **extra):
        item = {"path": path, "prompt": caption, **extra}
        if with_size:
            item.update(width=width, height=height, ratio=height / width)
        items.append(item)
        expected.setdefault(path, reason)

    for i in range(3):
        _photo(images / f"good{i}.jpg", seed=i)
        add(f"good{i}.jpg", "", sharegpt4v=f"a much longer description of random pixels number {i}")
    for name, text in UNICODE_CAPTIONS.items():
        _photo(images / name, seed=len(name))
        add(name, "", caption=text)
    _photo(images / "nosize.jpg", size=(64, 96))
    add("nosize.jpg", "", with_size=False)  # size comes from the header
    add("missing.jpg", "missing_file")
    (images / "missing_nosize.jpg").unlink(missing_ok=True)
    add("missing_nosize.jpg", "missing_file", with_size=False)
    (images / "zero.jpg").write_bytes(b"")
    add("zero.jpg", "empty_file", with_size=False)
    full = _photo(images / "truncated.jpg", seed=9)
    (images / "truncated.jpg").write_bytes(full[: len(full) // 2])
    add("truncated.jpg", "corrupt_image")
    png = io.BytesIO()
    Image.fromarray(np.full((64, 96, 3), 200, np.uint8)).save(png, "PNG")
    (images / "truncated.png").write_bytes(png.getvalue()[:-40])
    add("truncated.png", "corrupt_image")
    (images / "text.jpg").write_text("this is not an image at all")
    add("text.jpg", "not_an_image")
    Image.new("L", (3000, 2000)).save(images / "bomb.png")
    add("bomb.png", "too_many_pixels", with_size=False)
    add("bomb_meta.png", "too_many_pixels", width=30000, height=20000)
    _photo(images / "wide.jpg", size=(500, 100))
    add("wide.jpg", "extreme_aspect_ratio", width=500, height=100)
    _photo(images / "tall.jpg", size=(20, 100))
    add("tall.jpg", "extreme_aspect_ratio", with_size=False)
    _photo(images / "liar.jpg", size=(96, 64))
    add("liar.jpg", "size_mismatch", width=64, height=96)
    for name, caption, reason in [("empty.jpg", "", "empty_caption"), ("blank.jpg", " \n\t ", "empty_caption"),
                                  ("number.jpg", 42, "invalid_caption"), ("listcap.jpg", ["a"], "invalid_caption")]:
        _photo(images / name)
        add(name, reason, caption=caption)
    _photo(images / "nocaption.jpg")
    items.append({"path": "nocaption.jpg", "width": 96, "height": 64})
    expected["nocaption.jpg"] = "missing_caption"
    items.append(dict(items[0]))  # good0.jpg a second time
    items.append({"path": "../outside.jpg", "prompt": "escape", "width": 96, "height": 64})
    expected["../outside.jpg"] = "path_outside_root"
    items.append({"path": "/etc/passwd", "prompt": "escape", "width": 96, "height": 64})
    expected["/etc/passwd"] = "path_outside_root"
    (root / "InternData" / "data_info.json").write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    return root, items, expected


def _written(output: Path) -> dict[str, dict]:
    samples = {}
    for shard in sorted((output / "shards").glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            meta = json.loads(sample["json"])
            samples[meta["path"]] = meta
    return samples


def test_every_record_is_written_or_skipped_with_its_reason(tmp_path, make_config, encoders):
    root, items, expected = _corpus(tmp_path / "data")
    output = tmp_path / "out"
    summary = build(str(root), output, make_config(max_image_pixels=1_000_000), encoders=encoders)
    written = _written(output)
    failures = [json.loads(line) for line in (output / "failures.jsonl").read_text(encoding="utf-8").splitlines()]
    good = sorted(p for p, r in expected.items() if not r)
    assert sorted(written) == good
    by_path = {}
    for failure in failures:
        by_path.setdefault(failure["source"], []).append(failure["reason"])
    assert by_path.pop("good0.jpg") == ["duplicate_path"]
    assert {p: r[0] for p, r in by_path.items()} == {p: r for p, r in expected.items() if r}
    assert len(written) + len(failures) == len(items) == summary.records_read
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["records"] == {"read": len(items), "written": len(written), "skipped": len(failures)}
    assert sum(manifest["skipped_by_reason"].values()) == len(failures)
    assert Counter(f["reason"] for f in failures) == Counter(manifest["skipped_by_reason"])
    for name, text in UNICODE_CAPTIONS.items():
        assert written[name]["captions"]["prompt"] == text
    assert written["nosize.jpg"]["original_hw"] == [96, 64]


def test_empty_captions_can_be_encoded_instead_of_skipped(tmp_path, make_config, encoders):
    root, items, expected = _corpus(tmp_path / "data")
    output = tmp_path / "out"
    build(str(root), output, make_config(max_image_pixels=1_000_000, empty_caption="encode"), encoders=encoders)
    written = _written(output)
    assert written["empty.jpg"]["t5_lengths"]["prompt"] == 1  # only the end-of-sequence token
    assert written["blank.jpg"]["captions"]["prompt"] == ""
    assert "number.jpg" not in written  # not text: still skipped


def test_shard_member_names_come_only_from_sanitised_keys(tmp_path, make_config, encoders):
    import tarfile

    root = tmp_path / "data"
    images = root / "InternImgs" / "we ird" / "..dots.." / "x.y"
    images.mkdir(parents=True)
    _photo(images / "a.b.c.JPG")
    (root / "InternData").mkdir()
    path = "we ird/..dots../x.y/a.b.c.JPG"
    (root / "InternData" / "data_info.json").write_text(json.dumps([{"path": path, "prompt": "p"}]))
    output = tmp_path / "out"
    build(str(root), output, make_config(), encoders=encoders)
    (shard,) = (output / "shards").glob("*.tar")
    with tarfile.open(shard) as tar:
        names = tar.getnames()
    keys = {n.split(".", 1)[0] for n in names}
    assert len(keys) == 1
    (key,) = keys
    assert "/" not in key and ".." not in key
    assert sorted(n[len(key) + 1:] for n in names) == ["jpg", "json", "latent.npy", "t5_prompt.npy", "txt"]
    assert all(p.resolve().is_relative_to(output.resolve()) for p in output.rglob("*"))
