"""The pipeline (generate -> pair -> train -> report on one output root) without Ray: config and report.

The training stage takes a train YAML (`train.config`) and sets its data and run location: `data.pairs_url` = out,
`run.storage_path` = {out}/train, `run.name` = train.run_name. Its model must be the pipeline's model (on-policy
data, method.md section 4); a mismatch is a config error, not a silent override.

With a `toy` section (the embedded default, `stages.toy`), the toy world supplies what a real run configures:
the training and held-out prompts, the base model (`model.path`, pretrained by the pipeline under `{out}/toy/`) and
the scorer (the model-free quality dimension plus the toy classifier's `toy_semantic`, blended by the real
OmniScore formula). Setting any of those beside `toy` is a config error.

The training and held-out prompts are read and checked (prompt limits, no held-out prompt among the training
prompts) before any cluster work (`read_pipeline_prompts`).

The report is `{out}/report.json` and `{out}/report.md`: prompts, samples, OmniScores, pairs made, score gaps,
weights and the training loss / implicit-accuracy curve.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field, model_validator

from videodpo_ray import shards, storage
from videodpo_ray.config import StrictConfig, load_config
from videodpo_ray.errors import ConfigError
from videodpo_ray.models import ModelConfig
from videodpo_ray.stages.common import config_fields
from videodpo_ray.stages.evaluate import EvaluateConfig, refuse_overlap
from videodpo_ray.stages.evaluate_report import format_number, unscored_note
from videodpo_ray.stages.generate import GenerateConfig, GenerateReport, GenerationSettings
from videodpo_ray.stages.pair import PairConfig, PairReport, PairSettings
from videodpo_ray.stages.prompts import PromptRow, prompt_rows, prompts_jsonl, read_prompts
from videodpo_ray.stages.toy import ToyWorldConfig, toy_prompts
from videodpo_ray.training import checkpoint as ckpt
from videodpo_ray.training.config import TrainConfig

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
TRAINING_PROMPTS = "prompts.jsonl"  # under `out`: the training prompts, when the config gives them inline
HELD_OUT_PROMPTS = "evaluate-prompts.jsonl"  # likewise the held-out prompts
CURVE_METRICS = ("loss", "implicit_accuracy", "reward_margin", "mean_weight")
MODEL_IDENTITY = ("family", "variant", "path", "turbo_lora_path", "turbo_lora_mode", "text_encoder_path")


class PipelineTrainConfig(StrictConfig):
    """The pipeline's training stage: a train YAML plus overrides (the pipeline sets the data and run location)."""

    config: str  # path of a train YAML; relative paths are relative to the pipeline YAML's directory
    overrides: list[str] = []
    run_name: str = Field("dpo", pattern=r"^[A-Za-z0-9._-]+$")


class PipelineEvaluateConfig(StrictConfig):
    """The pipeline's evaluate stage: held-out prompts and seeds; model, sampling and scorer are the pipeline's."""

    prompts: str | list[str]  # a prompts file/URL, or the prompts themselves (not the training prompts); toy: set
    samples_per_prompt: int = Field(2, ge=1)
    prompts_per_chunk: int = Field(16, ge=1)
    base_seed: int = Field(20250, ge=0)
    gallery_prompts: int = Field(8, ge=0)


class PipelineConfig(StrictConfig):
    """generate -> pair -> train -> evaluate -> report, all under one output root."""

    out: str = "demo-output"
    toy: ToyWorldConfig | None = None  # the toy world: sets prompts, model.path, generate.scorer, evaluate.prompts
    prompts: str | list[str]  # a prompts file/URL, or the prompts themselves
    model: ModelConfig = ModelConfig()
    generate: GenerationSettings
    pair: PairSettings = PairSettings()
    train: PipelineTrainConfig | None = None  # None: stop after the pair stage
    evaluate: PipelineEvaluateConfig | None = None  # None: no before/after evaluation after training

    @model_validator(mode="before")
    @classmethod
    def _toy_world(cls, data: Any) -> Any:
        """Fill in what the `toy` section supplies (see the module docstring); refuse other values set by hand."""
        if not isinstance(data, dict) or data.get("toy") is None or isinstance(data.get("generate"), StrictConfig):
            return data  # no toy world, or an assignment to an already validated config
        toy = ToyWorldConfig.model_validate(data["toy"])
        out = storage.absolute_url(str(data.get("out", cls.model_fields["out"].default)))
        model, generate = dict(data.get("model") or {}), dict(data.get("generate") or {})
        evaluate = dict(data["evaluate"]) if isinstance(data.get("evaluate"), dict) else data.get("evaluate")
        train_prompts, held_out = toy_prompts(toy)
        supplied = {
            "prompts": (data, "prompts", train_prompts),
            "model.path": (model, "path", toy.base_model_url(out)),
            "generate.scorer": (generate, "scorer", toy.scorer_config(out)),
        }
        if isinstance(evaluate, dict):
            supplied["evaluate.prompts"] = (evaluate, "prompts", held_out)
        differing = [
            name for name, (section, key, value) in supplied.items()
            if section.get(key) is not None and _as_plain(section[key]) != _as_plain(value)
        ]
        if differing:
            raise ValueError(f"the toy world supplies {', '.join(differing)}: remove them, or remove the `toy` section")
        model["path"], generate["scorer"] = supplied["model.path"][2], supplied["generate.scorer"][2]
        data = {**data, "out": out, "prompts": train_prompts, "model": model, "generate": generate}
        if isinstance(evaluate, dict):
            data["evaluate"] = {**evaluate, "prompts": held_out}
        return data

    @model_validator(mode="after")
    def _check_pairs_possible(self) -> "PipelineConfig":
        if self.generate.samples_per_prompt < 2:
            raise ValueError("generate.samples_per_prompt must be >= 2: a pair needs two samples of a prompt")
        missing = self.generate.scorer.dimensions_missing_for_omniscore()
        if missing:
            raise ValueError(f"generate.scorer.dimensions do not score {', '.join(missing)}, which OmniScore blends "
                             "(generate.scorer.omniscore): the pair stage ranks samples by OmniScore")
        self.pair.pairing.check_samples_per_prompt(self.generate.samples_per_prompt)
        return self

    def generate_config(self, prompts_url: str, model_init_seed: int = 0) -> GenerateConfig:
        return GenerateConfig(
            prompts=prompts_url,
            out=self.out,
            model=self.model,
            model_init_seed=model_init_seed,
            **config_fields(self.generate),
        )

    def pair_config(self, model_init_seed: int = 0) -> PairConfig:
        return PairConfig(data=self.out, model=self.model, model_init_seed=model_init_seed, **config_fields(self.pair))

    def evaluate_config(self, prompts_url: str, model_init_seed: int, run_url: str) -> EvaluateConfig:
        """The evaluate stage of the trained run: `{out}/evaluate/{run_name}`, with the pipeline's settings (a run
        of the same data under another `train.run_name`, e.g. a control, gets its own evaluation)."""
        assert self.evaluate is not None and self.train is not None
        settings = self.evaluate
        return EvaluateConfig(
            out=storage.join(self.out, "evaluate", self.train.run_name),
            prompts=prompts_url,
            model=self.model,
            model_init_seed=model_init_seed,
            tuned=run_url,
            samples_per_prompt=settings.samples_per_prompt,
            prompts_per_chunk=settings.prompts_per_chunk,
            base_seed=settings.base_seed,
            sampling=self.generate.sampling,
            scorer=self.generate.scorer,
            sampler_pool=self.generate.sampler_pool,
            scorer_pool=self.generate.scorer_pool,
            training_data=self.out,
            gallery_prompts=settings.gallery_prompts,
            max_prompt_chars=self.generate.max_prompt_chars,
        )


@dataclass(frozen=True)
class PipelinePrompts:
    """The pipeline's prompts, read and checked, and the URLs its stages read them from."""

    training: list[PromptRow]
    training_url: str
    held_out_url: str | None  # None: no evaluate section


def read_pipeline_prompts(config: PipelineConfig) -> PipelinePrompts:
    """Read the training and held-out prompts (limit `generate.max_prompt_chars` for both), then write inline ones
    under `out`; ConfigError when a held-out prompt is a training prompt, or when an inline prompts file an earlier
    run wrote holds other prompts. Call before any cluster work: nothing is written unless every check passes."""
    max_chars = config.generate.max_prompt_chars
    training, training_url = read_prompt_setting(config.prompts, storage.join(config.out, TRAINING_PROMPTS), max_chars)
    inline = [(config.prompts, training, training_url)]
    held_out_url = None
    if config.evaluate is not None:
        held_out, held_out_url = read_prompt_setting(
            config.evaluate.prompts, storage.join(config.out, HELD_OUT_PROMPTS), max_chars
        )
        where = f"evaluate.prompts ({held_out_url}) vs prompts ({training_url})"
        refuse_overlap(held_out, {row.prompt for row in training}, where)
        inline.append((config.evaluate.prompts, held_out, held_out_url))
    recorded = [(url, prompts_jsonl(rows)) for setting, rows, url in inline if not isinstance(setting, str)]
    for url, data in recorded:  # both checked before either is written
        refuse_other_recorded_prompts(url, data)
    for url, data in recorded:
        if not storage.exists(url):
            storage.write_bytes_atomic(url, data)
    return PipelinePrompts(training, training_url, held_out_url)


def _as_plain(value: Any) -> Any:
    """A config value as plain data, for comparing a given value with a derived one."""
    return value.model_dump(mode="json") if isinstance(value, StrictConfig) else value


def load_pipeline_config(path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Load a pipeline YAML; a relative `train.config` is resolved against the YAML's directory."""
    config = load_config(PipelineConfig, path, overrides)
    if config.train is not None and not Path(config.train.config).is_absolute():
        resolved = (Path(path).resolve().parent / config.train.config).resolve()
        config.train = config.train.model_copy(update={"config": str(resolved)})
    return config


def train_config(config: PipelineConfig) -> TrainConfig:
    """The TrainConfig of the pipeline's training stage (data and run location set; model checked)."""
    assert config.train is not None
    placed = [
        f"data.pairs_url={json.dumps(config.out)}",
        f"run.storage_path={json.dumps(storage.join(config.out, 'train'))}",
        f"run.name={config.train.run_name}",
    ]
    if config.toy is not None:  # the toy base model the pipeline pretrains
        placed.append(f"model.path={json.dumps(config.model.path)}")
    trained = load_config(TrainConfig, config.train.config, [*config.train.overrides, *placed])
    differing = [key for key in MODEL_IDENTITY if getattr(trained.model, key) != getattr(config.model, key)]
    if differing:
        details = ", ".join(
            f"{key}: {getattr(trained.model, key)!r} vs {getattr(config.model, key)!r}" for key in differing
        )
        raise ConfigError(
            f"{config.train.config}: the train model differs from the pipeline model ({details}); pairs must come "
            "from the model being trained: make the two model sections agree"
        )
    return trained


def write_report(report: dict[str, Any], total_seconds: float) -> None:
    """`{out}/report.json` and the human-readable `{out}/report.md`."""
    report["seconds"]["total"] = total_seconds
    storage.write_bytes_atomic(storage.join(report["out"], REPORT_JSON), json.dumps(report, indent=2).encode())
    storage.write_bytes_atomic(storage.join(report["out"], REPORT_MD), render_markdown(report).encode())


def generate_section(generated: GenerateReport, config: PipelineConfig) -> dict[str, Any]:
    return {
        "prompts": generated.num_prompts,
        "samples_per_prompt": config.generate.samples_per_prompt,
        "chunks": generated.num_chunks,
        "chunks_sampled": len(generated.sampled),
        "chunks_rescored": len(generated.rescored),
        "chunks_skipped": len(generated.skipped),
        "failures": generated.failures,
    }


def pairs_section(paired: PairReport) -> dict[str, Any]:
    return {
        "pairs": paired.num_pairs,
        "scored_samples": paired.num_samples,
        "unscored_samples": len(paired.unscored),
        "prompts_without_pair": paired.prompts_without_pair,
        "rank_pairs_short_of_scored_samples": paired.rank_pairs_short,
        "omniscore": paired.omniscore,
        "score_gap": paired.score_gap,
        "weight": paired.weight,
        "shards": dict(shards.dataset_manifest(paired.out, "pairs")),
    }


def train_section(trained: TrainConfig, final_metrics: dict[str, Any]) -> dict[str, Any]:
    """The report's training section: the run, its per-step curve and its final metrics."""
    run_url = ckpt.run_dir(trained)
    curve = training_curve(run_url)
    section: dict[str, Any] = {
        "status": "done",
        "run": run_url,
        "steps": len(curve),
        "curve": curve,
        "final_metrics": {k: v for k, v in final_metrics.items() if isinstance(v, (int, float, str, bool))},
    }
    if curve:
        section["first"] = curve[0]
        section["last"] = curve[-1]
    return section


def training_curve(run_url: str) -> list[dict[str, float]]:
    """Per optimizer step: the CURVE_METRICS the run logged (`training.checkpoint.read_tensorboard_scalars`)."""
    scalars = ckpt.read_tensorboard_scalars(run_url)
    steps = sorted({step for key in CURVE_METRICS for step in scalars.get(key, {})})
    return [
        {"step": step, **{key: scalars[key][step] for key in CURVE_METRICS if step in scalars.get(key, {})}}
        for step in steps
    ]


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable summary of the report."""
    generated, pairs, train = report["generate"], report["pairs"], report["train"]
    lines = [
        "# videodpo-ray pipeline report",
        "",
        f"- output: `{report['out']}`",
        f"- model: {report['model']['family']}/{report['model']['variant']}"
        + (f" from `{report['model']['path']}`" if report["model"].get("path") else " (random init)"),
        f"- wall time: {report['seconds']['total']:.1f} s ("
        + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in report["seconds"].items() if stage != "total")
        + ")",
        "",
        "## Generate + score",
        "",
        f"{generated['prompts']} prompts x {generated['samples_per_prompt']} samples in "
        f"{generated['chunks']} chunk(s): "
        f"{generated['chunks_sampled']} sampled, {generated['chunks_rescored']} re-scored, "
        f"{generated['chunks_skipped']} already committed. {pairs['scored_samples']} samples scored, "
        f"{pairs['unscored_samples']} failed scoring.",
    ]
    if generated["failures"]:
        lines += ["", f"{len(generated['failures'])} failed sample(s) (their prompts with a failed sample are left out;"
                  " rerun with `generate.retry_failed=true` to try them again):", "",
                  "| prompt | sample | stage | attempts | error |", "|---|---|---|---:|---|"]
        lines += [f"| {f['prompt_id']} | {f['sample_id']} | {f['stage']} | {f['attempts']} | "
                  f"{f['error'][:200].replace('|', '/')} |"
                  for f in generated["failures"]]
    if pairs["omniscore"]:
        score = pairs["omniscore"]
        lines.append(f"OmniScore mean {score['mean']:.4f} (min {score['min']:.4f}, max {score['max']:.4f}).")
    lines += ["", "## Pairs", "", f"{pairs['pairs']} pairs in {pairs['shards']['num_shards']} shard(s); "
              f"{pairs['prompts_without_pair']} prompt(s) without a pair (tied or filtered out)."]
    if pairs["score_gap"]:
        gap, weight = pairs["score_gap"], pairs["weight"]
        lines.append(
            f"Score gap S_w - S_l: mean {gap['mean']:.4f}, min {gap['min']:.4f}, max {gap['max']:.4f}. "
            f"Pair weight: mean {weight['mean']:.4f}, min {weight['min']:.4f}, max {weight['max']:.4f}."
        )
    lines += ["", "## Train", "", f"Status: {train['status']}."]
    evaluated = report.get("evaluate")
    if train.get("curve"):
        lines += [
            f"Run: `{train['run']}`, {train['steps']} optimizer steps.",
            "",
            "| step | loss | implicit accuracy | reward margin | mean pair weight |",
            "|---:|---:|---:|---:|---:|",
        ]
        for point in train["curve"]:
            loss, accuracy, margin, weight = (point.get(key, float("nan")) for key in CURVE_METRICS)
            lines.append(f"| {point['step']} | {loss:.5f} | {accuracy:.3f} | {margin:.4g} | {weight:.4f} |")
    if evaluated:
        low, high = (format_number(bound, 3) for bound in evaluated["win_rate_ci95"])
        lines += [
            "", "## Evaluate (held-out prompts and seeds)", "",
            f"Win rate {format_number(evaluated['win_rate'], 3)} (95% CI [{low}, {high}]) over "
            f"{evaluated['num_prompts']} prompts"
            + unscored_note(evaluated["num_prompts_unscored"])
            + f"; OmniScore {format_number(evaluated['omniscore_before'])} -> "
            f"{format_number(evaluated['omniscore_after'])} (gain "
            f"{format_number(evaluated['omniscore_gain_mean'], sign=True)} +/- "
            f"{format_number(evaluated['omniscore_gain_se'])}). Report: `{evaluated['report']}`.",
        ]
    return "\n".join(lines) + "\n"


def read_prompt_setting(prompts: str | list[str], url: str, max_chars: int) -> tuple[list[PromptRow], str]:
    """Prompts and the URL a stage records: the prompts file itself, or (prompts given inline) `url`, where
    `read_pipeline_prompts` writes them."""
    if isinstance(prompts, str):
        return read_prompts(prompts, max_chars), prompts
    return prompt_rows(prompts, "config prompts", max_chars), url


def refuse_other_recorded_prompts(url: str, data: bytes) -> None:
    """ConfigError when an earlier run of this output recorded other inline prompts at `url` than `data` (what it
    generated and evaluated was made from them)."""
    if storage.exists(url) and storage.read_bytes(url) != data:
        raise ConfigError(
            f"{url}: an earlier run of this output was given other inline prompts, and its results were made from "
            "these; write to another `out` (or delete the output to start over)"
        )
