"""What every job shares: logging, joining Ray, actor-pool options, committing streamed chunks, exit codes."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Sequence

import pyarrow as pa

from videodpo_ray.errors import (
    CheckpointError,
    ConfigError,
    IncompleteStageError,
    NonFiniteTrainingError,
    PromptFileError,
    ShardError,
    VideoInputError,
)
from videodpo_ray.stages.common import ActorPoolConfig, ChunkCollector, ChunkProgress

INPUT_ERRORS = (ConfigError, PromptFileError, ShardError, VideoInputError, CheckpointError)


def setup_logging(level: int = logging.INFO) -> None:
    """The one logging setup: our loggers at `level` on stderr, Ray's and DeepSpeed's at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("videodpo_ray", "actors", "jobs"):
        logging.getLogger(name).setLevel(level)
    for name in ("ray", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def connect_ray(num_cpus: int | None = None) -> None:
    """Join the running cluster (inside `ray job submit`, or with RAY_ADDRESS set), else start a local one; quiet:
    Ray's own logs at WARNING on the driver and in every worker, no Ray Data progress or execution-plan lines."""
    import ray

    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING, "logging_config": ray.LoggingConfig(log_level="WARNING")}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        ray.init(num_cpus=num_cpus, **quiet)  # with its dashboard: Ray Train's state queries go through it
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def pool_options(pool: ActorPoolConfig) -> dict[str, Any]:
    """map_batches arguments for an actor pool (GPUs per actor resolved against the cluster)."""
    import ray

    return {
        "compute": ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        "batch_size": pool.batch_size,
        "num_cpus": pool.num_cpus,
        "num_gpus": pool.gpus(ray.cluster_resources().get("GPU", 0.0)),
    }


def commit_chunks(
    dataset: Any, expected_rows: dict[int, int], commit: Callable[[int, pa.Table], None], progress: ChunkProgress
) -> dict[int, tuple[int, int]]:
    """Stream `dataset`'s rows back, call `commit(chunk, rows)` as each chunk completes and print its progress line;
    return the incomplete chunks.

    A failing batch drops only its rows (`max_errored_blocks = -1`): its chunk stays uncommitted, every other chunk
    is committed, and the caller reports the incomplete ones.
    """
    dataset.context.max_errored_blocks = -1
    collector = ChunkCollector(expected_rows)
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for chunk, rows in collector.add(batch):
            commit(chunk, rows)
            print(progress.committed(chunk, rows.num_rows), flush=True)
    return collector.incomplete()


def root_cause(error: BaseException) -> BaseException:
    """The worker exception inside a Ray Train failure (TrainingFailedError -> WorkerGroupError -> worker error)."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        first = failures[min(failures)]
        return getattr(first, "cause", None) or first
    return error.__cause__ if error.__cause__ is not None else error


def job_main(
    argv: Sequence[str] | None,
    doc: str,
    load: Callable[[str, Sequence[str]], Any],
    run: Callable[[Any], str],
    num_cpus: int | None = None,
    connect: bool = True,
) -> int:
    """`python -m jobs.X CONFIG [key.sub=value ...]`: load the config, join Ray (or start a local one with
    `num_cpus`; connect=False leaves that to `run`, e.g. after it validated its inputs), run, print the summary
    `run` returns.

    Exit codes: 0 done; 1 some work failed (what was committed stays, a rerun completes the rest); 2 bad config or
    input (nothing was started).
    """
    setup_logging()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(doc)
        return 0 if args else 2
    try:
        config = load(args[0], args[1:])
        if connect:
            connect_ray(num_cpus)
        summary = run(config)
    except INPUT_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (IncompleteStageError, NonFiniteTrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        from ray.train import TrainingFailedError  # imported when something failed: Ray Train's imports take a second

        if not isinstance(error, TrainingFailedError):
            raise
        cause = root_cause(error)
        print(f"error: training failed: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 1
    print(summary)
    return 0
