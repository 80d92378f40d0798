"""Score existing mp4 files: `videodpo-ray score --videos DIR_OR_URL --prompts FILE --out URL [--scorer YAML]`.

`stages.score.plan_score` lists and matches the videos and cuts them into shards; Ray Data reads the bytes and
scores them on OmniScorer actors; the driver commits `{out}/scores/shard-{c:05d}` as soon as all its rows are back.
A batch that fails (an infrastructure fault: CUDA, out of memory, a missing weight file) leaves its shard
uncommitted; every other shard is committed and the command exits 1 naming the incomplete shard. A rerun skips
committed shards.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from jobs.common import INPUT_ERRORS, commit_chunks, connect_ray, pool_options, setup_logging
from videodpo_ray import shards, storage
from videodpo_ray.config import apply_overrides, build_config, load_config
from videodpo_ray.errors import IncompleteStageError
from videodpo_ray.scoring import ScorerConfig
from videodpo_ray.stages.common import ChunkProgress
from videodpo_ray.stages.score import ScoreFilesConfig, ScorePlan, ScoreReport, plan_score, record_scorer_device


def _read_videos(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the `video` column (mp4 bytes) read from each row's `url`."""
    batch["video"] = np.array([storage.read_bytes(str(url)) for url in batch.pop("url")], dtype=object)
    return batch


def score_files(config: ScoreFilesConfig, plan: ScorePlan) -> ScoreReport:
    """Score every video of the plan's uncommitted shards and commit one scores shard per chunk (Ray must be
    initialised); IncompleteStageError if some shards stay uncommitted."""
    import ray

    from actors.scorer import OmniScorer

    started = time.monotonic()
    report = plan.report
    if plan.rows:
        pool = config.scorer_pool
        rows_of: dict[int, list[dict]] = {}
        for row in plan.rows:
            rows_of.setdefault(row["chunk"], []).append(row)
        chunks = [pa.Table.from_pylist(rows_of[index]) for index in plan.expected]
        scored = (  # a task = a shard's videos, batched by the actor (`batch_slices`): the same batches in every run
            ray.data.from_arrow(chunks)
            .map_batches(_read_videos, batch_size=None)
            .map_batches(OmniScorer, fn_constructor_kwargs={"config": config.scorer, "batch_size": pool.batch_size},
                         **{**pool_options(pool), "batch_size": None})
        )

        def commit(index: int, rows: pa.Table) -> None:
            scores = shards.project_table(rows, "scores")
            shards.write_shard(scores, config.out, "scores", index)
            report.failed_videos += scores.num_rows - scores.column("failed_reason").null_count
            report.written.append(index)

        progress = ChunkProgress("score", "videos", plan.expected)
        report.incomplete = commit_chunks(scored, plan.expected, commit, progress)
    report.written.sort()
    report.seconds = time.monotonic() - started
    if report.incomplete:
        raise IncompleteStageError(report)
    return report


def run_score_command(
    videos: str, prompts: str, out: str, scorer: Path | None, tiny: bool, overrides: Sequence[str]
) -> int:
    """The `videodpo-ray score` command: build and validate the config, score, print the summary; the exit code."""
    setup_logging()
    try:
        data = {"videos": videos, "prompts": prompts, "out": out, "scorer": {}}
        if scorer is not None:
            data["scorer"] = load_config(ScorerConfig, scorer, ["tiny=true"] if tiny else []).model_dump(mode="json")
        extra = ["scorer.tiny=true"] if tiny else []
        config = build_config(ScoreFilesConfig, apply_overrides(data, [*extra, *overrides]), "score options")
        plan = plan_score(config)  # inputs checked before Ray starts
        import ray

        connect_ray()
        record_scorer_device(config, ray.cluster_resources().get("GPU", 0.0))
        report = score_files(config, plan)
    except INPUT_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except IncompleteStageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
