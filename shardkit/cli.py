"""The shardkit command line: parse, load config, call one function per command."""

from __future__ import annotations

import functools
import logging
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .config import (COMPUTE_DTYPES, DEVICES, EMPTY_CAPTION_POLICIES, RESIZE_MODES, STORE_DTYPES, TINY_MODELS_HOME,
                     make_config, preset_names)
from .errors import ShardkitError
from .testing.tiny_pipelines import TINY_FAMILIES


def _user_errors(fn):
    """A user mistake is one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ShardkitError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: OUTPUT is left resumable; run the same command again to continue", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="shardkit")
@click.option("-v", "--verbose", is_flag=True, help="Log diagnostics to stderr.")
def main(verbose: bool) -> None:
    """Turn image-caption datasets into training-ready WebDataset shards of VAE latents and T5 features."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _csv(_ctx, _param, value):
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


@main.command()
@click.argument("source")
@click.argument("output")
@click.option("--config", "preset", help=f"Preset name ({', '.join(preset_names())}) or a .toml file; flags override it.")
@click.option("--resolution", type=click.Choice(["256", "512", "1024", "2048", "2880"]), default=None,
              help="PixArt aspect table (base resolution). [default: 512]")
@click.option("--max-ratio", type=float, default=None,
              help="Skip images whose max(h/w, w/h) exceeds this. [default: 4.5, PixArt's filter]")
@click.option("--resize-mode", type=click.Choice(RESIZE_MODES), default=None,
              help="crop: cover the bucket and centre-crop (PixArt training); stretch: resize to the bucket (PixArt's extractor). [default: crop]")
@click.option("--captions", callback=_csv, default=None,
              help="Comma-separated caption fields; the first is required, the rest are encoded where present and non-empty. [default: prompt,sharegpt4v]")
@click.option("--empty-caption", type=click.Choice(EMPTY_CAPTION_POLICIES), default=None,
              help="What to do when the first caption field is empty: skip the record, or encode the empty string. [default: skip]")
@click.option("--keep-images/--no-images", "keep_images", default=None,
              help="Store the original image bytes in the shards. [default: keep]")
@click.option("--store-dtype", type=click.Choice(STORE_DTYPES), default=None, help="dtype of stored latents and T5 features. [default: fp16]")
@click.option("--max-image-pixels", type=int, default=None,
              help="Skip images with more pixels than this (decompression bombs). [default: 89478485]")
@click.option("--max-image-bytes", type=click.IntRange(min=1), default=None,
              help="Skip image files (and tar members, Parquet cells) larger than this many bytes. [default: 8 bytes per pixel of --max-image-pixels + 1 MiB]")
@click.option("--image-root", default=None,
              help="Folder that image paths are relative to (JSONL and path columns of Parquet sources; overrides the layout's default).")
@click.option("--follow-symlinks-outside-root", is_flag=True, default=None,
              help="Read images through symbolic links that lead out of the image root (symlink farms); "
                   "otherwise such records are skipped as path_outside_root.")
@click.option("--image-column", default=None,
              help="Parquet / save_to_disk sources: the column holding image bytes, an {bytes, path} struct or a path. [default: found from the schema]")
@click.option("--filter", "filters", multiple=True,
              help="Keep records whose source metadata satisfies this expression, e.g. \"pwatermark < 0.5\" or "
                   "\"aesthetic >= 5 and punsafe < 0.1\"; repeat to require several. A record lacking a field fails.")
@click.option("--min-image-size", type=int, default=None, help="Skip images whose shorter side is under this many pixels. [default: 0, keep all]")
@click.option("--dedup/--no-dedup", default=None,
              help="Skip records whose image bytes equal an earlier record's (as duplicate_image). [default: off]")
@click.option("--vae", default=None, help="VAE: Hugging Face id or local folder. [default: madebyollin/sdxl-vae-fp16-fix]")
@click.option("--vae-subfolder", default=None, help="Subfolder of --vae holding the VAE (e.g. 'vae' in a pipeline repository).")
@click.option("--t5", default=None,
              help="T5: Hugging Face id or a folder holding text_encoder/ and tokenizer/. [default: PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers]")
@click.option("--max-length", type=int, default=None, help="T5 token limit (captions are truncated to it). [default: 300]")
@click.option("--pipeline", default=None,
              help="Encode as this diffusers text-to-image pipeline does (Hugging Face id or a folder with "
                   "model_index.json): its VAE and text encoders only, instead of --vae/--t5. Supported: PixArt-α/Σ, "
                   "Sana, SDXL, SD3, Flux.")
@click.option("--dtype", type=click.Choice(COMPUTE_DTYPES), default=None,
              help="Encoder compute dtype; auto is fp16 on CUDA (fp16 autocast over fp32 weights for a VAE "
                   "whose config sets force_upcast), fp32 on CPU. [default: auto]")
@click.option("--batch-size", type=int, default=None, help="Images per VAE batch (one bucket per batch). [default: 16]")
@click.option("--t5-batch-size", type=int, default=None, help="Most captions per T5 batch (captions are sorted by length and cut where padding is least). [default: 64]")
@click.option("--shard-max-count", type=int, default=None, help="Most samples in one shard. [default: 1000]")
@click.option("--shard-max-bytes", type=int, default=None, help="Most bytes in one shard. [default: 1000000000]")
@click.option("--device", type=click.Choice(DEVICES), default=None, help="Where the encoders run. [default: auto]")
@click.option("--workers", type=int, default=None, help="Image decode threads (0 decodes in the main thread). [default: 2]")
@click.option("--encoder-streams", type=int, default=None,
              help="Batches encoded at once, each on its own thread with a share of the CPU threads; "
                   "0 = auto: 1 on a GPU, 2 on a CPU where torch uses 2+ threads. [default: 0]")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar. [default: on]")
@click.option("--endpoint-url", default=None,
              help="S3-compatible endpoint for s3:// SOURCE and OUTPUT. [default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS]")
@click.option("--staging-dir", default=None,
              help="Local folder where shards bound for object storage are written before their upload, and where "
                   "images from tar and Parquet sources wait past --gather-memory. [default: the system temp folder]")
@click.option("--gather-memory", type=int, default=None,
              help="Most bytes of tar and Parquet source images held in memory while shards are gathered; "
                   "the rest wait in files under --staging-dir. [default: 1073741824]")
@click.option("--storage-options", default=None,
              help="More fsspec options for s3:// (or other URL) SOURCE and OUTPUT, as JSON; never recorded. "
                   "Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE.")
@click.option("--overwrite", is_flag=True, help="Delete an existing build in OUTPUT and start over (otherwise a rerun resumes).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process (one rank of it under torchrun or srun); ray: a Ray cluster runs the plan.")
@click.option("--ray-address", default=None,
              help="Ray cluster to join (e.g. ray://head:10001, or auto). [default: RAY_ADDRESS, else a local Ray]")
@click.option("--ray-actors", type=click.IntRange(min=1), default=None,
              help="Encoder actors. [default: GPUs / --ray-gpus-per-actor on a GPU cluster, else half the CPUs]")
@click.option("--ray-gpus-per-actor", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="GPUs per encoder actor; 0.5 puts two actors on each GPU.")
@_user_errors
def build(source, output, preset, overwrite, resolution, storage_options, filters, engine, ray_address, ray_actors,
          ray_gpus_per_actor, **options):
    """Encode SOURCE into aspect-bucketed shards in OUTPUT.

    SOURCE is a PixArt-Σ dataset folder (InternImgs/ + InternData/data_info.json), its InternData
    folder or json file, a .jsonl file with the same fields, a folder of images with same-stem
    .txt captions, WebDataset tar shards (img2dataset's output folder, a .tar, a brace pattern like
    'data/{00000..00127}.tar' or a .txt list of shards), Parquet files (a file, folder or glob) or
    a folder written by datasets' save_to_disk. SOURCE and OUTPUT may be s3:// URLs (SOURCE also
    http(s)://). Running the same command again on an unfinished OUTPUT resumes it, with any
    number of processes. Under torchrun (or srun) each rank writes its share of the plan's
    shards; --engine ray runs the plan on a Ray cluster; see docs/scale-out.md.
    """
    from .build import BuildJob
    from .distributed import discover_ranks, finish_ranks, joined_ranks
    from .report import format_build_summary, progress_bar
    from .storage import parse_storage_options

    fs_options = parse_storage_options(storage_options)
    config = make_config(preset, resolution=int(resolution) if resolution else None, filters=filters or None, **options)
    # torchrun, Slurm and schedulers stop workers with SIGTERM: unwind as on Ctrl-C, so that the
    # build's locks are deleted and OUTPUT is left resumable.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if engine == "ray":
        from .ray_engine import RayOptions, build_on_ray

        ray_options = RayOptions(address=ray_address, actors=ray_actors, gpus_per_actor=ray_gpus_per_actor)
        summary = build_on_ray(source, output, config, ray_options, overwrite=overwrite, storage_options=fs_options,
                               progress=config.progress)
        click.echo(format_build_summary(summary))
        _refuse_empty(summary)
        return
    if ray_address or ray_actors:
        raise ShardkitError("--ray-address and --ray-actors apply to --engine ray")
    ranks = discover_ranks()
    show_progress = config.progress and ranks.rank == 0  # one bar per launch, not one per rank
    # Status lines fill the seconds before the bar, at a terminal (as the bar itself).
    announce = functools.partial(click.echo, err=True) if show_progress and sys.stderr.isatty() else None
    with joined_ranks(ranks) as group, BuildJob(source, output, config, overwrite=overwrite, storage_options=fs_options,
                                                 ranks=ranks, announce=announce) as job:
        job.prepare_plan(group)
        note = job.resume_note(job.ledger())
        if note and ranks.rank == 0:
            click.echo(note, err=True)
        with progress_bar(show_progress, job.pending_records() if show_progress else None) as advance:
            summary = job.run(advance)
        summary.merged = finish_ranks(job.ledger(), ranks, group)
    click.echo(format_build_summary(summary))
    _refuse_empty(summary)
    global finished_rank_of_a_rendezvous
    finished_rank_of_a_rendezvous = group is not None
    if ranks.distributed:
        if summary.merged is True:
            click.echo(f"{ranks.describe()}: done ({summary.shards_written} shards); rank 0 wrote the final manifest.json")
        elif summary.merged is not None or summary.complete:
            click.echo(f"{ranks.describe()}: done ({summary.shards_written} shards); the build is complete")
        else:
            click.echo(f"{ranks.describe()}: done ({summary.shards_written} shards); other processes still write the "
                       f"rest: whichever finishes last writes the complete manifest.json")


# Set once a rank that joined a rendezvous has finished and closed its group. The interpreter's
# own teardown can then still abort the process from torch's gloo threads (std::terminate), after
# every file is written and closed, and torchrun would report the finished launch as failed:
# `python -m shardkit` leaves without that teardown.
finished_rank_of_a_rendezvous = False


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def _refuse_empty(summary) -> None:
    """An empty build is a mistake, not a result (judged once the whole plan is done)."""
    if summary.complete and summary.written == 0:
        reasons = ", ".join(f"{reason} {count}" for reason, count in summary.skipped_by_reason.items())
        raise ShardkitError(f"no sample was written: every record was skipped ({reasons}); see "
                            f"{summary.output}/failures.jsonl for each record's detail")


@main.command("tiny-models")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("--pipeline", "family", type=click.Choice(tuple(TINY_FAMILIES)), default=None,
              help="Write a whole tiny diffusers pipeline of this family instead (VAE, text encoders, tokenizers, "
                   "transformer/UNet, scheduler); DEST is then required.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--force", is_flag=True, help="Rewrite DEST even if it already holds the tiny models.")
@_user_errors
def tiny_models(dest, family, seed, force):
    """Write tiny random encoders (VAE, T5, tokenizer) to DEST, for the offline demo and tests only.

    DEST defaults to ~/.cache/shardkit/tiny-models, where `--config tiny-offline` reads them.
    They load through the same from_pretrained code path as the real SDXL VAE and T5 but
    produce meaningless features: never train on a build made with them. With --pipeline FAMILY,
    DEST gets the folder `save_pretrained` writes for that family's diffusers pipeline, every
    component tiny.
    """
    from .testing.tiny_models import write_tiny_models
    from .testing.tiny_pipelines import write_tiny_pipeline

    if family and dest is None:
        raise ShardkitError("--pipeline needs DEST, the folder to write the tiny pipeline to")
    try:
        if family:
            path = write_tiny_pipeline(dest, family, seed=seed, force=force)
        else:
            path = write_tiny_models(dest or Path(TINY_MODELS_HOME).expanduser(), seed=seed, force=force)
    except FileExistsError as exc:
        raise ShardkitError(f"{exc}; pick another DEST") from None
    if family:
        click.echo(f"tiny {family} pipeline in {path} (model_index.json and one folder per component)")
        return
    click.echo(f"tiny models in {path} (vae/, text_encoder/, tokenizer/): use --vae {path} --vae-subfolder vae --t5 {path}")


@main.command("inspect")
@click.argument("output")
@click.option("--verify", is_flag=True, help="Read every shard end to end and check it against the manifest and the shard format.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (no progress bar).")
@click.option("--preview", type=click.Path(dir_okay=False), default=None,
              help="Draw a contact sheet with thumbnails per bucket and charts to this PNG file.")
@click.option("--decode-with", default=None, help="Preview thumbnails decoded from the latents by this VAE (folder or Hugging Face id).")
@click.option("--decode-subfolder", default=None, help="Subfolder of --decode-with holding the VAE (e.g. 'vae').")
@click.option("--thumbs-per-bucket", type=click.IntRange(1, 32), default=4, show_default=True,
              help="Thumbnails per bucket in the preview.")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for an s3:// OUTPUT. [default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS]")
@click.option("--storage-options", default=None, help="More fsspec options for a URL OUTPUT, as JSON.")
@click.option("--allow-incomplete", is_flag=True,
              help="Treat an unfinished (resumable) build as a warning: only damage to what it wrote fails --verify.")
@click.option("--jobs", type=click.IntRange(1, 256), default=None,
              help="Shards verified at once (threads); more help most when OUTPUT is in object storage. [default: 4]")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar while verifying. [default: on]")
@_user_errors
def inspect_command(output, verify, as_json, preview, decode_with, decode_subfolder, thumbs_per_bucket, endpoint_url,
                    storage_options, allow_incomplete, jobs, progress):
    """Show what the shard set in OUTPUT holds and, with --verify, prove every byte of it sound.

    OUTPUT is a `shardkit build` output folder or URL. Exit code 0: sound (or summary only);
    1: --verify found problems; 2: a usage error.
    """
    import json

    from .inspect import format_report, inspect_output
    from .storage import parse_storage_options, storage_options_for

    if (decode_with or decode_subfolder) and not preview:
        raise ShardkitError("--decode-with and --decode-subfolder only shape the preview; add --preview FILE.png")
    if decode_subfolder and not decode_with:
        raise ShardkitError("--decode-subfolder needs --decode-with VAE")
    report = inspect_output(output, verify_shards=verify, progress=progress and not as_json, preview=preview,
                            thumbs_per_bucket=thumbs_per_bucket, decode_with=decode_with, decode_subfolder=decode_subfolder,
                            allow_incomplete=allow_incomplete, jobs=jobs,
                            storage_options=storage_options_for(output, endpoint_url, parse_storage_options(storage_options)))
    click.echo(json.dumps(report.as_json(), indent=2, ensure_ascii=False) if as_json else format_report(report))
    sys.exit(report.exit_code)


@main.command("export")
@click.argument("output")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "export_format", type=click.Choice(["pixart"]), default="pixart", show_default=True,
              help="pixart: PixArt-Σ's InternData/ feature files + data_info.json (+ InternImgs/).")
@click.option("--max-length", type=int, default=None,
              help="Pad caption features to this many tokens. [default: the build's T5 max_length]")
@click.option("--images/--no-images", default=True, help="Copy the original images to DEST/InternImgs when the build kept them. [default: on]")
@click.option("--compress", is_flag=True, help="Write caption features with np.savez_compressed (smaller, slower).")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for an s3:// OUTPUT. [default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS]")
@click.option("--storage-options", default=None, help="More fsspec options for a URL OUTPUT, as JSON.")
@click.option("--overwrite", is_flag=True, help="Write into a DEST that is not empty.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar. [default: on]")
@_user_errors
def export_command(output, dest, export_format, max_length, images, compress, endpoint_url, storage_options, overwrite,
                   progress):
    """Write the build in OUTPUT (folder or manifest, local or URL) as PixArt-Σ's per-file layout in DEST."""
    from .export import PixArtExport
    from .report import progress_bar
    from .storage import parse_storage_options, storage_options_for

    options = storage_options_for(output, endpoint_url, parse_storage_options(storage_options))
    job = PixArtExport(output, dest, max_length=max_length, images=images, overwrite=overwrite, compress=compress,
                       storage_options=options)
    with progress_bar(progress, job.total_samples) as advance:
        summary = job.run(advance)
    captions = ", ".join(f"{count} in {folder}" for folder, count in summary.caption_features.items())
    click.echo(f"exported {summary.samples} samples ({export_format}) to {summary.dest}: "
               f"{summary.latents} latents, {captions}, {summary.images} images; {summary.data_info}")


@main.command("merge")
@click.argument("output")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for an s3:// OUTPUT. [default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS]")
@click.option("--storage-options", default=None, help="More fsspec options for a URL OUTPUT, as JSON.")
@_user_errors
def merge_command(output, endpoint_url, storage_options):
    """Write OUTPUT/manifest.json from the shards recorded as done, by hand.

    Workers write it themselves (the last to finish writes the complete one); use this after a
    worker died or when the manifest is wanted now. Refuses while shards of the plan are missing.
    """
    from .ledger import finish_by_hand
    from .storage import Storage, parse_storage_options, storage_options_for

    storage = Storage.for_url(output, storage_options_for(output, endpoint_url, parse_storage_options(storage_options)))
    click.echo(finish_by_hand(storage))


@main.command("index")
@click.argument("output")
@click.option("--format", "index_format", type=click.Choice(["wids", "energon"]), required=True,
              help="wids: a wids-shard-index-v1 JSON for wids.ShardListDataset; energon: .nv-meta/ and NAME.tar.idx "
                   "files so Megatron-Energon reads the build without `energon prepare`.")
@click.option("--output", "destination", default=None,
              help="Where the wids index goes (a file path or URL). [default: OUTPUT/wids-index.json]")
@click.option("--split-part", default="train", show_default=True, help="The energon split part that holds every shard.")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for an s3:// OUTPUT. [default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS]")
@click.option("--storage-options", default=None, help="More fsspec options for a URL OUTPUT, as JSON.")
@_user_errors
def index_command(output, index_format, destination, split_part, endpoint_url, storage_options):
    """Index the finished build in OUTPUT for another loader (wids, Megatron-Energon).

    Every shard is read once and must match the manifest (size, sha256, sample count).
    """
    from .index import write_index
    from .storage import parse_storage_options, storage_options_for

    report = write_index(output, index_format, destination=destination, split_part=split_part,
                         storage_options=storage_options_for(output, endpoint_url, parse_storage_options(storage_options)))
    where = report.written[0] if report.kind == "wids" else f"{len(report.written)} files in {output}"
    click.echo(f"indexed {report.samples} samples in {report.shards} shards ({report.kind}): {where}")


if __name__ == "__main__":
    main()
