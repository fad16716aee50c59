"""The command line: documented options, presets, one-line errors with exit code 2."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from shardkit.cli import main
from shardkit.config import BuildConfig, make_config, preset_names, read_preset
from shardkit.errors import ConfigError


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_build_help_documents_every_option():
    result = _run("build", "--help")
    assert result.exit_code == 0
    for field in dataclasses.fields(BuildConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "keep_images":
            flag = "--keep-images"
        if field.name == "filters":
            flag = "--filter"  # one expression per flag, repeated
        assert flag in result.output, flag
    assert "--config" in result.output and "--overwrite" in result.output


def test_presets_exist_and_load():
    assert {"pixart-sigma-512", "pixart-sigma-1024", "tiny-offline"} <= set(preset_names())
    config = make_config("pixart-sigma-1024")
    assert config.resolution == 1024 and config.max_length == 300
    assert make_config("pixart-sigma-1024", resolution=512).resolution == 512  # flags override presets


def test_preset_with_unknown_option_is_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[build]\nresolutoin = 512\n")
    with pytest.raises(ConfigError, match="unknown option"):
        read_preset(str(bad))


@pytest.mark.parametrize("args,needle", [
    (["build", "{missing}", "{out}", "--config", "tiny-offline"], "does not exist"),
    (["build", "{toy}", "{out}", "--config", "no-such-preset"], "unknown config preset"),
    (["build", "{toy}", "{out}", "--config", "{badtoml}"], "cannot read"),
    (["build", "{toy}", "{out}", "--vae", "{missing}", "--t5", "{missing}", "--device", "cpu"], "cannot load the VAE"),
    (["build", "{toy}", "{out}", "--config", "tiny-offline", "--vae", "{models}", "--t5", "{missing}"], "cannot load the T5"),
    (["build", "{toy}", "{out}", "--config", "tiny-offline", "--batch-size", "0"], "batch_size must be >= 1"),
])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, toy_dataset, tiny_models, args, needle):
    badtoml = tmp_path / "broken.toml"
    badtoml.write_text("[build\n")
    values = {"missing": tmp_path / "missing", "out": tmp_path / "out", "toy": toy_dataset, "badtoml": badtoml,
              "models": tiny_models}
    result = CliRunner().invoke(main, [a.format(**values) for a in args])
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert "Traceback" not in result.output


def test_build_command_runs_and_summarises(tmp_path, toy_dataset, tiny_models):
    out = tmp_path / "out"
    result = _run("build", toy_dataset, out, "--config", "tiny-offline", "--vae", tiny_models, "--t5", tiny_models,
                  "--workers", "0", "--no-progress", "--captions", "prompt")
    assert result.exit_code == 0, result.output
    assert "17 written, 0 skipped of 17 records read" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["captions"] == ["prompt"] and manifest["config"]["workers"] == 0
    assert list(manifest["token_lengths"]) == ["prompt"]


def test_nonempty_foreign_output_is_refused(tmp_path, toy_dataset, tiny_models):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = _run("build", toy_dataset, out, "--config", "tiny-offline", "--vae", tiny_models, "--t5", tiny_models)
    assert result.exit_code == 2 and "not empty" in result.output
    assert (out / "precious.txt").read_text() == "keep me"


def test_tiny_models_command(tmp_path):
    result = _run("tiny-models", tmp_path / "m")
    assert result.exit_code == 0
    assert {"vae", "text_encoder", "tokenizer"} <= {p.name for p in (tmp_path / "m").iterdir()}
    assert "offline demo and tests only" in " ".join(_run("tiny-models", "--help").output.split())
