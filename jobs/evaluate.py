"""Evaluate job: `videodpo-ray evaluate CONFIG.yaml [key.sub=value ...]` (or `python -m jobs.evaluate`).

The base model and the tuned one (a training run or its export) sample the same held-out prompts with the same
seeds through the generate job (`{out}/base`, `{out}/tuned`: resumable by chunk, nothing committed is redone), both
are scored alike, and `stages.evaluate` writes `results.parquet`, `summary.json` and `index.html` under `out`. The
held-out prompts and `training_data` are checked (no prompt trained on) before any cluster work.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common import job_main
from jobs.generate import generate
from videodpo_ray import storage
from videodpo_ray.config import load_config
from videodpo_ray.stages.evaluate import (
    MODELS,
    RESULTS,
    SUMMARY,
    EvaluateConfig,
    check_training_data,
    results_table,
    summarize,
)
from videodpo_ray.stages.evaluate_report import format_number, unscored_note, write_report
from videodpo_ray.stages.prompts import read_prompts
from videodpo_ray.training import checkpoint as ckpt


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Sample and score both models (what is committed is kept), then write results, summary and report."""
    config = config.model_copy(update={"out": storage.absolute_url(config.out)})
    prompts = read_prompts(config.prompts, config.max_prompt_chars)
    check_training_data(config, prompts)
    export_url = ckpt.export_url_of(config.tuned)
    for which in MODELS:
        print(generate(config.generate_config(which, export_url), prompts=prompts).summary(), flush=True)
    results = results_table(config, prompts)
    buffer = pa.BufferOutputStream()
    pq.write_table(results, buffer)
    storage.write_bytes_atomic(storage.join(config.out, RESULTS), buffer.getvalue().to_pybytes())
    summary = {**summarize(results), "base_model": config.model.model_dump(mode="json"), "tuned": export_url}
    summary_json = json.dumps(summary, indent=2, allow_nan=False)  # summarize wrote None for what it could not compute
    storage.write_bytes_atomic(storage.join(config.out, SUMMARY), summary_json.encode())
    run_url = export_url.removesuffix(f"/{ckpt.EXPORT_DIR}") if export_url.endswith(f"/{ckpt.EXPORT_DIR}") else None
    summary["report"] = write_report(
        config.out, summary, results.to_pylist(), prompts,
        run_url=run_url, training_data=config.training_data, gallery_prompts=config.gallery_prompts,
    )
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    low, high = (format_number(bound, 3) for bound in summary["win_rate_ci95"])
    return (
        f"evaluate: win rate {format_number(summary['win_rate'], 3)} [{low}, {high}] over {summary['num_prompts']} "
        f"prompts{unscored_note(summary['num_prompts_unscored'])}; OmniScore gain "
        f"{format_number(summary['omniscore_gain_mean'], 4, sign=True)} +/- "
        f"{format_number(summary['omniscore_gain_se'])}; report {summary['report']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv, __doc__, lambda path, overrides: load_config(EvaluateConfig, path, overrides),
        lambda config: summary_line(evaluate(config)), connect=False,
    )


if __name__ == "__main__":
    sys.exit(main())
