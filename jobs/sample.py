"""Sample job: `videodpo-ray sample --model vc2 --weights PATH|tiny --prompts FILE --out DIR [--tuned RUN] ...`.

Small prompt files run in-process; with `ray: true` (or above `ray_above_prompts` prompts) the batches fan out to
sampler actors with Ray Data (one per GPU). The settings are recorded (or checked: a rerun with others exits 2)
before any sampling. Either way the driver writes each video as its batch comes back, then `index.jsonl` (the done
samples) and `failures.jsonl` (the samples the sampler gave up on: not written, reported, exit code 1); a rerun
skips the batches whose samples are all done, so it retries the failed ones.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

import pyarrow as pa

from jobs.common import INPUT_ERRORS, connect_ray, job_main, pool_options, setup_logging
from videodpo_ray import storage
from videodpo_ray.config import apply_overrides, build_config, load_config
from videodpo_ray.errors import IncompleteStageError
from videodpo_ray.stages.common import record_manifest
from videodpo_ray.stages.prompts import read_prompts
from videodpo_ray.stages.sample import (
    FAILURES,
    INDEX,
    SAMPLE_MANIFEST,
    SampleConfig,
    SampleReport,
    check_inputs,
    failure_row,
    gif_file,
    index_lines,
    jsonl,
    plan_sample,
    record_device,
    request_table,
    resolved_model,
    sample_manifest,
    uses_ray,
)


def run_sample(config: SampleConfig, num_cpus: int | None = None) -> SampleReport:
    """Validate inputs and record the settings, sample every pending batch, write the videos, `index.jsonl` and
    `failures.jsonl`. IncompleteStageError (with the report) when some samples failed."""
    started = time.monotonic()
    config = config.model_copy(update={"out": storage.absolute_url(config.out)})
    check_inputs(config)
    prompts = read_prompts(config.prompts)
    model, init_seed, export_url = resolved_model(config)
    manifest = sample_manifest(config, prompts, model, init_seed, export_url)
    record_manifest(storage.join(config.out, SAMPLE_MANIFEST), manifest)
    plan = plan_sample(config, prompts)
    report = SampleReport(out=config.out, num_prompts=len(prompts), skipped=plan.num_done())
    actor_kwargs = {"model": model, "sampling": config.sampling, "init_seed": init_seed,
                    "tuned_export": export_url, "gif": config.gif}

    def write(rows: pa.Table) -> None:
        for row in rows.to_pylist():
            if row["video"] is None:
                report.failures.append(failure_row(row))
                continue
            data = {row["file"]: row["video"], **({gif_file(row["file"]): row["gif"]} if config.gif else {})}
            missing = [name for name in data if name not in plan.existing]
            for name in missing:
                storage.write_bytes_atomic(storage.join(config.out, name), data[name])
                plan.existing.add(name)
            report.written += bool(missing)

    tables = [request_table(plan.batches[index]) for index in plan.pending]
    if tables:
        from actors.sampler import SamplerActor  # torch, diffusers and PyAV: only once there is work to do
    if tables and uses_ray(config, len(prompts)):
        import ray

        report.mode = "ray"
        connect_ray(num_cpus)
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
        record_device(config.out, config.sampler_pool.device_type(cluster_gpus))
        dataset = ray.data.from_arrow(tables).map_batches(
            SamplerActor,
            batch_format="pyarrow",
            fn_constructor_kwargs=actor_kwargs,
            **{**pool_options(config.sampler_pool), "batch_size": None},  # one block = one planned batch
        )
        for rows in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            write(rows)
    elif tables:
        sampler = SamplerActor(**actor_kwargs)
        record_device(config.out, sampler.device.type)
        for table in tables:
            write(sampler(table))
    storage.write_bytes_atomic(storage.join(config.out, INDEX), index_lines(config, plan, model, export_url))
    storage.write_bytes_atomic(storage.join(config.out, FAILURES), jsonl(report.failures))
    report.seconds = time.monotonic() - started
    if report.failures:
        raise IncompleteStageError(report)
    return report


def run_sample_command(
    family: str,
    weights: str,
    prompts: str,
    out: str,
    tuned: str | None,
    samples_per_prompt: int,
    seed: int,
    ray: bool,
    overrides: Sequence[str],
) -> int:
    """The `videodpo-ray sample` command: build and validate the config, sample, print the summary; the exit code
    (`jobs.common.job_main`'s: 2 bad input, 1 some samples failed)."""
    setup_logging()
    model = {"family": family, "variant": "tiny"} if weights == "tiny" else {"family": family, "path": weights}
    data = {"model": model, "prompts": prompts, "out": out, "tuned": tuned, "seed": seed,
            "samples_per_prompt": samples_per_prompt, "ray": True if ray else "auto"}
    try:
        config = build_config(SampleConfig, apply_overrides(data, overrides), "sample options")
        report = run_sample(config)
    except INPUT_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except IncompleteStageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv, __doc__, lambda path, overrides: load_config(SampleConfig, path, overrides),
        lambda config: run_sample(config).summary(), connect=False,
    )


if __name__ == "__main__":
    sys.exit(main())
