"""Generate + Score job: `ray job submit -- python -m jobs.generate CONFIG.yaml [key.sub=value ...]`.

prompts file -> `stages.generate.plan_generate` -> for every chunk not committed yet: N samples per prompt on
sampler actors, OmniScore on scorer actors, then `{out}/samples/shard-{chunk:05d}` and `{out}/scores/shard-{chunk:05d}`
committed by the driver as soon as all of the chunk's rows are back (scores last: a chunk is done when its scores
shard is). Samples the sampler or scorer gave up on go to `{out}/failures/shard-{chunk:05d}` first
(`stages.generate.commit_chunk`): a poison prompt never stops a chunk from committing.

One Ray Data pipeline runs over all pending chunks, so each actor loads its model once; a chunk is one task per
stage. A task that fails (not a poison prompt: out of memory, a CUDA fault, a bug) drops only its chunk's rows; that
chunk stays uncommitted, every other chunk is committed, and the job ends with an error naming the incomplete chunks.
A rerun skips committed chunks, re-scores chunks whose samples were committed but not their scores (a chunk whose
committed samples are empty has nothing to score: its empty scores shard is committed), and samples the rest: no
chunk is ever written twice or duplicated. Nothing is written or removed before the device check (`record_devices`),
so a refused run leaves the output as it was, `retry_failed` included.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

import pyarrow as pa

from jobs.common import commit_chunks, connect_ray, job_main, pool_options
from videodpo_ray import storage
from videodpo_ray.config import load_config
from videodpo_ray.errors import IncompleteStageError
from videodpo_ray.stages.common import ChunkProgress
from videodpo_ray.stages.generate import (
    GenerateConfig,
    GeneratePlan,
    GenerateReport,
    commit_chunk,
    committed_samples,
    plan_generate,
    record_devices,
    recorded_failures,
    request_blocks,
    retry_failed_chunks,
)
from videodpo_ray.stages.prompts import PromptRow, read_prompts


def generate(
    config: GenerateConfig,
    prompts: Sequence[PromptRow] | None = None,
    sampler_class: type | None = None,
    scorer_class: type | None = None,
) -> GenerateReport:
    """Run the Generate + Score stages for every uncommitted chunk; IncompleteStageError if some stay incomplete.

    `prompts` (already read) overrides `config.prompts`; `sampler_class` and `scorer_class` (tests and benchmarks;
    default `SamplerActor` and `OmniScorer`) must behave like those.
    """
    started = time.monotonic()
    config = config.model_copy(update={"out": storage.absolute_url(config.out)})
    prompts = list(prompts) if prompts is not None else read_prompts(config.prompts, config.max_prompt_chars)
    plan = plan_generate(config, prompts)
    if plan.to_sample or plan.to_score or plan.to_close or plan.report.retried:
        import ray  # only now (with Ray, torch and the actors): bad input fails before any cluster work or import

        connect_ray()
        record_devices(config, ray.cluster_resources().get("GPU", 0.0))  # refused: nothing written or removed yet
        if plan.report.retried:
            plan = retry_failed_chunks(config, prompts)
        for chunk in plan.to_close:  # every prompt failed sampling, then a crash came before the (empty) scores
            commit_chunk(config.out, chunk.index, committed_samples(config, [chunk])[0], rescored=True)
            plan.report.rescored.append(chunk.index)
        if plan.to_sample or plan.to_score:
            plan.report.incomplete = sample_and_score(config, plan, sampler_class, scorer_class)
    report = plan.report
    report.sampled.sort()
    report.rescored.sort()
    report.failures = recorded_failures(config.out)
    report.seconds = time.monotonic() - started
    if report.incomplete:
        raise IncompleteStageError(report)
    return report


def sample_and_score(
    config: GenerateConfig, plan: GeneratePlan, sampler_class: type | None, scorer_class: type | None
) -> dict[int, tuple[int, int]]:
    """Sample `plan.to_sample`, score it and `plan.to_score` in one Ray Data pipeline, committing each chunk as its
    rows come back (`commit_chunk`); the chunks left incomplete."""
    import ray

    from actors.sampler import SamplerActor
    from actors.scorer import OmniScorer

    sources = []
    if plan.to_sample:
        sources.append(
            ray.data.from_arrow(request_blocks(config, plan.to_sample)).map_batches(
                sampler_class or SamplerActor,
                batch_format="pyarrow",
                fn_constructor_kwargs={
                    "model": config.model,
                    "sampling": config.sampling,
                    "init_seed": config.model_init_seed,
                    "tuned_export": config.tuned,
                    "max_attempts": config.max_attempts,
                    "batch_size": config.sampler_pool.batch_size,
                },
                **{**pool_options(config.sampler_pool), "batch_size": None},  # a task = a chunk, see batch_slices
            )
        )
    if plan.to_score:
        sources.append(ray.data.from_arrow(committed_samples(config, plan.to_score)))
    samples = sources[0].union(*sources[1:]) if len(sources) > 1 else sources[0]
    scored = samples.map_batches(
        scorer_class or OmniScorer,
        fn_constructor_kwargs={"config": config.scorer, "batch_size": config.scorer_pool.batch_size},
        **{**pool_options(config.scorer_pool), "batch_size": None},
    )
    report, rescoring = plan.report, {chunk.index for chunk in plan.to_score}

    def commit(index: int, rows: pa.Table) -> None:
        commit_chunk(config.out, index, rows, rescored=index in rescoring)
        (report.rescored if index in rescoring else report.sampled).append(index)

    pending = plan.pending_rows()
    committed_prompts = report.num_prompts - sum(pending.values()) // config.samples_per_prompt
    progress = ChunkProgress(
        "generate", "videos", pending, (committed_prompts, report.num_prompts), config.samples_per_prompt
    )
    return commit_chunks(scored, pending, commit, progress)


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv, __doc__, lambda path, overrides: load_config(GenerateConfig, path, overrides),
        lambda config: generate(config).summary(), connect=False,
    )


if __name__ == "__main__":
    sys.exit(main())
