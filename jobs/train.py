"""DPO training job: `ray job submit -- python -m jobs.train configs/train_vc2_full.yaml [key.sub=value ...]`.

The driver validates the config, the pair shards and any earlier checkpoint of the same run BEFORE workers start,
then runs a TorchTrainer (one DeepSpeed rank per worker). With `data.pairs_per_worker` or `model.gradient_checkpointing`
"auto" on GPU workers, a one-GPU task first measures how many of a step's pairs one micro-batch can carry, and whether
it needs checkpointing (`videodpo_ray/training/memory.py`).
Resubmitting the same config (same run.name and storage_path) resumes from the run's last committed checkpoint, also
after the driver was killed.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from jobs.common import connect_ray, job_main
from videodpo_ray.config import load_config
from videodpo_ray.errors import NonFiniteTrainingError
from videodpo_ray.training import checkpoint as ckpt
from videodpo_ray.training.config import TrainConfig
from videodpo_ray.training.inputs import (
    completed_checkpoint,
    schedule_change,
    settle_memory_layout,
    validate_inputs,
    with_absolute_paths,
)
from videodpo_ray.training.plan import PairPlan


def build_trainer(config: TrainConfig, train_fn: Callable[[dict], None] | None = None):
    """The TorchTrainer of a run (RunConfig name + storage_path make resubmissions resume); `train_fn` defaults to
    `actors.train_worker.train_loop_per_worker`. Ray Train is imported here, not with the module: a bad config is
    refused before its imports (seconds) are paid for."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from actors.train_worker import train_loop_per_worker

    return TorchTrainer(
        train_fn or train_loop_per_worker,
        train_loop_config=config.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={
                "CPU": config.scaling.cpus_per_worker,
                **({"GPU": 1} if config.scaling.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=config.run.storage_path,
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.num_to_keep),
            callbacks=[progress_printer(config.run.name)],
            logging_config=LoggingConfig(log_level="WARNING"),  # our progress line replaces Train's INFO logs
        ),
    )


def progress_printer(name: str) -> Any:
    """A Ray Train callback printing one progress line per optimizer step on the driver's log (it runs in the Train
    controller)."""
    from ray.train import UserCallback

    class ProgressPrinter(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            head = metrics[0] if metrics else {}
            if "loss" in head:  # a step (a finished run exported again reports no step)
                saved = " (checkpoint)" if checkpoint is not None else ""
                print(
                    f"[train {name}] step {head['step'] + 1}/{head['total_steps']} epoch {head['epoch']} "
                    f"loss {head['loss']:.5f} "
                    f"acc {head['implicit_accuracy']:.3f} margin {head['reward_margin']:.4g} lr {head['lr']:.3g} "
                    f"grad_norm {head['grad_norm']:.4g} {head['pairs_per_s']:.2f} pairs/s "
                    f"peak {head['peak_memory_gib']:.1f} GiB{saved}",
                    flush=True,
                )
            if head.get("done"):
                print(f"[train {name}] finished; exported trainable weights to {head['export_url']}", flush=True)

    return ProgressPrinter()


def run_training(config: TrainConfig, train_fn: Callable[[dict], None] | None = None):
    """Validate inputs, then join Ray (or start a local one) and train; returns the ray.train Result, or raises the
    NonFiniteTrainingError that stopped the workers (not retried: a retry would replay the same steps).

    A run that already finished (its final checkpoint is on storage) is recognised here, before Ray or any worker
    starts: its Result is read back from storage and nothing is trained.
    """
    config = settle_memory_layout(with_absolute_paths(config))
    plan = validate_inputs(config)
    final = completed_checkpoint(config)
    outdated = ckpt.export_outdated(config) if final is not None else None
    if final is not None and outdated is None:
        from ray.train import Result

        print(f"[train {config.run.name}] already complete: {final} is the final step; nothing to train", flush=True)
        return Result.from_path(ckpt.run_dir(config))
    if outdated is not None:  # the workers restore the final step and only export it
        print(f"[train {config.run.name}] already trained: {final} is the final step; exporting it again "
              f"({outdated})", flush=True)
    note = schedule_change(config)
    if note is not None:
        print(f"[train {config.run.name}] note: {note}", flush=True)
    connect_ray()
    if not config.memory_settled:
        config = memory_layout_measured_on_gpu(config, plan)
    print(
        f"[train {config.run.name}] {plan.num_pairs} pairs in {len(plan.shards)} shard(s), {plan.steps_per_epoch} "
        f"steps/epoch of {plan.pairs_per_step} pairs (workers x accumulation x micro-batch = "
        f"{config.scaling.num_workers} x {config.optim.grad_accum} x {config.data.pairs_per_worker}), "
        f"ZeRO-{config.deepspeed.zero_stage}, gradient checkpointing "
        f"{'on' if config.model.gradient_checkpointing else 'off'}; run dir {ckpt.run_dir(config)}",
        flush=True,
    )
    result = build_trainer(config, train_fn).fit()
    if isinstance(result.return_value, NonFiniteTrainingError):  # the workers stopped together instead of failing
        raise result.return_value
    return result


def memory_layout_measured_on_gpu(config: TrainConfig, plan: PairPlan) -> TrainConfig:
    """`data.pairs_per_worker` / `model.gradient_checkpointing` "auto" chosen by `training.memory.probe_on_cuda` in
    a one-GPU Ray task (its process exits after it, freeing the GPU for the workers)."""
    import ray

    from videodpo_ray.training.memory import probe_on_cuda

    probe = ray.remote(num_gpus=1, num_cpus=config.scaling.cpus_per_worker, max_calls=1)(probe_on_cuda)
    choice = ray.get(probe.remote(config, plan.shards))
    print(f"[train {config.run.name}] memory layout measured on one GPU: {choice.summary()}", flush=True)
    if choice.gradient_checkpointing is not None:
        config = config.with_gradient_checkpointing(choice.gradient_checkpointing)
    return config.with_micro_batch(choice.pairs_per_worker, choice.grad_accum)


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv, __doc__, lambda path, overrides: load_config(TrainConfig, path, overrides), _train, connect=False
    )


def _train(config: TrainConfig) -> str:
    result = run_training(config)
    return f"run {config.run.name}: finished; export {result.metrics.get('export_url', '(disabled)')}"


if __name__ == "__main__":
    sys.exit(main())
