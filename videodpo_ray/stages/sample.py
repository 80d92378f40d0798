"""The Sample stage without Ray: sample videos from a base or tuned model for a prompt file.

Sample k of prompt p uses seed `seed + k` (as the original sampling scripts: one seed for every prompt) and is
written as `{out}/{prompt_id}-seed{seed + k}.mp4` (and `.gif` when asked); the prompt id is the prompt's index
(`000003`) or its given name (`{"name.mp4": prompt}` files), percent-encoded (`urllib.parse.quote`, nothing kept
safe: `dir/clip` is `dir%2Fclip`), so every file lies directly under `out` whatever the id. `{out}/index.jsonl` lists
every finished sample with its prompt id, prompt, seed, files and the sampler settings, batch size included;
`{out}/failures.jsonl` lists the samples the latest run could not make (empty when none), which are not written.

A video depends only on (model, prompt list, seed, batch composition): requests are cut into batches of
`batch_size` in a fixed order, so the same seed and batch size give byte-identical files however many actors run
them. `{out}/sample.json` records every setting that changes a video (`sample_manifest`) and `{out}/sample-device.json`
the sampler's device type, so a rerun with other settings is refused instead of mixing two kinds of video. A sample
is done when every file the settings ask for exists (mp4, and gif when `gif`); a rerun skips the batches whose
samples are all done and writes only the missing files of the others.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence
from urllib.parse import quote

import pyarrow as pa
from pydantic import Field

from videodpo_ray import storage
from videodpo_ray.config import StrictConfig
from videodpo_ray.errors import ConfigError
from videodpo_ray.models import ModelConfig
from videodpo_ray.stages.common import ActorPoolConfig, SamplingConfig, record_manifest
from videodpo_ray.stages.prompts import PromptRow, prompts_jsonl
from videodpo_ray.training import checkpoint as ckpt
from videodpo_ray.video_format import MP4_ENCODING

INDEX = "index.jsonl"
FAILURES = "failures.jsonl"
SAMPLE_MANIFEST = "sample.json"
DEVICE_MANIFEST = "sample-device.json"  # the sampler's device type, known once it is placed


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

    def files(self, gif: bool) -> list[str]:
        """The files this sample is made of: its mp4, and its gif when asked."""
        return [self.file, gif_file(self.file)] if gif else [self.file]


@dataclass
class SamplePlan:
    """Every request in batches of `batch_size` (fixed order), which batches still have files to write, and the
    files of the output (updated as they are written)."""

    batches: list[list[SampleRequest]]
    pending: list[int]  # indices into `batches`
    existing: set[str]
    gif: bool

    def done(self, item: SampleRequest) -> bool:
        """Whether every file of `item` exists."""
        return all(name in self.existing for name in item.files(self.gif))

    def num_done(self) -> int:
        return sum(self.done(item) for batch in self.batches for item in batch)


@dataclass
class SampleReport:
    out: str
    num_prompts: int
    written: int = 0  # samples completed by this run
    skipped: int = 0  # samples done before it
    failures: list[dict[str, Any]] = field(default_factory=list)  # `failure_row`s: samples the sampler gave up on
    mode: str = "local"
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"sample -> {self.out}: {self.num_prompts} prompts, {self.written} video(s) written, {self.skipped} "
            f"already there ({self.mode}); index {storage.join(self.out, INDEX)}; {self.seconds:.1f} s"
        ]
        if self.failures:
            lines.append(
                f"  {len(self.failures)} sample(s) failed and were not written, recorded in "
                f"{storage.join(self.out, FAILURES)}; rerun to try them again:"
            )
            lines += [
                f"    {f['prompt_id']} {f['prompt'][:60]!r} sample {f['sample_index']} (seed {f['seed']}) "
                f"[{f['attempts']} attempts]: {f['error'][:200]}"
                for f in self.failures
            ]
        return "\n".join(lines)


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


def sample_manifest(
    config: SampleConfig, prompts: Sequence[PromptRow], model: ModelConfig, init_seed: int, export_url: str | None
) -> dict[str, Any]:
    """Every setting that changes a video or which file holds it: the prompt list (a file name is a prompt id and a
    seed; the batches follow the list), seeds, the resolved model (the tuned export's, with its weights' hash) and
    sampling settings, batch size included (float rounding in batched kernels). Not `gif` (it adds files), nor
    `ray` or the actor pool."""
    return {
        "num_prompts": len(prompts),
        "prompts_sha256": hashlib.sha256(prompts_jsonl(prompts)).hexdigest(),
        "samples_per_prompt": config.samples_per_prompt,
        "seed": config.seed,
        "model": model.model_dump(mode="json", exclude={"gradient_checkpointing"}),  # samplers ignore it
        "init_seed": init_seed,
        "tuned": export_url,
        "tuned_export": ckpt.read_export_info(export_url) if export_url else None,  # the same URL, new weights?
        "sampling": config.sampling.model_dump(mode="json"),
        "batch_size": config.batch_size,
        "video_encoding": MP4_ENCODING,
        "file_names": FILE_NAMES,  # an output named otherwise would be sampled again beside its old files
    }


def record_device(out: str, device: str) -> None:
    """Record (or check) the sampler's device type, "cuda" or "cpu": the two round floats differently."""
    record_manifest(storage.join(out, DEVICE_MANIFEST), {"sampler_device": device})


FILE_NAMES = "{percent-encoded prompt id}-seed{seed}.mp4"  # `sample_file`'s scheme, recorded in sample.json


def sample_file(prompt_id: str, seed: int) -> str:
    """The mp4 of `prompt_id` at `seed`: a flat name directly under `out` (the id percent-encoded, `/` included:
    one file name per id, never a path)."""
    return f"{quote(prompt_id, safe='')}-seed{seed}.mp4"


def gif_file(mp4: str) -> str:
    return mp4.removesuffix(".mp4") + ".gif"


def plan_sample(config: SampleConfig, prompts: Sequence[PromptRow]) -> SamplePlan:
    """All requests in batches; a batch is pending unless every one of its samples is done."""
    requests = [
        SampleRequest(row.prompt_id, row.prompt, k, config.seed + k, sample_file(row.prompt_id, config.seed + k))
        for row in prompts
        for k in range(config.samples_per_prompt)
    ]
    batches = [requests[begin : begin + config.batch_size] for begin in range(0, len(requests), config.batch_size)]
    plan = SamplePlan(batches, [], set(storage.list_files(config.out)), config.gif)
    plan.pending = [index for index, batch in enumerate(batches) if not all(plan.done(item) for item in batch)]
    return plan


def request_table(batch: Sequence[SampleRequest]) -> pa.Table:
    """A batch as the sampler actor's input rows (`prompt`, `seed`, plus the request fields)."""
    return pa.Table.from_pylist([asdict(item) for item in batch])


def uses_ray(config: SampleConfig, num_prompts: int) -> bool:
    return config.ray is True or (config.ray == "auto" and num_prompts > config.ray_above_prompts)


def failure_row(row: dict[str, Any]) -> dict[str, Any]:
    """A sampler output row without a video -> its `failures.jsonl` line."""
    keys = ("prompt_id", "prompt", "sample_index", "seed", "file")
    return {**{key: row[key] for key in keys}, "error": row["failed_reason"], "attempts": row["attempts"]}


def jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def index_lines(config: SampleConfig, plan: SamplePlan, model: ModelConfig, tuned: str | None) -> bytes:
    """`index.jsonl`: one line per done sample (every file it lists exists), in request order."""
    settings: dict[str, Any] = {
        "model": f"{model.family}/{model.variant}" + (f"@{model.path}" if model.path else ""),
        "tuned": tuned,
        "batch_size": config.batch_size,
        "sampling": config.sampling.model_dump(mode="json"),
    }
    return jsonl([
        {"prompt_id": item.prompt_id, "prompt": item.prompt, "sample_index": item.sample_index, "seed": item.seed,
         "file": item.file, "gif": gif_file(item.file) if config.gif else None, **settings}
        for batch in plan.batches
        for item in batch
        if plan.done(item)
    ])
