"""The whole loop on one output root: `python -m jobs.pipeline configs/pipeline_demo.yaml [key.sub=value ...]`.

toy world (when configured: pretrain the toy base model and classifier once, `stages.toy`) ->
generate + score (jobs/generate.py) -> pair + encode latents (jobs/pair.py) -> DPO training (jobs/train.py) ->
before/after evaluation on held-out prompts (jobs/evaluate.py, when configured) -> `{out}/report.json` and
`{out}/report.md` (`stages.pipeline`). The config, the train config and both prompt sets are checked first, before
any cluster work. Every stage skips what an earlier run committed, so rerunning the same config after a crash (or
after it finished) completes the missing work only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from jobs.common import job_main, root_cause
from jobs.evaluate import evaluate, summary_line
from jobs.generate import generate
from jobs.pair import make_pairs
from jobs.train import run_training
from videodpo_ray import storage
from videodpo_ray.errors import NonFiniteTrainingError
from videodpo_ray.stages.pipeline import (
    REPORT_MD,
    PipelineConfig,
    generate_section,
    load_pipeline_config,
    pairs_section,
    read_pipeline_prompts,
    train_config,
    train_section,
    write_report,
)
from videodpo_ray.stages.toy import prepare_toy_world

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipeline_demo.yaml"
EVALUATE_KEYS = ("num_prompts", "num_prompts_unscored", "win_rate", "win_rate_ci95", "omniscore_before",
                 "omniscore_after", "omniscore_gain_mean", "omniscore_gain_se", "report")


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run every stage, write the report files under `config.out` and return the report."""
    started = time.monotonic()
    config = config.model_copy(update={"out": storage.absolute_url(config.out)})
    report: dict[str, Any] = {"out": config.out, "model": config.model.model_dump(mode="json"), "seconds": {}}
    trained = train_config(config) if config.train is not None else None  # config errors before any work
    prompts = read_pipeline_prompts(config)  # so are prompt errors, held-out ones included

    if config.toy is not None:
        stage = time.monotonic()
        print("toy world: base model and classifier (built once, cached under the output root) ...", flush=True)
        toy = prepare_toy_world(config.toy, config.out)
        report["toy"] = {"base_model": toy.base_model, "classifier": toy.classifier, "built": list(toy.built)}
        report["seconds"]["toy"] = time.monotonic() - stage
        print(f"toy world: {'built ' + ' and '.join(toy.built) if toy.built else 'cached'} "
              f"({report['seconds']['toy']:.0f} s): {toy.base_model}", flush=True)

    stage = time.monotonic()
    init_seed = trained.run.seed if trained is not None else 0  # random-init weights identical in every stage
    generated = generate(config.generate_config(prompts.training_url, init_seed), prompts=prompts.training)
    report["generate"] = generate_section(generated, config)
    report["seconds"]["generate"] = time.monotonic() - stage
    print(generated.summary(), flush=True)

    stage = time.monotonic()
    paired = make_pairs(config.pair_config(init_seed))
    report["pairs"] = pairs_section(paired)
    report["seconds"]["pair"] = time.monotonic() - stage
    print(paired.summary(), flush=True)

    if trained is None:
        report["train"] = {"status": "skipped: no train section in the pipeline config"}
    elif paired.num_pairs == 0:
        report["train"] = {"status": "skipped: no pairs to train on (every prompt's samples tied)"}
    else:
        from ray.train import TrainingFailedError  # Ray Train only now: a bad config fails before its import

        stage = time.monotonic()
        try:
            result = run_training(trained)
        except (TrainingFailedError, NonFiniteTrainingError) as error:  # the report still shows what worked
            cause = root_cause(error)
            report["train"] = {"status": f"failed: {type(cause).__name__}: {cause}"}
            write_report(report, time.monotonic() - started)
            raise
        report["train"] = train_section(trained, result.metrics or {})
        report["seconds"]["train"] = time.monotonic() - stage
        if prompts.held_out_url is not None:
            stage = time.monotonic()
            summary = evaluate(config.evaluate_config(prompts.held_out_url, init_seed, report["train"]["run"]))
            report["evaluate"] = {key: summary[key] for key in EVALUATE_KEYS}
            report["seconds"]["evaluate"] = time.monotonic() - stage
            print(summary_line(summary), flush=True)
    write_report(report, time.monotonic() - started)
    return report


def run_and_summarise(config: PipelineConfig) -> str:
    """Run the pipeline; one line saying where its report is."""
    report = run_pipeline(config)
    return f"report: {storage.join(report['out'], REPORT_MD)} ({report['seconds']['total']:.0f} s)"


def run_demo(out: str = "demo-output", num_cpus: int = 4) -> int:
    """`videodpo-ray demo`: configs/pipeline_demo.yaml (tiny VC2, built-in prompts) on a local Ray cluster."""
    argv = [str(DEMO_CONFIG), f"out={json.dumps(out)}"]
    return job_main(argv, __doc__, load_pipeline_config, run_and_summarise, num_cpus=num_cpus)


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(argv, __doc__, load_pipeline_config, run_and_summarise, connect=False)


if __name__ == "__main__":
    sys.exit(main())
