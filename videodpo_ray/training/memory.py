"""`data.pairs_per_worker: auto`: how many pairs one forward/backward carries, chosen from GPU memory.

Auto never changes what a step trains on: each worker's share of an optimizer step stays `optim.grad_accum` pairs
(exactly what `pairs_per_worker: 1` gives), and auto packs them into the fewest micro-batches its GPU holds: the
largest divisor m of grad_accum that fits becomes `pairs_per_worker`, and grad_accum / m the accumulation.

What fits is measured, at the model's size, on the run's own first pairs. The peak memory of a DPO micro-step
(reference forward, policy forward/backward, AdamW) is fixed + pairs x per-pair once activations dominate (on the
H200, VC2 full: 38.3 / 56.5 / 92.7 GiB at 1 / 2 / 4 pairs; the line through the first two gives 92.9 at 4), and a
maximum of such lines in general (at small sizes the optimizer step's temporaries peak first): convex in pairs, so
the line through 1 and 2 pairs never predicts more memory than a larger micro-batch takes: none that fits lies beyond
where the line crosses the budget. The divisors up to there are run once each, from the largest down, and the first
within the budget is taken.

The probe runs plain AdamW in the model's own precision; DeepSpeed's bf16 engine also keeps float32 master
weights and gradients (`deepspeed_extra_bytes`), and the budget leaves the rest of `MEMORY_FRACTION` as head-room for
the CUDA context, communication buckets and the allocator's fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from videodpo_ray.models import build_model
from videodpo_ray.shards import ShardInfo
from videodpo_ray.training.config import TrainConfig
from videodpo_ray.training.step import dpo_step

MEMORY_FRACTION = 0.85  # of the GPU's total memory a micro-step may peak at

PeakMeter = Callable[[Callable[[], None]], int]  # runs a function, returns the peak bytes allocated while it ran


@dataclass(frozen=True)
class MicroBatchChoice:
    """What the probe found: the chosen micro-batch and the measurements it was chosen from."""

    pairs_per_worker: int
    grad_accum: int
    peak_bytes: dict[int, int]  # measured peak of a micro-step, by pairs (OOM: not listed)
    budget_bytes: int

    def summary(self) -> str:
        gib = 2**30
        measured = ", ".join(f"{pairs}: {peak / gib:.1f}" for pairs, peak in sorted(self.peak_bytes.items()))
        return (f"micro-batch {self.pairs_per_worker} x accumulation {self.grad_accum} (peak GiB by micro-batch: "
                f"{measured}; budget {self.budget_bytes / gib:.1f} GiB)")


def cuda_peak_bytes(run: Callable[[], None]) -> int:
    """Peak bytes the CUDA caching allocator handed out while `run()` ran (the tensors alive before included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def cuda_budget_bytes(device: torch.device) -> int:
    """MEMORY_FRACTION of the GPU's total memory: what a micro-step may peak at."""
    return int(MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory)


def deepspeed_extra_bytes(config: TrainConfig, trainable: int) -> int:
    """Bytes DeepSpeed's bf16 engine holds beyond the probe's plain AdamW (16 B per trained parameter: float32
    weight, gradient and two moments): bf16 weight and gradient (4 B) plus a float32 master weight, gradient and two
    moments (16 B), split over the ranks by ZeRO stages 1-3."""
    if not config.use_bf16:
        return 0
    shards = config.scaling.num_workers if config.deepspeed.zero_stage > 0 else 1
    return max(0, (4 + 16 // shards) - 16) * trainable


def choose_micro_batch(
    step: Callable[[int], None], per_worker: int, budget_bytes: int, meter: PeakMeter
) -> MicroBatchChoice:
    """The largest divisor m of `per_worker` whose micro-step `step(m)` peaks within `budget_bytes`.

    `step(pairs)` runs one micro-step; it is run once first to allocate what persists (the optimizer's states).
    1 when even one pair does not fit: the run then needs ZeRO's partitions, which the probe does not have.
    """
    peaks: dict[int, int] = {}

    def fits(pairs: int) -> bool:
        try:
            peaks[pairs] = meter(lambda: step(pairs))
        except torch.OutOfMemoryError:
            return False
        return peaks[pairs] <= budget_bytes

    try:
        step(1)
    except torch.OutOfMemoryError:
        return MicroBatchChoice(1, per_worker, peaks, budget_bytes)
    divisors = [m for m in range(per_worker, 0, -1) if per_worker % m == 0]
    if fits(1) and per_worker > 1 and fits(2):
        per_pair = peaks[2] - peaks[1]
        on_line = (budget_bytes - (peaks[1] - per_pair)) // max(per_pair, 1)
        candidates = [m for m in divisors if 2 < m <= on_line]
        chosen = next((m for m in candidates if fits(m)), 2 if per_worker % 2 == 0 else 1)
    else:
        chosen = 1
    return MicroBatchChoice(chosen, per_worker // chosen, peaks, budget_bytes)


def probe_micro_batch(
    config: TrainConfig, shard_list: Sequence[ShardInfo], device: torch.device, meter: PeakMeter,
    budget_bytes: int,
) -> MicroBatchChoice:
    """Build the run's model on `device` and choose its micro-batch (`choose_micro_batch`) on the run's first two
    pairs, repeated to the sizes tried; `budget_bytes` less what DeepSpeed adds (`deepspeed_extra_bytes`).
    Call with optim.grad_accum >= 2 (the plan then holds at least 2 pairs)."""
    # the pair reader imports PyAV: imported here, so that benchmarks/gpu.py can use the rest without it
    from videodpo_ray.training.data import (
        PairLoader,
        batch_text_embeddings,
        pair_latents,
        prompts_to_encode,
        stores_text_embeddings,
    )
    from videodpo_ray.training.plan import PairPlan

    stored_text = stores_text_embeddings(shard_list)
    with device:
        model = build_model(config.model.model_copy(update={"build_text_encoder": not stored_text}),
                            seed=config.run.seed).to(device)
    plan = PairPlan(shard_list, seed=config.shuffle_seed, num_workers=1, pairs_per_worker=2, grad_accum=1)
    batch = next(iter(PairLoader(plan, epoch=0, rank=0, start_step=0, latent_family=config.model.family,
                                 prefetch=0)))
    win, lose = pair_latents(model, batch, device)
    dropped = [False] * len(batch.pairs)  # no CFG dropout here: the empty prompt's embedding is never looked up
    wanted = prompts_to_encode(batch.pairs, dropped)
    with torch.no_grad():
        encoded = dict(zip(wanted, model.encode_prompts(wanted))) if wanted else {}
    text = batch_text_embeddings(batch.pairs, dropped, torch.empty(0), encoded).to(device)
    trainable = model.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=0.0, fused=device.type == "cuda")
    generator = torch.Generator(device).manual_seed(0)

    def step(pairs: int) -> None:
        rows = torch.arange(pairs, device=device) % 2
        try:
            output = dpo_step(model, win[rows], lose[rows], text[rows], None, beta_dpo=config.dpo.beta_dpo,
                              generator=generator)
            output.loss.backward()
            optimizer.step()
        finally:
            optimizer.zero_grad(set_to_none=True)

    extra = deepspeed_extra_bytes(config, sum(parameter.numel() for parameter in trainable))
    return choose_micro_batch(step, config.optim.grad_accum, budget_bytes - extra, meter)


def probe_on_cuda(config: TrainConfig, shard_list: Sequence[ShardInfo]) -> MicroBatchChoice:
    """`probe_micro_batch` on this process's GPU, within MEMORY_FRACTION of its memory."""
    device = torch.device("cuda", torch.cuda.current_device())
    return probe_micro_batch(config, shard_list, device, cuda_peak_bytes, cuda_budget_bytes(device))

