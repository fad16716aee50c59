"""Sources: the three layouts, header-read sizes, fail-fast metadata errors."""

from __future__ import annotations

import datetime
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from shardkit.errors import SourceError
from shardkit.sources import iter_records, make_key, resolve_source

CAPTIONS = ("prompt", "sharegpt4v")


def _pixart(tmp_path: Path, items) -> Path:
    (tmp_path / "InternImgs").mkdir()
    (tmp_path / "InternData").mkdir()
    (tmp_path / "InternData" / "data_info.json").write_text(json.dumps(items), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("which", ["root", "interndata", "json"])
def test_pixart_layout_is_found_from_root_folder_or_json(tmp_path, which):
    root = _pixart(tmp_path, [{"path": "a.jpg", "width": 4, "height": 2, "ratio": 0.5, "prompt": "p", "sharegpt4v": "s"}])
    source = {"root": root, "interndata": root / "InternData", "json": root / "InternData" / "data_info.json"}[which]
    spec = resolve_source(source)
    assert spec.kind == "pixart" and spec.image_root == root / "InternImgs"
    (record,) = iter_records(spec, CAPTIONS)
    assert (record.path, record.width, record.height) == ("a.jpg", 4, 2)
    assert record.captions == {"prompt": "p", "sharegpt4v": "s"}
    assert record.location == root / "InternImgs" / "a.jpg"


def test_image_folder_with_same_stem_captions_is_searched_recursively(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    Image.new("RGB", (8, 4)).save(tmp_path / "b.png")
    Image.new("RGB", (8, 4)).save(tmp_path / "sub" / "deeper" / "a.jpg")
    (tmp_path / "sub" / "deeper" / "a.txt").write_text("a caption\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a caption of anything")
    records = list(iter_records(resolve_source(tmp_path), CAPTIONS))
    assert [r.path for r in records] == ["b.png", "sub/deeper/a.jpg"]
    assert records[0].captions == {}  # skipped downstream as missing_caption
    assert records[1].captions == {"prompt": "a caption"}
    assert records[1].width is None  # read from the header later, never from pixels here


def test_jsonl_source_with_image_root(tmp_path):
    lines = [{"path": "x/1.jpg", "prompt": "one"}, {"path": "2.jpg", "prompt": "two", "width": 3, "height": 5}]
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(json.dumps(l) for l in lines) + "\n\n", encoding="utf-8")
    records = list(iter_records(resolve_source(meta, image_root=str(tmp_path / "imgs")), CAPTIONS))
    assert [r.location for r in records] == [tmp_path / "imgs" / "x" / "1.jpg", tmp_path / "imgs" / "2.jpg"]
    assert (records[1].width, records[1].height) == (3, 5)


@pytest.mark.parametrize("content,message", [
    ('[{"path": "a.jpg", "prompt": "x"}', "invalid JSON at line 1"),
    ('{"path": "a.jpg"}', "expected a JSON list"),
    ('[{"path": "a.jpg", "width": "wide", "height": 3}]', "data_info.json[0]: 'width' must be a positive whole number"),
    ('[{"path": "a.jpg", "width": 3}]', "give both 'width' and 'height'"),
    ('[{"path": 5}]', "'path' must be a non-empty string"),
    ('[{"path": "a.jpg"}, 7]', "data_info.json[1]: expected an object"),
])
def test_bad_metadata_fails_fast_naming_the_entry(tmp_path, content, message):
    root = _pixart(tmp_path, [])
    (root / "InternData" / "data_info.json").write_text(content, encoding="utf-8")
    with pytest.raises(SourceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        list(iter_records(resolve_source(root), CAPTIONS))


def test_bad_jsonl_line_is_named(tmp_path):
    meta = tmp_path / "m.jsonl"
    meta.write_text('{"path": "a.jpg", "prompt": "x"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(SourceError, match="m.jsonl line 2: invalid JSON"):
        list(iter_records(resolve_source(meta), CAPTIONS))


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(tmp_path / "nope")


def test_keys_are_stable_unique_and_dot_free():
    paths = ["a/b_c.jpg", "a_b/c.jpg", "a.b/c.d.jpg", "über/ü.png", "x" * 300 + ".jpg"]
    keys = [make_key(p) for p in paths]
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k and len(k) <= 81 for k in keys)
    assert keys == [make_key(p) for p in paths]
    assert keys[0].startswith("a_b_c-")


def test_source_kind_is_found_from_what_the_folder_holds(tmp_path):
    from shardkit.sources import expand_braces

    wds = tmp_path / "wds"
    wds.mkdir()
    for name in ("00001.tar", "00000.tar", "00000.parquet", "00000_stats.json"):
        (wds / name).write_bytes(b"")
    spec = resolve_source(wds)
    assert spec.kind == "webdataset" and [f.name for f in spec.files] == ["00000.tar", "00001.tar"]
    Image.new("RGB", (8, 4)).save(wds / "cover.jpg")
    assert resolve_source(wds).kind == "folder"  # images at the top make it an image folder

    (tmp_path / "list.txt").write_text("# shards\nwds/00001.tar\n\n/abs/00009.tar\n")
    listed = resolve_source(tmp_path / "list.txt")
    assert listed.kind == "webdataset" and [str(f) for f in listed.files] == [str(wds / "00001.tar"), "/abs/00009.tar"]
    pattern = resolve_source(str(tmp_path / "wds" / "{00000..00002}.tar"))
    assert [f.name for f in pattern.files] == ["00000.tar", "00001.tar", "00002.tar"]
    assert expand_braces("s3://b/{a,b}/{8..10}.tar") == ["s3://b/a/8.tar", "s3://b/a/9.tar", "s3://b/a/10.tar",
                                                        "s3://b/b/8.tar", "s3://b/b/9.tar", "s3://b/b/10.tar"]
    with pytest.raises(SourceError, match="counts down"):
        resolve_source(str(tmp_path / "{9..1}.tar"))
    with pytest.raises(SourceError, match="neither a .tar shard nor a .parquet file"):
        resolve_source(str(tmp_path / "{a.tar,b.csv}"))
    with pytest.raises(SourceError, match="--image-column names a column of a Parquet"):
        resolve_source(wds / "00000.tar", image_column="jpg")


def test_parquet_folder_streams_rows_in_file_order_with_their_metadata(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "laion"
    folder.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (8, 4)).save(png, "PNG")
    for name, keys in (("part-1.parquet", ["c"]), ("part-0.parquet", ["a", "b"])):
        pq.write_table(pa.table({"key": keys, "thumb": [b"not used"] * len(keys), "jpg": [png.getvalue()] * len(keys),
                                 "caption": [f"caption {k}" for k in keys], "similarity": [0.3] * len(keys),
                                 "when": [datetime.date(2024, 1, 2)] * len(keys)}), folder / name, row_group_size=1)
    spec = resolve_source(folder)
    assert spec.kind == "parquet"
    records = list(iter_records(spec, ("caption",)))
    assert [(r.index, r.path, r.source_key) for r in records] == [
        (0, "part-0.parquet#0", "a"), (1, "part-0.parquet#1", "b"), (2, "part-1.parquet#0", "c")]
    assert records[0].image_bytes == png.getvalue() and records[0].captions == {"caption": "caption a"}
    assert records[0].metadata == {"key": "a", "similarity": 0.3, "when": "2024-01-02"}  # bytes columns are not metadata
    chosen = list(iter_records(resolve_source(folder, image_column="thumb"), ("caption",)))
    assert chosen[0].image_bytes == b"not used"
    with pytest.raises(SourceError, match="column 'similarity' of part-0.parquet is double, not image bytes"):
        resolve_source(folder, image_column="similarity")
