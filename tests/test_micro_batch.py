"""`data.pairs_per_worker: auto` and `model.gradient_checkpointing: auto`: the micro-batch, and whether it recomputes
its activations, chosen from memory (training/memory.py), settled from a checkpoint on resume, and the step batch
auto keeps. The memory probe runs here on the CPU with a peak meter that counts tensor
storages (the job runs it on a GPU with the CUDA allocator's peak)."""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path
from typing import Callable, Iterable

import pytest
import torch
from conftest import commit_checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from videodpo_ray import shards
from videodpo_ray.config import load_config
from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.training import checkpoint as ckpt
from videodpo_ray.training.config import TrainConfig, deepspeed_config
from videodpo_ray.training.inputs import settle_memory_layout, validate_inputs
from videodpo_ray.training.memory import (
    MicroBatchChoice,
    choose_micro_batch,
    deepspeed_extra_bytes,
    probe_micro_batch,
)
from videodpo_ray.training.synthetic import synthetic_pair_rows


class LiveStorageBytes(TorchDispatchMode):
    """Peak bytes of the CPU tensor storages alive while the mode is on: `alive` ones at the start, plus every storage
    an op creates, until it is freed."""

    def __init__(self, alive: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.finalizers: dict[int, weakref.finalize] = {}
        self.live = self.peak = 0
        for tensor in alive:
            self._track(tensor)

    def _track(self, tensor: object) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.finalizers:
            return
        self.finalizers[key] = weakref.finalize(storage, self._free, key, size)
        self.live += size
        self.peak = max(self.peak, self.live)

    def _free(self, key: int, size: int) -> None:
        self.finalizers.pop(key, None)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(output):
            self._track(tensor)
        return output


def cpu_peak_bytes(run: Callable[[], None]) -> int:
    """Peak bytes of the storages `run()` creates (what existed before is the same for every run: left out)."""
    meter = LiveStorageBytes()
    with meter:
        run()
    return meter.peak


def config_for(pairs: Path, tmp_path: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"data.pairs_url={pairs}", "run.name=auto", f"run.storage_path={tmp_path / 'runs'}", "model.family=vc2",
        "model.variant=tiny", "model.finetune=full", "model.gradient_checkpointing=true", "scaling.num_workers=1",
        *overrides,
    ])


@pytest.fixture(scope="module")
def vc2_pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    model = build_model(ModelConfig(family="vc2", variant="tiny"), seed=0)
    rows = synthetic_pair_rows(model, num_pairs=4, num_frames=4, height=16, width=16)
    shards.write_shard(shards.make_table("pairs", rows), str(root), "pairs", 0)
    return root


# --- the choice ------------------------------------------------------------------------------------------------------


def test_the_largest_divisor_within_the_budget_is_chosen_and_out_of_memory_is_a_no():
    """A step holding 500 bytes plus 1000 per pair, out of memory above 8 pairs: exact arithmetic."""
    held = []

    def step(pairs: int) -> None:
        if pairs > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        held.append(torch.empty(500 + 1000 * pairs, dtype=torch.uint8))
        held.clear()

    def choose(per_worker: int, budget: int):
        return choose_micro_batch(step, per_worker, budget, cpu_peak_bytes)

    assert (choose(12, 10**9).pairs_per_worker, choose(12, 10**9).grad_accum) == (6, 2)  # 12 pairs: out of memory
    assert choose(12, 10**9).peak_bytes == {1: 1500, 2: 2500, 6: 6500}
    assert (choose(8, 10**9).pairs_per_worker, choose(8, 4500).pairs_per_worker) == (8, 4)
    assert choose(8, 4499).pairs_per_worker == 2
    assert choose(3, 2600).pairs_per_worker == 1  # 2 fits but divides 3 pairs no better than 1
    assert (choose(4, 1499).pairs_per_worker, choose(4, 1499).grad_accum) == (1, 4)  # not even 1 pair fits
    assert choose(1, 10**9).peak_bytes == {1: 1500}  # nothing to pack: 2 pairs never tried
    gib = 2**30
    printed = MicroBatchChoice(2, 1, {1: int(38.3 * gib), 2: int(56.5 * gib)}, int(118.8 * gib)).summary()
    assert printed == "micro-batch 2 x accumulation 1 (peak GiB by micro-batch: 1: 38.3, 2: 56.5; budget 118.8 GiB)"


def test_deepspeed_bf16_adds_its_float32_master_copy_split_over_zero_ranks(tmp_path):
    def extra(*overrides: str) -> int:
        return deepspeed_extra_bytes(config_for(tmp_path, tmp_path, "scaling.use_gpu=true", *overrides), 1000)

    assert extra() == 4000  # 1 rank: 4 B bf16 weight + grad, 16 B float32 master, grad, moments vs AdamW's 16 B
    assert extra("scaling.num_workers=2") == 0 and extra("scaling.num_workers=4") == 0  # 4 + 8 / 4 + 4 <= 16
    assert extra("scaling.num_workers=4", "deepspeed.zero_stage=0") == 4000  # nothing split
    assert extra("deepspeed.bf16=false") == 0


# --- the probe at the model's size, on the run's pairs ---------------------------------------------------------------


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_the_probe_measures_the_run_s_own_step_and_bounds_larger_micro_batches_from_below(vc2_pairs, tmp_path,
                                                                                            finetune):
    config = config_for(vc2_pairs, tmp_path, f"model.finetune={finetune}", "optim.grad_accum=4")
    choice = probe_micro_batch(config, shards.list_shards(str(vc2_pairs), "pairs"), torch.device("cpu"),
                               cpu_peak_bytes, 10**12)
    assert (choice.pairs_per_worker, choice.grad_accum) == (4, 1)  # all 4 pairs fit: the largest divisor of 4
    peaks = choice.peak_bytes
    assert sorted(peaks) == [1, 2, 4] and peaks[1] < peaks[2] < peaks[4]
    # convex in pairs (a max of linear terms: here the optimizer step's temporaries peak at 1 pair, the backward's
    # activations beyond): the line through 1 and 2 pairs never overestimates, so no larger micro-batch is missed
    assert peaks[4] >= peaks[1] + 3 * (peaks[2] - peaks[1])


def test_checkpointing_auto_trains_without_it_when_the_micro_batch_fits_and_with_it_otherwise(vc2_pairs, tmp_path):
    shard_list = shards.list_shards(str(vc2_pairs), "pairs")

    def probe(checkpointing: str, budget: int, pairs: str = "4") -> MicroBatchChoice:
        config = config_for(vc2_pairs, tmp_path, f"model.gradient_checkpointing={checkpointing}",
                            f"data.pairs_per_worker={pairs}", "optim.grad_accum=1")
        return probe_micro_batch(config, shard_list, torch.device("cpu"), cpu_peak_bytes, budget)

    configured = probe("true", 10**12)
    assert configured.gradient_checkpointing is None  # configured, not chosen: nothing to settle
    roomy = probe("auto", 10**12)
    assert (roomy.gradient_checkpointing, roomy.pairs_per_worker, roomy.fits) == (False, 4, True)
    kept, recomputed = roomy.peak_bytes[4], configured.peak_bytes[4]
    assert recomputed < 0.8 * kept  # 4 pairs of activations at 16x16 outweigh the optimizer's temporaries
    tight = probe("auto", kept - 1)  # one byte short of the peak without checkpointing
    assert (tight.gradient_checkpointing, tight.pairs_per_worker, tight.peak_bytes) == (True, 4, {4: recomputed})
    assert tight.summary().startswith(f"gradient checkpointing on (off: 4 pair(s) peaked at {kept / 2**30:.1f} GiB), "
                                      "micro-batch 4 x accumulation 1")
    packed = probe("auto", 10**12, pairs="auto")  # both auto: 1 pair (grad_accum 1 settles that on a GPU run)
    assert (packed.gradient_checkpointing, packed.pairs_per_worker) == (False, 1)


# --- settling auto in the job: CPU, nothing to pack, resume ----------------------------------------------------------


def write_state(pairs: Path, tmp_path: Path, pairs_per_worker: int, grad_accum: int) -> None:
    frozen = [dataclasses.asdict(info) for info in shards.list_shards(str(pairs), "pairs")]
    state = ckpt.TrainState(global_step=1, epoch=0, step_in_epoch=1, total_steps=4, world_size=1, zero_stage=2,
                            pairs_per_worker=pairs_per_worker, grad_accum=grad_accum, seed=0, shards=frozen)
    commit_checkpoint(tmp_path / "runs" / "auto", state.to_json(), 1)


def test_auto_is_the_default_and_keeps_the_step_batch_of_one_pair_per_micro_batch(vc2_pairs, tmp_path):
    config = config_for(vc2_pairs, tmp_path, "optim.grad_accum=4", "scaling.use_gpu=true")
    assert config.data.pairs_per_worker == "auto" and config.pairs_per_step == 4
    assert settle_memory_layout(config) is config  # a GPU run measures it
    assert validate_inputs(config).pairs_per_step == 4
    with pytest.raises(ValueError, match="still 'auto'"):
        deepspeed_config(config)
    settled = config.with_micro_batch(2, 2)
    assert (settled.pairs_per_step, deepspeed_config(settled)["train_micro_batch_size_per_gpu"]) == (4, 2)

    on_cpu = settle_memory_layout(config_for(vc2_pairs, tmp_path, "optim.grad_accum=4"))
    assert (on_cpu.data.pairs_per_worker, on_cpu.optim.grad_accum) == (1, 4)
    one = settle_memory_layout(config_for(vc2_pairs, tmp_path, "scaling.use_gpu=true"))
    assert (one.data.pairs_per_worker, one.optim.grad_accum) == (1, 1)
    zero3 = settle_memory_layout(config_for(vc2_pairs, tmp_path, "scaling.use_gpu=true", "optim.grad_accum=4",
                                          "deepspeed.zero_stage=3"))
    assert (zero3.data.pairs_per_worker, zero3.optim.grad_accum) == (1, 4)
    with pytest.raises(ValueError, match="pairs_per_worker"):
        config_for(vc2_pairs, tmp_path, "data.pairs_per_worker=0")


def test_checkpointing_auto_is_settled_off_on_cpu_on_with_zero3_and_measured_on_a_gpu(vc2_pairs, tmp_path):
    def settled(*overrides: str) -> TrainConfig:
        return settle_memory_layout(config_for(vc2_pairs, tmp_path, "model.gradient_checkpointing=auto", *overrides))

    assert settled().model.gradient_checkpointing is False and settled().memory_settled
    zero3 = settled("scaling.use_gpu=true", "deepspeed.zero_stage=3")
    assert zero3.model.gradient_checkpointing is True and zero3.memory_settled
    on_gpu = settled("scaling.use_gpu=true", "data.pairs_per_worker=2")
    assert on_gpu.model.gradient_checkpointing == "auto" and not on_gpu.memory_settled  # the job's GPU probe
    with pytest.raises(ValueError, match="model.gradient_checkpointing is still 'auto'"):
        deepspeed_config(on_gpu)
    assert deepspeed_config(on_gpu.with_gradient_checkpointing(True))["train_micro_batch_size_per_gpu"] == 2


def test_a_resumed_auto_run_keeps_the_micro_batch_its_checkpoint_recorded(vc2_pairs, tmp_path):
    write_state(vc2_pairs, tmp_path, pairs_per_worker=2, grad_accum=2)
    resumed = settle_memory_layout(config_for(vc2_pairs, tmp_path, "optim.grad_accum=4", "scaling.use_gpu=true"))
    assert (resumed.data.pairs_per_worker, resumed.optim.grad_accum) == (2, 2)
    validate_inputs(resumed)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"optim.grad_accum \(pairs per worker per step with "
                       r"data.pairs_per_worker auto\) is 2 but the checkpoint was saved with 4"):
        settle_memory_layout(config_for(vc2_pairs, tmp_path, "optim.grad_accum=2", "scaling.use_gpu=true"))
    with pytest.raises(ckpt.CheckpointMismatchError, match="data.pairs_per_worker is 1 but the checkpoint was saved "
                       "with 2"):
        validate_inputs(config_for(vc2_pairs, tmp_path, "optim.grad_accum=2", "data.pairs_per_worker=1"))
