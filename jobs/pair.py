"""Pair job: `ray job submit -- python -m jobs.pair CONFIG.yaml [key.sub=value ...]`.

`stages.pair.plan_pair_shards` builds every pair from the committed scores (on the driver: scores are small),
refusing (exit 2) an unfinished generate output: a chunk that `{data}/generation.json` plans, or with a samples
shard, but without a scores shard. For every chunk whose pair shard is not committed, Ray Data attaches the
winner/loser mp4s from the chunk's samples shard, latent-encoder actors VAE-encode them and text-encode their prompts,
and the driver commits `{out}/pairs/shard-{chunk:05d}` once all its pairs are back (after writing the output's
empty-prompt embedding, `tensor_bytes.empty_prompt_url`, if absent, before the first shard). The encoder's device type
is recorded (`stages.pair.record_device`): a resume on the other kind of cluster is refused. A failing batch leaves its
shard uncommitted, not the others; the job then exits 1 naming it.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

import pyarrow as pa

from jobs.common import commit_chunks, connect_ray, job_main, pool_options
from videodpo_ray import shards, storage
from videodpo_ray.config import load_config
from videodpo_ray.errors import IncompleteStageError
from videodpo_ray.stages.common import ChunkProgress
from videodpo_ray.stages.generate import planned_chunks
from videodpo_ray.stages.pair import (
    PairConfig,
    PairReport,
    attach_videos,
    pair_shard,
    plan_pair_shards,
    record_device,
)


def make_pairs(config: PairConfig) -> PairReport:
    """Build, encode and commit the pair shards of every chunk not committed yet (IncompleteStageError if some fail)."""
    started = time.monotonic()
    config = config.model_copy(
        update={"data": storage.absolute_url(config.data), "out": storage.absolute_url(config.pairs_root)}
    )
    plan = plan_pair_shards(config, planned_chunks(config.data))
    report = plan.report
    if plan.pending:
        import ray  # only now (with Ray, torch and the actor): bad input fails before any cluster work or import

        from actors.latent_encoder import LatentEncoderActor, empty_prompt_of
        from videodpo_ray import tensor_bytes

        connect_ray()
        record_device(config, ray.cluster_resources().get("GPU", 0.0))
        empty_url = tensor_bytes.empty_prompt_url(config.pairs_root)
        encoded = (
            ray.data.from_arrow(list(plan.pending.values()))
            .map_batches(attach_videos, batch_format="pyarrow", batch_size=None, fn_kwargs={"samples": plan.samples})
            .map_batches(
                LatentEncoderActor,
                batch_format="pyarrow",
                fn_constructor_kwargs={
                    "model": config.model,
                    "dtype": config.latent_dtype,
                    "text_dtype": config.embedding_dtype,
                    "init_seed": config.model_init_seed,
                    "batch_size": config.encoder_pool.batch_size,
                },
                **{**pool_options(config.encoder_pool), "batch_size": None},  # a task = a chunk, see batch_slices
            )
        )

        def commit(chunk: int, rows: pa.Table) -> None:
            # the empty-prompt embedding lands once per output, before the first shard that relies on it
            if not report.written and not storage.exists(empty_url):
                storage.write_bytes_atomic(empty_url, empty_prompt_of(chunk, rows))
            shards.write_shard(pair_shard(rows, config.keep_videos), config.pairs_root, "pairs", chunk)
            report.written.append(chunk)

        expected = {chunk: table.num_rows for chunk, table in plan.pending.items()}
        report.incomplete = commit_chunks(encoded, expected, commit, ChunkProgress("pair", "pairs", expected))
    report.written.sort()
    report.seconds = time.monotonic() - started
    if report.incomplete:
        raise IncompleteStageError(report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv, __doc__, lambda path, overrides: load_config(PairConfig, path, overrides),
        lambda config: make_pairs(config).summary(), connect=False,
    )


if __name__ == "__main__":
    sys.exit(main())
