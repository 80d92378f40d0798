"""`data.pairs_per_worker: auto` and `model.gradient_checkpointing: auto`: how many pairs one forward/backward
carries, and whether it keeps its activations, chosen from GPU memory.

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

`model.gradient_checkpointing: auto` is chosen by the same probe: without checkpointing when the micro-step (the
chosen or the configured micro-batch) fits without it, else with it. Recomputing the activations costs more than
packing gains: on the H200, VC2 full at 1 pair takes 0.98 s per step with checkpointing and 0.63 s without (1.56x),
while packing 4 pairs per micro-batch instead of 1 gains 1.22x.

The probe runs plain AdamW in the model's own precision; DeepSpeed's bf16 engine also keeps float32 master
weights and gradients (`deepspeed_extra_bytes`), and the budget leaves the rest of `MEMORY_FRACTION` as head-room for
the CUDA context, communication buckets and the allocator's fragmentation.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, replace
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
    gradient_checkpointing: bool | None = None  # None: not the probe's to choose
    rejected: str = ""  # why the probe did not train without checkpointing

    @property
    def fits(self) -> bool:
        """The chosen micro-batch was measured within the budget."""
        return self.peak_bytes.get(self.pairs_per_worker, self.budget_bytes + 1) <= self.budget_bytes

    def summary(self) -> str:
        gib = 2**30
        measured = ", ".join(f"{pairs}: {peak / gib:.1f}" for pairs, peak in sorted(self.peak_bytes.items()))
        checkpointing = ("" if self.gradient_checkpointing is None else
                         f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}"
                         f"{f' ({self.rejected})' if self.rejected else ''}, ")
        return (f"{checkpointing}micro-batch {self.pairs_per_worker} x accumulation {self.grad_accum} (peak GiB by "
                f"micro-batch: {measured}; budget {self.budget_bytes / gib:.1f} GiB)")


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


def peak_memory_gib(device: torch.device) -> float:
    """This process's memory high-water mark in GiB: on a GPU the CUDA allocator's peak (what the probe measures, so
    a run's first steps check its choice), on the CPU the peak resident set (Linux reports it in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


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


def measure_micro_batch(
    step: Callable[[int], None], pairs: int, grad_accum: int, budget_bytes: int, meter: PeakMeter
) -> MicroBatchChoice:
    """A configured micro-batch of `pairs` measured (run once first, as in `choose_micro_batch`)."""
    peaks: dict[int, int] = {}
    try:
        step(pairs)
        peaks[pairs] = meter(lambda: step(pairs))
    except torch.OutOfMemoryError:
        pass
    return MicroBatchChoice(pairs, grad_accum, peaks, budget_bytes)


def probe_micro_batch(
    config: TrainConfig, shard_list: Sequence[ShardInfo], device: torch.device, meter: PeakMeter,
    budget_bytes: int,
) -> MicroBatchChoice:
    """Build the run's model on `device` and settle its "auto" memory settings on the run's first pairs, repeated
    to the sizes tried, within `budget_bytes` less what DeepSpeed adds (`deepspeed_extra_bytes`): the micro-batch
    (`choose_micro_batch`; the configured one is measured) without gradient checkpointing, then with it when that
    does not fit and the config says auto."""
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
    configured = config.model.gradient_checkpointing
    options = [False, True] if configured == "auto" else [configured]
    with device:
        model = build_model(config.model.model_copy(update={"build_text_encoder": not stored_text,
                                                            "gradient_checkpointing": options[0]}),
                            seed=config.run.seed).to(device)
    loaded = min(2, sum(info.num_rows for info in shard_list))
    plan = PairPlan(shard_list, seed=config.shuffle_seed, num_workers=1, pairs_per_worker=loaded, grad_accum=1)
    batch = next(iter(PairLoader(plan, epoch=0, rank=0, start_step=0, latent_space=model.latent_space,
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
        rows = torch.arange(pairs, device=device) % loaded
        try:
            output = dpo_step(model, win[rows], lose[rows], text[rows], None, beta_dpo=config.dpo.beta_dpo,
                              generator=generator)
            output.loss.backward()
            optimizer.step()
        finally:
            optimizer.zero_grad(set_to_none=True)

    budget = budget_bytes - deepspeed_extra_bytes(config, sum(parameter.numel() for parameter in trainable))
    choice = choose_memory_layout(step, model.set_gradient_checkpointing, options, config.data.pairs_per_worker,
                                  config.optim.grad_accum, budget, meter)
    return choice if configured == "auto" else replace(choice, gradient_checkpointing=None)


def choose_memory_layout(
    step: Callable[[int], None], set_checkpointing: Callable[[bool], None], options: Sequence[bool],
    pairs_per_worker: int | str, grad_accum: int, budget_bytes: int, meter: PeakMeter,
) -> MicroBatchChoice:
    """The micro-batch (chosen for "auto", else measured) under each checkpointing option in turn, the first that
    fits: `options` [False, True] for `model.gradient_checkpointing: auto`, else the configured one alone."""
    rejected = ""
    for checkpointing in options:
        set_checkpointing(checkpointing)
        if pairs_per_worker == "auto":
            choice = choose_micro_batch(step, grad_accum, budget_bytes, meter)
        else:
            choice = measure_micro_batch(step, int(pairs_per_worker), grad_accum, budget_bytes, meter)
        if choice.fits or checkpointing:
            break
        peak = choice.peak_bytes.get(choice.pairs_per_worker)
        rejected = (f"off: {choice.pairs_per_worker} pair(s) ran out of memory" if peak is None else
                    f"off: {choice.pairs_per_worker} pair(s) peaked at {peak / 2**30:.1f} GiB")
    return replace(choice, gradient_checkpointing=checkpointing, rejected=rejected)


def probe_on_cuda(config: TrainConfig, shard_list: Sequence[ShardInfo]) -> MicroBatchChoice:
    """`probe_micro_batch` on this process's GPU, within MEMORY_FRACTION of its memory."""
    device = torch.device("cuda", torch.cuda.current_device())
    return probe_micro_batch(config, shard_list, device, cuda_peak_bytes, cuda_budget_bytes(device))

