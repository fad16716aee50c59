"""The training reader: PixArt's batch layout, one bucket per batch, exact epochs, equal ranks,
local = HTTP, bad shards, no pickle."""

from __future__ import annotations

import functools
import gc
import gzip
import http.server
import io
import json
import logging
import os
import pickle
import random
import shutil
import tarfile
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from shardkit.buckets import BucketTable
from shardkit.errors import ShardkitError
from shardkit.manifest import Manifest, ShardEntry, write_manifest
import shardkit.reader.collate as collate_module
from shardkit.format import json_bytes, npy_bytes, read_npy, split_member_name
from shardkit.reader import (BatchBuffers, ShardFormatError, ShardReader, ShardInfo, ShardReadError, batches_per_rank,
                             count_batches, derive_seed, plan_reader)
from shardkit.shards import Sample, ShardWriter
from shardkit.tario import iter_tar_samples

FIELDS = ("prompt", "sharegpt4v")
DOWNSAMPLE = 128  # small latents: [2C, 2, 2] for a 256 x 256 bucket


# ---- a synthetic build: exact control over shard sizes and content -------------------------

def write_synthetic_build(output: Path, layout: dict[str, list[int]], *, max_length: int = 12, hidden: int = 4,
                          channels: int = 2, path_of: Callable[[int], str] = lambda i: f"img/{i:04d}.png",
                          has_second: Callable[[int], bool] = lambda i: True, image: bool = False,
                          latent_payload: Callable[[int, np.ndarray], bytes] | None = None) -> dict[str, dict]:
    """Shards ``{bucket: [samples per shard]}`` plus a manifest that verifies sound; returns
    {key: expected content}.

    Sample i has latent mean ``i`` and std ``0.5 + i / 100``, prompt features of ``2 + i % 5``
    rows and second-field features of ``3 + i % 7`` rows (capped at max_length)."""
    table = BucketTable(256)
    entries, expected, index = [], {}, 0
    for bucket_key, sizes in layout.items():
        bucket = table[bucket_key]
        for shard_index, size in enumerate(sizes):
            writer = ShardWriter(output, f"shards/{bucket.tag}-{shard_index:05d}.tar")
            for _ in range(size):
                i = index
                index += 1
                key = f"s{i:04d}-b{bucket_key.replace('.', 'p')}"
                latent_hw = (bucket.height // DOWNSAMPLE, bucket.width // DOWNSAMPLE)
                moments = np.concatenate([np.full((channels, *latent_hw), i, np.float16),
                                          np.full((channels, *latent_hw), 0.5 + i / 100, np.float16)])
                features = {"prompt": _feature(i, min(2 + i % 5, max_length), hidden)}
                if has_second(i):
                    features["sharegpt4v"] = _feature(1000 + i, min(3 + i % 7, max_length), hidden)
                captions = {name: f"{name} of sample {i}" for name in features}
                meta = {"key": key, "path": path_of(i), "source_index": i, "original_hw": [100 + i, 200 + i],
                        "bucket": bucket_key, "bucket_hw": [bucket.height, bucket.width],
                        "aspect_ratio": bucket.ratio, "latent_shape": list(moments.shape), "captions": captions,
                        "t5_fields": list(features), "t5_lengths": {n: f.shape[0] for n, f in features.items()},
                        "image_ext": "png" if image else None}
                members = [("json", json_bytes(meta)), ("txt", captions["prompt"].encode())]
                if image:
                    members.append(("png", f"image bytes {i}".encode()))
                latent_bytes = latent_payload(i, moments) if latent_payload else npy_bytes(moments)
                members.append(("latent.npy", latent_bytes))
                members += [(f"t5_{n}.npy", npy_bytes(f)) for n, f in features.items()]
                writer.add(Sample(key, members))
                expected[key] = {"meta": meta, "moments": moments, "features": features}
            written = writer.commit()
            entries.append(ShardEntry(path=written.path, bucket=bucket_key, bucket_hw=[bucket.height, bucket.width],
                                      samples=written.samples, bytes=written.bytes, sha256=written.sha256))
    manifest = Manifest(config={"captions": list(FIELDS), "max_length": max_length, "store_dtype": "fp16",
                                "resolution": 256, "keep_images": image},
                        encoders={"vae": {"latent_channels": channels, "scaling_factor": 0.5,
                                          "downsample_factor": DOWNSAMPLE},
                                  "t5": {"hidden_size": hidden, "max_length": max_length}},
                        resolution=256, buckets=table.as_json(), shards=entries, status="complete",
                        records_read=index)
    write_manifest(output, manifest)
    return expected


def _feature(seed: int, rows: int, hidden: int) -> np.ndarray:
    return (seed + np.arange(rows * hidden).reshape(rows, hidden) / 64).astype(np.float16)


def stored_samples(build: Path) -> dict[str, dict]:
    """What the shards of a real build hold, read with webdataset: {key: meta, moments, features}."""
    stored = {}
    for shard in sorted((build / "shards").glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            meta = json.loads(sample["json"])
            stored[sample["__key__"]] = {
                "meta": meta,
                "moments": np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False),
                "features": {n: np.load(io.BytesIO(sample[f"t5_{n}.npy"]), allow_pickle=False) for n in meta["t5_fields"]},
            }
    return stored


def _keys(batches) -> list[str]:
    return [key for batch in batches for key in batch["keys"]]


def _loader(dataset, workers: int = 2):
    return DataLoader(dataset, batch_size=None, num_workers=workers, multiprocessing_context="fork" if workers else None)


# ---- layout and content ---------------------------------------------------------------------

def test_batches_are_one_bucket_in_pixart_layout_and_equal_the_stored_arrays(toy_build):
    stored = stored_samples(toy_build)
    dataset = ShardReader(toy_build, batch_size=2, layout="dict", latent="mean", shuffle=False)
    max_length = dataset.max_length
    assert max_length == 300 and dataset.info.caption_channels == 32
    batches = list(dataset)
    assert len(batches) == len(dataset) == 14  # 3 full batches + 11 partial tails at batch size 2
    for batch in batches:
        metas = [stored[k]["meta"] for k in batch["keys"]]
        assert {m["bucket"] for m in metas} == {batch["bucket"]}
        size = len(batch["keys"])
        h, w = metas[0]["bucket_hw"]
        assert batch["latent"].shape == (size, 4, h // 8, w // 8) and batch["latent"].dtype == torch.float16
        assert batch["caption_feature"].shape == (size, 1, max_length, 32)
        assert batch["caption_feature"].dtype == torch.float16
        assert batch["attention_mask"].shape == (size, 1, 1, max_length) and batch["attention_mask"].dtype == torch.int16
        assert batch["data_info"]["img_hw"].dtype == torch.float32 and batch["data_info"]["img_hw"].shape == (size, 2)
        assert batch["data_info"]["aspect_ratio"].shape == (size,)
        for i, key in enumerate(batch["keys"]):
            meta, moments = stored[key]["meta"], stored[key]["moments"]
            field = batch["caption_field"][i]
            assert field == "prompt" and batch["prompt"][i] == meta["captions"]["prompt"]  # real_prompt_ratio=1
            np.testing.assert_array_equal(batch["latent"][i].numpy(), moments[:4])
            feature = stored[key]["features"][field]
            length = meta["t5_lengths"][field]
            got = batch["caption_feature"][i, 0].numpy()
            np.testing.assert_array_equal(got[:length], feature)
            np.testing.assert_array_equal(got[length:], np.repeat(feature[-1:], max_length - length, axis=0))
            mask = batch["attention_mask"][i, 0, 0]
            assert mask[:length].eq(1).all() and mask[length:].eq(0).all() and int(mask.sum()) == length
            assert batch["data_info"]["img_hw"][i].tolist() == meta["original_hw"]
            assert batch["data_info"]["aspect_ratio"][i].item() == pytest.approx(float(meta["bucket"]))


def test_latents_are_drawn_from_the_posterior_reproducibly(toy_build):
    stored = stored_samples(toy_build)

    def batches(**options):
        return list(ShardReader(toy_build, batch_size=2, shuffle=False, **options))

    drawn = batches(seed=5, dtype=torch.float32)
    again = batches(seed=5, dtype=torch.float32)
    other = batches(seed=6, dtype=torch.float32)
    means = batches(latent="mean", dtype=torch.float32)
    scaled = batches(latent="mean", dtype=torch.float32, scale_factor=0.13025)
    keys = _keys(list(ShardReader(toy_build, batch_size=2, shuffle=False, layout="dict")))
    assert isinstance(drawn[0], tuple) and len(drawn[0]) == 4
    flat = lambda bs: torch.cat([b[0].flatten() for b in bs])
    assert torch.equal(flat(drawn), flat(again)) and not torch.equal(flat(drawn), flat(other))
    torch.testing.assert_close(flat(scaled), flat(means) * 0.13025)
    # (latent - mean) / std is standard normal noise.
    start, noise = 0, []
    for batch in drawn:
        for latent in batch[0]:
            moments = torch.from_numpy(stored[keys[start]]["moments"]).float()
            mean, std = moments.chunk(2)
            noise.append(((latent - mean) / std).flatten())
            start += 1
    noise = torch.cat(noise)
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
    assert drawn[0][0].dtype == torch.float32 and drawn[0][1].dtype == torch.float32


def test_caption_field_follows_the_ratio_and_falls_back_to_the_prompt(tmp_path):
    expected = write_synthetic_build(tmp_path, {"1.0": [20], "0.5": [20]}, has_second=lambda i: i % 4 != 0)

    def choices(ratio, seed=0):
        dataset = ShardReader(tmp_path, batch_size=4, layout="dict", real_prompt_ratio=ratio, seed=seed)
        out = {}
        for batch in dataset:
            for i, key in enumerate(batch["keys"]):
                field = batch["caption_field"][i]
                out[key] = field
                feature = expected[key]["features"][field]
                length = feature.shape[0]
                np.testing.assert_array_equal(batch["caption_feature"][i, 0, :length].numpy(), feature)
                assert int(batch["attention_mask"][i].sum()) == length
                assert batch["prompt"][i] == expected[key]["meta"]["captions"][field]
        return out

    everything_second = choices(0.0)
    assert all(field == ("sharegpt4v" if "sharegpt4v" in expected[key]["features"] else "prompt")
               for key, field in everything_second.items())
    assert set(choices(1.0).values()) == {"prompt"}
    mixed = choices(0.5)
    counts = {name: sum(1 for f in mixed.values() if f == name) for name in FIELDS}
    assert counts["prompt"] > 10 and counts["sharegpt4v"] > 10  # 40 samples, 30 with a second field
    assert choices(0.5) == mixed and choices(0.5, seed=1) != mixed


# ---- epochs, shuffling, distribution -----------------------------------------------------------

def test_one_epoch_yields_every_sample_exactly_once(toy_build):
    all_keys = set(stored_samples(toy_build))
    ordered = _keys(ShardReader(toy_build, batch_size=2, layout="dict", shuffle=False))
    assert len(ordered) == len(set(ordered)) == len(all_keys) and set(ordered) == all_keys
    assert ordered == _keys(ShardReader(toy_build, batch_size=2, layout="dict", shuffle=False))

    dataset = ShardReader(toy_build, batch_size=2, layout="dict", seed=1)
    first = _keys(dataset)
    assert sorted(first) == sorted(all_keys) and first == _keys(dataset)  # same epoch, same order
    dataset.set_epoch(1)
    second = _keys(dataset)
    assert sorted(second) == sorted(all_keys) and second != first


def test_two_ranks_of_two_workers_get_equal_batches_and_cover_the_build(toy_build):
    all_keys = set(stored_samples(toy_build))
    for batch_size in (2, 1):
        per_rank = []
        for rank in range(2):
            dataset = ShardReader(toy_build, batch_size=batch_size, layout="dict", rank=rank, world_size=2, seed=3)
            batches = list(_loader(dataset))
            assert all(len(b["keys"]) == batch_size for b in batches)  # several ranks: full batches only
            per_rank.append(_keys(batches))
            assert len(batches) == len(dataset)
        full = count_batches([ShardInfo("", k["meta"]["bucket"], 1) for k in stored_samples(toy_build).values()], batch_size, False)
        assert len(per_rank[0]) == len(per_rank[1]) == (full // 2) * batch_size
        union = per_rank[0] + per_rank[1]
        assert len(union) == len(set(union)) and set(union) <= all_keys
    # Batch size 1: 17 samples, 2 ranks -> 8 each; one sample waits for another epoch.
    assert len(set(union)) == 16


def test_uneven_shards_still_give_every_rank_the_same_number_of_batches(tmp_path):
    layout = {"1.0": [7, 1, 5], "0.5": [3], "2.0": [2, 2, 2, 2, 9]}
    expected = write_synthetic_build(tmp_path, layout)
    shards = ShardReader(tmp_path, batch_size=2).shards
    # Shards dealt round-robin to 2 ranks would give them 12 and 25 samples: one rank would stop early.
    naive = [sum(s.samples for s in shards[rank::2]) for rank in range(2)]
    assert naive[0] != naive[1]
    for world, batch_size in ((2, 2), (3, 3)):
        keys = []
        for rank in range(world):
            dataset = ShardReader(tmp_path, batch_size=batch_size, layout="dict", rank=rank, world_size=world)
            dataset.set_epoch(2)
            batches = list(_loader(dataset))
            quota = batches_per_rank(shards, batch_size, world, keep_partial=False)
            assert len(batches) == len(dataset) == quota == count_batches(shards, batch_size, False) // world
            for batch in batches:
                assert len({expected[k]["meta"]["bucket"] for k in batch["keys"]}) == 1
            keys += _keys(batches)
        assert len(keys) == len(set(keys)) == world * quota * batch_size


def test_the_plan_shares_every_epoch_exactly_for_any_layout():
    rng = random.Random(0)
    for trial in range(60):
        buckets = rng.sample(["0.5", "1.0", "2.0", "0.25"], rng.randint(1, 4))
        shards = [ShardInfo(f"s{trial}-{i}", rng.choice(buckets), rng.randint(1, 9)) for i in range(rng.randint(1, 12))]
        batch_size, world, workers = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 3)
        keep_partial = rng.random() < 0.5
        seen: set[tuple[str, int]] = set()
        for rank in range(world):
            total = 0
            for worker in range(workers):
                plan = plan_reader(shards, batch_size=batch_size, epoch=trial, seed=1, shuffle=trial % 2 == 0,
                                   rank=rank, world_size=world, worker=worker, num_workers=workers,
                                   keep_partial=keep_partial)
                total += len(plan.batches)
                samples = sum(p.stop - p.start for p in plan.pieces)
                assert samples == sum(b.size for b in plan.batches)
                assert all(0 <= p.start < p.stop <= p.shard.samples for p in plan.pieces)
                assert len({p.shard.url for p in plan.pieces}) == len(plan.pieces)
                for batch in plan.batches:
                    assert (batch.bucket, batch.start) not in seen
                    seen.add((batch.bucket, batch.start))
            assert total == batches_per_rank(shards, batch_size, world, keep_partial)
        if world == 1 and keep_partial:
            assert sum(count_batches([s], 1, True) for s in shards) == sum(s.samples for s in shards)
            assert len(seen) == count_batches(shards, batch_size, True)


def test_rank_and_world_size_come_from_the_environment(tmp_path, monkeypatch):
    write_synthetic_build(tmp_path, {"1.0": [6, 6]})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    dataset = ShardReader(tmp_path, batch_size=2, layout="dict")
    assert dataset.distributed() == (1, 3) and len(dataset) == 2
    assert ShardReader(tmp_path, batch_size=2, rank=0, world_size=1).distributed() == (0, 1)
    # A spawned DataLoader worker gets the parent's rank with the pickled dataset.
    assert pickle.loads(pickle.dumps(dataset))._rank == 1


def test_resampled_mode_yields_a_fixed_number_of_batches_per_rank(tmp_path):
    expected = write_synthetic_build(tmp_path, {"1.0": [5, 3], "2.0": [4]})
    for rank in range(2):
        dataset = ShardReader(tmp_path, batch_size=2, layout="dict", resampled=True, batches_per_epoch=7,
                               rank=rank, world_size=2)
        assert len(dataset) == 7
        batches = list(_loader(dataset))
        assert len(batches) == 7
        assert all(len(b["keys"]) == 2 and len({expected[k]["meta"]["bucket"] for k in b["keys"]}) == 1 for b in batches)
    with pytest.raises(ShardkitError, match="resampled"):
        ShardReader(tmp_path, batch_size=2, batches_per_epoch=3)


# ---- sources ------------------------------------------------------------------------------------

@contextmanager
def serve(folder: Path):
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a["keys"] == b["keys"] and a["caption_field"] == b["caption_field"]
        for name in ("latent", "caption_feature", "attention_mask"):
            assert torch.equal(a[name], b[name])
        for name in ("img_hw", "aspect_ratio"):
            assert torch.equal(a["data_info"][name], b["data_info"][name])


def test_http_reads_equal_local_reads_and_the_cache_serves_without_the_server(toy_build, tmp_path):
    options = dict(batch_size=2, layout="dict", seed=7, real_prompt_ratio=0.5)
    local = list(ShardReader(toy_build, **options))
    with serve(toy_build) as url:
        _assert_same_batches(local, list(ShardReader(url, **options)))
        _assert_same_batches(local, list(ShardReader(f"{url}/manifest.json", **options)))
        cached = ShardReader(url, cache_dir=tmp_path / "cache", **options)
        _assert_same_batches(local, list(cached))
    assert len(list((tmp_path / "cache").glob("*.tar"))) == len(cached.shards)
    _assert_same_batches(local, list(cached))  # the server is gone: every shard comes from the cache
    assert cached.stats.shards_failed == 0


def test_a_cached_download_is_checked_against_the_manifest_sha256(toy_build, tmp_path):
    build = tmp_path / "build"
    shutil.copytree(toy_build, build)
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (build / "manifest.json").write_text(json.dumps(manifest))
    with serve(build) as url:
        dataset = ShardReader(url, batch_size=1, layout="dict", cache_dir=tmp_path / "cache", retries=1,
                               retry_backoff=0, on_error="skip", shuffle=False)
        keys = _keys(dataset)
    assert dataset.stats.shards_failed == 1 and dataset.stats.retries == 1
    assert "sha256" in dataset.stats.failed_shards[0] and manifest["shards"][0]["path"] in dataset.stats.failed_shards[0]
    assert len(keys) == manifest["records"]["written"] - manifest["shards"][0]["samples"]


def test_a_brace_pattern_of_shards_reads_like_the_manifest(toy_build):
    names = ",".join(sorted(p.stem for p in (toy_build / "shards").glob("*.tar")))
    pattern = f"{toy_build}/shards/{{{names}}}.tar"
    options = dict(batch_size=2, layout="dict", latent="mean", shuffle=False)
    _assert_same_batches(list(ShardReader(toy_build, **options)), list(ShardReader(pattern, max_length=300, **options)))
    with pytest.raises(ShardkitError, match="max_length"):
        ShardReader(pattern, batch_size=2)


# ---- bad shards and unsafe content ----------------------------------------------------------------

def test_a_truncated_shard_is_skipped_with_a_warning_or_raises(toy_build, tmp_path, caplog):
    build = tmp_path / "build"
    shutil.copytree(toy_build, build)
    victim = max((build / "shards").glob("*.tar"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    lost = sum(s["samples"] for s in json.loads((build / "manifest.json").read_text())["shards"]
               if s["path"].endswith(victim.name))

    with caplog.at_level(logging.WARNING, logger="shardkit.reader"):
        dataset = ShardReader(build, batch_size=1, layout="dict", on_error="skip", shuffle=False)
        keys = _keys(dataset)
    assert dataset.stats.shards_failed == 1 and victim.name in dataset.stats.failed_shards[0]
    assert any(victim.name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert len(keys) == len(set(keys)) >= 17 - lost

    with pytest.raises(ShardReadError, match=victim.name):
        list(ShardReader(build, batch_size=1, on_error="raise"))

    # Several ranks: the rank that lost samples repeats some, so both still step equally.
    counts = []
    for rank in range(2):
        dataset = ShardReader(build, batch_size=1, layout="dict", on_error="skip", rank=rank, world_size=2, shuffle=False)
        counts.append((len(list(dataset)), len(dataset), dataset.stats.filled_batches))
    assert counts[0][0] == counts[1][0] == counts[0][1] == 8
    assert counts[0][2] + counts[1][2] >= 1


def test_a_pickled_array_is_never_loaded(tmp_path):
    def pickled(i, moments):
        buffer = io.BytesIO()
        np.save(buffer, np.array([{"payload": i}], dtype=object), allow_pickle=True)
        return buffer.getvalue()

    write_synthetic_build(tmp_path, {"1.0": [2]}, latent_payload=pickled)
    with pytest.raises(ShardReadError, match="not a plain .npy"):
        list(ShardReader(tmp_path, batch_size=1))


def test_members_of_a_sample_must_be_adjacent(tmp_path):
    write_synthetic_build(tmp_path, {"1.0": [2]})
    shard = next((tmp_path / "shards").glob("*.tar"))
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    members.append(members.pop(1))  # the first sample's .txt moves behind the second sample
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ShardReadError, match="not adjacent"):
        list(ShardReader(tmp_path, batch_size=1))


def test_member_names_split_as_webdataset_splits_them():
    for name in ("abc.json", "abc.latent.npy", "dir/abc.t5_prompt.npy", "a.b/c.d.e", "noext", "dir/.hidden"):
        theirs = wds.tariterators.base_plus_ext(name)
        assert split_member_name(name) == (None if theirs == (None, None) else theirs)
    assert split_member_name("a.b/c.d.e") == ("a.b/c", "d.e")


def test_bad_options_are_one_clear_error(toy_build):
    for options, message in (({"layout": "list"}, "layout"), ({"latent": "mode"}, "latent"),
                             ({"rank": 1}, "rank and world_size"), ({"rank": 2, "world_size": 2}, "rank"),
                             ({"on_error": "ignore"}, "on_error"), ({"real_prompt_ratio": 2.0}, "real_prompt_ratio")):
        with pytest.raises(ShardkitError, match=message):
            ShardReader(toy_build, batch_size=2, **options)
    with pytest.raises(ShardkitError, match="manifest"):
        ShardReader(toy_build / "nowhere", batch_size=2)


# ---- reading fast: members skipped unread, headers parsed once, buffers reused ---------------------

def _members_by_sample(fileobj, want=None) -> list[tuple[str, dict[str, bytes]]]:
    return [(raw.key, raw.members) for raw in iter_tar_samples(fileobj, want=want)]


def _bytes_read_by_this_process() -> int:
    """What the kernel counts as read by this process (every read and pread system call)."""
    io_counts = Path("/proc/self/io")
    if not io_counts.exists():
        pytest.skip("needs /proc/self/io (Linux)")
    return int(next(line for line in io_counts.read_text().splitlines() if line.startswith("rchar:")).split()[1])


def test_unused_members_are_skipped_unread_and_batches_stay_the_same(tmp_path):
    # Wide second-field rows: with real_prompt_ratio=1 they are never used, so never read.
    expected = write_synthetic_build(tmp_path, {"1.0": [4]}, hidden=8192, image=True)
    shard = next((tmp_path / "shards").glob("*.tar"))
    with tarfile.open(shard) as tar:
        unused = sum(m.size for m in tar if m.name.endswith((".t5_sharegpt4v.npy", ".png", ".txt")))
    dataset = ShardReader(tmp_path, batch_size=2, layout="dict", latent="mean", shuffle=False, memory_map=False)
    read_before = _bytes_read_by_this_process()
    batches = list(dataset)
    assert _bytes_read_by_this_process() - read_before < shard.stat().st_size - 0.8 * unused
    for batch in batches:
        for i, key in enumerate(batch["keys"]):
            feature = expected[key]["features"]["prompt"]
            np.testing.assert_array_equal(batch["caption_feature"][i, 0, :len(feature)].numpy(), feature)
            np.testing.assert_array_equal(batch["latent"][i].numpy(), expected[key]["moments"][:2])

    # A local file (offsets moved past what is skipped), a stream (read and dropped) and a gzip
    # stream give the same members; with no filter every member is read.
    want = lambda key, suffix: suffix in ("json", "t5_prompt.npy")
    payload = shard.read_bytes()
    with open(shard, "rb") as fh:
        local = _members_by_sample(fh, want)
    assert local == _members_by_sample(io.BytesIO(payload), want) == _members_by_sample(io.BytesIO(gzip.compress(payload)), want)
    assert [sorted(m) for _, m in local] == [["json", "t5_prompt.npy"]] * 4
    with tarfile.open(shard) as tar:
        everything = {m.name: tar.extractfile(m).read() for m in tar}
    with open(shard, "rb") as fh:
        assert {f"{key}.{suffix}": data for key, members in _members_by_sample(fh) for suffix, data in members.items()} == everything


def _header_offsets(shard: Path) -> dict[str, int]:
    with tarfile.open(shard) as tar:
        return {m.name: m.offset for m in tar}


def test_a_damaged_tar_header_is_named_instead_of_ending_the_shard_early(tmp_path):
    expected = write_synthetic_build(tmp_path, {"1.0": [3]})
    shard = next((tmp_path / "shards").glob("*.tar"))
    pristine = shard.read_bytes()
    second_key = sorted(expected)[1]
    for offset, message in ((_header_offsets(shard)[f"{second_key}.json"], "damaged: bad checksum"),
                            (0, "not a tar file")):
        data = bytearray(pristine)
        data[offset + 3] ^= 0x20  # a byte of the member's name: the header checksum no longer matches
        shard.write_bytes(bytes(data))
        with pytest.raises(ShardReadError, match=message):
            list(ShardReader(tmp_path, batch_size=1, shuffle=False))


def test_a_shard_cut_at_a_member_boundary_is_found_truncated(tmp_path):
    # Cut just before the last sample: every header left is whole, only the end-of-archive is missing.
    expected = write_synthetic_build(tmp_path, {"1.0": [3]})
    shard = next((tmp_path / "shards").glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:_header_offsets(shard)[f"{sorted(expected)[-1]}.json"]])
    with pytest.raises(ShardReadError, match="cut short"):
        ShardReader([str(shard)], batch_size=1, max_length=12)  # counting its samples reads it to the end
    with pytest.raises(ShardReadError, match="cut short"):
        list(ShardReader(tmp_path, batch_size=1))


def test_memory_mapped_payloads_equal_copied_ones_and_their_maps_end_with_the_batch(tmp_path):
    # T5 rows of 16 KB and more, and .json members over the 8 KB read-ahead window (long paths):
    # both come from the map; the small .txt from the window.
    write_synthetic_build(tmp_path, {"1.0": [5], "2.0": [4]}, hidden=8192, path_of=lambda i: f"{'x' * 9000}/{i}.png")
    shard = sorted((tmp_path / "shards").glob("*.tar"))[0]
    with open(shard, "rb") as fh:
        mapped = [(raw.key, raw.members) for raw in iter_tar_samples(fh, map_payloads=True)]
    with open(shard, "rb") as fh:
        copied = _members_by_sample(fh)
    assert [(key, {suffix: bytes(data) for suffix, data in members.items()}) for key, members in mapped] == copied
    kinds = {suffix: type(data) for _, members in mapped for suffix, data in members.items()}
    assert kinds == {"json": memoryview, "txt": bytes, "latent.npy": bytes, "t5_prompt.npy": memoryview,
                     "t5_sharegpt4v.npy": memoryview}
    compressed = tmp_path / "shard.tar.gz"
    compressed.write_bytes(gzip.compress(shard.read_bytes()))
    with open(compressed, "rb") as fh:  # a compressed local file is decompressed, never mapped
        assert all(type(data) is bytes for _, members in _members_by_sample(fh) for data in members.values())
    del mapped

    gc.collect()
    open_files = len(os.listdir("/proc/self/fd"))
    options = dict(batch_size=2, layout="dict", seed=1)
    batches = list(ShardReader(tmp_path, **options))
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == open_files  # no map outlives the samples read from it
    _assert_same_batches(list(ShardReader(tmp_path, memory_map=False, **options)), batches)

    # Cut inside a mapped T5 member: found cut short, as when it is copied.
    last = _header_offsets(shard)
    shard.write_bytes(shard.read_bytes()[:max(offset for name, offset in last.items() if name.endswith(".npy")) + 2048])
    for memory_map in (True, False):
        with pytest.raises(ShardReadError, match="cut short"):
            list(ShardReader(tmp_path, batch_size=1, memory_map=memory_map))


def test_npy_payloads_load_as_numpy_loads_them_and_bad_headers_are_refused_every_time():
    def npy(array) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=True)
        return buffer.getvalue()

    arrays = [np.arange(i, i + 15, dtype=np.float16).reshape(3, 5) for i in range(4)]
    for array in arrays:
        np.testing.assert_array_equal(read_npy(npy(array), "x"), array)
    fortran = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    assert np.array_equal(read_npy(npy(fortran), "x"), fortran) and read_npy(npy(fortran), "x").flags.f_contiguous

    pickled = npy(np.array([{"payload": 1}], dtype=object))
    for _ in range(2):  # the second time the header comes from the cache: still refused
        with pytest.raises(ShardFormatError, match="not a plain .npy array.*Python objects"):
            read_npy(pickled, "x")
    good = npy(arrays[0])
    huge = good.replace(b"(3, 5)", b"(99999999, 99999)")  # a header claiming 20 TB: refused, nothing allocated
    for broken in (good[:-2], good[:40], b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f2'}  \n" + bytes(30), b"PK\x03\x04" + good,
                   huge):
        with pytest.raises(ShardFormatError, match="not a plain .npy array"):
            read_npy(broken, "x")


def test_caption_padding_longest_pads_to_the_batch_longest_caption(tmp_path):
    expected = write_synthetic_build(tmp_path, {"1.0": [9], "2.0": [5]})
    options = dict(batch_size=3, layout="dict", shuffle=False, seed=2)
    padded = list(ShardReader(tmp_path, **options))
    longest = list(ShardReader(tmp_path, caption_padding="longest", **options))
    assert len(padded) == len(longest) == 5
    for full, short in zip(padded, longest):
        length = max(expected[key]["meta"]["t5_lengths"]["prompt"] for key in full["keys"])
        assert full["caption_feature"].shape[2] == 12 > length == short["caption_feature"].shape[2]
        assert short["attention_mask"].shape == (len(full["keys"]), 1, 1, length)
        assert torch.equal(short["caption_feature"], full["caption_feature"][:, :, :length])
        assert torch.equal(short["attention_mask"], full["attention_mask"][..., :length])
        assert torch.equal(short["latent"], full["latent"]) and short["keys"] == full["keys"]
    with pytest.raises(ShardkitError, match="caption_padding"):
        ShardReader(tmp_path, batch_size=2, caption_padding="dynamic")


def test_latent_noise_is_drawn_per_sample_from_its_key(tmp_path):
    # The values are pinned: mean + std * N(0, 1) drawn with a generator seeded by (seed, epoch, key).
    expected = write_synthetic_build(tmp_path, {"1.0": [5], "0.5": [4]})
    for dtype in (None, torch.float32, torch.bfloat16):
        for batch in ShardReader(tmp_path, batch_size=2, layout="dict", seed=4, scale_factor=0.5, dtype=dtype):
            for i, key in enumerate(batch["keys"]):
                mean, std = torch.from_numpy(expected[key]["moments"]).float().chunk(2)
                noise = torch.empty_like(mean).normal_(generator=torch.Generator().manual_seed(derive_seed(4, 0, key, "noise")))
                assert torch.equal(batch["latent"][i], ((noise * std + mean) * 0.5).to(dtype or torch.float16))


def test_batch_buffers_are_reused_only_once_nothing_holds_them():
    buffers = BatchBuffers(pool_min_bytes=0)
    shape = (4, 1, 6, 8)
    first = buffers.tensor(shape, torch.float16).fill_(1)
    address = first.data_ptr()
    second = buffers.tensor(shape, torch.float16)
    assert second.data_ptr() != address  # the first batch is still held
    kept_view = first[:, 0].numpy()  # a numpy view of a view holds the buffer too
    del first
    third = buffers.tensor(shape, torch.float16)
    assert third.data_ptr() not in (address, second.data_ptr()) and (kept_view == 1).all()
    del kept_view, third
    tail = buffers.tensor((2, 1, 6, 8), torch.float16)  # a smaller batch takes the front of a free block
    assert tail.data_ptr() in {address, buffers._pool[2].ctypes.data}
    assert buffers.tensor(shape, torch.bfloat16).dtype == torch.bfloat16


def test_pooled_batches_that_are_held_are_never_overwritten(tmp_path):
    write_synthetic_build(tmp_path, {"1.0": [8], "2.0": [6]}, hidden=16)
    reference = list(ShardReader(tmp_path, batch_size=2, layout="dict"))
    pooled = ShardReader(tmp_path, batch_size=2, layout="dict")
    pooled.collate.buffers = BatchBuffers(pool_min_bytes=0)
    held = list(pooled)  # every batch kept: no two may share memory
    _assert_same_batches(reference, held)
    assert len({b["caption_feature"].data_ptr() for b in held}) == len(held)
    addresses = set()
    for i, batch in enumerate(pooled):  # each batch let go before the next: buffers come back
        _assert_same_batches([reference[i]], [batch])
        addresses.add(batch["caption_feature"].data_ptr())
    assert len(addresses) <= 2 < len(held)


def test_a_worker_collates_into_shared_memory(tmp_path, monkeypatch):
    write_synthetic_build(tmp_path, {"1.0": [3]})
    dataset = ShardReader(tmp_path, batch_size=3, layout="dict", shuffle=False)
    in_process = next(iter(dataset))
    monkeypatch.setattr(collate_module, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=1))
    in_worker = next(iter(ShardReader(tmp_path, batch_size=3, layout="dict", shuffle=False)))
    assert in_worker["latent"].is_shared() and in_worker["caption_feature"].is_shared()
    assert not in_process["caption_feature"].is_shared()
    _assert_same_batches([in_process], [in_worker])
