"""What a training run needs that the driver can check before any worker starts, and its paths made absolute."""

from __future__ import annotations

from videodpo_ray import shards, storage
from videodpo_ray.errors import CheckpointMismatchError, ConfigError, ShardError
from videodpo_ray.shards import ShardInfo
from videodpo_ray.training import checkpoint as ckpt
from videodpo_ray.training.config import TrainConfig, lr_multiplier
from videodpo_ray.training.plan import LATENT_COLUMNS, PairPlan

MODEL_PATHS = ("path", "turbo_lora_path", "text_encoder_path")


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """Local relative paths resolved against the driver's directory (Ray workers run in other directories)."""
    def absolute(url: str | None) -> str | None:
        return None if url is None else storage.absolute_url(url)

    updates = {
        "data": config.data.model_copy(update={"pairs_url": absolute(config.data.pairs_url)}),
        "run": config.run.model_copy(update={"storage_path": absolute(config.run.storage_path)}),
        "model": config.model.model_copy(update={key: absolute(getattr(config.model, key)) for key in MODEL_PATHS}),
    }
    return config.model_copy(update=updates)


def validate_inputs(config: TrainConfig) -> PairPlan:
    """Check everything a run needs that can be checked without workers; raise ConfigError / ShardError.

    - model.path, model.turbo_lora_path and model.text_encoder_path exist;
    - the pair shards: at least one committed shard, each with rows and exactly the pairs schema (read from the
      parquet footers, not the data); with ZeRO-3 every pair must carry latents made by this model family
      (the VAE would be partitioned across ranks), checked from the footers' column statistics;
    - enough pairs for one optimizer step (`pairs_per_worker: auto` keeps the step of pairs_per_worker 1);
    - an earlier checkpoint of this run (same run.name + storage_path) was saved with the same layout and
      settings (`ckpt.check_resumable`), and the shards it froze are all still there, unchanged
      (`check_frozen_shards`); the plan is then the frozen one (shards committed since are not in it).
    """
    for key in MODEL_PATHS:
        url = getattr(config.model, key)
        if url is not None and not storage.exists(url):
            raise ConfigError(f"model.{key}: checkpoint path {url} does not exist")
    shard_list = shards.list_shards(config.data.pairs_url, "pairs")
    if not shard_list:
        raise ShardError(
            f"data.pairs_url: no committed pair shards under {storage.join(config.data.pairs_url, 'pairs')} "
            "(a shard counts once its manifest shard-NNNNN.json is written)"
        )
    zero3 = config.deepspeed.zero_stage == 3
    for info in shard_list:
        shards.check_footer(
            info,
            non_null=LATENT_COLUMNS if zero3 else (),
            why="; ZeRO-3 training needs stored latents (encode the pairs first, or use zero_stage 2)",
        )
    latest = ckpt.latest_checkpoint_state(ckpt.run_dir(config))
    if latest is not None:
        url, state = latest
        ckpt.check_resumable(state, config, url)
        shard_list = check_frozen_shards(state, shard_list, url)
    return PairPlan(
        shard_list,
        seed=config.shuffle_seed,
        num_workers=config.scaling.num_workers,
        pairs_per_worker=config.micro_batch,
        grad_accum=config.optim.grad_accum,
    )


def check_frozen_shards(state: ckpt.TrainState, listed: list[ShardInfo], checkpoint_url: str) -> list[ShardInfo]:
    """The shard list a checkpoint froze, after checking that every shard in it is still committed with the same
    content; ShardError naming each one gone or rewritten (else the workers would fail at it, maybe hours in)."""
    frozen = PairPlan.shards_from_json(state.shards)
    current = {info.url: info for info in listed}
    problems = []
    for info in frozen:
        now = current.get(info.url)
        if now is None:
            problems.append(f"{info.url} is gone")
        elif (now.num_rows, now.num_bytes, now.sha256) != (info.num_rows, info.num_bytes, info.sha256):
            problems.append(f"{info.url} was rewritten ({info.num_rows} rows, sha256 {info.sha256[:12]} then; "
                            f"{now.num_rows} rows, sha256 {now.sha256[:12]} now)")
    if problems:
        raise ShardError(
            f"cannot resume from {checkpoint_url}: a run trains on the pair shards it started with, and "
            + "; ".join(problems)
            + ". Restore them, or train on the shards as they are now in a new run (another run.name)."
        )
    return frozen


def settle_memory_layout(config: TrainConfig) -> TrainConfig:
    """The "auto" memory settings settled where no GPU has to measure them.

    - `data.pairs_per_worker: auto`: as an earlier checkpoint of this run recorded it (exact resume), else 1 pair on
      CPU workers, when optim.grad_accum is 1 (nothing to pack) and with ZeRO-3 (its weights are split over the
      ranks: a one-GPU probe would hold them all).
    - `model.gradient_checkpointing: auto`: off on CPU workers, on with ZeRO-3 (for the same reason). A resume
      measures it again: recomputing activations does not change the numbers.
    What is left "auto" the job measures on a GPU (`training.memory`); integers and booleans come back unchanged.
    """
    if config.data.pairs_per_worker == "auto":
        latest = ckpt.latest_checkpoint_state(ckpt.run_dir(config))
        if latest is not None:
            url, state = latest
            ckpt.check_resumable(state, config, url)
            config = config.with_micro_batch(state.pairs_per_worker, state.grad_accum)
        elif not config.scaling.use_gpu or config.optim.grad_accum == 1 or config.deepspeed.zero_stage == 3:
            config = config.with_micro_batch(1, config.optim.grad_accum)
    if config.model.gradient_checkpointing == "auto":
        if not config.scaling.use_gpu:
            config = config.with_gradient_checkpointing(False)
        elif config.deepspeed.zero_stage == 3:
            config = config.with_gradient_checkpointing(True)
    return config


def completed_checkpoint(config: TrainConfig) -> str | None:
    """The URL of the run's final checkpoint when the run already finished, else None (storage reads only).

    Finished: the last committed checkpoint is at the step count this config asks for over the run's frozen shard
    list, so a resubmission with more epochs or a higher data.max_steps continues instead. A checkpoint past that
    count is refused (CheckpointMismatchError): its weights are from a later step than the run would end at. Call
    after `validate_inputs` (which checks that the checkpoint's layout and settings match the config).
    """
    latest = ckpt.latest_checkpoint_state(ckpt.run_dir(config))
    if latest is None:
        return None
    url, state = latest
    total = total_steps_from(state, config)
    if state.global_step > total:
        raise CheckpointMismatchError(
            f"cannot resume run {config.run.name!r} from {url}: data.max_steps {config.data.max_steps} and "
            f"data.epochs {config.data.epochs} make {total} steps, but the checkpoint is at step {state.global_step} "
            f"(trained towards {state.total_steps}). Raise data.max_steps or data.epochs to at least "
            f"{state.global_step} steps, or start a new run (another run.name)."
        )
    return url if state.global_step == total else None


def schedule_change(config: TrainConfig) -> str | None:
    """A note when a resumed run asks for another step count than its checkpoint was trained towards and the LR
    schedule depends on it (linear, cosine): the schedule is recomputed over the new count, so the LR jumps at the
    resume step. None otherwise."""
    latest = ckpt.latest_checkpoint_state(ckpt.run_dir(config))
    optim = config.optim
    if latest is None or optim.schedule == "constant":
        return None
    state = latest[1]
    total = total_steps_from(state, config)
    if total == state.total_steps:
        return None
    before, after = (lr_multiplier(state.global_step, warmup_steps=optim.warmup_steps, total_steps=steps,
                                   schedule=optim.schedule) for steps in (state.total_steps, total))
    return (f"the run now has {total} steps, its checkpoint was trained towards {state.total_steps}: the "
            f"{optim.schedule} LR schedule is recomputed over {total} steps, so at step {state.global_step} the LR "
            f"goes from {before * optim.lr:.3g} to {after * optim.lr:.3g}")


def total_steps_from(state: ckpt.TrainState, config: TrainConfig) -> int:
    """The step count `config` asks for over the run's frozen shard list and layout, as its checkpoint records them."""
    plan = PairPlan(
        PairPlan.shards_from_json(state.shards),
        seed=state.seed,
        num_workers=state.world_size,
        pairs_per_worker=state.pairs_per_worker,
        grad_accum=state.grad_accum,
    )
    return plan.total_steps(config.data.epochs, config.data.max_steps)
