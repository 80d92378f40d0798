"""The DPO training config (model, data, loss, optimizer, DeepSpeed, scaling, run, export) and what derives from it:
the DeepSpeed config dict and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from videodpo_ray import storage
from videodpo_ray.config import StrictConfig
from videodpo_ray.dpo_options import BetaSchedule, DPOReduction
from videodpo_ray.models import ModelConfig


class DataConfig(StrictConfig):
    """Where the pair shards are and how they are batched and ordered."""

    pairs_url: str  # root URL of the pair shards (any fsspec URL: s3://, gs://, local path)
    # Micro-batch: pairs per worker per forward/backward. "auto" (GPU workers): optim.grad_accum pairs per worker per
    # step, packed into the fewest micro-batches the GPU holds (training/memory.py); 1 on CPU workers.
    pairs_per_worker: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    cfg_dropout: float = Field(0.2, ge=0.0, le=1.0)  # fraction of pairs trained with the empty prompt
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimizer steps (None: run all epochs)
    shuffle_seed: int | None = Field(None, ge=0)  # None -> run.seed
    prefetch_batches: int = Field(2, ge=0)  # micro-batches prepared ahead in a background thread
    swap_winner_loser: bool = False  # negative control: train on (loser, winner); the gain must vanish or reverse
    # prompts whose text embeddings a worker keeps (CPU, LRU) when shards store none; unused when every shard does
    prompt_cache_entries: int = Field(1024, ge=1)


class DPOConfig(StrictConfig):
    """Diffusion-DPO loss settings (method.md section 1).

    beta_dpo is per loss space: 5000 for the epsilon / v-prediction families (VideoDPO); flow-matching families
    (Wan) train on v = eps - x0 errors, where flow_grpo uses 100 (SD3.5) with this same loss normalisation.
    beta_schedule: "constant" (default; Flow-DPO as VideoAlign recommends) or "timestep_scaled", flow-matching
    families only: beta_t = beta_dpo * (1 - s)^2 at the pair's noise level s in [0, 1] (VideoAlign found it
    reward-hacks; offered for comparison, needs shared_noise).
    """

    beta_dpo: float = Field(5000.0, gt=0.0)
    beta_schedule: BetaSchedule = "constant"
    reduction: DPOReduction = "mean"  # "videodpo_reference" is a reproduction mode only
    shared_noise: bool = True  # False reproduces VideoDPO's independent winner/loser noise

    @model_validator(mode="after")
    def _timestep_scaled_needs_one_timestep_per_pair(self) -> "DPOConfig":
        if self.beta_schedule == "timestep_scaled" and not self.shared_noise:
            raise ValueError("beta_schedule='timestep_scaled' needs shared_noise=true (one timestep per pair)")
        return self


class OptimConfig(StrictConfig):
    """AdamW, learning-rate schedule, clipping and gradient accumulation."""

    lr: float = Field(6e-6, ge=0.0)  # 0: the control run in which nothing moves (the tuned model is the base)
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # after warmup; decays to 0 at the last step
    grad_clip: float | None = Field(None, gt=0.0)  # max global grad norm; None = no clipping (VideoDPO)
    grad_accum: int = Field(1, ge=1)


class DeepSpeedConfig(StrictConfig):
    """The ZeRO stage and precision; the DeepSpeed config dict is derived from the whole TrainConfig."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool | Literal["auto"] = "auto"  # auto: bf16 on GPU, fp32 on CPU (no fp16 anywhere)
    offload_optimizer: bool = False  # ZeRO-1/2/3: keep the optimizer states in CPU memory
    # Extra DeepSpeed config keys, deep-merged over the generated dict last,
    # e.g. {"zero_optimization": {"stage3_param_persistence_threshold": 0}}.
    overrides: dict[str, Any] = {}


class ScalingConfig(StrictConfig):
    """The Ray Train worker group."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)


class RunConfig(StrictConfig):
    """Run identity, storage and fault tolerance. Re-running the same name + storage_path resumes the run."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    # URL (s3://, gs://, local path): checkpoints, TensorBoard files and the export
    storage_path: Annotated[str, AfterValidator(storage.check_ray_storage_url)]
    checkpoint_every: int = Field(100, ge=1)  # optimizer steps between checkpoints (plus one at the end)
    num_to_keep: int | None = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint (-1: unlimited)
    seed: int = Field(0, ge=0)


class ExportConfig(StrictConfig):
    """The trainable weights written as safetensors at the end of training."""

    enabled: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class TrainConfig(StrictConfig):
    """Everything one DPO training run needs (configs/train_*.yaml)."""

    model: ModelConfig = ModelConfig()
    data: DataConfig
    dpo: DPOConfig = DPOConfig()
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig
    export: ExportConfig = ExportConfig()
    compile: bool = False  # torch.compile the policy denoiser (and a reference copy); eager with a warning on failure

    @model_validator(mode="after")
    def _check_combinations(self) -> "TrainConfig":
        if self.deepspeed.bf16 is True and not self.scaling.use_gpu:
            raise ValueError("deepspeed.bf16=true needs scaling.use_gpu=true (CPU training runs in fp32)")
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage 1, 2 or 3")
        return self

    @property
    def pairs_per_step(self) -> int:
        """Pairs in one optimizer step over all workers: num_workers x pairs_per_worker x grad_accum (auto keeps the
        batch of pairs_per_worker 1)."""
        return self.scaling.num_workers * self.micro_batch * self.optim.grad_accum

    @property
    def micro_batch(self) -> int:
        """pairs_per_worker, where "auto" counts as 1 until `with_micro_batch` settles it (same step batch)."""
        return 1 if self.data.pairs_per_worker == "auto" else self.data.pairs_per_worker

    def with_micro_batch(self, pairs_per_worker: int, grad_accum: int) -> "TrainConfig":
        """This config with its micro-batch settled (`pairs_per_worker: auto` chosen, or read from a checkpoint)."""
        return self.model_copy(update={
            "data": self.data.model_copy(update={"pairs_per_worker": pairs_per_worker}),
            "optim": self.optim.model_copy(update={"grad_accum": grad_accum}),
        })

    def with_gradient_checkpointing(self, enabled: bool) -> "TrainConfig":
        """This config with `model.gradient_checkpointing: auto` settled."""
        return self.model_copy(update={"model": self.model.model_copy(update={"gradient_checkpointing": enabled})})

    @property
    def memory_settled(self) -> bool:
        """Neither `data.pairs_per_worker` nor `model.gradient_checkpointing` is still "auto"."""
        return "auto" not in (self.data.pairs_per_worker, self.model.gradient_checkpointing)

    @property
    def shuffle_seed(self) -> int:
        return self.run.seed if self.data.shuffle_seed is None else self.data.shuffle_seed

    @property
    def use_bf16(self) -> bool:
        if self.deepspeed.bf16 == "auto":
            return self.scaling.use_gpu
        return self.deepspeed.bf16


def deepspeed_config(config: TrainConfig, num_trainable: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict of a TrainConfig (AdamW via torch, ZeRO stage, bf16 on GPU, clipping, accumulation).

    `num_trainable` (parameter count) caps ZeRO's communication buckets: DeepSpeed's default 5e8 elements would
    allocate and sweep GB-sized buffers every step for a model far smaller than that.
    """
    optim = config.optim
    if not config.memory_settled:
        raise ValueError("deepspeed_config: data.pairs_per_worker or model.gradient_checkpointing is still 'auto' "
                         "(the train job settles both: training.inputs, training.memory)")
    zero: dict[str, Any] = {"stage": config.deepspeed.zero_stage}
    if num_trainable is not None and config.deepspeed.zero_stage > 0:
        bucket = int(min(5e8, max(num_trainable, 1)))
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
        if config.deepspeed.zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size=bucket)
    if config.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    generated = {
        "train_micro_batch_size_per_gpu": config.data.pairs_per_worker,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": config.pairs_per_step,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: torch.optim.AdamW, nothing JIT-compiled (DeepSpeed's fused/CPU Adam would be built first).
            "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                       "weight_decay": optim.weight_decay, "torch_adam": True},
        },
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": optim.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": config.use_bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(generated, config.deepspeed.overrides)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _deep_merge(merged[key], value) if both_sections else value
    return merged


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """LR factor for optimizer step `step` (0-based): linear warmup, then constant, linear or cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
