"""The tiny offline models load like PixArt-Σ's real ones and are byte-reproducible."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from shardkit.testing import tiny_models
from shardkit.testing.tiny_models import write_tiny_models

CAPTIONS = [
    "A fluffy orange cat sleeps on a sunny windowsill.",
    "A lighthouse on a rocky point at night, its lamp shining through the fog.",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_models(tmp_path_factory.mktemp("tiny") / "models")


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_layout_looks_like_a_diffusers_repo(tiny_dir: Path) -> None:
    index = json.loads((tiny_dir / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == "PixArtSigmaPipeline"
    assert index["_shardkit_tiny"] is True
    assert index["tokenizer"] == ["transformers", "T5TokenizerFast"]
    assert (tiny_dir / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_dir / "text_encoder" / "model.safetensors").is_file()
    # No pickles anywhere.
    assert not [p for p in tiny_dir.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
    # No leftover staging folders next to the result.
    assert [p.name for p in tiny_dir.parent.iterdir()] == ["models"]


def test_vae_downsamples_8x_into_4_channels(tiny_dir: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_dir, subfolder="vae")
    assert vae.config.scaling_factor == pytest.approx(0.13025)
    with torch.no_grad():
        mean = vae.encode(torch.randn(2, 3, 64, 96)).latent_dist.mean
    assert mean.shape == (2, 4, 8, 12)


def test_tokenizer_ends_with_eos_and_pads(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 512
    assert "<extra_id_0>" in tokenizer.get_vocab() and "<extra_id_99>" in tokenizer.get_vocab()

    awkward = ["", "café naïve façade", "emoji 😀🎉, Arabic مرحبا, Hebrew שלום, CJK 你好世界", "word " * 1000]
    for text in CAPTIONS + awkward:
        assert tokenizer(text).input_ids[-1] == 1

    batch = tokenizer(
        CAPTIONS + awkward, padding="max_length", max_length=300, truncation=True, return_tensors="pt"
    )
    assert batch.input_ids.shape == (6, 300)
    lengths = batch.attention_mask.sum(dim=1)
    for row, length in zip(batch.input_ids, lengths):
        assert row[length - 1] == 1  # eos survives truncation
        assert (row[length:] == 0).all()  # then padding
    assert lengths[-1] == 300
    # Known words are whole pieces, not <unk>.
    assert tokenizer.unk_token_id not in tokenizer(CAPTIONS[0]).input_ids


def test_text_encoder_is_32_wide_and_tells_captions_apart(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer")
    encoder = T5EncoderModel.from_pretrained(tiny_dir, subfolder="text_encoder")
    assert encoder.config.d_model == 32
    assert encoder.config.vocab_size >= len(tokenizer)

    batch = tokenizer(CAPTIONS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    assert hidden.shape == (2, 32, 32)
    assert torch.isfinite(hidden).all()
    assert hidden.std() > 0
    assert not torch.allclose(hidden[0], hidden[1])


def test_two_writes_are_byte_identical(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_models(tmp_path / "again")
    assert _file_hashes(again) == _file_hashes(tiny_dir)


def test_complete_folder_is_kept_unless_forced(tmp_path: Path) -> None:
    dest = write_tiny_models(tmp_path / "models", seed=1)
    weights = dest / "text_encoder" / "model.safetensors"
    before = weights.read_bytes()

    write_tiny_models(dest, seed=2)
    assert weights.read_bytes() == before

    write_tiny_models(dest, seed=2, force=True)
    assert weights.read_bytes() != before


def test_unrelated_folder_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me", encoding="utf-8")
    for force in (False, True):
        with pytest.raises(FileExistsError):
            write_tiny_models(tmp_path, force=force)
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tiny_models, "_write_text_encoder", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_tiny_models(tmp_path / "models")
    assert list(tmp_path.iterdir()) == []
