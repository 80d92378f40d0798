"""Evaluate job: `videodpo-ray evaluate CONFIG.yaml [key.sub=value ...]` (or `python -m jobs.evaluate`).

The base model and the tuned one (a training run or its export) sample the same held-out prompts with the same
seeds through the generate job (`{out}/base`, `{out}/tuned`: resumable by chunk, nothing committed is redone), both
are scored alike, and `stages.evaluate` writes `results.parquet`, `summary.json` and `index.html` under `out`.
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
from videodpo_ray.stages.evaluate import MODELS, RESULTS, SUMMARY, EvaluateConfig, results_table, summarize
from videodpo_ray.stages.evaluate_report import write_report
from videodpo_ray.stages.prompts import read_prompts
from videodpo_ray.training import checkpoint as ckpt


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Sample and score both models (what is committed is kept), then write results, summary and report."""
    config = config.model_copy(update={"out": storage.absolute_url(config.out)})
    prompts = read_prompts(config.prompts)
    export_url = ckpt.export_url_of(config.tuned)
    for which in MODELS:
        print(generate(config.generate_config(which, export_url), prompts=prompts).summary(), flush=True)
    results = results_table(config, prompts)
    buffer = pa.BufferOutputStream()
    pq.write_table(results, buffer)
    storage.write_bytes_atomic(storage.join(config.out, RESULTS), buffer.getvalue().to_pybytes())
    summary = {**summarize(results), "base_model": config.model.model_dump(mode="json"), "tuned": export_url}
    storage.write_bytes_atomic(storage.join(config.out, SUMMARY), json.dumps(summary, indent=2).encode())
    run_url = export_url.removesuffix(f"/{ckpt.EXPORT_DIR}") if export_url.endswith(f"/{ckpt.EXPORT_DIR}") else None
    summary["report"] = write_report(
        config.out, summary, results.to_pylist(), prompts,
        run_url=run_url, training_data=config.training_data, gallery_prompts=config.gallery_prompts,
    )
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    low, high = summary["win_rate_ci95"]
    return (
        f"evaluate: win rate {summary['win_rate']:.3f} [{low:.3f}, {high:.3f}] over {summary['num_prompts']} prompts; "
        f"OmniScore gain {summary['omniscore_gain_mean']:+.4f} +/- {summary['omniscore_gain_se']:.4f}; "
        f"report {summary['report']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv, __doc__, lambda path, overrides: load_config(EvaluateConfig, path, overrides),
        lambda config: summary_line(evaluate(config)), connect=False,
    )


if __name__ == "__main__":
    sys.exit(main())
