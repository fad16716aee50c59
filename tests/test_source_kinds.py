"""WebDataset tars (img2dataset's layout), Parquet and Hugging Face datasets as SOURCE: the same
latents and features as a folder build of the same images, metadata carried into the samples,
filters, --min-image-size and --dedup as recorded skips."""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from shardkit.build import build
from shardkit.cli import main
from shardkit.inspect import inspect_output
from shardkit.manifest import read_manifest
from test_reader import serve

# (key, image format, size, caption): img2dataset-like keys; PNG and WebP bytes are named .jpg in its tars.
IMAGES = [("000000000", "JPEG", (64, 48), "a red fox in snow"),
          ("000000001", "PNG", (40, 72), "a lighthouse at dusk"),
          ("000000002", "WEBP", (56, 56), "three green apples"),
          ("000000003", "JPEG", (80, 40), "a bicycle by a wall"),
          ("000000004", "PNG", (48, 64), "rain on a window")]
METADATA = {"000000000": {"aesthetic": 6.1, "pwatermark": 0.1, "punsafe": 0.01},
            "000000001": {"aesthetic": 4.2, "pwatermark": 0.7, "punsafe": 0.02},
            "000000002": {"aesthetic": 5.5, "pwatermark": 0.2, "punsafe": 0.0},
            "000000003": {"aesthetic": 5.0, "pwatermark": 0.3},
            "000000004": {"aesthetic": 7.3, "pwatermark": 0.05, "punsafe": 0.5}}


@functools.cache
def _image_bytes(key: str) -> bytes:
    _, fmt, size, _ = next(item for item in IMAGES if item[0] == key)
    rng = np.random.default_rng(int(key))
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def _json_for(key: str, caption: str) -> dict:
    _, _, (width, height), _ = next(item for item in IMAGES if item[0] == key)
    return {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success", "caption": caption,
            "width": None, "height": None, "original_width": width, "original_height": height,
            "sha256": "0" * 64, "exif": "{}", **METADATA[key]}


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _folder(tmp_path: Path) -> Path:
    """The same images and captions as image files with same-stem .txt captions."""
    root = tmp_path / "folder"
    root.mkdir()
    for key, fmt, _, caption in IMAGES:
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        (root / f"{key}.{ext}").write_bytes(_image_bytes(key))
        (root / f"{key}.txt").write_text(caption, encoding="utf-8")
    return root


def _img2dataset_tars(tmp_path: Path) -> Path:
    """img2dataset's webdataset output: NNNNN.tar with .parquet and _stats.json beside each; the
    members of a sample not in key order; the last shard cut short; plus a sample without an
    image, one without a caption and one whose key has a dot in its folder name."""
    root = tmp_path / "tars"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, _, _, caption in IMAGES[:3]:
            _add(tar, f"{key}.json", json.dumps(_json_for(key, caption)).encode())
            _add(tar, f"{key}.jpg", _image_bytes(key))
            _add(tar, f"{key}.txt", caption.encode())
        _add(tar, "000000010.json", json.dumps({"key": "000000010", "status": "success", "caption": "lost"}).encode())
        _add(tar, "000000010.txt", b"an image that never arrived")
        _add(tar, "000000011.jpg", _image_bytes("000000003"))  # no caption
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, _, _, caption in IMAGES[3:]:
            _add(tar, f"v1.2/{key}.jpg", _image_bytes(key))
            _add(tar, f"v1.2/{key}.txt", caption.encode())
            _add(tar, f"v1.2/{key}.json", json.dumps(_json_for(key, caption)).encode())
        _add(tar, "000000012.jpg", _image_bytes("000000000"))
        _add(tar, "000000012.txt", b"a sample cut off by the end of the shard")
    whole.seek(0)
    with tarfile.open(fileobj=whole) as tar:
        cut = tar.getmembers()[-1].offset_data + 10
    (root / "00001.tar").write_bytes(whole.getvalue()[:cut])  # the last member's data is cut
    for name in ("00000", "00001"):
        pq.write_table(pa.table({"key": ["x"], "status": ["success"]}), root / f"{name}.parquet")
        (root / f"{name}_stats.json").write_text("{}")
    return root


def _samples(output: Path) -> dict[str, dict[str, bytes]]:
    """key -> member -> bytes, read with stock webdataset."""
    import webdataset

    shards = [str(p) for p in sorted((output / "shards").glob("*.tar"))]
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
            for s in webdataset.WebDataset(shards, shardshuffle=False)}


def _by_caption(output: Path) -> dict[str, dict[str, bytes]]:
    return {sample["txt"].decode(): sample for sample in _samples(output).values()}


def _failures(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "failures.jsonl").read_text().splitlines()]


def _assert_same_encodings(got: Path, expected: Path) -> None:
    """Every sample of ``expected`` (by caption) has the same latent and T5 features in ``got``."""
    ours, theirs = _by_caption(got), _by_caption(expected)
    assert sorted(ours) == sorted(theirs)
    for caption, sample in theirs.items():
        for member in ("latent.npy", "t5_txt.npy"):
            assert ours[caption][member] == sample[member], f"{member} of {caption!r}"


@pytest.fixture(scope="module")
def folder_build(tmp_path_factory, make_config, encoders) -> Path:
    tmp = tmp_path_factory.mktemp("folder")
    output = tmp / "out"
    build(str(_folder(tmp)), output, make_config(captions=("txt",)), encoders=encoders)
    return output


# ---- WebDataset tars -------------------------------------------------------------------------

def test_img2dataset_tars_build_like_a_folder_with_metadata_and_skips(tmp_path, folder_build, make_config, encoders):
    output = tmp_path / "out"
    summary = build(str(_img2dataset_tars(tmp_path)), output, make_config(captions=("txt",)), encoders=encoders)
    assert summary.written == 5 and summary.records_read == summary.written + summary.skipped
    _assert_same_encodings(output, folder_build)
    reasons = {f["source"]: f["reason"] for f in _failures(output)}
    assert reasons == {"00000.tar/000000010": "missing_image", "00000.tar/000000011": "missing_caption",
                       "00001.tar/000000012": "damaged_shard"}
    samples = _samples(output)
    assert all("." not in key and "/" not in key for key in samples)
    by_caption = _by_caption(output)
    # The key is read from the source; bytes are stored as what they are, not as they were named.
    png = by_caption["a lighthouse at dusk"]
    assert "png" in png and "jpg" not in png and png["png"] == _image_bytes("000000001")
    dotted = json.loads(by_caption["rain on a window"]["json"])
    assert dotted["path"] == "00001.tar/v1.2/000000004" and dotted["key"].startswith("v1_2_000000004-")
    assert dotted["source"]["url"] == "https://example.com/000000004.jpg"
    assert dotted["source"]["punsafe"] == 0.5 and dotted["source"]["original_width"] == 48
    declared = read_manifest(output).source_fields
    assert declared["aesthetic"] == ["number"] and declared["url"] == ["string"] and declared["width"] == ["null"]
    assert inspect_output(str(output), verify_shards=True).exit_code == 0


def test_tars_over_http_brace_pattern_and_list_file(tmp_path, make_config, encoders):
    tars = _img2dataset_tars(tmp_path)
    local = tmp_path / "local"
    build(str(tars), local, make_config(captions=("txt",)), encoders=encoders)
    (tars / "shards.txt").write_text("# img2dataset output\n00000.tar\n00001.tar\n")
    with serve(tars) as url:
        for n, source in enumerate([f"{url}/{{00000..00001}}.tar", f"{url}/shards.txt"]):
            remote = tmp_path / f"remote{n}"
            build(source, remote, make_config(captions=("txt",)), encoders=encoders)
            assert _samples(remote) == _samples(local), source
            assert _failures(remote) == _failures(local)


def test_missing_shard_of_a_pattern_is_one_clear_line(tmp_path, tiny_models):
    _img2dataset_tars(tmp_path)
    result = CliRunner().invoke(main, ["build", str(tmp_path / "tars" / "{00000..00002}.tar"), str(tmp_path / "out"),
                                       "--captions", "txt", "--vae", str(tiny_models), "--vae-subfolder", "vae",
                                       "--t5", str(tiny_models), "--resolution", "256", "--device", "cpu",
                                       "--no-progress"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: shard ") and "00002.tar does not exist" in result.output


# ---- Parquet and Hugging Face datasets -----------------------------------------------------

def _rows() -> dict[str, list]:
    return {"key": [k for k, *_ in IMAGES], "caption": [c for *_, c in IMAGES],
            "aesthetic": [METADATA[k]["aesthetic"] for k, *_ in IMAGES],
            "pwatermark": [METADATA[k]["pwatermark"] for k, *_ in IMAGES],
            "punsafe": [METADATA[k].get("punsafe") for k, *_ in IMAGES]}


def test_parquet_with_bytes_struct_and_path_columns(tmp_path, folder_build, make_config, encoders):
    images = [_image_bytes(k) for k, *_ in IMAGES]
    folder = _folder(tmp_path)
    paths = sorted(p.name for p in folder.iterdir() if p.suffix != ".txt")
    tables = {
        "bytes": pa.table({**_rows(), "jpg": pa.array(images, pa.binary())}),
        "struct": pa.table({**_rows(), "image": [{"bytes": b, "path": p} for b, p in zip(images, paths)]}),
        "path": pa.table({**_rows(), "image": paths}),
    }
    for kind, table in tables.items():
        source = tmp_path / f"{kind}.parquet"
        pq.write_table(table, source, row_group_size=2)
        output = tmp_path / f"out-{kind}"
        config = make_config(captions=("caption",), image_root=str(folder) if kind == "path" else None)
        summary = build(str(source), output, config, encoders=encoders)
        assert summary.written == 5 and summary.skipped == 0, kind
        _assert_same_encodings_renamed(output, folder_build)
        sample = json.loads(_by_caption_field(output)["three green apples"]["json"])
        assert sample["source"]["aesthetic"] == 5.5 and sample["source"]["key"] == "000000002"


def test_images_past_gather_memory_wait_on_disk_and_come_back_whole(tmp_path, make_config, encoders):
    """--gather-memory 0: every image of a shard still being gathered waits in a file under
    --staging-dir; the shards are the same bytes, and nothing is left behind."""
    source = tmp_path / "laion.parquet"
    pq.write_table(pa.table({**_rows(), "jpg": pa.array([_image_bytes(k) for k, *_ in IMAGES], pa.binary())}),
                   source, row_group_size=2)
    staging = tmp_path / "staging"
    staging.mkdir()
    outputs = {}
    for memory in (1 << 30, 0):
        outputs[memory] = tmp_path / f"out-{memory}"
        config = make_config(captions=("caption",), keep_images=True, gather_memory=memory, staging_dir=str(staging))
        summary = build(str(source), outputs[memory], config, encoders=encoders)
        assert summary.written == 5 and summary.skipped == 0
    assert len(list((outputs[0] / "shards").glob("*.tar"))) > 1
    assert _samples(outputs[0]) == _samples(outputs[1 << 30])
    assert list(staging.iterdir()) == []


def _by_caption_field(output: Path) -> dict[str, dict[str, bytes]]:
    return {json.loads(s["json"])["captions"]["caption"]: s for s in _samples(output).values()}


def _assert_same_encodings_renamed(got: Path, expected: Path, field: str = "caption") -> None:
    """As _assert_same_encodings, for a build whose caption field is not ``txt``."""
    ours, theirs = _by_caption_field(got), _by_caption(expected)
    assert sorted(ours) == sorted(theirs)
    for caption, sample in theirs.items():
        assert ours[caption]["latent.npy"] == sample["latent.npy"]
        assert ours[caption][f"t5_{field}.npy"] == sample["t5_txt.npy"]


def test_parquet_null_image_is_a_skip_and_image_column_is_checked(tmp_path, make_config, encoders):
    source = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"jpg": pa.array([_image_bytes("000000000"), None], pa.binary()),
                             "caption": ["one", "two"]}), source)
    summary = build(str(source), tmp_path / "out", make_config(captions=("caption",)), encoders=encoders)
    assert summary.written == 1 and summary.skipped_by_reason == {"missing_image": 1}
    result = CliRunner().invoke(main, ["build", str(source), str(tmp_path / "out2"), "--image-column", "photo"])
    assert result.exit_code == 2 and "has no column 'photo'" in result.output and "Traceback" not in result.output


@pytest.mark.timeout(300)
def test_parquet_paths_and_cells_are_read_as_image_files_are(tmp_path, make_config, encoders):
    """A path column's paths stay inside --image-root (symbolic links resolved); image files and
    cells are held to --max-image-bytes; a FIFO named like a table is one line, never opened."""
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(_image_bytes("000000000"))
    (root / "big.png").write_bytes(_image_bytes("000000001"))
    (tmp_path / "outside.png").write_bytes(_image_bytes("000000001"))
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    paths = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"image": ["a.jpg", "big.png", "link.png", "../outside.png"],
                             "caption": ["one", "two", "three", "four"]}), paths)
    bound = len(_image_bytes("000000000")) + 100
    config = make_config(captions=("caption",), image_root=str(root), max_image_bytes=bound)
    summary = build(str(paths), tmp_path / "out", config, encoders=encoders)
    assert summary.written == 1
    assert {f["source"]: f["reason"] for f in _failures(tmp_path / "out")} == {
        "big.png": "file_too_large", "link.png": "path_outside_root", "../outside.png": "path_outside_root"}
    cells = tmp_path / "cells.parquet"
    pq.write_table(pa.table({"jpg": pa.array([_image_bytes("000000000"), _image_bytes("000000001")], pa.binary()),
                             "caption": ["one", "two"]}), cells)
    summary = build(str(cells), tmp_path / "out-cells", make_config(captions=("caption",), max_image_bytes=bound),
                    encoders=encoders)
    (skip,) = _failures(tmp_path / "out-cells")
    assert summary.written == 1 and (skip["source"], skip["reason"]) == ("cells.parquet#1", "file_too_large")
    fifos = tmp_path / "fifos"
    fifos.mkdir()
    os.mkfifo(fifos / "part-0.parquet")
    result = CliRunner().invoke(main, ["build", str(fifos / "*.parquet"), str(tmp_path / "out-fifo")])
    assert result.exit_code == 2 and "is a FIFO (named pipe), not a regular file" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_hf_dataset_saved_to_disk_and_to_parquet(tmp_path, folder_build, make_config, encoders):
    datasets = pytest.importorskip("datasets")
    images = [{"bytes": _image_bytes(k), "path": f"{k}.img"} for k, *_ in IMAGES]
    dataset = datasets.Dataset.from_dict({"image": images, **_rows()}).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "train.parquet"))
    for source in (tmp_path / "saved", tmp_path / "train.parquet"):
        output = tmp_path / f"out-{source.name}"
        summary = build(str(source), output, make_config(captions=("caption",)), encoders=encoders)
        assert summary.written == 5 and summary.skipped == 0, source
        _assert_same_encodings_renamed(output, folder_build)
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "dict"))
    result = CliRunner().invoke(main, ["build", str(tmp_path / "dict"), str(tmp_path / "out3")])
    assert result.exit_code == 2 and "pass one split's folder" in result.output


# ---- filters, --min-image-size, --dedup ---------------------------------------------------

def test_filters_and_min_image_size_are_recorded_skips(tmp_path, make_config, encoders):
    tars = _img2dataset_tars(tmp_path)
    config = make_config(captions=("txt",), filters=("pwatermark < 0.5", "punsafe < 0.1 and aesthetic >= 5"),
                         min_image_size=45)
    output = tmp_path / "out"
    summary = build(str(tars), output, config, encoders=encoders)
    assert summary.records_read == summary.written + summary.skipped
    reasons = {f["source"].rsplit("/", 1)[-1]: f["reason"] for f in _failures(output)}
    assert reasons["000000001"] == "filtered: pwatermark < 0.5"
    assert reasons["000000003"] == "filtered: punsafe < 0.1 and aesthetic >= 5"  # it has no punsafe
    assert reasons["000000004"] == "filtered: punsafe < 0.1 and aesthetic >= 5"
    assert reasons["000000010"] == "missing_image"
    kept = {json.loads(s["json"])["source"]["key"] for s in _samples(output).values()}
    assert kept == {"000000000", "000000002"}
    small = build(str(tars), tmp_path / "small", make_config(captions=("txt",), min_image_size=50), encoders=encoders)
    detail = next(f for f in _failures(tmp_path / "small") if f["source"].endswith("000000000"))
    assert detail["reason"] == "filtered: --min-image-size 50" and "64x48" in detail["detail"]
    assert small.skipped_by_reason["filtered: --min-image-size 50"] == 4  # all but the 56x56 one


@pytest.mark.parametrize("expression,message", [
    ("aesthetic >", "ends early"),
    ("aesthetic >= 5 and", "ends early"),
    ("__import__('os')", "expected a comparison"),
    ("(" * 40 + "a > 1" + ")" * 40, "nesting deeper than 32"),
    ("a > 1; b", "cannot read"),
])
def test_bad_filter_is_one_line_naming_the_place(tmp_path, expression, message):
    result = CliRunner().invoke(main, ["build", str(tmp_path), str(tmp_path / "out"), "--filter", expression])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_an_output_begun_before_the_record_options_existed_resumes(tmp_path, toy_build, toy_dataset, make_config,
                                                                   encoders):
    """A manifest and plan that do not record options added since count them as their defaults."""
    import hashlib
    import shutil

    output = tmp_path / "out"
    shutil.copytree(toy_build, output)
    added = ("image_column", "filters", "min_image_size", "dedup", "max_image_bytes", "follow_symlinks_outside_root")
    manifest = json.loads((output / "manifest.json").read_text())
    plan = json.loads((output / "plan.json").read_text())["plan"]
    for config in (manifest["config"], plan["config"]):
        for name in added:
            config.pop(name, None)
    (output / "manifest.json").write_text(json.dumps(manifest))
    body = json.dumps(plan, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    (output / "plan.json").write_text(f'{{"sha256":"{hashlib.sha256(body.encode()).hexdigest()}","plan":{body}}}\n')
    summary = build(str(toy_dataset), output, make_config(), encoders=encoders)
    assert summary.shards_reused == summary.shards > 0 and summary.written_this_run == 0


def _duplicated_parquet(tmp_path: Path) -> Path:
    """Rows 2 and 5 repeat row 0's image; row 3 repeats row 1's, whose first copy has no caption."""
    keys = ["000000000", "000000001", "000000000", "000000001", "000000002", "000000000", "000000003"]
    captions = ["a", None, "b", "c", "d", "e", "f"]
    source = tmp_path / "dups.parquet"
    pq.write_table(pa.table({"jpg": pa.array([_image_bytes(k) for k in keys], pa.binary()), "caption": captions,
                             "row": list(range(len(keys)))}), source, row_group_size=3)
    return source


def test_dedup_skips_later_copies_naming_the_first_kept(tmp_path, make_config, encoders):
    output = tmp_path / "out"
    summary = build(str(_duplicated_parquet(tmp_path)), output, make_config(captions=("caption",), dedup=True),
                    encoders=encoders)
    assert summary.written == 4
    skips = {f["index"]: (f["reason"], f["detail"]) for f in _failures(output)}
    assert skips[1][0] == "missing_caption"
    assert skips[2] == ("duplicate_image", "image bytes equal those of record 0, the first with them")
    assert skips[5][0] == "duplicate_image" and "record 0" in skips[5][1]
    assert 3 not in skips  # its first copy had no caption: this one is kept
    without = build(str(_duplicated_parquet(tmp_path)), tmp_path / "all", make_config(captions=("caption",)),
                    encoders=encoders)
    assert without.written == 6


def test_dedup_holds_across_kill_and_resume(tmp_path, make_config, encoders):
    from test_resilience import _KILL_DRIVER, _files

    source = _duplicated_parquet(tmp_path)
    config = make_config(captions=("caption",), dedup=True, shard_max_count=2, batch_size=1)
    clean = tmp_path / "clean"
    build(str(source), clean, config, encoders=encoders)
    output = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", _KILL_DRIVER, "between_shards", "2", str(source), str(output),
                            json.dumps(config.to_json())], capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stdout + child.stderr
    summary = build(str(source), output, config, encoders=encoders)
    assert summary.shards_reused >= 1 and summary.skipped_by_reason["duplicate_image"] == 2
    assert _files(output) == _files(clean)
    assert read_manifest(output).source_fields == {"row": ["number"]}


def test_dedup_reads_image_files_of_a_folder_source(tmp_path, make_config, encoders):
    folder = _folder(tmp_path)
    (folder / "zz-copy.png").write_bytes(_image_bytes("000000001"))
    (folder / "zz-copy.txt").write_text("the same lighthouse again")
    summary = build(str(folder), tmp_path / "out", make_config(captions=("txt",), dedup=True), encoders=encoders)
    assert summary.written == 5 and summary.skipped_by_reason == {"duplicate_image": 1}
    (skip,) = _failures(tmp_path / "out")
    assert skip["source"] == "zz-copy.png" and skip["detail"].startswith("image bytes equal those of record 1,")


def test_untrusted_tar_members_become_recorded_problems(tmp_path):
    from shardkit.sources import iter_records, resolve_source

    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, "a.jpg", _image_bytes("000000000"))
        _add(tar, "a.txt", b"\xff\xfe not utf-8")
        link = tarfile.TarInfo("b.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        _add(tar, "b.txt", b"a link is never followed")
        _add(tar, "c.jpg", _image_bytes("000000001"))
        _add(tar, "c.json", b"[" * 100_000)
        _add(tar, "d.jpg", _image_bytes("000000002"))
        _add(tar, "d.txt", b"x" * (1024 * 1024 + 1))  # a caption member is bounded as a caption file is
        _add(tar, "e.jpg", _image_bytes("000000003"))
        _add(tar, "e.json", b'{"caption": "from the json", "aesthetic": 5}')
    records = {r.source_key: r for r in iter_records(resolve_source(shard), ("caption",))}
    assert records["a"].captions == {} and records["a"].image_bytes == _image_bytes("000000000")
    assert records["b"].image_bytes is None and records["b"].source_problem is None  # planned as missing_image
    assert records["c"].source_problem == ("invalid_metadata", "00000.tar/c.json is not a JSON object (nested too deeply)")
    records = {r.source_key: r for r in iter_records(resolve_source(shard), ("txt",))}
    assert records["a"].captions == {"txt": None}  # planned as invalid_caption
    assert records["d"].source_problem == ("file_too_large", "00000.tar/d.txt holds 1048577 bytes, over the limit of "
                                                             "1048576 bytes (captions are read up to 1048576 bytes)")
    assert records["e"].metadata == {"caption": "from the json", "aesthetic": 5}
    # An image member over --max-image-bytes is refused by its header, before it is read.
    bound = len(_image_bytes("000000003"))  # e.jpg's size: c.jpg holds more
    records = {r.source_key: r for r in iter_records(resolve_source(shard, max_image_bytes=bound), ("txt",))}
    assert records["e"].source_problem is None and records["e"].image_bytes == _image_bytes("000000003")
    assert records["c"].source_problem == ("file_too_large", f"00000.tar/c.jpg holds {len(_image_bytes('000000001'))} "
                                                             f"bytes, over the limit of {bound} bytes (--max-image-bytes)")


def test_deeply_nested_metadata_is_a_recorded_problem_not_a_crash(tmp_path):
    from shardkit.sources import iter_records, resolve_source

    deep = 1
    for _ in range(40):
        deep = [deep]
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, extra in (("flat", {"tags": [["a"]]}), ("deep", {"tags": deep})):
            _add(tar, f"{key}.jpg", _image_bytes("000000000"))
            _add(tar, f"{key}.json", json.dumps({"caption": key, **extra}).encode())
    records = {r.source_key: r for r in iter_records(resolve_source(shard), ("caption",))}
    assert records["flat"].source_problem is None and records["flat"].metadata == {"tags": [["a"]]}
    assert records["deep"].source_problem[0] == "invalid_metadata"
    assert "more than 32 levels deep" in records["deep"].source_problem[1]

    column_type = pa.int64()
    for _ in range(40):
        column_type = pa.list_(column_type)
    table = pa.table({"jpg": pa.array([_image_bytes("000000000")] * 2, pa.binary()), "caption": ["a", "b"],
                      "tags": pa.array([None, deep], column_type)})
    pq.write_table(table, tmp_path / "deep.parquet")
    first, second = iter_records(resolve_source(tmp_path / "deep.parquet"), ("caption",))
    assert first.source_problem is None and first.metadata == {"tags": None}
    assert second.source_problem == ("invalid_metadata", "row 1 of deep.parquet nests lists or objects more than 32 "
                                                         "levels deep")
