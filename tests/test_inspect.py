"""shardkit inspect: the summary, verification of every byte, the JSON report and the preview picture."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from shardkit.cli import main
from shardkit.summary import token_length_stats
from shardkit.manifest import Manifest, ShardEntry, write_manifest
from shardkit.preview import BAR_COLOUR, CARD_H, FIELD_COLOURS, GAP, axis_top, preview_layout
from shardkit.format import npy_bytes

# The toy build's bucket with three samples, the one most corruptions are made in.
SHARD = "shards/288x224-00000.tar"


# ---- helpers -----------------------------------------------------------------------------

def inspect(*args: str):
    return CliRunner().invoke(main, ["inspect", *args])


def verify_json(output) -> tuple[int, dict]:
    result = inspect(str(output), "--verify", "--json")
    return result.exit_code, json.loads(result.stdout)


def kinds(report: dict) -> set[str]:
    return {f["kind"] for f in report["findings"]}


def finding(report: dict, kind: str) -> dict:
    matches = [f for f in report["findings"] if f["kind"] == kind]
    assert matches, f"no {kind} finding in {report['findings']}"
    return matches[0]


@pytest.fixture
def copy(toy_build, tmp_path) -> Path:
    """A private copy of the shared toy build, free to corrupt."""
    return Path(shutil.copytree(toy_build, tmp_path / "out"))


def read_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            tar.addfile(info, io.BytesIO(payload))


def sample_keys(path: Path) -> list[str]:
    return list(dict.fromkeys(name.split(".", 1)[0] for name, _ in read_members(path)))


def update_manifest(output: Path, change) -> None:
    manifest = Manifest.from_json(json.loads((output / "manifest.json").read_text()))
    change(manifest)
    write_manifest(output, manifest)  # recomputes the totals from the shard entries


def refresh_checksum(output: Path, relative: str) -> None:
    """Make the manifest agree with a rewritten shard, so only the content checks can fire."""
    data = (output / relative).read_bytes()

    def change(manifest: Manifest) -> None:
        entry = next(e for e in manifest.shards if e.path == relative)
        entry.bytes, entry.sha256 = len(data), hashlib.sha256(data).hexdigest()

    update_manifest(output, change)


def rewrite_member(output: Path, relative: str, name: str, transform) -> None:
    """Replace one member's payload (transform(bytes) -> bytes) and refresh the manifest's checksum."""
    path = output / relative
    members = read_members(path)
    assert any(n == name for n, _ in members)
    write_members(path, [(n, transform(p) if n == name else p) for n, p in members])
    refresh_checksum(output, relative)


def npy_transform(change):
    def transform(payload: bytes) -> bytes:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
        return npy_bytes(change(array))
    return transform


def put_nan_in_t5(output: Path, key: str, index: tuple[int, int]) -> None:
    """A NaN at ``index`` of the sample's prompt T5 features in SHARD (checksum refreshed)."""
    def poison(array):
        array = array.copy()
        array[index] = np.nan
        return array

    rewrite_member(output, SHARD, f"{key}.t5_prompt.npy", npy_transform(poison))


def member_payload_offset(path: Path, name: str) -> int:
    """File offset of the array data inside a .npy member (past the tar header and the npy header)."""
    with tarfile.open(path) as tar:
        member = tar.getmember(name)
        payload = tar.extractfile(member).read()
    major = payload[6]
    header_len = int.from_bytes(payload[8:10], "little") if major == 1 else int.from_bytes(payload[8:12], "little")
    return member.offset_data + (10 if major == 1 else 12) + header_len


# ---- a sound build -----------------------------------------------------------------------

def test_clean_build_is_sound_and_the_summary_equals_the_shards_contents(toy_build):
    code, report = verify_json(toy_build)
    assert code == 0 and report["sound"] is True and report["findings"] == [] and report["warnings"] == []
    manifest = json.loads((toy_build / "manifest.json").read_text())
    summary = report["summary"]

    # Count what the tars really hold, independently of shardkit's reader.
    per_bucket: dict[str, int] = {}
    lengths: dict[str, list[int]] = {"prompt": [], "sharegpt4v": []}
    for shard in manifest["shards"]:
        path = toy_build / shard["path"]
        members = dict(read_members(path))
        keys = sample_keys(path)
        per_bucket[shard["bucket"]] = per_bucket.get(shard["bucket"], 0) + len(keys)
        for key in keys:
            for field in json.loads(members[f"{key}.json"])["t5_fields"]:
                lengths[field].append(np.load(io.BytesIO(members[f"{key}.t5_{field}.npy"])).shape[0])
        assert path.stat().st_size == shard["bytes"]

    assert summary["samples"] == manifest["totals"]["samples"] == sum(per_bucket.values()) == 17
    assert summary["shards"] == manifest["totals"]["shards"] == len(list((toy_build / "shards").glob("*.tar")))
    assert summary["bytes"] == manifest["totals"]["bytes"] == sum(p.stat().st_size for p in (toy_build / "shards").glob("*.tar"))
    assert {b["bucket"]: b["samples"] for b in summary["buckets"]} == per_bucket
    assert {b["bucket"]: [b["height"], b["width"]] for b in summary["buckets"]} == \
        {k: v["hw"] for k, v in manifest["totals"]["per_bucket"].items()}
    assert report["verification"]["samples_checked"] == 17
    assert report["verification"]["samples_per_bucket"] == per_bucket
    for stats in summary["token_lengths"]:
        real = np.array(lengths[stats["field"]])
        assert stats["captions"] == len(real)
        assert (stats["min"], stats["max"]) == (real.min(), real.max())
        assert stats["median"] == np.median(real)
        assert stats["p95"] == np.percentile(real, 95, method="inverted_cdf")
        assert stats["truncated"] == int((real == 300).sum()) and stats["max_length"] == 300
    assert summary["encoders"]["vae"]["latent_channels"] == 4 and summary["encoders"]["t5"]["hidden_size"] == 32
    assert summary["skipped_by_reason"] == manifest["skipped_by_reason"]


def test_text_summary_lists_buckets_tokens_and_encoders(toy_build):
    result = inspect(str(toy_build), "--verify", "--no-progress")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "17 samples in 13 shards" in out and "sound:" in out
    assert "1.29      288x224          3       1" in out
    assert "prompt" in out and "sharegpt4v" in out and "AutoencoderKL" in out and "T5EncoderModel" in out


def test_summary_without_verify_reads_only_the_manifest(copy):
    shutil.rmtree(copy / "shards")
    result = inspect(str(copy), "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["verified"] is False and report["summary"]["samples"] == 17 and "findings" not in report


def test_verification_streams_each_shard_once(toy_build, monkeypatch):
    from shardkit.manifest import ShardSet

    opened: list[str] = []
    real_open = ShardSet.open

    def counting_open(self, relative):
        opened.append(relative)
        return real_open(self, relative)

    monkeypatch.setattr(ShardSet, "open", counting_open)
    code, report = verify_json(toy_build)
    assert code == 0
    shard_opens = [u for u in opened if u.startswith("shards/")]
    assert len(shard_opens) == len(set(shard_opens)) == 13
    assert report["verification"]["bytes_read"] == report["summary"]["bytes"]


def test_token_length_stats_from_a_histogram():
    stats = token_length_stats("prompt", {"10": 1, "20": 2, "300": 1}, 300)
    assert (stats.min, stats.median, stats.p95, stats.max) == (10, 20.0, 300, 300)
    assert stats.truncated == 1 and stats.truncated_share == 0.25
    even = token_length_stats("prompt", {"10": 1, "20": 1}, 300)
    assert even.median == 15.0 and even.truncated == 0


# ---- corruptions, each found and named ---------------------------------------------------

def test_flipped_latent_byte_fails_the_checksum(copy):
    path = copy / SHARD
    key = sample_keys(path)[1]
    offset = member_payload_offset(path, f"{key}.latent.npy")
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01  # low byte of the first fp16 value: a changed value, still finite
    path.write_bytes(bytes(data))
    code, report = verify_json(copy)
    assert code == 1 and kinds(report) == {"sha256_mismatch"}
    assert finding(report, "sha256_mismatch")["shard"] == SHARD


def test_latent_byte_flipped_to_nan_fails_checksum_and_value_check(copy):
    path = copy / SHARD
    key = sample_keys(path)[1]
    offset = member_payload_offset(path, f"{key}.latent.npy")
    data = bytearray(path.read_bytes())
    data[offset + 1] = 0x7E  # high byte of an fp16: all-ones exponent, non-zero mantissa = NaN
    path.write_bytes(bytes(data))
    code, report = verify_json(copy)
    assert code == 1 and kinds(report) == {"sha256_mismatch", "non_finite"}
    nan = finding(report, "non_finite")
    assert (nan["shard"], nan["key"]) == (SHARD, key) and "latent" in nan["message"] and "1 NaN" in nan["message"]


def test_negative_std_is_found(copy):
    path = copy / SHARD
    key = sample_keys(path)[0]
    latent = np.load(io.BytesIO(dict(read_members(path))[f"{key}.latent.npy"]))
    std_index = 4 * latent.shape[1] * latent.shape[2]  # first value of channel C=4: the std half
    assert latent.reshape(-1)[std_index] > 0
    offset = member_payload_offset(path, f"{key}.latent.npy") + 2 * std_index
    data = bytearray(path.read_bytes())
    data[offset + 1] ^= 0x80  # the fp16 sign bit
    path.write_bytes(bytes(data))
    code, report = verify_json(copy)
    assert code == 1 and kinds(report) == {"sha256_mismatch", "negative_std"}
    assert finding(report, "negative_std")["key"] == key


@pytest.mark.parametrize("cut", ["inside_a_member", "at_a_member_boundary"])
def test_truncated_shard(copy, cut):
    path = copy / SHARD
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    middle = members[len(members) // 2]
    size = middle.offset_data + middle.size // 2 if cut == "inside_a_member" else middle.offset
    path.write_bytes(path.read_bytes()[:size])
    code, report = verify_json(copy)
    assert code == 1
    assert {"truncated_tar", "size_mismatch", "sha256_mismatch", "count_mismatch"} <= kinds(report)
    assert finding(report, "truncated_tar")["shard"] == SHARD
    assert f"is {size} bytes" in finding(report, "size_mismatch")["message"]


def test_damaged_tar_header(copy):
    path = copy / SHARD
    with tarfile.open(path) as tar:
        header = tar.getmembers()[4].offset
    data = bytearray(path.read_bytes())
    data[header + 3] ^= 0x20  # the member's name: its header checksum no longer matches
    path.write_bytes(bytes(data))
    refresh_checksum(copy, SHARD)
    code, report = verify_json(copy)
    assert code == 1 and "unreadable_member" in kinds(report)
    assert f"header at byte {header}" in finding(report, "unreadable_member")["message"]


@pytest.mark.parametrize("suffix", ["t5_prompt.npy", "latent.npy", "json", "jpg"])
def test_member_deleted_from_a_sample(copy, suffix):
    path = copy / SHARD
    members = read_members(path)
    keys = sample_keys(path)
    meta = {k: json.loads(dict(members)[f"{k}.json"]) for k in keys}
    key = next(k for k in keys if suffix != "jpg" or meta[k]["image_ext"] == "jpg")
    write_members(path, [(n, p) for n, p in members if n != f"{key}.{suffix}"])
    refresh_checksum(copy, SHARD)
    code, report = verify_json(copy)
    assert code == 1 and kinds(report) == {"incomplete_sample"}
    missing = finding(report, "incomplete_sample")
    assert (missing["shard"], missing["key"]) == (SHARD, key) and f"{key}.{suffix}" in missing["message"]


def test_duplicate_key_planted_in_a_second_shard(copy):
    members = read_members(copy / SHARD)
    key = sample_keys(copy / SHARD)[0]
    planted = [(n, p) for n, p in members if n.startswith(key + ".")]
    second = "shards/288x224-00001.tar"
    write_members(copy / second, planted)
    data = (copy / second).read_bytes()
    meta = json.loads(dict(planted)[f"{key}.json"])

    def add_entry(manifest: Manifest) -> None:
        manifest.shards.append(ShardEntry(path=second, bucket="1.29", bucket_hw=[288, 224], samples=1, bytes=len(data),
                                          sha256=hashlib.sha256(data).hexdigest(),
                                          token_lengths={f: {str(n): 1} for f, n in meta["t5_lengths"].items()}))

    update_manifest(copy, add_entry)
    code, report = verify_json(copy)
    assert code == 1 and kinds(report) == {"duplicate_key"}
    duplicate = finding(report, "duplicate_key")
    assert (duplicate["shard"], duplicate["key"]) == (second, key) and SHARD in duplicate["message"]


def test_latent_of_the_wrong_shape_for_its_bucket(copy):
    key = sample_keys(copy / SHARD)[2]
    rewrite_member(copy, SHARD, f"{key}.latent.npy",
                   npy_transform(lambda a: np.abs(np.resize(a, (8, 36 + 2, 28)))))  # bucket 288x224 needs [8, 36, 28]
    code, report = verify_json(copy)
    assert code == 1 and kinds(report) == {"latent_shape"}
    wrong = finding(report, "latent_shape")
    assert wrong["key"] == key and "[8, 38, 28]" in wrong["message"] and "[8, 36, 28]" in wrong["message"]


def test_nan_in_a_t5_entry(copy):
    key = sample_keys(copy / SHARD)[1]

    put_nan_in_t5(copy, key, (3, 5))
    code, report = verify_json(copy)
    assert code == 1 and kinds(report) == {"non_finite"}
    nan = finding(report, "non_finite")
    assert nan["key"] == key and "t5_prompt" in nan["message"] and "[3, 5]" in nan["message"]


def test_shard_missing_from_disk(copy):
    (copy / "shards/128x512-00000.tar").unlink()
    code, report = verify_json(copy)
    assert code == 1 and kinds(report) == {"missing_shard", "count_mismatch"}
    assert finding(report, "missing_shard")["shard"] == "shards/128x512-00000.tar"
    assert "bucket 0.25" in finding(report, "count_mismatch")["message"]


def test_extra_unlisted_shard_and_partial_temp_file(copy):
    shutil.copy(copy / SHARD, copy / "shards/288x224-00007.tar")
    (copy / "shards/.partial-1.0-00003.tar").write_bytes(b"half written")
    code, report = verify_json(copy)
    assert code == 1 and kinds(report) == {"unlisted_shard"}
    assert finding(report, "unlisted_shard")["shard"] == "shards/288x224-00007.tar"
    assert [w["kind"] for w in report["warnings"]] == ["partial_shard"]


def test_partial_temp_file_alone_is_a_warning_not_a_failure(copy):
    (copy / "shards/.partial-1.0-00003.tar").write_bytes(b"half written")
    code, report = verify_json(copy)
    assert code == 0 and report["sound"] is True
    assert report["warnings"][0]["shard"] == "shards/.partial-1.0-00003.tar"


def _store_fp32(array):
    return array.astype(np.float32)


def _narrow_t5(array):
    return array[:, :16]


def _drop_last_token(array):
    return array[:-1]


@pytest.mark.parametrize("suffix, transform, kind", [
    ("latent.npy", npy_transform(_store_fp32), "dtype"),
    ("t5_sharegpt4v.npy", npy_transform(_narrow_t5), "t5_shape"),
    ("t5_prompt.npy", npy_transform(_drop_last_token), "t5_shape"),
    ("latent.npy", lambda payload: b"not an npy file", "unreadable_member"),
])
def test_member_content_checks(copy, suffix, transform, kind):
    key = sample_keys(copy / SHARD)[0]
    rewrite_member(copy, SHARD, f"{key}.{suffix}", transform)
    code, report = verify_json(copy)
    assert code == 1 and kinds(report) == {kind}
    assert finding(report, kind)["key"] == key


def test_dotted_key(copy):
    path = copy / SHARD
    members = read_members(path)
    key = sample_keys(path)[1]
    dotted = key.replace("-", ".", 1)
    renamed = []
    for name, payload in members:
        if name.startswith(key + "."):
            if name.endswith(".json"):
                payload = json.dumps({**json.loads(payload), "key": dotted}).encode()
            name = dotted + name[len(key):]
        renamed.append((name, payload))
    write_members(path, renamed)
    refresh_checksum(copy, SHARD)
    code, report = verify_json(copy)
    assert code == 1 and kinds(report) == {"dotted_key"}
    assert finding(report, "dotted_key")["key"] == dotted


def test_members_of_a_sample_not_adjacent(copy):
    path = copy / SHARD
    members = read_members(path)
    key = sample_keys(path)[0]
    moved = [m for m in members if m[0] == f"{key}.t5_sharegpt4v.npy"]
    write_members(path, [m for m in members if m not in moved] + moved)
    refresh_checksum(copy, SHARD)
    code, report = verify_json(copy)
    assert code == 1 and {"non_adjacent_members", "incomplete_sample"} <= kinds(report)
    assert finding(report, "non_adjacent_members")["key"] == key


def test_manifest_counts_and_status(copy):
    def change(manifest: Manifest) -> None:
        next(e for e in manifest.shards if e.path == SHARD).samples += 1
        manifest.status = "in_progress"

    update_manifest(copy, change)
    code, report = verify_json(copy)
    assert code == 1 and kinds(report) == {"count_mismatch", "build_incomplete"}
    shards = {f["shard"] for f in report["findings"] if f["kind"] == "count_mismatch"}
    assert shards == {SHARD, None}  # the shard's count and its bucket's total


def test_text_report_names_each_problem(copy):
    (copy / "shards/128x512-00000.tar").unlink()
    key = sample_keys(copy / SHARD)[1]
    rewrite_member(copy, SHARD, f"{key}.latent.npy", npy_transform(lambda a: a.astype(np.float32)))
    text = inspect(str(copy), "--verify", "--no-progress")
    assert text.exit_code == 1
    report = json.loads(inspect(str(copy), "--verify", "--json").stdout)
    lines = text.stdout.splitlines()
    for f in report["findings"]:
        assert any(f["kind"] in line and (f["shard"] or "") in line and (f["key"] or "") in line for line in lines), f


def test_reads_any_fsspec_filesystem(toy_build):
    memory = fsspec.filesystem("memory")
    root = "/inspect-test-set"
    try:
        for path in toy_build.rglob("*"):
            if path.is_file():
                memory.pipe(f"{root}/{path.relative_to(toy_build).as_posix()}", path.read_bytes())
        code, report = verify_json(f"memory://{root}")
        assert code == 0 and report["summary"]["samples"] == 17 and report["verification"]["shards_checked"] == 13
        memory.pipe(f"{root}/shards/9.9-00000.tar", b"stray")
        code, report = verify_json(f"memory://{root}")
        assert code == 1 and kinds(report) == {"unlisted_shard"}
    finally:
        memory.rm(root, recursive=True)


def test_report_does_not_depend_on_how_many_shards_are_verified_at_once(copy):
    """Damage in three shards (a NaN, a cut, a missing file) among sound ones: the same findings, in
    the same order, with one thread or eight."""
    key = sample_keys(copy / SHARD)[1]
    put_nan_in_t5(copy, key, (0, 0))
    others = sorted(p for p in (copy / "shards").glob("*.tar") if p.name != Path(SHARD).name)
    cut = others[0].read_bytes()
    others[0].write_bytes(cut[:len(cut) // 2])
    others[-1].unlink()
    reports = []
    for jobs in ("1", "8"):
        result = inspect(str(copy), "--verify", "--json", "--jobs", jobs)
        assert result.exit_code == 1
        reports.append(json.loads(result.stdout))
    assert reports[0]["findings"] == reports[1]["findings"]
    assert {"non_finite", "truncated_tar", "missing_shard"} <= kinds(reports[0])


def test_shards_are_verified_on_several_threads(toy_build, monkeypatch):
    import threading

    from shardkit.manifest import ShardSet

    both_running = threading.Barrier(2, timeout=20)  # breaks unless two shards are read at once
    original = ShardSet.open
    started = []

    def open_shard(self, relative):
        if relative.startswith("shards/"):
            started.append(relative)
            if len(started) <= 2:
                both_running.wait()
        return original(self, relative)

    monkeypatch.setattr(ShardSet, "open", open_shard)
    result = inspect(str(toy_build), "--verify", "--json", "--jobs", "2")
    assert result.exit_code == 0 and json.loads(result.stdout)["verification"]["shards_checked"] == 13


def test_user_errors_exit_2_with_one_line(tmp_path, toy_build):
    missing = inspect(str(tmp_path / "nowhere"))
    assert missing.exit_code == 2 and missing.stderr.startswith("error: no manifest.json")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    broken = inspect(str(tmp_path / "broken"), "--verify")
    assert broken.exit_code == 2 and "not valid JSON" in broken.stderr and len(broken.stderr.splitlines()) == 1
    stray = inspect(str(toy_build), "--decode-with", "somewhere")
    assert stray.exit_code == 2 and "--preview" in stray.stderr


# ---- the preview picture -----------------------------------------------------------------

@pytest.fixture(scope="module")
def no_images_build(tmp_path_factory, toy_dataset, make_config, encoders) -> Path:
    from shardkit.build import build

    output = tmp_path_factory.mktemp("no-images") / "out"
    build(str(toy_dataset), output, make_config(keep_images=False), encoders=encoders)
    return output


def region(image: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return image[y0:y1, x0:x1]


def colour_mask(pixels: np.ndarray, colour) -> np.ndarray:
    return np.all(pixels == np.array(colour, dtype=np.uint8), axis=-1)


def check_preview_png(path: Path, summary: dict, thumbs_per_bucket: int) -> np.ndarray:
    buckets = summary["buckets"]
    layout = preview_layout(len(buckets), thumbs_per_bucket)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (layout.width, layout.height)
        image = np.asarray(png.convert("RGB"))
    assert image.std() > 20  # not a blank canvas

    # The bar chart: one bar per bucket, its height in proportion to the bucket's samples.
    top = max(b["samples"] for b in buckets)
    plot_height = layout.bar_plot[3] - layout.bar_plot[1]
    heights = []
    for bucket, slot in zip(buckets, layout.bar_slots):
        mask = colour_mask(region(image, slot), BAR_COLOUR)
        columns = mask.any(axis=0).sum()
        heights.append(mask.sum() / columns)
        assert mask.sum() > 0
    scale = heights[int(np.argmax([b["samples"] for b in buckets]))] / top
    for bucket, height in zip(buckets, heights):
        assert abs(height - bucket["samples"] * scale) <= 1.0
    assert scale * axis_top(top) == pytest.approx(plot_height, abs=1)
    assert colour_mask(image, BAR_COLOUR).sum() == sum(colour_mask(region(image, s), BAR_COLOUR).sum() for s in layout.bar_slots)

    # The token histogram: one colour per caption field.
    histogram = region(image, layout.histogram_plot)
    for index, _ in enumerate(summary["token_lengths"]):
        assert colour_mask(histogram, FIELD_COLOURS[index]).sum() > 50

    # Thumbnails: pictures, not empty boxes, where the bucket has samples; nothing beyond.
    for bucket, boxes in zip(buckets, layout.thumbs):
        for slot, box in enumerate(boxes):
            pixels = region(image, box).astype(np.float64)
            if slot < bucket["samples"]:
                assert pixels.std() > 10, (bucket["bucket"], slot)
            else:
                assert pixels.std() < 1, (bucket["bucket"], slot)
    return image


def test_preview_contact_sheet_from_stored_images(toy_build, tmp_path):
    target = tmp_path / "sheet.png"
    result = inspect(str(toy_build), "--preview", str(target), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["preview"]["thumbnail_source"] == "stored_images" and report["preview"]["thumbnails"] == 17
    check_preview_png(target, report["summary"], 4)


def test_preview_thumbs_per_bucket_sets_the_layout(toy_build, tmp_path):
    target = tmp_path / "two.png"
    result = inspect(str(toy_build), "--preview", str(target), "--thumbs-per-bucket", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    check_preview_png(target, report["summary"], 2)
    assert preview_layout(13, 2).columns > preview_layout(13, 4).columns
    for thumbs in (1, 2, 4, 8):
        one_row = preview_layout(1, thumbs)
        for n in range(1, 30):  # one more row of bucket cards for every `columns` buckets
            rows = -(-n // one_row.columns)
            assert preview_layout(n, thumbs).height == one_row.height + (rows - 1) * (CARD_H + GAP)


def test_preview_without_images_draws_latent_channels_and_says_so(no_images_build, tmp_path):
    code, report = verify_json(no_images_build)
    assert code == 0  # a build without images is complete without the image member
    target = tmp_path / "latents.png"
    result = inspect(str(no_images_build), "--preview", str(target), "--no-progress")
    assert result.exit_code == 0
    assert "latent channels" in result.stdout and "--decode-with" in result.stdout
    check_preview_png(target, report["summary"], 4)


def test_preview_decodes_latents_through_a_vae(no_images_build, tiny_models, tmp_path):
    target = tmp_path / "decoded.png"
    result = inspect(str(no_images_build), "--preview", str(target), "--decode-with", str(tiny_models),
                     "--decode-subfolder", "vae", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["preview"]["thumbnail_source"] == "vae_decode" and report["preview"]["thumbnails"] == 17
    check_preview_png(target, report["summary"], 4)
    bad = inspect(str(no_images_build), "--preview", str(target), "--decode-with", str(tmp_path / "no-vae"))
    assert bad.exit_code == 2 and bad.stderr.startswith("error: cannot load the VAE")
