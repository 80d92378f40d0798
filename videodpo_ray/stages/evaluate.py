"""The Evaluate stage without Ray: the base and the tuned model, the same prompts and seeds, scored alike.

Layout under `out`: `base/` and `tuned/` are two generate-stage outputs (samples and scores shards, resumable by
chunk; sample k of prompt p has seed `sample_seed(base_seed, p, k)` in both), then
- `results.parquet`: one row per (prompt, seed, model) with every raw dimension, OmniScore and the failure reason;
- `summary.json`: win rate (a prompt is won when the tuned model's mean OmniScore over its N seeds beats the
  base model's, both over the seeds scored for both models; a tie counts half) with a Wilson 95% interval, the
  mean per-prompt OmniScore gain and its standard error, and each dimension's mean before and after (raw and
  VBench-normalised) with the 95% interval of the per-prompt difference (Student's t); VBench Quality / Semantic /
  Total over the dimensions present (the missing ones named). A value that cannot be computed (an interval of one
  prompt) is null;
- `index.html` (`stages.evaluate_report`).

Held-out prompts must not be training prompts: with `training_data` set, it must exist and share no prompt text
with `prompts` (`check_training_data`), checked before any cluster work.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Collection, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from videodpo_ray import shards, storage
from videodpo_ray.config import StrictConfig
from videodpo_ray.dimensions import DIMENSIONS, VBENCH_OUTPUTS, VBENCH_QUALITY_DIMENSIONS, VBENCH_SEMANTIC_DIMENSIONS
from videodpo_ray.errors import ConfigError
from videodpo_ray.models import ModelConfig
from videodpo_ray.omniscore import blend, normalise, vbench_values, weighted_mean
from videodpo_ray.scoring import ScorerConfig, dimension_outputs
from videodpo_ray.seeds import sample_seed
from videodpo_ray.stages.common import ActorPoolConfig, SamplingConfig
from videodpo_ray.stages.generate import GenerateConfig
from videodpo_ray.stages.prompts import MAX_PROMPT_CHARS, PromptRow

MODELS = ("base", "tuned")
RESULTS = "results.parquet"
SUMMARY = "summary.json"
Z_95 = 1.959963984540054
TRAINING_PROMPT_KINDS = ("samples", "pairs")  # the shards of a generate/pair output that hold prompt texts
OVERLAP_NAMED = 3  # overlapping prompts an error quotes


class EvaluateConfig(StrictConfig):
    """`videodpo-ray evaluate`: a base model and its tuned version on held-out prompts and seeds."""

    out: str
    prompts: str  # any prompt file: .txt (VBench prompt lists), .json (VBench_full_info.json too), .jsonl, .parquet
    max_prompt_chars: int = Field(MAX_PROMPT_CHARS, ge=1)  # a longer prompt is refused (exit 2) with its file and row
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
    training_data: str | None = None  # the generate/pair output the run trained on: analysis panels, overlap check
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
            max_prompt_chars=self.max_prompt_chars,
        )


def training_prompts(data: str) -> set[str]:
    """The prompt texts of the generate/pair output `data`: the `prompt` column alone of its samples and pairs shards.
    ConfigError when `data` does not exist or holds no such shard."""
    if not storage.exists(data):
        raise ConfigError(f"training_data {data}: does not exist")
    texts: set[str] = set()
    found = False
    for kind in TRAINING_PROMPT_KINDS:
        paths, filesystem = shards.parquet_inputs(data, kind)
        found = found or bool(paths)
        for path in paths:
            texts.update(pq.read_table(path, columns=["prompt"], filesystem=filesystem).column("prompt").to_pylist())
    if not found:
        raise ConfigError(f"training_data {data}: no committed samples or pairs shards; not a generate/pair output")
    return texts


def refuse_overlap(held_out: Sequence[PromptRow], training: Collection[str], where: str) -> None:
    """ConfigError naming a few held-out prompts that are training prompts too (same text) and their count."""
    shared = [row for row in held_out if row.prompt in training]
    if shared:
        named = ", ".join(f"{row.prompt_id} {row.prompt[:80]!r}" for row in shared[:OVERLAP_NAMED])
        more = ", ..." if len(shared) > OVERLAP_NAMED else ""
        raise ConfigError(
            f"{where}: {len(shared)} of {len(held_out)} held-out prompt(s) are training prompts too ({named}{more}); "
            "an evaluation on trained prompts is not held out: remove them from the held-out prompts"
        )


def check_training_data(config: EvaluateConfig, prompts: Sequence[PromptRow]) -> None:
    """With `training_data` set: it exists, and no held-out prompt is one of its prompts."""
    if config.training_data is not None:
        where = f"prompts {config.prompts} vs training_data {config.training_data}"
        refuse_overlap(prompts, training_prompts(config.training_data), where)


def score_columns(scorer: ScorerConfig) -> list[str]:
    """The raw dimension columns the configured scorer fills (VBench dimensions only, in table order), then VBench's
    own value of a dimension where it differs from OmniScore's (`VBENCH_OUTPUTS`: dynamic_degree_vbench)."""
    outputs = {key for name in scorer.dimensions for key in dimension_outputs(name)}
    columns = [name for name in DIMENSIONS if name in outputs]
    return columns + [VBENCH_OUTPUTS[name] for name in columns if VBENCH_OUTPUTS.get(name) in outputs]


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


def student_t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile (above 0.5) of Student's t with `df` degrees of freedom: bisection on its exact
    distribution function (Abramowitz & Stegun 26.7.3-4: closed forms for an integer df). With few prompts the normal
    1.96 gives an interval far too narrow: t at 0.975 is 4.30 for 3 prompts, 2.26 for 10, 1.98 for 100."""
    central = 2 * probability - 1  # P(|T| <= t)
    low, high = 0.0, 1.0
    while _t_central_mass(high, df) < central:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_central_mass(middle, df) < central else (low, middle)
    return (low + high) / 2


def _t_central_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` degrees of freedom."""
    theta = math.atan(t / math.sqrt(df))
    cos2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:  # odd: (2 / pi) (theta + sin cos (1 + 2/3 cos^2 + 2.4/3.5 cos^4 + ... up to cos^(df-3)))
        for k in range(1, (df - 1) // 2):
            term *= cos2 * 2 * k / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    for k in range(1, df // 2):  # even: sin (1 + 1/2 cos^2 + 1.3/2.4 cos^4 + ... up to cos^(df-2))
        term *= cos2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


@dataclass(frozen=True)
class Difference:
    """Mean and standard error of `count` paired per-prompt differences (after - before)."""

    mean: float
    se: float
    count: int

    @classmethod
    def of(cls, differences: Sequence[float]) -> "Difference":
        if not differences:
            return cls(math.nan, math.nan, 0)
        se = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
        return cls(statistics.fmean(differences), se, len(differences))

    @property
    def ci95(self) -> list[float]:
        """The 95% interval of the mean difference: Student's t with count - 1 degrees of freedom."""
        if self.count < 2:
            return [math.nan, math.nan]
        half = student_t_quantile(0.975, self.count - 1) * self.se
        return [self.mean - half, self.mean + half]


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (NaN, infinity) made None, through dicts and lists: valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


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
    """The summary of a results table (see the module docstring), on the seeds scored for both models; what cannot
    be computed is None."""
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
    for column in VBENCH_OUTPUTS.values():  # VBench's own value of a dimension, for its Quality / Semantic / Total
        side = _paired_prompt_means(rows, column) if column in results.column_names else {}
        for which in MODELS if side and side["base"] else ():
            means[which][column] = statistics.fmean(side[which].values())
    return finite_or_none({
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
        "vbench": {which: vbench_present(vbench_values(means[which])) for which in MODELS},
    })


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
