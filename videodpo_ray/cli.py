"""The `videodpo-ray` command line. Each command only parses arguments and calls into the library or a job."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="VideoDPO on Ray: generate, score, pair, train, evaluate."
)
convert_app = typer.Typer(no_args_is_help=True, help="Convert original checkpoints into the model layer's format.")
app.add_typer(convert_app, name="convert")
runs_app = typer.Typer(no_args_is_help=True, help="Housekeeping of training runs on storage.")
app.add_typer(runs_app, name="runs")


@app.command()
def train(
    config: Path = typer.Argument(..., help="training YAML (configs/train_*.yaml)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides"),
) -> None:
    """Fine-tune a model with Diffusion-DPO on pair shards (Ray Train + DeepSpeed)."""
    _job("train", config, overrides)


def _job(module: str, config: Path, overrides: list[str] | None) -> None:
    """Run `jobs.<module>.main([CONFIG, *overrides])` and exit with its code. An unreadable config file is refused
    first, before the job's imports (torch, Ray: seconds) are paid for."""
    import importlib

    if not config.is_file():
        typer.echo(f"error: {config}: cannot read config ({'a directory' if config.is_dir() else 'no such file'})",
                   err=True)
        raise typer.Exit(code=2)
    raise typer.Exit(code=importlib.import_module(f"jobs.{module}").main([str(config), *(overrides or [])]))


CONFIG = typer.Argument(..., help="the job's YAML config")
OVERRIDES = typer.Argument(None, help="key.sub=value overrides")


@app.command()
def generate(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Generate + score: N samples per prompt on sampler actors, OmniScore on scorer actors (GenerateConfig)."""
    _job("generate", config, overrides)


@app.command()
def pair(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Pair: best-worst (or rank) pairs, filters and weights, VAE latents in pair shards (PairConfig)."""
    _job("pair", config, overrides)


@app.command()
def run(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """The whole pipeline: generate -> pair -> train -> evaluate -> report (PipelineConfig); resumable as a whole."""
    _job("pipeline", config, overrides)


@app.command()
def status(run_url: str = typer.Argument(..., metavar="RUN", help="an output root or a training run (path or URL)")):
    """What a run on storage has committed: shards, pairs, checkpoints, the last step's metrics, the evaluation."""
    from videodpo_ray.stages.status import render_status, run_status

    found = run_status(run_url)
    typer.echo(render_status(found))
    if not found["exists"]:
        raise typer.Exit(code=2)  # a mistyped path, as every command's bad input


@app.command()
def evaluate(
    config: Path = typer.Argument(..., help="evaluate YAML (EvaluateConfig: out, prompts, model, tuned, scorer, ...)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides"),
) -> None:
    """Base vs tuned on held-out prompts and seeds: results.parquet, summary.json and index.html under `out`."""
    from jobs.evaluate import main as evaluate_main

    raise typer.Exit(code=evaluate_main([str(config), *(overrides or [])]))


@app.command()
def demo(
    out: str = typer.Option("demo-output", help="output root (local path or URL) for shards, training and report"),
    num_cpus: int = typer.Option(
        4, min=1, help="logical CPUs of the local Ray cluster (ignored when RAY_ADDRESS is set)"
    ),
) -> None:
    """Generate -> score -> pair -> train -> evaluate on a tiny model with local Ray; writes {out}/report.md."""
    from jobs.pipeline import run_demo

    raise typer.Exit(code=run_demo(out, num_cpus=num_cpus))


@app.command()
def score(
    videos: str = typer.Option(..., help="directory or URL of mp4 files"),
    prompts: str = typer.Option(..., help="file mapping video names to prompts"),
    out: str = typer.Option(..., help="output URL for score shards"),
    scorer: Optional[Path] = typer.Option(None, help="scorer YAML (ScorerConfig: dimensions, models.<dim>.weights)"),
    tiny: bool = typer.Option(False, help="random-init tiny models (tests, demos; the scores mean nothing)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. videos_per_shard=16"),
) -> None:
    """Score existing mp4 files with the OmniScore dimensions."""
    from jobs.score import run_score_command

    raise typer.Exit(code=run_score_command(videos, prompts, out, scorer, tiny, overrides or []))


@app.command()
def sample(
    model: str = typer.Option(..., help="model family: vc2, t2v_turbo, cogvideox, wan (any registered family)"),
    weights: str = typer.Option("tiny", help="weights directory, checkpoint or URL; 'tiny' = random-init preset"),
    prompts: str = typer.Option(..., help="prompt file: .txt (a line each), .json (list or {name: prompt}), .jsonl"),
    out: str = typer.Option(..., help="output directory or URL for the mp4 files and index.jsonl"),
    tuned: Optional[str] = typer.Option(None, help="a training run directory or its export: sample the tuned model"),
    samples_per_prompt: int = typer.Option(1, min=1, help="videos per prompt (seeds seed, seed+1, ...)"),
    seed: int = typer.Option(123, min=0, help="seed of each prompt's first video"),
    ray: bool = typer.Option(False, "--ray", help="fan out to Ray sampler actors (automatic above 64 prompts)"),
    overrides: Optional[list[str]] = typer.Argument(
        None, help="key=value overrides, e.g. sampling.num_inference_steps=25 batch_size=8 gif=true model.variant=5b"
    ),
) -> None:
    """Sample videos from a base or tuned model for a prompt file (resumable: existing videos are skipped)."""
    from jobs.sample import run_sample_command

    code = run_sample_command(model, weights, prompts, out, tuned, samples_per_prompt, seed, ray, overrides or [])
    raise typer.Exit(code=code)


@app.command()
def export(
    run: str = typer.Argument(..., help="a training run directory (or its export/) on any storage"),
    out: str = typer.Option(..., help="output directory or URL"),
    merged: bool = typer.Option(
        True, "--merged/--trainable", help="merged: full weights with the LoRA folded in; trainable: the export as is"
    ),
) -> None:
    """Write a training run's export: merged into a base-model directory (`sample --weights OUT`), or as is."""
    from videodpo_ray.errors import ConfigError
    from videodpo_ray.storage import join, read_bytes, write_bytes_atomic
    from videodpo_ray.training.checkpoint import EXPORT_FILES, export_url_of, write_merged_export

    try:
        export_url = export_url_of(run)
        if merged:
            write_merged_export(export_url, out)
        else:
            for name in EXPORT_FILES:
                write_bytes_atomic(join(out, name), read_bytes(join(export_url, name)))
    except ConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2)
    typer.echo(f"wrote {'merged model' if merged else 'export'} of {export_url} to {out}")


@convert_app.command("vc2")
def convert_vc2(
    checkpoint: str = typer.Option(..., help="original VC2 / T2V-Turbo base model.ckpt (local path or fsspec URL)"),
    out: Path = typer.Option(..., help="output directory"),
    lora: Optional[str] = typer.Option(None, help="T2V-Turbo unet_lora.pt to merge"),
    config: Optional[str] = typer.Option(
        None, help="JSON/YAML with the lvdm UNet kwargs (default: read off the shapes)"
    ),
) -> None:
    """Convert an original VideoCrafter2 (or T2V-Turbo) checkpoint to safetensors + config.json per component."""
    from videodpo_ray.errors import CheckpointError
    from videodpo_ray.models.convert_vc2 import convert_vc2_checkpoint

    try:
        written = convert_vc2_checkpoint(checkpoint, out, config=config, lora=lora)
    except CheckpointError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(code=1)
    typer.echo(f"wrote {written}")


@app.command("import-videodpo")
def import_videodpo(
    src: str = typer.Option(
        ..., help="released dataset directory or URL (winvideos/, losevideos/, metadata.json, pair.json)"
    ),
    out: str = typer.Option(..., help="output root URL; shards go to {out}/pairs/"),
    rows_per_shard: int = typer.Option(64, min=1, help="pairs per shard"),
    strict: bool = typer.Option(False, help="stop at the first bad pair instead of reporting it"),
) -> None:
    """Import the released VideoDPO pair dataset into pair shards, one Ray Data task per shard (bad pairs are reported
    by index)."""
    from jobs.import_videodpo import import_dataset
    from videodpo_ray.errors import ConfigError, DatasetImportError, IncompleteStageError, RejectedPairError

    try:
        report = import_dataset(src, out, rows_per_shard=rows_per_shard, strict=strict)
    except ConfigError as error:  # e.g. a rerun with other settings than {out}/import.json records
        typer.echo(f"import-videodpo: {error}", err=True)
        raise typer.Exit(code=2)
    except DatasetImportError as error:  # the dataset's files, found before any work (2); --strict's bad pair (1)
        typer.echo(f"import-videodpo: {error}", err=True)
        raise typer.Exit(code=1 if isinstance(error, RejectedPairError) else 2)
    except IncompleteStageError as error:  # a shard's task failed: the others are written
        typer.echo(f"import-videodpo: {error}", err=True)
        raise typer.Exit(code=1)
    typer.echo(report.summary())


@runs_app.command("clean")
def runs_clean(
    root: str = typer.Argument(..., help="storage root of the runs (run.storage_path): local path or URL"),
    yes: bool = typer.Option(False, "--yes", help="delete; without it this is a dry run that only lists"),
    min_age: float = typer.Option(3600.0, min=0.0, help="seconds: anything changed more recently is left alone"),
) -> None:
    """Remove run folders without a committed checkpoint and orphaned temporary objects (dry run by default)."""
    from videodpo_ray.training.runs import apply_clean, plan_clean

    plan = plan_clean(root, min_age_s=min_age)
    if yes:
        apply_clean(plan)
    typer.echo(plan.summary(applied=yes))


if __name__ == "__main__":
    app()
