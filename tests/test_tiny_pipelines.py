"""`shardkit tiny-models DIR --pipeline FAMILY`: a tiny pipeline folder the pipeline class loads, reproducibly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from shardkit.cli import main
from shardkit.testing.tiny_pipelines import TINY_FAMILIES, write_tiny_pipeline


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_the_pipeline_class_loads_it_and_it_is_tiny(family, tiny_pipeline):
    import diffusers

    folder = tiny_pipeline(family)
    index = json.loads((folder / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(folder)
    assert pipe.vae is not None and (getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)) is not None
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 2_000_000
    assert not [p for p in folder.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]


def test_two_writes_are_byte_identical(tiny_pipeline, tmp_path):
    assert _hashes(write_tiny_pipeline(tmp_path / "again", "sd3")) == _hashes(tiny_pipeline("sd3"))


def test_kept_unless_forced_and_never_over_unrelated_files(tmp_path):
    dest = write_tiny_pipeline(tmp_path / "p", "pixart-alpha", seed=1)
    weights = dest / "text_encoder" / "model.safetensors"
    before = weights.read_bytes()
    write_tiny_pipeline(dest, "pixart-alpha", seed=2)
    assert weights.read_bytes() == before
    with pytest.raises(FileExistsError, match="holds the tiny pixart-alpha models"):
        write_tiny_pipeline(dest, "flux")
    write_tiny_pipeline(dest, "pixart-alpha", seed=2, force=True)
    assert weights.read_bytes() != before

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_tiny_pipeline(tmp_path / "mine", "flux", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "p"]  # no staging leftovers


def test_cli_writes_a_family_and_refuses_in_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["tiny-models", str(tmp_path / "flux"), "--pipeline", "flux"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "flux" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    result = runner.invoke(main, ["tiny-models", str(tmp_path / "other"), "--pipeline", "sana"])
    assert result.exit_code == 2
    assert "refusing to replace it" in result.output and "Traceback" not in result.output
