"""The Evaluate stage without Ray: the base and the tuned model, the same prompts and seeds, scored alike.

Layout under `out`: `base/` and `tuned/` are two generate-stage outputs (samples and scores shards, resumable by
chunk; sample k of prompt p has seed `sample_seed(base_seed, p, k)` in both), then
- `results.parquet`: one row per (prompt, seed, model) with every raw dimension, OmniScore and the failure reason;
- `summary.json`: win rate (a prompt is won when the tuned model's mean OmniScore over its N seeds beats the
  base model's, both over the seeds scored for both models; a tie counts half) with a Wilson 95% interval, the
  mean per-prompt OmniScore gain and its standard error, and each dimension's mean before and after (raw and
  VBench-normalised) with the 95% interval of the per-prompt difference; VBench Quality / Semantic / Total over
  the dimensions present (the missing ones named);
- `index.html` (`stages.evaluate_report`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa
from pydantic import Field

from videodpo_ray import shards, storage
from videodpo_ray.config import StrictConfig
from videodpo_ray.dimensions import DIMENSIONS, VBENCH_QUALITY_DIMENSIONS, VBENCH_SEMANTIC_DIMENSIONS
from videodpo_ray.models import ModelConfig
from videodpo_ray.omniscore import blend, normalise, weighted_mean
from videodpo_ray.scoring import ScorerConfig, dimension_outputs
from videodpo_ray.seeds import sample_seed
from videodpo_ray.stages.common import ActorPoolConfig, SamplingConfig
from videodpo_ray.stages.generate import GenerateConfig
from videodpo_ray.stages.prompts import PromptRow

MODELS = ("base", "tuned")
RESULTS = "results.parquet"
SUMMARY = "summary.json"
Z_95 = 1.959963984540054


class EvaluateConfig(StrictConfig):
    """`videodpo-ray evaluate`: a base model and its tuned version on held-out prompts and seeds."""

    out: str
    prompts: str  # any prompt file: .txt (VBench prompt lists), .json (VBench_full_info.json too), .jsonl, .parquet
    model: ModelConfig = ModelConfig()  # the base model
    model_init_seed: int = 0  # torch seed of a random-init base (a training run's run.seed)
    tuned: str  # the training run directory (its training curves go into the report) or its export
    samples_per_prompt: int = Field(2, ge=1)
    prompts_per_chunk: int = Field(16, ge=1)
    base_seed: int = Field(20250, ge=0)  # held out: not the data-generation seed
    sampling: SamplingConfig = SamplingConfig()
    scorer: ScorerConfig
    sampler_pool: ActorPoolConfig = ActorPoolConfig()
    scorer_pool: ActorPoolConfig = ActorPoolConfig(num_gpus=0.0)
    training_data: str | None = None  # the generate/pair output the run trained on: the report's analysis panels
    gallery_prompts: int = Field(8, ge=0)

    def generate_config(self, which: str, tuned_export: str | None) -> GenerateConfig:
        """The generate stage of one side: `{out}/base` or `{out}/tuned`, identical but for the model."""
        return GenerateConfig(
            prompts=self.prompts,
            out=storage.join(self.out, which),
            model=self.model,
            model_init_seed=self.model_init_seed,
            tuned=tuned_export if which == "tuned" else None,
            samples_per_prompt=self.samples_per_prompt,
            prompts_per_chunk=self.prompts_per_chunk,
            base_seed=self.base_seed,
            sampling=self.sampling,
            scorer=self.scorer,
            sampler_pool=self.sampler_pool,
            scorer_pool=self.scorer_pool,
        )


def score_columns(scorer: ScorerConfig) -> list[str]:
    """The raw dimension columns the configured scorer fills (VBench dimensions only, in table order)."""
    outputs = {key for name in scorer.dimensions for key in dimension_outputs(name)}
    return [name for name in DIMENSIONS if name in outputs]


def results_table(config: EvaluateConfig, prompts: Sequence[PromptRow]) -> pa.Table:
    """One row per (prompt, seed, model) from the committed scores shards of both sides."""
    columns = score_columns(config.scorer)
    by_sample: dict[tuple[str, str], dict[str, Any]] = {}
    for which in MODELS:
        for info in shards.list_shards(storage.join(config.out, which), "scores"):
            for row in shards.read_shard(info).to_pylist():
                by_sample[(which, row["sample_id"])] = row
    rows = []
    for prompt in prompts:
        for k in range(config.samples_per_prompt):
            for which in MODELS:
                score = by_sample.get((which, f"{prompt.prompt_id}-{k}"), {"failed_reason": "not scored"})
                rows.append({
                    "prompt_id": prompt.prompt_id, "prompt": prompt.prompt, "sample_index": k,
                    "seed": sample_seed(config.base_seed, prompt.prompt_id, k), "model": which,
                    **{name: score.get(name) for name in columns},
                    "omniscore": score.get("omniscore"), "failed_reason": score.get("failed_reason"),
                })
    schema = pa.schema(
        [pa.field("prompt_id", pa.string()), pa.field("prompt", pa.string()), pa.field("sample_index", pa.int64()),
         pa.field("seed", pa.int64()), pa.field("model", pa.string()),
         *(pa.field(name, pa.float64()) for name in [*columns, "omniscore"]), pa.field("failed_reason", pa.string())]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def wilson_interval(successes: float, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (ties counted as half a success)."""
    if trials == 0:
        return (math.nan, math.nan)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (centre - half, centre + half)


@dataclass(frozen=True)
class Difference:
    """Mean and standard error of paired per-prompt differences (after - before)."""

    mean: float
    se: float

    @classmethod
    def of(cls, differences: Sequence[float]) -> "Difference":
        if not differences:
            return cls(math.nan, math.nan)
        se = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
        return cls(statistics.fmean(differences), se)

    @property
    def ci95(self) -> list[float]:
        return [self.mean - Z_95 * self.se, self.mean + Z_95 * self.se]


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def _paired_prompt_means(rows: list[dict[str, Any]], column: str) -> dict[str, dict[str, float]]:
    """{model: {prompt_id: mean of `column` over the prompt's seeds}}, on the seeds whose value is finite for both
    models: base and tuned are compared on the same seeds (a sample that failed on one side drops that seed from
    both). A prompt without such a seed is left out."""
    values: dict[str, dict[tuple[str, int], float]] = {which: {} for which in MODELS}
    for row in rows:
        if _finite(row[column]) and row["failed_reason"] is None:
            values[row["model"]][(row["prompt_id"], row["sample_index"])] = row[column]
    shared = sorted(values["base"].keys() & values["tuned"].keys())
    means: dict[str, dict[str, float]] = {}
    for which in MODELS:
        by_prompt: dict[str, list[float]] = {}
        for prompt_id, index in shared:
            by_prompt.setdefault(prompt_id, []).append(values[which][(prompt_id, index)])
        means[which] = {prompt_id: statistics.fmean(seeds) for prompt_id, seeds in by_prompt.items()}
    return means


def summarize(results: pa.Table) -> dict[str, Any]:
    """The summary of a results table (see the module docstring), on the seeds scored for both models."""
    rows = results.to_pylist()
    omni = _paired_prompt_means(rows, "omniscore")
    prompts = sorted(omni["base"])
    gains = [omni["tuned"][p] - omni["base"][p] for p in prompts]
    wins = sum(1.0 if gain > 0 else 0.5 if gain == 0 else 0.0 for gain in gains)
    gain = Difference.of(gains)
    dimensions = [name for name in results.column_names if name in DIMENSIONS]
    per_dimension, means = {}, {which: {} for which in MODELS}
    for name in dimensions:
        side = _paired_prompt_means(rows, name)
        both = sorted(side["base"])
        if not both:
            continue
        difference = Difference.of([side["tuned"][p] - side["base"][p] for p in both])
        before = statistics.fmean(side["base"][p] for p in both)
        after = statistics.fmean(side["tuned"][p] for p in both)
        means["base"][name], means["tuned"][name] = before, after
        per_dimension[name] = {
            "before": before, "after": after, "difference": difference.mean, "difference_ci95": difference.ci95,
            "before_normalised": normalise(name, before), "after_normalised": normalise(name, after),
            "num_prompts": len(both),
        }
    return {
        "num_prompts": len(prompts),
        "num_prompts_unscored": len(set(results.column("prompt_id").to_pylist())) - len(prompts),
        "samples_per_prompt": max(results.column("sample_index").to_pylist(), default=-1) + 1,
        "win_rate": wins / len(prompts) if prompts else math.nan,
        "win_rate_ci95": list(wilson_interval(wins, len(prompts))),
        "omniscore_before": statistics.fmean(omni["base"][p] for p in prompts) if prompts else math.nan,
        "omniscore_after": statistics.fmean(omni["tuned"][p] for p in prompts) if prompts else math.nan,
        "omniscore_gain_mean": gain.mean,
        "omniscore_gain_se": gain.se,
        "omniscore_gain_ci95": gain.ci95,
        "dimensions": per_dimension,
        "vbench": {which: vbench_present(means[which]) for which in MODELS},
    }


def vbench_present(raw_means: dict[str, float]) -> dict[str, Any]:
    """VBench Quality / Semantic / Total over the dimensions present; the missing dimensions are listed."""
    quality = [d for d in VBENCH_QUALITY_DIMENSIONS if d in raw_means]
    semantic = [d for d in VBENCH_SEMANTIC_DIMENSIONS if d in raw_means]
    scores: dict[str, Any] = {
        "quality": weighted_mean(raw_means, quality) if quality else None,
        "semantic": weighted_mean(raw_means, semantic) if semantic else None,
        "missing": [d for d in (*VBENCH_QUALITY_DIMENSIONS, *VBENCH_SEMANTIC_DIMENSIONS) if d not in raw_means],
    }
    if quality and semantic:
        scores["total"] = blend(scores["quality"], scores["semantic"])
    return scores
