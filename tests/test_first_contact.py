"""Mistakes a new user makes in the first hour: each stops with one line that names the cause and
what to do, exits non-zero, and (an option mistake) stops before the encoders load and before
OUTPUT is created."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from shardkit.build import BuildJob, build
from shardkit.cli import main
from shardkit.config import make_config, read_preset
from shardkit.errors import ShardkitError
from shardkit.inspect import format_report, inspect_output
from test_resilience import interrupt_build

REPO = Path(__file__).resolve().parent.parent


def _cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def _error_line(result) -> str:
    """The one line a mistake prints; fails unless the command exited 2 with exactly that."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def _image_folder(root: Path, names: dict[str, str | None]) -> Path:
    """Images (64x64) with their same-stem .txt caption, or none where the caption is None."""
    root.mkdir(parents=True)
    for index, (name, caption) in enumerate(names.items()):
        array = np.random.default_rng(index).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(array).save(root / name)
        if caption is not None:
            (root / name).with_suffix(".txt").write_text(caption)
    return root


def _tiny_args(models: Path) -> list:
    return ["--resolution", "256", "--vae", models, "--vae-subfolder", "vae", "--t5", models, "--device", "cpu",
            "--dtype", "fp32", "--workers", "0"]


# ---- --captions is checked against the source before the encoders load ----------------------

@pytest.mark.parametrize("captions, needle", [
    ("promt", "no record in pixart source"),
    ("prompt,sharegtp4v", "'sharegtp4v' caption field"),
])
def test_caption_fields_no_record_has_stop_before_the_encoders(toy_dataset, tmp_path, captions, needle):
    output = tmp_path / "out"
    # A VAE that cannot load: the caption mistake must be found first.
    line = _error_line(_cli("build", toy_dataset, output, "--captions", captions, "--vae", tmp_path / "no-vae",
                            "--t5", tmp_path / "no-t5"))
    assert needle in line and "fields there: " in line and "prompt, sharegpt4v" in line and "--captions" in line
    assert not output.exists()


def test_a_large_source_is_checked_against_its_first_records_and_says_so(tmp_path):
    source = tmp_path / "big.jsonl"
    source.write_text("".join(json.dumps({"path": f"{i}.jpg", "caption": "x"}) + "\n" for i in range(1500)))
    line = _error_line(_cli("build", source, tmp_path / "out", "--captions", "prompt"))
    assert "in the first 1000 records" in line and "'prompt'" in line and "fields there: caption" in line
    assert not (tmp_path / "out").exists()


def test_a_folder_without_caption_files_stops_naming_the_txt(tmp_path):
    source = _image_folder(tmp_path / "images", {"a.png": None, "b.png": None})
    line = _error_line(_cli("build", source, tmp_path / "out", "--vae", tmp_path / "no-vae"))
    assert "same-stem .txt" in line and "a.txt for a.png" in line
    assert not (tmp_path / "out").exists()


def test_a_folder_image_without_its_txt_is_skipped_naming_the_txt(tmp_path, make_config, encoders):
    source = _image_folder(tmp_path / "folder", {"a.png": "a photo", "b.png": None})
    summary = build(str(source), tmp_path / "out", make_config(), encoders=encoders)
    assert (summary.written, summary.skipped) == (1, 1)
    failure = json.loads((tmp_path / "out" / "failures.jsonl").read_text())
    assert failure["reason"] == "missing_caption" and "b.txt is missing" in failure["detail"]


def test_a_failed_encoder_load_leaves_no_output_folder(toy_dataset, tiny_models, tmp_path):
    output = tmp_path / "out"
    line = _error_line(_cli("build", toy_dataset, output, "--vae", tmp_path / "no-vae", "--t5", tiny_models,
                            "--device", "cpu"))
    assert "cannot load the VAE" in line
    assert not output.exists()


def test_folder_and_jsonl_sources_give_the_progress_bar_its_total(tmp_path, make_config, encoders, toy_dataset):
    """The bar's total is the records of the plan's shards still to write (planning's skips are done)."""
    from shardkit.build import BuildJob

    folder = _image_folder(tmp_path / "images", {"a.png": "a", "b.png": "b", "c.png": None})
    (folder / "notes.md").write_text("not an image")
    lines = tmp_path / "data.jsonl"
    lines.write_text("".join(json.dumps({"path": name, "prompt": "x"}) + "\n"
                             for name in sorted(p.name for p in (toy_dataset / "InternImgs").iterdir())[:5]))
    for source, root, total in ((folder, None, 2), (lines, str(toy_dataset / "InternImgs"), 5)):
        with BuildJob(str(source), tmp_path / f"out-{source.name}", make_config(image_root=root),
                      encoders=encoders) as job:
            job.prepare_plan()
            assert job.pending_records() == total, source


# ---- a build that writes nothing fails, and verify says so ---------------------------------

def test_a_build_that_writes_nothing_exits_nonzero_and_verify_finds_it(tmp_path, tiny_models):
    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps({"path": f"gone{i}.jpg", "width": 64, "height": 64, "prompt": "a photo"})
                              + "\n" for i in range(3)))
    output = tmp_path / "out"
    result = _cli("build", source, output, *_tiny_args(tiny_models), "--no-progress")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no sample was written" in errors[0] and "missing_file 3" in errors[0]
    assert "failures.jsonl" in errors[0] and "Traceback" not in result.output

    verify = _cli("inspect", output, "--verify", "--no-progress")
    assert verify.exit_code == 1 and "empty_build" in verify.output, verify.output


# ---- encoders: an unreachable hub, a broken tokenizer folder ---------------------------------

def test_an_offline_hub_is_named_in_one_line_before_output_exists(toy_dataset, tmp_path):
    output = tmp_path / "out"
    line = _error_line(_cli("build", toy_dataset, output, "--vae", "shardkit-test/absent-vae",
                            "--t5", "shardkit-test/absent-t5", "--device", "cpu", env={"HF_HUB_OFFLINE": "1"}))
    assert "HF_HUB_OFFLINE" in line and "'shardkit-test/absent-vae'" in line and "'shardkit-test/absent-t5'" in line
    assert "--vae DIR" in line and "--t5 DIR" in line
    assert not output.exists()


def test_an_unreachable_hub_is_named_in_one_line_without_retries(toy_dataset, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": f"http://127.0.0.1:{port}", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "shardkit", "build", str(toy_dataset), str(tmp_path / "out"),
                             "--device", "cpu", "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{port} cannot be reached" in lines[0] and "--vae DIR" in lines[0] and "--t5 DIR" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["missing", "unreadable", "no vocabulary"])
def test_a_missing_or_broken_tokenizer_folder_is_named(toy_dataset, tiny_models, tmp_path, damage):
    t5 = tmp_path / "t5"
    shutil.copytree(tiny_models, t5)
    if damage == "missing":
        shutil.rmtree(t5 / "tokenizer")
    elif damage == "unreadable":
        (t5 / "tokenizer" / "tokenizer.json").write_text("not json")
    else:  # transformers then builds a tokenizer that knows only its special tokens
        (t5 / "tokenizer" / "tokenizer.json").unlink()
    line = _error_line(_cli("build", toy_dataset, tmp_path / "out", "--vae", tiny_models, "--vae-subfolder", "vae",
                            "--t5", t5, "--device", "cpu"))
    assert f"{t5 / 'tokenizer'}/" in line and "tokenizer.json or spiece.model" in line
    assert not (tmp_path / "out").exists()


# ---- presets, changed options ----------------------------------------------------------------

def test_the_tiny_offline_preset_works_from_any_folder(tiny_models, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(tiny_models, home / ".cache" / "shardkit" / "tiny-models")
    monkeypatch.setenv("HOME", str(home))
    source = _image_folder(tmp_path / "images", {"a.png": "a photo", "b.png": "another photo"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert make_config("tiny-offline").vae == str(home / ".cache" / "shardkit" / "tiny-models")
    result = _cli("build", source, tmp_path / "out", "--config", "tiny-offline", "--workers", "0", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "2 written, 0 skipped of 2 records read" in result.output


def test_relative_paths_in_a_toml_file_are_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.toml").write_text('[build]\nvae = "./models"\nt5 = "org/name"\n')
    monkeypatch.chdir(tmp_path)
    options = read_preset("conf/mine.toml")
    assert options == {"vae": str(tmp_path / "conf" / "models"), "t5": "org/name"}


def test_changed_options_show_old_and_new_values(toy_build, toy_dataset, make_config, encoders, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(toy_build, output)
    with pytest.raises(ShardkitError) as caught:
        build(str(toy_dataset), output, make_config(batch_size=8, resize_mode="stretch"), encoders=encoders)
    assert "batch_size 4 -> 8" in str(caught.value) and "resize_mode crop -> stretch" in str(caught.value)


# ---- resume: said at the start, kept apart in the summary; inspect of an unfinished build -----

@pytest.fixture
def unfinished_build(toy_dataset, make_config, encoders, tmp_path, monkeypatch) -> Path:
    output = tmp_path / "unfinished"
    interrupt_build(toy_dataset, output, make_config(), encoders, monkeypatch)
    return output


def test_a_resume_says_what_it_keeps_and_counts_this_run_apart(unfinished_build, toy_dataset, tiny_models):
    manifest = json.loads((unfinished_build / "manifest.json").read_text())
    kept_shards = len(manifest["shards"])
    kept = sum(shard["samples"] for shard in manifest["shards"])
    assert manifest["status"] == "in_progress" and 0 < kept < 17
    result = _cli("build", toy_dataset, unfinished_build, *_tiny_args(tiny_models), "--batch-size", "4",
                  "--t5-batch-size", "8", "--shard-max-count", "8", "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"resuming {unfinished_build}: {kept_shards} shards ({kept} samples) kept from an earlier run" in result.output
    assert "17 written, 0 skipped of 17 records read" in result.output
    assert f"this run wrote {17 - kept} samples" in result.output
    assert f"kept from an earlier run: {kept} samples" in result.output


def test_inspect_of_an_unfinished_build_counts_consistently(unfinished_build):
    manifest = json.loads((unfinished_build / "manifest.json").read_text())
    samples = sum(shard["samples"] for shard in manifest["shards"])
    assert manifest["records"]["read"] == samples + manifest["records"]["skipped"]
    report = format_report(inspect_output(str(unfinished_build)))
    assert f"{samples} records read, 0 skipped so far" in report


def test_the_build_announces_the_encoder_load(toy_dataset, make_config, tmp_path):
    lines = []
    with BuildJob(str(toy_dataset), tmp_path / "out", make_config(), announce=lines.append):
        pass
    assert lines == [f"loading encoders: VAE {make_config().vae}, T5 {make_config().t5} ..."]


# ---- Python 3.10 ---------------------------------------------------------------------------

def test_config_reads_presets_with_tomli_where_there_is_no_tomllib():
    script = ("import sys; sys.modules['tomllib'] = None\n"  # as on Python 3.10: `import tomllib` fails
              "import shardkit.config as config\n"
              "assert config.tomllib.__name__ == 'tomli'\n"
              "print(config.make_config('pixart-sigma-1024').resolution)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1024"
