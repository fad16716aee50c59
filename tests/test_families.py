"""Each family adapter reproduces its own diffusers pipeline: text encodings equal the pipeline's
``encode_prompt`` as ``__call__`` calls it, latents equal its VAE's, buckets fit its geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import close_in_fp16, pipeline_reference

from shardkit.errors import ShardkitError
from shardkit.families import FAMILIES, family_by_name, family_for, load_pipeline_encoders, read_model_index
from shardkit.images import to_model_input

FAMILY_NAMES = ["pixart-alpha", "pixart-sigma", "sana", "sdxl", "sd3", "flux"]

CAPTIONS = [
    "A Fluffy ORANGE cat sleeps on a sunny windowsill.",
    "  two horses graze in a misty meadow at dawn  ",
    "",
    "A lighthouse on a rocky point at night, its lamp shining through the fog; " * 12,  # past every limit
    "Red desert dunes.",
]

@pytest.fixture(scope="module")
def loaded(tiny_pipeline):
    """family -> (the pipeline itself, shardkit's encoders of it), each loaded once."""
    cache = {}

    def get(name):
        if name not in cache:
            import diffusers

            folder = tiny_pipeline(name)
            cls = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
            pipe = cls.from_pretrained(folder)
            cache[name] = pipe, load_pipeline_encoders(str(folder), torch.device("cpu"), "fp32", np.dtype(np.float16))
        return cache[name]

    return get


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_text_equals_the_pipelines_encode_prompt(name, loaded):
    pipe, encoders = loaded(name)
    stored = encoders.encode_captions(CAPTIONS, batch_size=2)
    ours = encoders.family.assemble(stored)
    reference = pipeline_reference(name, pipe, CAPTIONS)
    assert set(ours) == set(reference)
    for key, expected in reference.items():
        assert ours[key].shape == expected.shape, key
    mask = reference.get("prompt_attention_mask")
    if mask is not None:
        assert torch.equal(ours["prompt_attention_mask"], mask)
        valid = mask.bool()
        close_in_fp16(ours["prompt_embeds"][valid], reference["prompt_embeds"][valid])
        # Only the valid rows are stored.
        assert [len(sample["prompt_embeds"]) for sample in stored] == mask.sum(dim=1).tolist()
    else:
        close_in_fp16(ours["prompt_embeds"], reference["prompt_embeds"])
    for key in set(reference) - {"prompt_embeds", "prompt_attention_mask"}:
        close_in_fp16(ours[key], reference[key])


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_stored_arrays_follow_the_declared_members(name, loaded):
    _, encoders = loaded(name)
    members = {m.name: m for m in encoders.members}
    for sample in encoders.encode_captions(CAPTIONS[:3], batch_size=4):
        for key, array in sample.items():
            member = members[key]
            assert array.dtype == np.float16 and member.dtype == "store"
            rows_rule = member.shape[0]
            if rows_rule == "L":
                assert 1 <= array.shape[0] <= member.max_rows and array.shape[1:] == member.shape[1:]
            else:
                assert array.shape == member.shape
    text_members = {m.name for m in encoders.members if m.dtype == "store"}
    assert text_members == set(sample)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_latents_equal_the_pipelines_vae(name, loaded):
    pipe, encoders = loaded(name)
    spec = encoders.vae.spec
    height, width = 64, 96  # a bucket shape: divides by every family's spatial multiple
    pixels = torch.randint(0, 256, (2, height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    stored = torch.from_numpy(encoders.encode_images(pixels)).float()
    assert stored.shape[1:] == spec.stored_shape(height, width)
    with torch.no_grad():
        encoded = pipe.vae.encode(to_model_input(pixels))
    if spec.stored == "latent":
        reference = encoded.latent
        latents = stored
    else:
        reference = encoded.latent_dist.mean
        latents = stored[:, :spec.latent_channels]
        std = stored[:, spec.latent_channels:]
        assert torch.linalg.norm(std - encoded.latent_dist.std) <= 1e-3 * torch.linalg.norm(encoded.latent_dist.std)
    assert latents.shape == reference.shape
    assert torch.linalg.norm(latents - reference) <= 1e-3 * torch.linalg.norm(reference)
    # Normalisation from the config: (x - shift) * scale.
    config = pipe.vae.config
    assert spec.scaling_factor == config.scaling_factor
    assert spec.shift_factor == config.get("shift_factor")
    shift = config.get("shift_factor") or 0.0
    torch.testing.assert_close(spec.normalize(latents), (latents - shift) * config.scaling_factor)
    assert spec.downsample == pipe.vae_scale_factor


def test_latent_geometry_per_family(loaded):
    geometry = {name: loaded(name)[1].vae.spec for name in FAMILY_NAMES}
    assert geometry["sana"].vae_class == "AutoencoderDC" and geometry["sana"].downsample == 32
    assert geometry["sana"].stored == "latent" and geometry["sana"].shift_factor is None
    for name in ("sd3", "flux"):
        assert geometry[name].latent_channels == 16 and geometry[name].shift_factor is not None
    for name in ("pixart-alpha", "pixart-sigma", "sdxl"):
        assert geometry[name].downsample == 8 and geometry[name].stored == "mean_std"


@pytest.mark.parametrize("family", FAMILIES.values(), ids=lambda f: f.name)
def test_bucket_tables_fit_the_vae_and_the_patching(family):
    assert {512, 1024} <= set(family.resolutions)
    for resolution in family.resolutions:
        for bucket in family.bucket_table(resolution).buckets:
            assert bucket.height % family.spatial_multiple == 0 and bucket.width % family.spatial_multiple == 0


def test_pixart_and_sana_tables_hold_every_bucket_the_pipelines_bin_to():
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha

    for family_name in ("pixart-alpha", "pixart-sigma", "sana"):
        family = family_by_name(family_name)
        for resolution, binned in ((512, alpha.ASPECT_RATIO_512_BIN), (1024, alpha.ASPECT_RATIO_1024_BIN)):
            table = family.bucket_table(resolution).table
            assert {key: tuple(map(int, hw)) for key, hw in binned.items()}.items() <= table.items()


def test_a_resolution_that_does_not_fit_is_refused_in_one_line():
    with pytest.raises(ShardkitError, match="takes --resolution 512 or 1024") as error:
        family_by_name("sana").bucket_table(256)
    assert "\n" not in str(error.value)


def test_an_unknown_pipeline_class_is_refused_listing_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ShardkitError) as error:
        family_for(read_model_index(str(tmp_path)))
    message = str(error.value)
    assert "KandinskyPipeline" in message and "\n" not in message
    assert all(name in message for name in FAMILIES)


def test_components_come_from_transformers_and_diffusers_only(tmp_path, tiny_pipeline):
    folder = tmp_path / "pipeline"
    folder.mkdir()
    index = json.loads((tiny_pipeline("flux") / "model_index.json").read_text())
    index["text_encoder"] = ["os", "system"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ShardkitError, match="from transformers and diffusers only"):
        load_pipeline_encoders(str(folder), torch.device("cpu"))


def test_text_identity_records_what_the_pipeline_applied(loaded):
    from diffusers.utils import is_bs4_available, is_ftfy_available

    applied = "clean_caption" if is_bs4_available() and is_ftfy_available() else "lower_strip"
    for name in ("pixart-alpha", "pixart-sigma"):
        identity = loaded(name)[1].identity()
        assert identity["text"]["caption_preprocessing"] == applied
        assert identity["text"]["bs4_installed"] == is_bs4_available()
        assert identity["text"]["ftfy_installed"] == is_ftfy_available() and identity["text"]["clean_caption"]
    sana = loaded("sana")[1].identity()["text"]
    assert sana["caption_preprocessing"] == "lower_strip"  # Sana's __call__ default is clean_caption=False
    assert sana["clean_caption"] is False
    assert sana["instruction_tokens"] > 0 and sana["max_sequence_length"] == 300
    assert loaded("sd3")[1].identity()["text"]["max_sequence_length"] == 256
    flux = loaded("flux")[1].identity()
    assert flux["text"]["max_sequence_length"] == 512
    assert flux["latents"]["vae_class"] == "AutoencoderKL" and flux["latents"]["shift_factor"] == pytest.approx(0.1159)


@pytest.mark.parametrize("name", ["pixart-sigma", "sana", "sdxl", "sd3", "flux"])
def test_a_diffusers_batch_is_what_the_pipeline_computes(name, loaded):
    from shardkit.families.collate import diffusers_batch
    from shardkit.families.sdxl import micro_conditioning

    pipe, encoders = loaded(name)
    spec = encoders.vae.spec
    pixels = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    stored_latents = list(encoders.encode_images(pixels))
    captions = CAPTIONS[:2]
    texts = encoders.encode_captions(captions, batch_size=4)
    if encoders.family.micro_conditioning:
        for sample in texts:
            sample.update(micro_conditioning((480, 640), (0, 80), (64, 64)))
    with torch.no_grad():
        encoded = pipe.vae.encode(to_model_input(pixels))
    mean = encoded.latent if spec.stored == "latent" else encoded.latent_dist.mean

    batch = diffusers_batch(encoders.family, spec, stored_latents, texts, ["a", "b"], captions, latent="mean")
    assert torch.linalg.norm(batch["latents"] - mean) <= 1e-3 * torch.linalg.norm(mean)
    assert batch["keys"] == ["a", "b"] and batch["captions"] == captions
    # The text side is the pipeline's encode_prompt outputs (test_text_equals_the_pipelines_encode_prompt).
    assert set(batch) == {"latents", "keys", "captions"} | set(encoders.family.assemble(texts))
    if name == "sdxl":
        assert batch["original_size"].tolist() == [[480, 640]] * 2
        assert batch["crop_coords_top_left"].tolist() == [[0, 80]] * 2
        assert batch["target_size"].tolist() == [[64, 64]] * 2

    normalized = diffusers_batch(encoders.family, spec, stored_latents, texts, ["a", "b"], captions, latent="mean",
                                 normalize=True)["latents"]
    shift = pipe.vae.config.get("shift_factor") or 0.0
    torch.testing.assert_close(normalized, (batch["latents"] - shift) * pipe.vae.config.scaling_factor)

    sampled = diffusers_batch(encoders.family, spec, stored_latents, texts, ["a", "b"], captions,
                              generator=torch.Generator().manual_seed(0))["latents"]
    if spec.stored == "latent":
        assert torch.equal(sampled, batch["latents"])  # DC-AE: deterministic, no posterior
    else:
        assert not torch.equal(sampled, batch["latents"])
        std = torch.from_numpy(np.stack(stored_latents)).float()[:, spec.latent_channels:]
        assert ((sampled - batch["latents"]).abs() <= 6 * std + 1e-6).all()


def test_repeated_captions_are_encoded_once_and_an_empty_list_is_nothing(loaded, monkeypatch):
    _, encoders = loaded("pixart-sigma")
    seen = []
    original = type(encoders.family).encode

    def counting(self, parts, captions, batch_size, store_dtype):
        seen.append(list(captions))
        return original(self, parts, captions, batch_size, store_dtype)

    monkeypatch.setattr(type(encoders.family), "encode", counting)
    stored = encoders.encode_captions(["b", "a", "b"], batch_size=4)
    assert seen == [["b", "a"]]
    assert np.array_equal(stored[0]["prompt_embeds"], stored[2]["prompt_embeds"])
    assert encoders.encode_captions([], batch_size=4) == []


def test_a_missing_pipeline_folder_is_one_line(tmp_path):
    with pytest.raises(ShardkitError) as error:
        load_pipeline_encoders(str(tmp_path / "absent"), torch.device("cpu"))
    assert "does not exist" in str(error.value) and "\n" not in str(error.value)


def test_pickled_weights_are_never_loaded(tmp_path, tiny_pipeline):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline("pixart-sigma"), folder)
    weights = folder / "text_encoder" / "model.safetensors"
    torch.save(load_file(weights), folder / "text_encoder" / "pytorch_model.bin")  # a pickle
    weights.unlink()
    with pytest.raises(ShardkitError, match="cannot load the text_encoder"):
        load_pipeline_encoders(str(folder), torch.device("cpu"))
