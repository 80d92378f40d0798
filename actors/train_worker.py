"""The Ray Train worker function: Diffusion-DPO with DeepSpeed, exact data position, checkpoints and resume.

Determinism (a resumed run ends bit-identical to an uninterrupted one on CPU): the model is built under the run
seed, the data order is `PairPlan`'s pure function of (shards, seed, epoch), CFG dropout of (seed, pair_id, epoch),
and every micro-batch draws its timesteps and noise from a generator seeded with (seed, step, rank, micro-batch).
A checkpoint restores weights, optimizer and LR scheduler (DeepSpeed), the data position, the pair log and the RNGs.

Text embeddings: when every pair row stores its prompt's (as the pair stage writes them), the model is built without
its text encoder (the final report's `built_parameters` shows it) and the empty prompt's comes from
`tensor_bytes.empty_prompt_url`; otherwise prompts are encoded per batch through a bounded CPU LRU cache.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from videodpo_ray import shards, storage, tensor_bytes
from videodpo_ray.config import dump_config
from videodpo_ray.errors import NonFiniteTrainingError
from videodpo_ray.models import build_model
from videodpo_ray.seeds import drops_prompt, pair_noise_seeds
from videodpo_ray.training import checkpoint as ckpt
from videodpo_ray.training.config import TrainConfig, deepspeed_config, lr_multiplier
from videodpo_ray.training.curves import TrainingCurves
from videodpo_ray.training.data import (
    MicroBatch,
    PairLoader,
    PromptEmbeddingCache,
    batch_text_embeddings,
    pair_latents,
    prompts_to_encode,
    stores_text_embeddings,
)
from videodpo_ray.training.memory import peak_memory_gib
from videodpo_ray.training.plan import DataPosition, PairPlan
from videodpo_ray.training.runs import Heartbeat
from videodpo_ray.training.step import DPOObjective

LOG_METRICS = (  # averaged over the workers
    "loss", "implicit_accuracy", "reward_margin", "model_mse_win", "model_mse_lose", "ref_mse_win", "ref_mse_lose",
    "mean_weight", "timestep", "cfg_dropped", "data_wait_fraction",
)


def train_loop_per_worker(config: dict[str, Any]) -> NonFiniteTrainingError | None:
    """Ray Train entry point (`TorchTrainer(train_loop_per_worker, train_loop_config=config.model_dump())`); returns
    the NonFiniteTrainingError that stopped the run early, which `jobs.train.run_training` raises."""
    # Quiet by default: Ray Train's worker logs each report with its whole metrics dict at INFO on the root logger;
    # the driver prints one progress line per step instead.
    logging.getLogger().setLevel(logging.WARNING)
    worker = DPOWorker(TrainConfig.model_validate(config))
    alive = Heartbeat(ckpt.run_dir(worker.config)) if worker.rank == 0 else contextlib.nullcontext()
    with alive:  # `runs clean` keeps the folder of a run that has no checkpoint yet
        return worker.run()


class DPOWorker:
    """One Ray Train worker's training run."""

    def __init__(self, config: TrainConfig) -> None:
        import ray.train

        self.config = config
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        if self.world_size != config.scaling.num_workers:
            raise RuntimeError(f"worker group has {self.world_size} workers, config says {config.scaling.num_workers}")
        if config.scaling.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.seed = config.shuffle_seed
        self.pair_log: list[dict[str, Any]] = []
        self.last_checkpoint_step: int | None = None
        self.curves: TrainingCurves | None = None  # rank 0's TensorBoard event files

    # --- setup ------------------------------------------------------------------------------------------------
    def run(self) -> NonFiniteTrainingError | None:
        """Train to the end; a NaN/inf loss or gradient norm ends the run early and is returned, not raised."""
        import deepspeed
        import ray.train

        config = self.config
        if self.device.type == "cpu":  # bit-identical resumes; on GPU the deterministic kernels cost speed
            torch.use_deterministic_algorithms(True, warn_only=True)
            # gloo training never calls DeepSpeed's shared-memory all-reduce; its C++ build takes minutes per machine
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        restored = ray.train.get_checkpoint()
        with restored.as_directory() if restored is not None else contextlib.nullcontext() as directory:
            saved = self._read_saved_state(Path(directory)) if directory else None
            listed = self._from_rank0(lambda: [] if saved else shards.list_shards(self.config.data.pairs_url, "pairs"))
            shard_list = PairPlan.shards_from_json(saved.shards) if saved else listed
            stored_text = self._from_rank0(lambda: stores_text_embeddings(shard_list))
            model = build_model(config.model.model_copy(update={"build_text_encoder": not stored_text}),
                                seed=config.run.seed)
            self.built_parameters = sum(parameter.numel() for parameter in model.parameters())
            if config.compile:
                model.compile_denoiser()
            objective = DPOObjective(model, config.dpo)
            self.plan = PairPlan(
                shard_list,
                seed=self.seed,
                num_workers=self.world_size,
                pairs_per_worker=config.data.pairs_per_worker,
                grad_accum=config.optim.grad_accum,
            )
            self.total_steps = self.plan.total_steps(config.data.epochs, config.data.max_steps)
            optim = config.optim
            self.engine, _, _, self.scheduler = deepspeed.initialize(
                model=objective,
                model_parameters=model.trainable_parameters(),
                config=deepspeed_config(config, sum(p.numel() for p in model.trainable_parameters())),
                lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
                    optimizer,
                    lambda step: lr_multiplier(step, warmup_steps=optim.warmup_steps, total_steps=self.total_steps,
                                               schedule=optim.schedule),
                ),
            )
            self.model = model
            self.frozen_fingerprint = self._frozen_fingerprint()
            if saved is not None:
                self._restore(Path(directory), saved)
            else:
                self.global_step, self.epoch, self.step_in_epoch = 0, 0, 0
                self.initial_fingerprint = self.frozen_fingerprint
        if stored_text:  # no text encoder: every prompt's embedding and the empty prompt's are stored
            self.prompt_cache = None
            self.empty_prompt = tensor_bytes.read_empty_prompt_embedding(config.data.pairs_url)
        else:
            self.prompt_cache = PromptEmbeddingCache(model, config.data.prompt_cache_entries)
            self.empty_prompt = self.prompt_cache.encode("")
        if self.rank == 0:
            self.curves = TrainingCurves(ckpt.run_dir(config))
        try:
            if self.global_step == self.total_steps:  # a finished run resubmitted for another export (run_training)
                ray.train.report(self._finish())
            self._train()
        except NonFiniteTrainingError as error:  # raised on every rank together (an all-reduced check)
            return error  # rank 0's return value: the driver raises it, so Ray Train does not replay the same steps
        finally:
            if self.curves is not None:
                self.curves.close()
        return None

    def _from_rank0(self, compute: Callable[[], Any]) -> Any:
        """`compute()` on rank 0, broadcast: every rank plans on the same shard list and builds the same model."""
        value = [compute() if self.rank == 0 else None]
        dist.broadcast_object_list(value, src=0)
        return value[0]

    def _read_saved_state(self, directory: Path) -> ckpt.TrainState:
        state = ckpt.TrainState.from_json((directory / ckpt.TRAIN_STATE).read_text(), str(directory / ckpt.TRAIN_STATE))
        ckpt.check_resumable(state, self.config, str(directory))
        return state

    def _restore(self, directory: Path, state: ckpt.TrainState) -> None:
        load_path, _ = self.engine.load_checkpoint(
            str(directory), tag=ckpt.DEEPSPEED_TAG, load_module_strict=False  # frozen weights are not saved
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}")
        per_rank = torch.load(directory / ckpt.rank_file(self.rank), weights_only=False)
        if per_rank["frozen_fingerprint"] != self.frozen_fingerprint:
            raise RuntimeError(
                "the frozen weights (reference model, VAE, base weights) differ from the ones this run was "
                "checkpointed with: model.path or the model code changed between submissions of the same run"
            )
        self.initial_fingerprint = per_rank["initial_fingerprint"]
        ckpt.set_rng_states(per_rank["rng"])
        self.pair_log = ckpt.read_pair_log((directory / ckpt.PAIR_LOG).read_text()) if self.rank == 0 else []
        self.global_step, self.epoch, self.step_in_epoch = state.global_step, state.epoch, state.step_in_epoch
        self.last_checkpoint_step = state.global_step

    def _frozen_fingerprint(self) -> str:
        """Hash of this rank's frozen weights (its ZeRO-3 partition when partitioned)."""
        tensors = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters() if not p.requires_grad]
        return ckpt.fingerprint(tensors)

    # --- training ---------------------------------------------------------------------------------------------
    def _train(self) -> None:
        config = self.config
        while self.global_step < self.total_steps:
            epoch = self.epoch
            loader = PairLoader(
                self.plan,
                epoch=epoch,
                rank=self.rank,
                start_step=self.step_in_epoch,
                latent_space=self.model.latent_space,
                prefetch=config.data.prefetch_batches,
                swap_winner_loser=config.data.swap_winner_loser,
            )
            batches = iter(loader)
            try:
                while self.global_step < self.total_steps and self.epoch == epoch:
                    self._train_step(batches)
            finally:
                batches.close()  # stops the prefetch thread (at max_steps)

    def _train_step(self, batches: Iterator[MicroBatch]) -> None:
        config = self.config
        accum = config.optim.grad_accum
        start = time.perf_counter()
        waited = 0.0
        sums = dict.fromkeys(LOG_METRICS, 0.0)
        step_pair_ids: list[str] = []
        grad_norm = None
        for micro in range(accum):
            before = time.perf_counter()
            batch: MicroBatch = next(batches)
            waited += time.perf_counter() - before
            if (batch.step, batch.micro) != (self.step_in_epoch, micro):
                raise RuntimeError(f"data plan out of step: got {(batch.step, batch.micro)}, "
                                   f"expected {(self.step_in_epoch, micro)}")
            win, lose, embeddings, weights, dropped = self._tensors(batch)
            seeds = pair_noise_seeds(config.run.seed, self.global_step, self.rank, micro, self.plan.pairs_per_worker)
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
            loss, metrics = self.engine(win, lose, embeddings, weights, generators)
            self._check_finite("DPO loss", loss.detach(), batch.pair_ids, f"micro-batch {micro}")
            step_pair_ids.extend(batch.pair_ids)
            self.engine.backward(loss)
            if self.engine.is_gradient_accumulation_boundary():
                grad_norm = self._grad_norm_stage0()
                if grad_norm is not None:  # ZeRO-0 applies whatever the gradients are: checked before the update
                    self._check_finite("gradient norm", grad_norm, step_pair_ids, "the step's gradients")
            lr = self.scheduler.get_last_lr()[0]
            self.engine.step()
            sums["loss"] += float(loss.detach()) / accum
            for key, value in metrics.items():
                if key in sums:
                    sums[key] += float(value) / accum
            sums["cfg_dropped"] += dropped / accum
        elapsed = time.perf_counter() - start
        sums["data_wait_fraction"] = waited / elapsed
        metrics = self._mean_over_workers(sums)
        metrics["peak_memory_gib"] = self._max_over_workers(peak_memory_gib(self.device))
        if grad_norm is None:  # ZeRO 1-3: DeepSpeed skips an update whose gradients overflow; it must not count
            grad_norm = self.engine.get_global_grad_norm()
            if grad_norm is not None:
                self._check_finite("gradient norm", grad_norm, step_pair_ids, "the step's gradients")
        metrics["grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)
        metrics["lr"] = lr
        metrics["pairs_per_s"] = config.pairs_per_step / elapsed
        all_ids = [None] * self.world_size
        dist.all_gather_object(all_ids, step_pair_ids)
        pair_ids = [pair_id for ids in all_ids for pair_id in ids]
        if self.rank == 0:
            self.pair_log.append({"step": self.global_step, "epoch": self.epoch, "pair_ids": pair_ids})
        metrics.update(step=self.global_step, epoch=self.epoch, total_steps=self.total_steps, pair_ids=pair_ids)
        self.global_step += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == self.plan.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self.curves is not None:
            self.curves.log(metrics)
        final = self.global_step == self.total_steps
        if final:
            metrics.update(self._finish())
        if final or self.global_step % config.run.checkpoint_every == 0:
            self._save_checkpoint(metrics)
        else:
            import ray.train

            ray.train.report(metrics)

    def _tensors(self, batch: MicroBatch):
        """Latents (stored, or VAE-encoded from the mp4s), prompt embeddings (stored, or encoded) with CFG dropout,
        and weights."""
        config = self.config
        dropped = [drops_prompt(self.seed, pair.pair_id, self.epoch, config.data.cfg_dropout) for pair in batch.pairs]
        encoded: dict[str, torch.Tensor] = {}
        if self.prompt_cache is not None:
            wanted = prompts_to_encode(batch.pairs, dropped)
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, wanted)  # same encode calls on every rank (ZeRO-3 gathers collectively)
            encoded = self.prompt_cache.lookup([prompt for prompts in everyone for prompt in prompts], wanted)
        embeddings = batch_text_embeddings(batch.pairs, dropped, self.empty_prompt, encoded).to(self.device)
        win, lose = pair_latents(self.model, batch, self.device)
        weights = torch.tensor([pair.weight for pair in batch.pairs], dtype=torch.float32, device=self.device)
        return win, lose, embeddings, weights, sum(dropped) / len(dropped)

    def _check_finite(self, quantity: str, value: Any, pair_ids: list[str], where: str) -> None:
        """NonFiniteTrainingError on every rank together when `value` (the loss, the gradient norm) is NaN or
        infinite on any rank, naming each rank's value and pairs."""
        value = float(value)
        bad = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() == 0.0:
            return
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, (self.rank, value, pair_ids))
        values = "; ".join(f"rank {rank}: {quantity} {value} on pairs {ids}" for rank, value, ids in everyone)
        kept = (f"the last good checkpoint ({ckpt.checkpoint_dir_name(self.last_checkpoint_step)}) is kept"
                if self.last_checkpoint_step is not None else "no checkpoint was written yet")
        raise NonFiniteTrainingError(
            f"non-finite {quantity} at step {self.global_step} (0-based; epoch {self.epoch}, {where}): {values}. "
            f"Training stopped before this update; {kept}. Check these pairs (latents, weights) or lower optim.lr."
        )

    def _grad_norm_stage0(self) -> float | None:
        """Global grad norm for ZeRO stage 0 (DeepSpeed reports it itself for stages 1-3), before clipping."""
        if self.config.deepspeed.zero_stage != 0:
            return None
        norms = [p.grad.detach().float().norm() for p in self.model.trainable_parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _mean_over_workers(self, values_by_key: dict[str, float]) -> dict[str, float]:
        values = torch.tensor([values_by_key[key] for key in LOG_METRICS], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        values /= self.world_size
        return {key: float(value) for key, value in zip(LOG_METRICS, values)}

    def _max_over_workers(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor)

    # --- logging, checkpoints, export -------------------------------------------------------------------------
    def _save_checkpoint(self, metrics: dict[str, Any]) -> None:
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory(prefix="videodpo-checkpoint-", ignore_cleanup_errors=True) as directory:
            self.engine.save_checkpoint(directory, tag=ckpt.DEEPSPEED_TAG, exclude_frozen_parameters=True)
            torch.save(
                {
                    "rng": ckpt.rng_states(),
                    "frozen_fingerprint": self.frozen_fingerprint,
                    "initial_fingerprint": self.initial_fingerprint,
                },
                Path(directory, ckpt.rank_file(self.rank)),
            )
            if self.rank == 0:
                state = ckpt.TrainState(
                    global_step=self.global_step,
                    epoch=self.epoch,
                    step_in_epoch=self.step_in_epoch,
                    total_steps=self.total_steps,
                    world_size=self.world_size,
                    zero_stage=self.config.deepspeed.zero_stage,
                    pairs_per_worker=self.config.data.pairs_per_worker,
                    grad_accum=self.config.optim.grad_accum,
                    seed=self.seed,
                    shards=self.plan.to_json(),
                    consumed=self.plan.consumed(DataPosition(self.epoch, self.step_in_epoch)),
                )
                Path(directory, ckpt.TRAIN_STATE).write_text(state.to_json())
                Path(directory, ckpt.PAIR_LOG).write_text(ckpt.write_pair_log(self.pair_log))
                Path(directory, ckpt.CONFIG_FILE).write_text(dump_config(self.config))
                if self.curves is not None:
                    self.curves.upload()
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(directory),
                checkpoint_dir_name=ckpt.checkpoint_dir_name(self.global_step),
            )
        self.last_checkpoint_step = self.global_step

    def _finish(self) -> dict[str, Any]:
        """After the last step: check the frozen weights, export the trainable weights; metrics for the last report."""
        if self._frozen_fingerprint() != self.initial_fingerprint:
            raise RuntimeError("the frozen weights (reference model, VAE, base weights) changed during training")
        export_url = self._export() if self.config.export.enabled else None
        return {"done": True, "reference_unchanged": True, "export_url": export_url,
                "built_parameters": self.built_parameters}  # the model as built, before the DPO reference copy

    def _export(self) -> str:
        import deepspeed

        parameters = self.model.trainable_parameters()
        gathered = deepspeed.zero.GatheredParameters(parameters, enabled=self.config.deepspeed.zero_stage == 3)
        export_url = storage.join(ckpt.run_dir(self.config), ckpt.EXPORT_DIR)
        with gathered:
            if self.rank == 0:
                ckpt.write_export(
                    self.model.trainable_state_dict(),
                    self.config.model,
                    export_url,
                    step=self.global_step,
                    dtype=self.config.export.dtype,
                    init_seed=self.config.run.seed,
                )
        dist.barrier()
        return export_url
