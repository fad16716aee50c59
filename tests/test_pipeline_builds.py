"""`shardkit build --pipeline DIR` for each family, end to end through the CLI and the reader:
the diffusers-layout batches equal what the pipeline itself computes for every sample, and the
build verifies, resumes and rebuilds byte for byte like any other."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import close_in_fp16, pipeline_reference

from shardkit import shards as shards_module
from shardkit.cli import main
from shardkit.images import to_model_input
from shardkit.reader import ShardReader

FAMILIES = ["pixart-alpha", "pixart-sigma", "sana", "sdxl", "sd3", "flux"]
# Images already at a bucket's size of the 512 table (divisible by every family's 32), so the
# build's resize is the identity and the pipeline's VAE sees the same pixels.
IMAGES = [((512, 512), "A Fluffy ORANGE cat sleeps on a sunny windowsill."),
          ((448, 576), "  two horses graze in a misty meadow at dawn  "),
          ((512, 512), "A lighthouse on a rocky point at night, its lamp shining through the fog; " * 12)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A JSON Lines source of the images above: caption -> its pixels, and the source path."""
    from PIL import Image

    root = tmp_path_factory.mktemp("bucket-sized")
    rng = np.random.default_rng(0)
    pixels, lines = {}, []
    for i, ((height, width), caption) in enumerate(IMAGES):
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(array).save(root / f"{i}.png")
        pixels[caption] = array
        lines.append(json.dumps({"path": f"{i}.png", "prompt": caption}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data.jsonl", pixels


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def build_args(source, output, pipeline) -> list:
    return ["build", source, output, "--pipeline", pipeline, "--resolution", "512", "--device", "cpu", "--dtype", "fp32",
            "--batch-size", "2", "--shard-max-count", "1", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_pipeline, dataset):
    """family -> (pipeline folder, a build stopped at its second sample then resumed, a build in one go)."""
    made = {}

    def get(family):
        if family not in made:
            folder = tiny_pipeline(family)
            root = tmp_path_factory.mktemp(family)
            resumed, whole = root / "resumed", root / "whole"
            original_add = shards_module.ShardWriter.add
            calls = []

            def interrupted_add(self, sample):
                calls.append(sample.key)
                if len(calls) == 2:
                    raise KeyboardInterrupt
                return original_add(self, sample)

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(shards_module.ShardWriter, "add", interrupted_add)
                stopped = cli(*build_args(dataset[0], resumed, folder))
            assert stopped.exit_code == 130, stopped.output
            again = cli(*build_args(dataset[0], resumed, folder))
            assert again.exit_code == 0 and "resuming" in again.output and "3 written" in again.output, again.output
            result = cli(*build_args(dataset[0], whole, folder))
            assert result.exit_code == 0, result.output
            made[family] = folder, resumed, whole
        return made[family]

    return get


def load_pipeline(folder):
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    return getattr(diffusers, index["_class_name"]).from_pretrained(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_sample_is_what_the_pipeline_computes(family, built, dataset):
    folder, _, whole = built(family)
    pipe = load_pipeline(folder)
    pixels = dataset[1]
    batches = list(ShardReader(whole, 2, latent="mean", shuffle=False))
    normalized = list(ShardReader(whole, 2, latent="mean", normalize=True, shuffle=False))
    assert sorted(caption for batch in batches for caption in batch["captions"]) == sorted(pixels)
    shift, scale = pipe.vae.config.get("shift_factor") or 0.0, pipe.vae.config.scaling_factor
    for batch, scaled in zip(batches, normalized):
        assert_encode_prompt_outputs(batch, pipeline_reference(family, pipe, batch["captions"]))

        images = torch.from_numpy(np.stack([pixels[caption] for caption in batch["captions"]]))
        with torch.no_grad():
            encoded = pipe.vae.encode(to_model_input(images))
        mean = encoded.latent if hasattr(encoded, "latent") else encoded.latent_dist.mean
        assert torch.linalg.norm(batch["latents"] - mean) <= 1e-3 * torch.linalg.norm(mean)
        torch.testing.assert_close(scaled["latents"], (batch["latents"] - shift) * scale)

        if family == "sdxl":
            sizes = [list(pixels[caption].shape[:2]) for caption in batch["captions"]]
            assert batch["original_size"].tolist() == sizes and batch["target_size"].tolist() == sizes
            assert batch["crop_coords_top_left"].tolist() == [[0, 0]] * len(sizes)


def assert_encode_prompt_outputs(batch: dict, reference: dict) -> None:
    """The batch holds the pipeline's ``encode_prompt`` outputs: equal within fp16 rounding where
    its mask marks a token valid (everywhere where it returns no mask), the masks equal."""
    assert set(reference) <= set(batch)
    for key, expected in reference.items():
        assert batch[key].shape == expected.shape, key
    mask = reference.get("prompt_attention_mask")
    if mask is not None:
        assert torch.equal(batch["prompt_attention_mask"], mask)
        close_in_fp16(batch["prompt_embeds"][mask.bool()], reference["prompt_embeds"][mask.bool()])
    else:
        close_in_fp16(batch["prompt_embeds"], reference["prompt_embeds"])
    for key in set(reference) - {"prompt_embeds", "prompt_attention_mask"}:
        close_in_fp16(batch[key], reference[key])


@pytest.mark.parametrize("family", FAMILIES)
def test_caption_dropout_gives_the_pipelines_encoding_of_the_empty_caption(family, built):
    folder, _, whole = built(family)
    pipe = load_pipeline(folder)
    dropped = list(ShardReader(whole, 2, latent="mean", shuffle=False, caption_dropout=1.0))
    kept = list(ShardReader(whole, 2, latent="mean", shuffle=False))
    assert [b["keys"] for b in dropped] == [b["keys"] for b in kept]
    for batch, original in zip(dropped, kept):
        assert batch["captions"] == [""] * len(batch["keys"])
        assert_encode_prompt_outputs(batch, pipeline_reference(family, pipe, batch["captions"]))
        for name in set(original) - {"captions", "keys"} - set(pipeline_reference(family, pipe, [""])):
            assert torch.equal(batch[name], original[name]), name  # latents, SDXL's sizes and crop: unchanged


def test_the_empty_caption_of_a_pipeline_build_is_verified_and_stored_again(built, dataset, tmp_path):
    import shutil

    from shardkit.errors import ShardkitError

    folder, _, whole = built("flux")
    output = tmp_path / "copy"
    shutil.copytree(whole, output)
    stored = {p.name: p.read_bytes() for p in (output / "empty_caption").iterdir()}
    assert set(stored) == {"prompt_embeds.npy", "pooled_prompt_embeds.npy"}
    damaged = output / "empty_caption" / "pooled_prompt_embeds.npy"
    damaged.write_bytes(stored["pooled_prompt_embeds.npy"][:-2] + b"\x00\x7c")  # fp16 inf
    result = cli("inspect", output, "--verify", "--json", "--no-progress")
    assert result.exit_code == 1
    assert "bad_empty_caption" in {finding["kind"] for finding in json.loads(result.output)["findings"]}
    with pytest.raises(ShardkitError, match="empty caption"):
        ShardReader(output, 1, caption_dropout=0.5)
    again = cli(*build_args(dataset[0], output, folder))
    assert again.exit_code == 0, again.output
    assert {p.name: p.read_bytes() for p in (output / "empty_caption").iterdir()} == stored

    manifest = json.loads((output / "manifest.json").read_text())
    del manifest["sample_format"]["empty_captions"]
    (output / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardkitError, match=r"stores no empty caption \(prompt_embeds, pooled_prompt_embeds\)"):
        ShardReader(output, 1, caption_dropout=0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_it_verifies_resumes_and_rebuilds_byte_for_byte(family, built, tmp_path):
    _, resumed, whole = built(family)

    def shard_bytes(output):
        return {p.name: p.read_bytes() for p in sorted((output / "shards").glob("*.tar"))}

    assert len(shard_bytes(whole)) == 3 and shard_bytes(resumed) == shard_bytes(whole)
    assert (resumed / "plan.json").read_bytes() == (whole / "plan.json").read_bytes()
    verified = cli("inspect", resumed, "--verify", "--no-progress")
    assert verified.exit_code == 0 and "sound" in verified.output, verified.output

    manifest = json.loads((whole / "manifest.json").read_text())
    declared = manifest["sample_format"]["pipeline"]
    assert declared["family"] == family and declared["latents"]["scaling_factor"] > 0

    exported = cli("export", whole, tmp_path / "pixart", "--no-progress")
    if family.startswith("pixart"):
        assert exported.exit_code == 0, exported.output
        feature = np.load(next((tmp_path / "pixart" / "InternData" / "caption_features_new").glob("*.npz")))
        assert feature["caption_feature"].shape[1] == (120 if family == "pixart-alpha" else 300)
    else:
        assert exported.exit_code == 2 and len(exported.output.strip().splitlines()) == 1, exported.output
        assert "layout='diffusers'" in exported.output


def test_a_resumed_reader_continues_with_the_same_batches(built):
    _, _, whole = built("sdxl")
    everything = [batch for batch in ShardReader(whole, 1, seed=3)]
    first = ShardReader(whole, 1, seed=3)
    iterator = iter(first)
    next(iterator)
    state = json.loads(json.dumps(first.state_dict()))
    again = ShardReader(whole, 1, seed=3)
    again.load_state_dict(state)
    rest = list(again)
    assert [b["keys"] for b in rest] == [b["keys"] for b in everything[1:]]
    for ours, expected in zip(rest, everything[1:]):
        assert torch.equal(ours["latents"], expected["latents"])  # the same noise: (seed, epoch, key)


def test_what_a_pipeline_build_cannot_give_is_refused_in_one_line(built):
    from shardkit.errors import ShardkitError

    _, _, whole = built("sdxl")
    with pytest.raises(ShardkitError, match="layout='diffusers'"):
        ShardReader(whole, 1, layout="tuple")


@pytest.mark.parametrize("preset, family, resolution", [
    ("pixart-alpha-512", "pixart-alpha", 512), ("sana-1024", "sana", 1024), ("sdxl-1024", "sdxl", 1024),
    ("sd3-1024", "sd3", 1024), ("flux-1024", "flux", 1024)])
def test_each_family_preset_names_a_hub_id_and_a_table_that_fits(preset, family, resolution):
    from conftest import REPO

    from shardkit.config import make_config
    from shardkit.families import family_by_name

    path = str(REPO / "configs" / f"{preset}.toml")  # the preset's file, as `--config NAME` reads it
    config = make_config(path)
    assert config.pipeline.count("/") == 1 and config.resolution == resolution
    assert family_by_name(family).bucket_table(config.resolution).buckets
    assert make_config(path, resolution=512).resolution == 512


def test_option_mistakes_are_one_line(tiny_pipeline, dataset, tmp_path):
    source = dataset[0]
    mixed = cli("build", source, tmp_path / "a", "--pipeline", tiny_pipeline("sd3"), "--t5", "x")
    assert mixed.exit_code == 2 and "--pipeline" in mixed.output and "--t5" in mixed.output
    too_fine = cli("build", source, tmp_path / "b", "--pipeline", tiny_pipeline("sdxl"), "--resolution", "256")
    assert too_fine.exit_code == 2 and "512 or 1024" in too_fine.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    unknown = cli("build", source, tmp_path / "c", "--pipeline", other)
    assert unknown.exit_code == 2 and "FluxPipeline" in unknown.output
    for result in (mixed, too_fine, unknown):
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_t5_build_reads_in_the_diffusers_layout_too(toy_build):
    pixart = next(iter(ShardReader(toy_build, 4, layout="dict", latent="mean", shuffle=False)))
    batch = next(iter(ShardReader(toy_build, 4, layout="diffusers", latent="mean", shuffle=False)))
    assert batch["keys"] == pixart["keys"] and batch["captions"] == pixart["prompt"]
    torch.testing.assert_close(batch["latents"], pixart["latent"].float())
    mask = pixart["attention_mask"][:, 0, 0].long()
    assert torch.equal(batch["prompt_attention_mask"], mask)
    valid = mask.bool()
    assert torch.equal(batch["prompt_embeds"][valid], pixart["caption_feature"][:, 0][valid])
    assert not batch["prompt_embeds"][~valid].any()  # zeros past the valid rows, as encode_prompt's


@pytest.mark.timeout(600)
def test_a_torchrun_launch_writes_the_bytes_of_one_process(built, dataset, tmp_path):
    import subprocess
    import sys

    from conftest import child_env, output_files

    folder, _, _ = built("sdxl")
    outputs = {}
    for processes in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(processes)] if processes > 1 else [sys.executable]
        outputs[processes] = tmp_path / f"processes-{processes}"
        command = [*launcher, "-m", "shardkit", *map(str, build_args(dataset[0], outputs[processes], folder))]
        result = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=500)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 1 of 2: done" in result.stdout
    assert output_files(outputs[2]) == output_files(outputs[1])
    assert (outputs[2] / "empty_caption" / "pooled_prompt_embeds.npy").is_file()


def test_two_workers_write_the_bytes_of_one(built, dataset, tmp_path, monkeypatch):
    """Two ranks of a launch without a rendezvous (as Slurm array tasks run), one after the other."""
    folder, _, whole = built("sd3")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    output = tmp_path / "two"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        result = cli(*build_args(dataset[0], output, folder))
        assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in (output / "shards").glob("*.tar")} == \
        {p.name: p.read_bytes() for p in (whole / "shards").glob("*.tar")}
    assert json.loads((output / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("member, change, kind", [
    ("prompt.prompt_embeds.npy", lambda array: array[:-1], "t5_shape"),
    ("prompt.pooled_prompt_embeds.npy", lambda array: array.astype(np.float32), "dtype"),
    ("json", lambda meta: {**meta, "micro_conditioning": {**meta["micro_conditioning"], "target_size": [1, 1]}},
     "bad_metadata"),
])
def test_verify_finds_damage_by_the_declaration(member, change, kind, built, tmp_path):
    import io
    import shutil
    import tarfile

    from shardkit.format import json_bytes, npy_bytes
    from shardkit.tario import UstarWriter

    _, _, whole = built("sdxl")
    output = tmp_path / "damaged"
    shutil.copytree(whole, output)
    shard = sorted((output / "shards").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(info.name, tar.extractfile(info).read()) for info in tar.getmembers()]
    out = io.BytesIO()
    writer = UstarWriter(out)
    for name, payload in members:
        if name.endswith("." + member):
            if member == "json":
                payload = json_bytes(change(json.loads(payload)))
            else:
                payload = npy_bytes(change(np.load(io.BytesIO(payload), allow_pickle=False)))
        writer.add(name, payload)
    writer.close()
    shard.write_bytes(out.getvalue())
    result = cli("inspect", output, "--verify", "--json", "--no-progress")
    assert result.exit_code == 1
    assert kind in {finding["kind"] for finding in json.loads(result.output)["findings"]}
