"""The Sample stage without Ray: sample videos from a base or tuned model for a prompt file.

Sample k of prompt p uses seed `seed + k` (as the original sampling scripts: one seed for every prompt) and is
written as `{out}/{prompt_id}-seed{seed + k}.mp4` (and `.gif` when asked); the prompt id is the prompt's index
(`000003`) or its given name (`{"name.mp4": prompt}` files). `{out}/index.jsonl` lists every sample with its prompt,
seed, file and the sampler settings, batch size included.

A video depends only on (model, prompt, seed, batch composition): requests are cut into batches of `batch_size` in
a fixed order, so the same seed and batch size give byte-identical files however many actors run them. A rerun
skips the batches whose files all exist.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import pyarrow as pa
from pydantic import Field

from videodpo_ray import storage
from videodpo_ray.config import StrictConfig
from videodpo_ray.errors import ConfigError
from videodpo_ray.models import ModelConfig
from videodpo_ray.stages.common import ActorPoolConfig, SamplingConfig
from videodpo_ray.stages.prompts import PromptRow
from videodpo_ray.training import checkpoint as ckpt

INDEX = "index.jsonl"


class SampleConfig(StrictConfig):
    """`videodpo-ray sample`: which model, which prompts, where the videos go and how they are sampled."""

    model: ModelConfig = ModelConfig()
    init_seed: int = 0  # torch seed while building a random-init model (a tuned export brings its own)
    tuned: str | None = None  # a training run directory or its export: sample the tuned model
    prompts: str
    out: str
    samples_per_prompt: int = Field(1, ge=1)
    seed: int = Field(123, ge=0)
    batch_size: int = Field(4, ge=1)  # videos per model call
    sampling: SamplingConfig = SamplingConfig()
    gif: bool = False  # also write an animated GIF beside every mp4
    ray: bool | Literal["auto"] = "auto"  # auto: Ray Data above `ray_above_prompts` prompts, else in-process
    ray_above_prompts: int = Field(64, ge=0)
    sampler_pool: ActorPoolConfig = ActorPoolConfig(max_actors=8)


@dataclass(frozen=True)
class SampleRequest:
    """One video to sample: its prompt, seed and file name."""

    prompt_id: str
    prompt: str
    sample_index: int
    seed: int
    file: str


@dataclass
class SamplePlan:
    """Every request in batches of `batch_size` (fixed order), and which batches still have files to write."""

    batches: list[list[SampleRequest]]
    pending: list[int]  # indices into `batches`


@dataclass
class SampleReport:
    out: str
    num_prompts: int
    written: int = 0
    skipped: int = 0
    mode: str = "local"
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"sample -> {self.out}: {self.num_prompts} prompts, {self.written} video(s) written, {self.skipped} "
            f"already there ({self.mode}); index {storage.join(self.out, INDEX)}; {self.seconds:.1f} s"
        )


def resolved_model(config: SampleConfig) -> tuple[ModelConfig, int, str | None]:
    """(model config, init seed, export URL): the tuned export's own model when `tuned` is set."""
    if config.tuned is None:
        return config.model, config.init_seed, None
    export_url = ckpt.export_url_of(config.tuned)
    model_config, _, info = ckpt.load_export(export_url)
    if model_config.family != config.model.family:
        raise ConfigError(
            f"--tuned {config.tuned}: an export of a {model_config.family!r} model, not {config.model.family!r}"
        )
    return model_config, int(info["init_seed"]), export_url


def check_inputs(config: SampleConfig) -> None:
    """ConfigError for weights that do not exist or an output location that is a file."""
    for key in ("path", "turbo_lora_path", "text_encoder_path"):
        url = getattr(config.model, key)
        if url is not None and not storage.exists(url):
            raise ConfigError(f"--weights / model.{key}: {url} does not exist")
    fs, path = storage.filesystem_for(config.out)
    if fs.exists(path) and not fs.isdir(path):
        raise ConfigError(f"--out {config.out}: is a file, not a directory")


def sample_file(prompt_id: str, seed: int) -> str:
    return f"{prompt_id}-seed{seed}.mp4"


def plan_sample(config: SampleConfig, prompts: Sequence[PromptRow]) -> SamplePlan:
    """All requests in batches; a batch is pending unless every one of its files exists."""
    requests = [
        SampleRequest(row.prompt_id, row.prompt, k, config.seed + k, sample_file(row.prompt_id, config.seed + k))
        for row in prompts
        for k in range(config.samples_per_prompt)
    ]
    batches = [requests[begin : begin + config.batch_size] for begin in range(0, len(requests), config.batch_size)]
    existing = set(storage.list_files(config.out))
    pending = [index for index, batch in enumerate(batches) if any(item.file not in existing for item in batch)]
    return SamplePlan(batches, pending)


def request_table(batch: Sequence[SampleRequest]) -> pa.Table:
    """A batch as the sampler actor's input rows (`prompt`, `seed`, plus the request fields)."""
    return pa.Table.from_pylist([asdict(item) for item in batch])


def uses_ray(config: SampleConfig, num_prompts: int) -> bool:
    return config.ray is True or (config.ray == "auto" and num_prompts > config.ray_above_prompts)


def index_lines(config: SampleConfig, plan: SamplePlan, model: ModelConfig, tuned: str | None) -> bytes:
    """`index.jsonl`: one line per video, in request order."""
    settings: dict[str, Any] = {
        "model": f"{model.family}/{model.variant}" + (f"@{model.path}" if model.path else ""),
        "tuned": tuned,
        "batch_size": config.batch_size,
        "sampling": config.sampling.model_dump(mode="json"),
    }
    lines = [
        json.dumps({"prompt_id": item.prompt_id, "prompt": item.prompt, "sample_index": item.sample_index,
                    "seed": item.seed, "file": item.file,
                    "gif": item.file.removesuffix(".mp4") + ".gif" if config.gif else None, **settings})
        for batch in plan.batches
        for item in batch
    ]
    return ("\n".join(lines) + "\n").encode()
