"""What a training checkpoint holds besides DeepSpeed's files, and the exported trainable weights.

A checkpoint directory (`{storage_path}/{run.name}/checkpoint-{step:08d}/`, merged by Ray Train from all workers):

    deepspeed/...            engine.save_checkpoint of every rank (model states, ZeRO optimizer shards, LR scheduler)
    latest                   DeepSpeed's tag file
    train_state.json         step, data position (+ rows consumed per shard), frozen shard list, world layout
    pair_log.jsonl           the pair ids of every step so far (all workers), one JSON line per step
    config.yaml              the TrainConfig of the run (a resume must match it: `check_resumable`)
    rank-{r:05d}.pt          per rank: RNG states and the fingerprint of the frozen weights

The export (`{storage_path}/{run.name}/export/`): `trainable.safetensors` (model.trainable_state_dict(): the LoRA
factors alone, or the full/temporal denoiser weights), `model.yaml` (the ModelConfig) and `export.json`.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
from pydantic import BaseModel

from videodpo_ray import storage
from videodpo_ray.config import build_config, dump_config, load_yaml
from videodpo_ray.errors import CheckpointError, CheckpointMismatchError, ConfigError
from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.training.config import TrainConfig

if TYPE_CHECKING:  # torch is imported where tensors are handled: reading run state must not pay for it (seconds)
    import torch

    from videodpo_ray.models.base import VideoDiffusionModel

CHECKPOINT_PREFIX = "checkpoint-"
DEEPSPEED_TAG = "deepspeed"
TRAIN_STATE = "train_state.json"
PAIR_LOG = "pair_log.jsonl"
CONFIG_FILE = "config.yaml"
EXPORT_DIR = "export"
EXPORT_WEIGHTS = "trainable.safetensors"
EXPORT_MODEL = "model.yaml"
EXPORT_INFO = "export.json"
EXPORT_FILES = (EXPORT_WEIGHTS, EXPORT_MODEL, EXPORT_INFO)
MERGED_INFO = "merged_export.json"  # in a merged model directory: which export it was made from
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the committed checkpoints


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def run_dir(config: TrainConfig) -> str:
    """`{storage_path}/{run.name}`: Ray Train's experiment directory for this run."""
    return storage.join(config.run.storage_path, config.run.name)


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resume needs, plus the layout it is valid for."""

    global_step: int
    epoch: int
    step_in_epoch: int
    total_steps: int
    world_size: int
    zero_stage: int
    pairs_per_worker: int
    grad_accum: int
    seed: int
    shards: list[dict[str, Any]]
    consumed: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> "TrainState":
        """Parse a train_state.json; CheckpointError naming `source` when it is not one this version writes."""
        try:
            return cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError) as error:
            raise CheckpointError(f"{source}: not a train state this version reads ({error})") from None


# Settings a resume may change (a section, "export", covers all its settings): they locate the run, set how long it
# runs, how often it saves and what it exports, or choose memory and throughput; none changes a step's numbers. A
# lower step count than the checkpoint's is refused by `training.inputs.completed_checkpoint`.
RESUME_MAY_CHANGE = (
    "data.epochs", "data.max_steps", "data.prefetch_batches", "data.prompt_cache_entries", "run.name",
    "run.storage_path", "run.checkpoint_every", "run.num_to_keep", "run.max_failures", "export",
    "scaling.cpus_per_worker", "model.gradient_checkpointing",
)
# Compared with the layout train_state.json records instead (`data.pairs_per_worker: auto` settles from it)
LAYOUT_SETTINGS = (
    "scaling.num_workers", "deepspeed.zero_stage", "data.shuffle_seed", "data.pairs_per_worker", "optim.grad_accum",
)
LAYOUT_WHY = ("Checkpoints are not resharded (ZeRO optimizer partitions and the exact data position depend on this "
              "layout).")
SETTINGS_WHY = ("A resume continues the checkpoint's numbers exactly: only the step count and the checkpointing, "
                "export and memory settings may change.")


def check_resumable(state: TrainState, config: TrainConfig, checkpoint_url: str) -> None:
    """Refuse a resume that would not continue the checkpoint's numbers exactly: a layout other than the one
    train_state.json records (no resharding: ZeRO partitions and the exact data position both depend on it), or a
    setting outside `RESUME_MAY_CHANGE` whose value differs from the checkpoint's config.yaml. A checkpoint without
    config.yaml (not written by the train worker: every worker checkpoint has one) is checked for its layout alone."""
    expected = {
        "scaling.num_workers": (state.world_size, config.scaling.num_workers),
        "deepspeed.zero_stage": (state.zero_stage, config.deepspeed.zero_stage),
        "data.shuffle_seed": (state.seed, config.shuffle_seed),
    }
    if config.data.pairs_per_worker == "auto":  # auto keeps optim.grad_accum pairs per worker per step
        expected["optim.grad_accum (pairs per worker per step with data.pairs_per_worker auto)"] = (
            state.pairs_per_worker * state.grad_accum, config.optim.grad_accum)
    else:
        expected["data.pairs_per_worker"] = (state.pairs_per_worker, config.data.pairs_per_worker)
        expected["optim.grad_accum"] = (state.grad_accum, config.optim.grad_accum)
    layout = {key: (then, now) for key, (then, now) in expected.items() if then != now}
    settings = changed_settings(config, checkpoint_url)
    problems = [f"{key} is {now} but the checkpoint was saved with {then}"
                for key, (then, now) in {**layout, **settings}.items()]
    if problems:
        why = " ".join(text for text, applies in ((LAYOUT_WHY, layout), (SETTINGS_WHY, settings)) if applies)
        raise CheckpointMismatchError(
            f"cannot resume run {config.run.name!r} from {checkpoint_url}: " + "; ".join(problems) + f". {why} "
            "Resume with the checkpoint's settings, or start a new run (another run.name)."
        )


def changed_settings(config: TrainConfig, checkpoint_url: str) -> dict[str, tuple[Any, Any]]:
    """{setting: (checkpoint's value, `config`'s value)} for every setting outside `RESUME_MAY_CHANGE` and
    `LAYOUT_SETTINGS` that differs from the checkpoint's config.yaml; {} when the checkpoint has none."""
    url = storage.join(checkpoint_url, CONFIG_FILE)
    try:
        text = storage.read_bytes(url)
    except FileNotFoundError:
        return {}
    saved = settled_settings(build_config(TrainConfig, load_yaml(text) or {}, url))
    exempt = (*RESUME_MAY_CHANGE, *LAYOUT_SETTINGS)
    return {
        key: (saved[key], now)
        for key, now in settled_settings(config).items()
        if not any(key == name or key.startswith(f"{name}.") for name in exempt) and saved[key] != now
    }


def settled_settings(config: TrainConfig) -> dict[str, Any]:
    """Every setting of `config` by its dotted name, with `deepspeed.bf16: auto` settled to what it means."""
    def leaves(section: BaseModel, prefix: str) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for name, info in type(section).model_fields.items():
            value = getattr(section, name)
            if isinstance(value, BaseModel):
                flat.update(leaves(value, f"{prefix}{name}."))
            elif not info.exclude:  # e.g. model.build_text_encoder: never written out
                flat[f"{prefix}{name}"] = value
        return flat

    return {**leaves(config, ""), "deepspeed.bf16": config.use_bf16}


def committed_checkpoint_name(run_url: str) -> str | None:
    """The directory name of the run's latest committed checkpoint, as Ray Train's checkpoint manager records it
    (`RAY_CHECKPOINT_SNAPSHOT`), or None before the first commit. Ray Train uploads every worker's files into the
    checkpoint's final directory and records the commit only once all of them are there, so a directory that is
    not in the record may be an interrupted upload."""
    url = storage.join(run_url, RAY_CHECKPOINT_SNAPSHOT)
    try:
        snapshot = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{url}: Ray Train's checkpoint record is not valid JSON ({error})") from error
    latest = snapshot.get("latest_checkpoint_result") if isinstance(snapshot, dict) else None
    return latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None


def latest_checkpoint_state(run_url: str) -> tuple[str, TrainState] | None:
    """(checkpoint URL, TrainState) of the run's latest committed checkpoint (`committed_checkpoint_name`), or None
    before the first commit."""
    fs, path = storage.filesystem_for(run_url)
    fs.invalidate_cache(path)  # s3fs answers from its listing cache otherwise
    name = committed_checkpoint_name(run_url)
    if name is None:
        return None
    url = storage.join(run_url, name)
    try:
        state_url = storage.join(url, TRAIN_STATE)
        return url, TrainState.from_json(storage.read_bytes(state_url).decode(), state_url)
    except FileNotFoundError:
        raise CheckpointError(f"{url}: committed by Ray Train but without {TRAIN_STATE}") from None


def read_pair_log(lines: str) -> list[dict[str, Any]]:
    """Parse pair_log.jsonl: [{"step", "epoch", "pair_ids"}, ...]."""
    return [json.loads(line) for line in lines.splitlines() if line.strip()]


def write_pair_log(entries: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries)


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """A hash of the exact bytes of tensors (used to prove the frozen reference never changes)."""
    import torch

    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


# --- export -------------------------------------------------------------------------------------------------------

def write_export(
    state_dict: dict[str, torch.Tensor],
    model_config: ModelConfig,
    export_url: str,
    *,
    step: int,
    dtype: str,
    init_seed: int,
) -> str:
    """Write the trainable weights as safetensors plus the ModelConfig; return the weights URL.

    `init_seed` is the torch seed the run built its model with: a model without `path` (random init) is only
    reproduced by building it under the same seed.
    """
    import torch
    from safetensors.torch import save as save_safetensors

    cast = getattr(torch, dtype)
    tensors = {
        name: tensor.detach().to("cpu", cast if tensor.is_floating_point() else tensor.dtype).contiguous()
        for name, tensor in state_dict.items()
    }
    weights_url = storage.join(export_url, EXPORT_WEIGHTS)
    weights = save_safetensors(tensors, metadata={"step": str(step)})
    storage.write_bytes_atomic(weights_url, weights)
    storage.write_bytes_atomic(
        storage.join(export_url, EXPORT_MODEL),
        dump_config(model_config).encode(),
    )
    info = {
        "step": step,
        "family": model_config.family,
        "finetune": model_config.finetune,
        "dtype": dtype,
        "num_tensors": len(tensors),
        "init_seed": init_seed,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),  # which weights: a rerun of the run rewrites them
    }
    storage.write_bytes_atomic(storage.join(export_url, EXPORT_INFO), json.dumps(info, indent=2).encode())
    return weights_url


def export_outdated(config: TrainConfig) -> str | None:
    """Why the export of a finished run is not what `config.export` asks for (none there, another step or dtype),
    or None: then there is nothing to write again (also when no export is asked for)."""
    latest = latest_checkpoint_state(run_dir(config))
    if not config.export.enabled or latest is None:
        return None
    export_url = storage.join(run_dir(config), EXPORT_DIR)
    try:
        info = json.loads(storage.read_bytes(storage.join(export_url, EXPORT_INFO)))
    except FileNotFoundError:
        return f"{export_url} holds no export"
    recorded, asked = (info.get("step"), info.get("dtype")), (latest[1].global_step, config.export.dtype)
    if recorded != asked:
        return (f"{export_url} holds step {recorded[0]} in {recorded[1]}, "
                f"the config asks for step {asked[0]} in {asked[1]}")
    return None


def load_export(export_url: str) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read an export: its ModelConfig, the trainable state dict and export.json."""
    from safetensors.torch import load as load_safetensors

    config_url = storage.join(export_url, EXPORT_MODEL)
    info = read_export_info(export_url)
    weights_url = storage.join(export_url, EXPORT_WEIGHTS)
    try:
        model_config = build_config(ModelConfig, load_yaml(storage.read_bytes(config_url)) or {}, config_url)
        data = storage.read_bytes(weights_url)
    except FileNotFoundError as error:
        raise ConfigError(f"{export_url}: not a training export ({error})") from None
    recorded = info.get("weights_sha256")
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        raise CheckpointError(f"{weights_url}: not the weights {EXPORT_INFO} records (sha256 {recorded}): the export "
                              "is being rewritten, or its rewrite was interrupted; export the run again")
    return model_config, load_safetensors(data), info


def read_export_info(export_url: str) -> dict[str, Any]:
    """An export's export.json: its step, family, dtype, init seed and the sha256 of its weights file."""
    try:
        return json.loads(storage.read_bytes(storage.join(export_url, EXPORT_INFO)))
    except FileNotFoundError as error:
        raise ConfigError(f"{export_url}: not a training export ({error})") from None


def export_url_of(run_or_export: str) -> str:
    """The export directory of a training run directory (`{run}/export`), or `run_or_export` itself when it is one."""
    for candidate in (run_or_export, storage.join(run_or_export, EXPORT_DIR)):
        if storage.exists(storage.join(candidate, EXPORT_INFO)):
            return candidate
    raise ConfigError(f"{run_or_export}: neither a training run with an export/ nor an export (no export.json)")


def load_exported_model(export_url: str, **overrides: Any) -> VideoDiffusionModel:
    """Build the exported run's model (base weights from its ModelConfig, with `overrides`) and load the trained
    weights strictly."""
    model_config, weights, info = load_export(export_url)
    model = build_model(model_config.model_copy(update=overrides), seed=info["init_seed"])
    model.load_trainable_state_dict(weights)
    return model


def write_merged_export(export_url: str, out: str) -> str:
    """The exported model with its trained weights folded in (LoRA merged into the base weights), written in the
    model layer's format: `ModelConfig(family, variant, path=out)` loads it like any base model. Returns `out`.

    `out` is replaced as a whole (`storage.publish_directory`: an interrupted write is refused by the loaders), so
    it must be new, empty, or an earlier merged export (it holds `MERGED_INFO`); anything else is a ConfigError.
    """
    names = {entry.url.rsplit("/", 1)[-1] for entry in storage.list_entries(out)}
    if names and not names & {MERGED_INFO, storage.WRITING_MARKER}:
        raise ConfigError(f"{out}: not empty and not a merged export (no {MERGED_INFO}): give a new or empty --out")
    model = load_exported_model(export_url, mixed_precision="no")  # base weights in float32, not bf16
    if model.config.finetune == "lora":
        model.merge_lora()
    info = read_export_info(export_url)
    merged = {"export": export_url, "step": info["step"], "weights_sha256": info.get("weights_sha256")}
    with tempfile.TemporaryDirectory(prefix="videodpo-merged-") as directory:
        model.save_pretrained(directory)
        Path(directory, MERGED_INFO).write_text(json.dumps(merged, indent=2))
        storage.publish_directory(Path(directory), out)
    return out


def read_tensorboard_scalars(run_url: str) -> dict[str, dict[int, float]]:
    """The scalars the run logged, {"loss": {step: value}, ...}, from `{run_url}/tensorboard/` (any fsspec URL).

    Event files of restarted attempts are read in order; TensorBoard drops the steps a restart redid.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard_url = storage.join(run_url, "tensorboard")
    files = storage.list_files(tensorboard_url)
    scalars: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix="videodpo-tensorboard-") as directory:
        for name in files:
            Path(directory, name).write_bytes(storage.read_bytes(storage.join(tensorboard_url, name)))
        events = EventAccumulator(directory, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag.removeprefix("train/")] = {event.step: event.value for event in events.Scalars(tag)}
    return scalars


def rng_states() -> dict[str, Any]:
    import torch

    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
