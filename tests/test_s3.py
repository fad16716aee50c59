"""Builds from and into object storage, against a real S3 server (moto's) on 127.0.0.1.

Round trip build -> inspect --verify -> reader, byte-identical to the same build on local disk;
uploads that fail half-way leave nothing under a final name, are retried, and resume completes
the set; credentials are never written anywhere.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner

from shardkit.build import build
from shardkit.errors import ShardkitError
from shardkit.storage import FsspecStorage

import s3fs  # the test extra installs it; a missing one must fail, not skip
from moto import server as moto_server

BUCKET = "shardkit-test"
SMALL_JSONL = "toy/InternImgs/records.jsonl"
KEY_ID = "AKIA-shardkit-test-key-id"
SECRET = "secret-that-must-never-be-written-9f3c"


@pytest.fixture(scope="module")
def s3(toy_dataset, tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with the toy dataset uploaded; yields its endpoint URL."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        # Fake credentials, and nothing from the machine's own AWS configuration.
        missing = str(tmp_path_factory.mktemp("aws") / "none")
        for name, value in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": missing,
                            "AWS_SHARED_CREDENTIALS_FILE": missing}.items():
            env.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir(BUCKET)
        fs.put(str(toy_dataset), f"{BUCKET}/toy", recursive=True)
        fs.pipe_file(f"{BUCKET}/{SMALL_JSONL}", _small_jsonl(toy_dataset).encode())
        yield endpoint
    server.stop()


def _small_jsonl(toy_dataset: Path) -> str:
    """Four toy records as JSON Lines (image paths relative to the file's folder)."""
    items = json.loads((toy_dataset / "InternData" / "data_info.json").read_text())[:4]
    return "".join(json.dumps(item) + "\n" for item in items)


@pytest.fixture
def s3fs_client(s3):
    return s3fs.S3FileSystem(endpoint_url=s3, skip_instance_cache=True)


def _options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint}


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _remote_files(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {path[len(prefix) + 1:]: fs.cat_file(path) for path in sorted(fs.find(prefix))}


def _fail_uploads(monkeypatch, should_fail: Callable[[str, list[str]], bool]) -> list[str]:
    """Make chosen shard uploads die half-way: a multipart upload is started and half the bytes
    sent, then the connection drops. ``should_fail(bucket/key, shard uploads so far)``; returns that list.

    Patched at s3fs's request level, which every filesystem instance looks up at call time."""
    original = s3fs.S3FileSystem._call_s3
    calls: list[str] = []

    async def call_s3(self, method, *args, **kwargs):
        if method == "put_object" and kwargs.get("Key", "").endswith(".tar"):
            bucket, key, body = kwargs["Bucket"], kwargs["Key"], kwargs["Body"]
            calls.append(f"{bucket}/{key}")
            if should_fail(calls[-1], calls):
                upload = await original(self, "create_multipart_upload", Bucket=bucket, Key=key)
                await original(self, "upload_part", Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                               PartNumber=1, Body=body[: len(body) // 2])
                raise ConnectionResetError(104, "Connection reset by peer (injected half-way through the upload)")
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", call_s3)
    return calls


def _nth_shard(calls: list[str], n: int) -> str | None:
    distinct = list(dict.fromkeys(calls))
    return distinct[n - 1] if len(distinct) >= n else None


def test_bucket_to_bucket_build_equals_local_then_inspect_and_reader(s3, s3fs_client, toy_build, make_config,
                                                                     encoders, monkeypatch):
    """Also: the third shard's first upload dies half-way; it is retried and the set is still exact."""
    monkeypatch.setattr(FsspecStorage, "retry_delays", (0.0, 0.0))
    calls = _fail_uploads(monkeypatch, lambda url, calls: url == _nth_shard(calls, 3) and calls.count(url) == 1)
    out = f"s3://{BUCKET}/roundtrip"
    summary = build(f"s3://{BUCKET}/toy", out, make_config(), encoders=encoders, storage_options=_options(s3))
    assert summary.output == out and summary.written == 17
    assert calls.count(_nth_shard(calls, 3)) == 2  # failed half-way once, then uploaded whole
    remote = _remote_files(s3fs_client, f"{BUCKET}/roundtrip")
    assert remote == _local_files(toy_build)  # every shard, manifest.json and failures.jsonl, byte for byte

    from shardkit.cli import main
    from shardkit.inspect import inspect_output

    report = inspect_output(out, verify_shards=True, storage_options=_options(s3))
    assert report.exit_code == 0, report.as_json()
    assert report.verification.sound and report.verification.samples_checked == 17
    cli = CliRunner().invoke(main, ["inspect", out, "--verify", "--json", "--endpoint-url", s3])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output)["sound"] is True

    from shardkit.reader import ShardReader

    def batches(source, **options):
        reader = ShardReader(source, 4, layout="dict", latent="mean", shuffle=False, **options)
        return [(b["keys"], b["latent"].numpy(), b["caption_feature"].numpy()) for b in reader]

    from_bucket, from_disk = batches(out, storage_options=_options(s3)), batches(str(toy_build))
    assert [keys for keys, _, _ in from_bucket] == [keys for keys, _, _ in from_disk]
    assert sum(len(keys) for keys, _, _ in from_bucket) == 17
    for (_, latent_a, t5_a), (_, latent_b, t5_b) in zip(from_bucket, from_disk):
        np.testing.assert_array_equal(latent_a, latent_b)
        np.testing.assert_array_equal(t5_a, t5_b)


def test_failed_upload_leaves_no_partial_shard_and_resume_completes(s3, s3fs_client, toy_build, toy_dataset,
                                                                    make_config, encoders, monkeypatch):
    monkeypatch.setattr(FsspecStorage, "retry_delays", (0.0, 0.0))
    calls = _fail_uploads(monkeypatch, lambda url, calls: url == _nth_shard(calls, 5))
    out = f"s3://{BUCKET}/resumed"
    with pytest.raises(ShardkitError, match="failed 3 times .*run the same command again to resume"):
        build(str(toy_dataset), out, make_config(), encoders=encoders, storage_options=_options(s3))
    doomed = _nth_shard(calls, 5)
    assert calls.count(doomed) == 3

    prefix = f"{BUCKET}/resumed"
    bucket, key, _ = s3fs_client.split_path(doomed)
    unfinished = s3fs_client.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", [])
    assert unfinished, "the injected failures really started uploads of the shard"
    assert not s3fs_client.exists(doomed), "a half-uploaded shard must not appear under its final name"
    manifest = json.loads(s3fs_client.cat_file(f"{prefix}/manifest.json"))
    assert manifest["status"] == "in_progress" and len(manifest["shards"]) == 4
    s3fs_client.invalidate_cache()
    present = {p[len(prefix) + 1:]: s3fs_client.size(p) for p in s3fs_client.find(f"{prefix}/shards")}
    assert present == {e["path"]: e["bytes"] for e in manifest["shards"]}  # exactly the listed, complete shards

    monkeypatch.undo()
    summary = build(str(toy_dataset), out, make_config(), encoders=encoders, storage_options=_options(s3))
    assert summary.shards_reused == 4 and summary.written == 17
    assert _remote_files(s3fs_client, prefix) == _local_files(toy_build)


def _folder_source(root: Path, toy_dataset: Path) -> Path:
    """A folder-layout source whose walk order is not plain path order, with CRLF captions."""
    images = sorted((toy_dataset / "InternImgs").glob("*.jpg"))[:4]
    layout = ["b_root.jpg", "a/z.jpg", "a/b/c.jpg", "a/y.jpg"]
    for image, relative in zip(images, layout):
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
        target.with_suffix(".txt").write_bytes(f"a photo\r\nnamed {relative}\r\n".encode())
    (root / "notes.md").write_text("not an image")
    return root


def test_folder_and_jsonl_sources_in_a_bucket_equal_local_ones(s3, s3fs_client, toy_dataset, make_config, encoders,
                                                               tmp_path):
    folder = _folder_source(tmp_path / "folder", toy_dataset)
    s3fs_client.put(str(folder), f"{BUCKET}/folder", recursive=True)
    config = make_config(captions=("prompt",))
    build(str(folder), tmp_path / "local-folder", config, encoders=encoders)
    build(f"s3://{BUCKET}/folder", f"s3://{BUCKET}/out-folder", config, encoders=encoders,
          storage_options=_options(s3))
    assert _remote_files(s3fs_client, f"{BUCKET}/out-folder") == _local_files(tmp_path / "local-folder")

    (tmp_path / "records.jsonl").write_text(_small_jsonl(toy_dataset))
    build(str(tmp_path / "records.jsonl"), tmp_path / "local-jsonl", make_config(image_root=str(toy_dataset / "InternImgs")),
          encoders=encoders)
    build(f"s3://{BUCKET}/{SMALL_JSONL}", f"s3://{BUCKET}/out-jsonl", make_config(), encoders=encoders,
          storage_options=_options(s3))
    remote = _remote_files(s3fs_client, f"{BUCKET}/out-jsonl")
    local = _local_files(tmp_path / "local-jsonl")
    assert sorted(remote) == sorted(local)
    for name in local:
        if name == "manifest.json":  # only the recorded image_root option differs
            a, b = json.loads(remote[name]), json.loads(local[name])
            a["config"].pop("image_root"), b["config"].pop("image_root")
            assert a == b
        elif name == "plan.json":  # so does the plan's (and so its checksum)
            a, b = json.loads(remote[name])["plan"], json.loads(local[name])["plan"]
            a["config"].pop("image_root"), b["config"].pop("image_root")
            assert a == b
        else:
            assert remote[name] == local[name], name


def test_cli_build_records_the_endpoint_but_no_credentials(s3, s3fs_client, tiny_models, monkeypatch):
    from click.testing import CliRunner

    from shardkit.cli import main

    monkeypatch.setattr(FsspecStorage, "retry_delays", ())
    out = f"s3://{BUCKET}/cli"
    args = ["build", f"s3://{BUCKET}/{SMALL_JSONL}", out, "--config", "tiny-offline", "--vae", str(tiny_models), "--t5",
            str(tiny_models), "--workers", "0", "--no-progress", "--captions", "prompt", "--endpoint-url", s3]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "4 written" in result.output and SECRET not in result.output
    manifest = json.loads(s3fs_client.cat_file(f"{BUCKET}/cli/manifest.json"))
    assert manifest["config"]["endpoint_url"] == s3 and manifest["status"] == "complete"
    for blob in _remote_files(s3fs_client, f"{BUCKET}/cli").values():
        assert SECRET.encode() not in blob and KEY_ID.encode() not in blob

    missing = CliRunner().invoke(main, args[:2] + [f"s3://no-such-bucket-{BUCKET}/x"] + args[3:])
    assert missing.exit_code == 2 and "bucket no-such-bucket" in missing.output and "does not exist" in missing.output
    leaky = CliRunner().invoke(main, args[:-1] + ["http://user:pw@127.0.0.1:1"])
    assert leaky.exit_code == 2 and "must not carry credentials" in leaky.output


def test_unreadable_source_stops_resumably_instead_of_skipping(s3, toy_build, make_config, encoders, tmp_path,
                                                               monkeypatch):
    """A source image that cannot be fetched (network, service) is no bad record: nothing is skipped."""
    original = s3fs.S3FileSystem._call_s3
    fetched: list[str] = []

    async def flaky_get(self, method, *args, **kwargs):
        if method == "get_object" and kwargs.get("Key", "").endswith((".jpg", ".png")):
            fetched.append(kwargs["Key"])
            if len(fetched) == 6:
                raise PermissionError(13, "Access denied (injected)")
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", flaky_get)
    output = tmp_path / "out"
    with pytest.raises(ShardkitError, match="cannot read s3://.*run the same command again to resume"):
        build(f"s3://{BUCKET}/toy", output, make_config(workers=0), encoders=encoders, storage_options=_options(s3))
    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", original)
    summary = build(f"s3://{BUCKET}/toy", output, make_config(workers=0), encoders=encoders,
                    storage_options=_options(s3))
    assert summary.skipped == 0 and summary.written == 17 and summary.shards_reused > 0
    assert _local_files(output) == _local_files(toy_build)


def test_header_of_a_large_jpeg_in_a_bucket_takes_a_ranged_read(s3, s3fs_client, tmp_path):
    import numpy as np
    from PIL import Image

    from shardkit.images import read_header
    from shardkit.storage import RemotePath

    rng = np.random.default_rng(0)
    local = tmp_path / "noise.jpg"
    Image.fromarray(rng.integers(0, 256, (300, 600, 3), dtype=np.uint8)).save(local, quality=95)
    s3fs_client.put(str(local), f"{BUCKET}/headers/noise.jpg")
    remote = RemotePath(f"s3://{BUCKET}/headers/noise.jpg", _options(s3))
    start, size = remote.read_start(64 * 1024)
    assert start == local.read_bytes()[:64 * 1024] and size == local.stat().st_size > 64 * 1024
    assert read_header(remote, 10**8) == read_header(local, 10**8)


@pytest.mark.timeout(60)
def test_a_second_build_into_a_locked_prefix_is_refused(s3, s3fs_client):
    """The lock object is created conditionally (If-None-Match), so two builds cannot both hold it."""
    from shardkit.distributed import RankInfo
    from shardkit.outputlock import lock_worker

    first = FsspecStorage(f"s3://{BUCKET}/locked", _options(s3))
    with lock_worker(first, RankInfo()):
        assert s3fs_client.exists(f"{BUCKET}/locked/build.lock")
        second = FsspecStorage(f"s3://{BUCKET}/locked", {**_options(s3), "skip_instance_cache": True})
        with pytest.raises(ShardkitError, match="another build holds OUTPUT s3://"):
            lock_worker(second, RankInfo())
        with pytest.raises(FileExistsError):  # what the refusal rests on: the store's conditional create
            second.fs.pipe_file(f"{BUCKET}/locked/build.lock", b"{}", mode="create")
    s3fs_client.invalidate_cache()
    assert not s3fs_client.exists(f"{BUCKET}/locked/build.lock")


@pytest.mark.timeout(60)
def test_images_in_a_bucket_are_read_within_the_byte_bound(s3, s3fs_client, tmp_path):
    from shardkit.buckets import Bucket
    from shardkit.images import ImageSkip, decode_and_fit, read_header
    from shardkit.storage import RemotePath

    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    s3fs_client.pipe_file(f"{BUCKET}/bounded/big.png", (tmp_path / "big.png").read_bytes())
    s3fs_client.pipe_file(f"{BUCKET}/bounded/empty.jpg", b"")
    big = RemotePath(f"s3://{BUCKET}/bounded/big.png", _options(s3))
    for read in (lambda: read_header(big, 10**8, max_bytes=100_000),
                 lambda: decode_and_fit(big, Bucket("1.0", 64, 64), "crop", 10**8, None, False, max_bytes=100_000)):
        with pytest.raises(ImageSkip) as skip:
            read()
        assert skip.value.reason == "file_too_large"
    assert read_header(big, 10**8).width == 400  # within the default bound
    with pytest.raises(ImageSkip) as skip:
        decode_and_fit(RemotePath(f"s3://{BUCKET}/bounded/empty.jpg", _options(s3)), Bucket("1.0", 64, 64), "crop",
                       10**8, None, False)
    assert skip.value.reason == "empty_file"


@pytest.mark.timeout(120)
def test_an_oversized_caption_object_is_a_skip_never_fetched(s3, s3fs_client, toy_dataset, make_config, encoders,
                                                            tmp_path):
    folder = _folder_source(tmp_path / "folder", toy_dataset)
    images = sorted(p for p in folder.rglob("*") if p.suffix in (".jpg", ".png", ".webp"))[:2]
    for image in images:
        s3fs_client.put_file(str(image), f"{BUCKET}/big-caption/{image.name}")
    s3fs_client.pipe_file(f"{BUCKET}/big-caption/{images[0].stem}.txt", b"a fine caption")
    s3fs_client.pipe_file(f"{BUCKET}/big-caption/{images[1].stem}.txt", b"x" * (1024 * 1024 + 1))
    build(f"s3://{BUCKET}/big-caption", tmp_path / "out", make_config(captions=("prompt",)), encoders=encoders,
          storage_options=_options(s3))
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert [(f["source"], f["reason"]) for f in failures] == [(images[1].name, "file_too_large")]


def test_tar_and_parquet_sources_in_a_bucket_equal_local_ones(s3, s3fs_client, make_config, encoders, tmp_path):
    from test_source_kinds import _duplicated_parquet, _img2dataset_tars

    tars, table = _img2dataset_tars(tmp_path), _duplicated_parquet(tmp_path)
    s3fs_client.put(str(tars), f"{BUCKET}/wds", recursive=True)
    s3fs_client.put(str(table), f"{BUCKET}/tables/{table.name}")
    for source, remote, captions in ((tars, f"s3://{BUCKET}/wds", "txt"),
                                     (table, f"s3://{BUCKET}/tables/{table.name}", "caption")):
        config = make_config(captions=(captions,))
        build(str(source), tmp_path / f"local-{captions}", config, encoders=encoders)
        build(remote, tmp_path / f"remote-{captions}", config, encoders=encoders, storage_options=_options(s3))
        assert _local_files(tmp_path / f"remote-{captions}") == _local_files(tmp_path / f"local-{captions}")
