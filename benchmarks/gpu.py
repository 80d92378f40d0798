"""GPU efficiency benchmark: baseline path vs fast path, side by side in one run, for sampling and DPO training.

Cases, most important first (`--cases` filters by name prefix; `--budget-s` skips what no longer fits):
- sampling (per denoiser step at a fixed batch, VAE decode, text encoding; extrapolated to the family's steps):
  VC2 (50 DDIM steps, CFG 12, 16x320x512, batch 8 = 16 rows), T2V-Turbo (4 LCM steps, no CFG pass, batch 8),
  CogVideoX-2B (50 steps, CFG, 49x480x720) and Wan-1.3B (50 steps, CFG, 81x480x832) at batch 2 = 4 rows (long
  sequences: throughput per row is flat there; their T5 encoders are not built, text embeddings are random);
  baseline = float32 weights + bf16 autocast with the UNet's norms in float32 (the reference figures' setting; Wan:
  CFG as two denoiser calls, VC2: one VAE call per frame index), fast = every weight in bf16 (`freeze_for_sampling`),
  CFG in one call, VAE frames pooled, then + the VC2 UNet's input-dtype norms (`norms_in_input_dtype`);
- `compile: true` (inductor) in a subprocess with a hard time cap: VC2 and T2V-Turbo sampling (the UNet forward eager
  vs compiled at the sampler's batch, then `sample()` end to end with the UNet and VAE decoder compiled) and VC2
  full-finetune DPO (eager vs compiled steps, 1 pair without checkpointing, as `auto` picks on an H200);
- DPO training (one step = reference forward + policy forward/backward + AdamW, bf16 autocast + activation
  checkpointing): VC2 full and VC2 LoRA r64 (4x16x40x64 latents, 1 pair, then pairs_per_gpu 2 and 4, then 1 and 2
  without checkpointing), Wan-1.3B LoRA and full (16x21x60x104 latents = 81x480x832), CogVideoX-2B LoRA
  (13x16x60x90 = 49x480x720); baseline = float32 frozen LoRA base + foreach AdamW + fp32 norms + peft's LoRA
  layers, fast = bf16 frozen base + fused AdamW + input-dtype norms + the repo's LoRA layers (input as is, adapter
  added in its GEMM); VC2 full then runs what `data.pairs_per_worker` and `model.gradient_checkpointing` auto choose
  for 8 pairs per worker per step (CUDA only).
MFU: FLOPs counted once per case with `torch.utils.flop_counter.FlopCounterMode` (a denoiser call; a whole
training step, so checkpointing's recompute counts) against a dense bf16 peak of 989 TFLOP/s (H100/H200 SXM),
also shown as a fraction of the bf16 matmul rate measured first. Results go to `--json` after every measurement
(a timeout loses nothing) and a markdown table ends the run. Without CUDA (or with --tiny) the same code runs the
tiny presets on the CPU in well under a minute, in float32 (sizes, steps and iterations cut; no MFU).

Run: `python benchmarks/gpu.py --json gpu.json --budget-s 420` (needs torch, diffusers, transformers, peft,
pydantic, open_clip_torch; no Ray, DeepSpeed or PyAV).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from videodpo_ray.models import ModelConfig, build_model, model_class
from videodpo_ray.models.base import VideoDiffusionModel
from videodpo_ray.models.modules import hold_frozen_in, norms_in_input_dtype, weight_dtype
from videodpo_ray.training.memory import choose_memory_layout, cuda_budget_bytes, cuda_peak_bytes
from videodpo_ray.training.step import dpo_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from traffic import plain_norms, set_lora_layers  # noqa: E402  (benchmarks/ is not a package)

PEAK_TFLOPS = 989.0  # dense bf16, H100 / H200 SXM (the spec sheet's 1979 is with 2:4 sparsity)
LORA = {"rank": 64}
VARIANTS = {"vc2": "full", "t2v_turbo": "full", "cogvideox": "2b", "wan": "1.3b"}
LABELS = {"vc2": "VC2", "t2v_turbo": "T2V-Turbo", "cogvideox": "CogVideoX-2B", "wan": "Wan-1.3B"}
SAMPLING = {  # family: (steps, guidance, batch on the GPU)
    "vc2": (50, 12.0, 8),
    "t2v_turbo": (4, 7.5, 8),
    "cogvideox": (50, 6.0, 2),
    "wan": (50, 5.0, 2),
}
PROMPT = "a red panda climbing a tree in the rain"
RESULT = "RESULT "  # the compile child's result line


# --- the run: budget, results, output --------------------------------------------------------------------------------
@dataclass
class Bench:
    device: torch.device
    tiny: bool
    deadline: float
    json_path: Path | None
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def precision(self) -> str:
        """ModelConfig.mixed_precision: bf16; float32 on the tiny CPU run (bf16 is emulated there, ~7x slower; the
        bf16 paths' correctness is tests/test_fast_paths.py's)."""
        return "no" if self.tiny else "bf16"

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.tiny else torch.bfloat16

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, function: Callable[[], Any], warmup: int, repeats: int) -> float:
        """Median seconds of `repeats` calls after `warmup` calls (fewer on the tiny presets)."""
        if self.tiny:  # the tiny run exercises the code, its times mean nothing
            warmup, repeats = 0, 1
        for _ in range(warmup):
            function()
        self.sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def mfu(self, flops: float | None, seconds: float) -> float | None:
        return flops / seconds / (PEAK_TFLOPS * 1e12) if flops and self.cuda else None

    def record(self, row: dict[str, Any]) -> None:
        self.results.setdefault("rows", []).append(row)
        print(format_row(row), flush=True)
        self.write()

    def note(self, kind: str, case: str, text: str) -> None:
        """Record a skipped case or variant (kind "skipped") or a failed one ("errors")."""
        self.results.setdefault(kind, []).append({"case": case, "reason": text})
        print(f"[{case}] {'SKIPPED' if kind == 'skipped' else 'FAILED'}: {text}", flush=True)
        self.write()

    def write(self) -> None:
        if self.json_path is None:
            return
        temporary = self.json_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.results, indent=2, default=str))
        temporary.replace(self.json_path)


def format_row(row: dict[str, Any]) -> str:
    parts = [f"[{row['case']}] {row['variant']}"]
    for key, unit in (("batch", ""), ("step_s", " s/step"), ("decode_s", " s decode"), ("s_per_video", " s/video"),
                      ("videos_per_s", " videos/s"), ("pairs", " pairs"), ("pairs_per_s", " pairs/s"),
                      ("peak_gib", " GiB peak")):
        if row.get(key) is not None:
            value = row[key]
            parts.append(f"{key}={value:.3f}{unit}" if isinstance(value, float) else f"{key}={value}{unit}")
    if row.get("mfu") is not None:
        parts.append(f"MFU {row['mfu']:.1%} ({row['mfu_of_matmul']:.1%} of measured matmul)")
    if row.get("speedup") is not None:
        parts.append(f"x{row['speedup']:.2f} vs baseline")
    if row.get("note"):
        parts.append(f"({row['note']})")
    return " ".join(parts)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | variant | batch | s/video or s/step | videos/s or pairs/s | peak GiB | MFU | x baseline |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]

    def number(value: Any, form: str) -> str:
        return "-" if value is None else format(value, form)

    for row in rows:
        if "s_per_video" in row:
            seconds, rate, batch = row["s_per_video"], row["videos_per_s"], row.get("batch")
        elif "pairs_per_s" in row:
            seconds, rate, batch = row["step_s"], row["pairs_per_s"], row.get("pairs")
        else:
            seconds, rate, batch = row.get("step_s"), None, row.get("batch")
        lines.append(
            f"| {row['case']} | {row['variant']} | {number(batch, 'd')} | {number(seconds, '.3f')} | "
            f"{number(rate, '.3f')} | {number(row.get('peak_gib'), '.1f')} | {number(row.get('mfu'), '.1%')} | "
            f"{number(row.get('speedup'), '.2f')} |"
        )
    return "\n".join(lines)


# --- models and shapes -----------------------------------------------------------------------------------------------
def build(bench: Bench, family: str, **overrides: Any) -> VideoDiffusionModel:
    """A random-init model on the device (weights created there: no minutes of CPU init at full size)."""
    config = ModelConfig(family=family, variant="tiny" if bench.tiny else VARIANTS[family], **overrides)
    with bench.device:
        model = build_model(config, seed=0)
    return model.to(bench.device)


def latent_shape(model: VideoDiffusionModel) -> tuple[int, ...]:
    """One video's latents at the model's default video size, in the family's layout."""
    return model.latent_shape(*model.video_size)


def random_inputs(bench: Bench, model: VideoDiffusionModel, rows: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(bench.device).manual_seed(0)
    latents = torch.randn((rows, *latent_shape(model)), generator=generator, device=bench.device)
    text = torch.randn((rows, *model.text_shape), generator=generator, device=bench.device)
    return latents, torch.full((rows,), 500, dtype=torch.long, device=bench.device), text


def count_flops(bench: Bench, case: str, function: Callable[[], Any]) -> float | None:
    """FLOPs `function` executes (on the GPU only: MFU has no meaning for the tiny CPU run); None if counting fails."""
    if not bench.cuda:
        return None
    try:
        with FlopCounterMode(display=False) as counter:
            function()
    except Exception as error:  # no MFU for this case, but its times still count
        bench.note("errors", case, f"FLOP counting failed, no MFU: {type(error).__name__}: {error}")
        return None
    flops = float(counter.get_total_flops())
    bench.results.setdefault("flops", {})[case] = flops
    return flops


def with_mfu(bench: Bench, row: dict[str, Any], flops: float | None, seconds: float) -> dict[str, Any]:
    row["mfu"] = bench.mfu(flops, seconds)
    if row["mfu"] is not None:
        row["mfu_of_matmul"] = row["mfu"] * PEAK_TFLOPS / bench.results["matmul_tflops"]
    return row


# --- cases: matmul ---------------------------------------------------------------------------------------------------
def matmul_rate(bench: Bench) -> None:
    size = 512 if bench.tiny else 8192
    a = torch.randn((size, size), device=bench.device, dtype=torch.bfloat16)
    b = torch.randn((size, size), device=bench.device, dtype=torch.bfloat16)
    seconds = bench.timed(lambda: a @ b, warmup=3, repeats=20)
    tflops = 2 * size**3 / seconds / 1e12
    bench.results["matmul_tflops"] = tflops
    bench.record({"case": "bf16 matmul", "variant": f"{size}^3", "step_s": seconds,
                  "note": f"{tflops:.0f} TFLOP/s = {tflops / PEAK_TFLOPS:.0%} of the {PEAK_TFLOPS:.0f} peak"})


# --- cases: sampling -------------------------------------------------------------------------------------------------
def sampling_case(bench: Bench, family: str) -> None:
    """Baseline vs fast sampling, per denoiser step at a fixed batch + VAE decode (+ text), extrapolated."""
    steps, guidance, batch = SAMPLING[family]
    batch = min(batch, 2) if bench.tiny else batch
    case = f"{LABELS[family]} sampling"
    model = build(bench, family, mixed_precision=bench.precision).eval()
    model.reference_denoiser = None  # the sampler's model never needs the DPO reference copy
    cfg = family != "t2v_turbo"  # T2V-Turbo feeds w to the UNet: no unconditional pass
    rows = 2 * batch if cfg else batch
    latents, timesteps, text = random_inputs(bench, model, rows)
    frames, height, width = model.video_size
    pooled_3d_vae = family in ("cogvideox", "wan")  # 3D VAEs decode one video per call: timed on 1, scaled
    decode_videos = 1 if pooled_3d_vae else batch
    size = f"{frames}x{height}x{width}, {steps} steps" + (f", CFG {guidance:g}" if cfg else ", no CFG pass")
    prompts = [f"{PROMPT} {index}" for index in range(batch)]

    text_encoding = family in ("vc2", "t2v_turbo")  # CogVideoX / Wan: T5-XXL not built, random embeddings

    def predict(rows_in: slice) -> torch.Tensor:
        with torch.no_grad():
            return model.predict(latents[rows_in], timesteps[rows_in], text[rows_in])

    flops_step = count_flops(bench, case, lambda: predict(slice(None)))  # one denoiser call of `rows` rows

    def measure(variant: str, step: Callable[[], Any], note: str) -> dict[str, Any]:
        bench.reset_peak()
        step_s = bench.timed(step, warmup=1, repeats=3 if family in ("vc2", "t2v_turbo") else 2)
        with torch.no_grad():
            decode_s = bench.timed(lambda: model.decode_latents(latents[:decode_videos]), warmup=0, repeats=1)
        decode_s *= batch / decode_videos
        text_s = 0.0
        if text_encoding:
            with torch.no_grad():
                text_s = bench.timed(lambda: (model.encode_prompts(prompts), model.empty_prompt_embedding()), 1, 2)
        total = steps * step_s + decode_s + text_s
        row = {"case": case, "variant": variant, "batch": batch, "rows_per_step": rows, "step_s": step_s,
               "decode_s": decode_s, "text_s": text_s, "s_per_video": total / batch, "videos_per_s": batch / total,
               "peak_gib": bench.peak_gib(), "extrapolated": True,
               "note": f"{size}; {steps} x step + decode + text, extrapolated; {note}"}
        if baseline:
            row["speedup"] = row["videos_per_s"] / baseline[0]["videos_per_s"]
        bench.record(with_mfu(bench, row, flops_step, step_s))
        return row

    baseline: list[dict[str, Any]] = []
    swapped_norms = plain_norms(model.denoiser)  # the reference figures' UNet: autocast runs its norms in fp32
    two_calls = family == "wan"  # the previous Wan loop: conditional and unconditional rows in two calls
    frame_pooling = hasattr(model, "vae_decode_frames")
    if frame_pooling:
        model.vae_decode_frames = batch  # the previous VC2 decode: one VAE call per frame index (B frames each)
    halves = slice(0, batch), slice(batch, rows)
    baseline.append(measure(
        "baseline: fp32 weights + autocast",
        (lambda: (predict(halves[0]), predict(halves[1]))) if two_calls else (lambda: predict(slice(None))),
        "fp32 VAE" + (", CFG in 2 calls" if two_calls else "") + (", 1 VAE call per frame" if frame_pooling else ""),
    ))
    if bench.remaining() <= 0:
        return
    model.freeze_for_sampling()
    if frame_pooling:
        model.vae_decode_frames = type(model).vae_decode_frames
    last = measure("fast: bf16 weights", lambda: predict(slice(None)),
                   "bf16 denoiser/VAE/text encoder" + (", CFG in 1 call" if two_calls else "")
                   + (f", {model.vae_decode_frames} frames per VAE call" if frame_pooling else ""))
    if swapped_norms and bench.remaining() > 0:
        norms_in_input_dtype(model.denoiser)
        last = measure("fast + input-dtype norms", lambda: predict(slice(None)),
                       f"{swapped_norms} norms in bf16 under autocast (no fp32 islands)")
    if family == "vc2" and bench.remaining() > 0:
        check_steps = 2 if bench.tiny else 5  # a divisor of 1000 (VC2's DDIM grid)
        seconds = bench.timed(lambda: model.sample(prompts, list(range(batch)), num_inference_steps=check_steps), 0, 1)
        predicted = check_steps * last["step_s"] + last["decode_s"] + last["text_s"]
        bench.record({"case": case, "variant": f"check: sample() end to end, {check_steps} steps", "batch": batch,
                      "step_s": seconds, "note": f"the step + decode + text split predicts {predicted:.2f} s "
                                                 f"(measured / predicted = {seconds / predicted:.2f})"})


# --- cases: DPO training ---------------------------------------------------------------------------------------------
class DPOSteps:
    """DPO steps of `model` on random latents of its default size, up to `pairs_max` pairs per step."""

    def __init__(self, bench: Bench, model: VideoDiffusionModel, pairs_max: int) -> None:
        self.model = model
        self.generator = torch.Generator(bench.device).manual_seed(0)
        shape = (pairs_max, *latent_shape(model))
        self.win = torch.randn(shape, generator=self.generator, device=bench.device)
        self.lose = torch.randn(shape, generator=self.generator, device=bench.device)
        self.text = torch.randn((pairs_max, *model.text_shape), generator=self.generator, device=bench.device)

    def __call__(self, pairs: int, optimizer: torch.optim.Optimizer | None) -> None:
        """One step of `pairs` pairs: reference forward, policy forward/backward, then AdamW if given."""
        output = dpo_step(self.model, self.win[:pairs], self.lose[:pairs], self.text[:pairs], None, beta_dpo=5000.0,
                          generator=self.generator)
        output.loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def dpo_case(bench: Bench, family: str, finetune: str, pair_counts: tuple[int, ...]) -> None:
    """One DPO step (reference forward + policy forward/backward + AdamW), baseline vs fast, at 1..N pairs."""
    pair_counts = pair_counts[:2] if bench.tiny else pair_counts
    case = f"{LABELS[family]} {'LoRA r64' if finetune == 'lora' else 'full'} DPO"
    model = build(bench, family, finetune=finetune, lora=LORA, mixed_precision=bench.precision,
                  gradient_checkpointing=True)
    lora = finetune == "lora"
    auto_pairs = 8 if family == "vc2" and finetune == "full" else 0  # pairs per worker per step auto packs
    step = DPOSteps(bench, model, max(*pair_counts, auto_pairs))
    latents = "x".join(map(str, latent_shape(model)))
    if lora:
        info_lora_overhead(bench, model, case)

    flops_pair = count_flops(bench, case, lambda: step(1, None))  # executed FLOPs of a 1-pair step (incl. recompute)
    for parameter in model.trainable_parameters():
        parameter.grad = None
    denoisers = [module for module in (model.denoiser, model.reference_denoiser) if module is not None]
    swapped_norms = sum(plain_norms(module) for module in denoisers)  # the reference figures' UNet
    variants = [("baseline: " + ("fp32 frozen base" if lora else "fp32 master") + " + autocast, foreach AdamW",
                 1, False, True)]
    fast_label = (f"fast: {'bf16 frozen base, fused LoRA add, ' if lora else ''}fused AdamW"
                  + (", input-dtype norms" if swapped_norms else ""))
    variants += [(fast_label, pairs, True, True) for pairs in pair_counts]
    heavy = family in ("wan", "cogvideox")  # seconds per step: 1 timed step (the FLOP count warmed up)
    flops_by_checkpointing = {True: flops_pair}
    if not heavy:  # what `model.gradient_checkpointing: auto` picks where a micro-batch fits without it
        kept = pair_counts[:1 if bench.tiny else 2]
        variants += [(fast_label + ", no checkpointing", pairs, True, False) for pairs in kept]

    def measure(label: str, pairs: int, fast: bool, checkpointing: bool) -> dict[str, Any]:
        # the frozen LoRA base in float32 (baseline) or the compute dtype (fast); a no-op for a full finetune
        hold_frozen_in(model.denoiser, bench.compute_dtype if fast else torch.float32)
        for module in denoisers if fast else ():
            norms_in_input_dtype(module)
        if lora:  # peft's own layers (input cast, the adapter added in three kernels) or the fused ones
            set_lora_layers(model, cast_input=not fast, fused_add=fast)
        model.set_gradient_checkpointing(checkpointing)
        if checkpointing not in flops_by_checkpointing:
            flops_by_checkpointing[checkpointing] = count_flops(bench, f"{case}, no checkpointing",
                                                                lambda: step(1, None))
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-6, weight_decay=0.01,
                                      fused=fast and bench.cuda)
        if not heavy:
            step(pairs, optimizer)  # warm-up; allocates the AdamW states
        bench.reset_peak()
        seconds = bench.timed(lambda: step(pairs, optimizer), warmup=0, repeats=1 if heavy else 3 if pairs == 1 else 2)
        row = {"case": case, "variant": label, "pairs": pairs, "step_s": seconds, "pairs_per_s": pairs / seconds,
               "peak_gib": bench.peak_gib(),
               "note": f"latents {latents} per video, bf16 autocast{' + checkpointing' if checkpointing else ''}"}
        flops = flops_by_checkpointing[checkpointing]
        return with_mfu(bench, row, flops and flops * pairs, seconds)

    baseline_rate = None
    for label, pairs, fast, checkpointing in variants:
        if bench.remaining() <= 0:
            bench.note("skipped", case, f"{label}, {pairs} pairs: budget spent")
            continue
        try:
            row = measure(label, pairs, fast, checkpointing)
        except torch.OutOfMemoryError:
            bench.note("errors", case, f"{label}, {pairs} pairs: out of memory")
            continue
        finally:
            for parameter in model.trainable_parameters():
                parameter.grad = None
            bench.reset_peak()
        if baseline_rate is None:
            baseline_rate = row["pairs_per_s"]
        else:
            row["speedup"] = row["pairs_per_s"] / baseline_rate
        bench.record(row)
    if auto_pairs:
        info_auto_micro_batch(bench, case, step, auto_pairs)


def info_auto_micro_batch(bench: Bench, case: str, step: DPOSteps, per_worker: int) -> None:
    """`data.pairs_per_worker: auto` with `model.gradient_checkpointing: auto` on this GPU: whether the job's probe
    (`choose_memory_layout`) keeps the activations, and the micro-batch it packs `per_worker` pairs into (fast path,
    fused AdamW), with the peaks it measured."""
    if not bench.cuda:
        bench.note("skipped", case, "pairs_per_worker auto: needs the CUDA allocator's peak")
        return
    optimizer = torch.optim.AdamW(step.model.trainable_parameters(), lr=0.0, fused=True)

    def probe_step(pairs: int) -> None:
        try:
            step(pairs, optimizer)
        finally:
            optimizer.zero_grad(set_to_none=True)

    start = time.monotonic()
    choice = choose_memory_layout(probe_step, step.model.set_gradient_checkpointing, (False, True), "auto",
                                  per_worker, cuda_budget_bytes(bench.device), cuda_peak_bytes)
    bench.record({"case": case, "variant": f"info: pairs_per_worker and gradient_checkpointing auto, {per_worker} "
                  "pairs per worker per step",
                  "pairs": choice.pairs_per_worker, "note": f"{choice.summary()}; probe "
                  f"{time.monotonic() - start:.0f} s"})


def info_lora_overhead(bench: Bench, model: VideoDiffusionModel, case: str) -> None:
    """CPU time a LoRA step spends outside the passes: the adapters-off toggle and diffusers' dtype walk."""
    def toggle() -> None:
        with model.reference_adapters():
            pass

    toggle_ms = 1e3 * bench.timed(toggle, 1, 10)
    walk_ms = 1e3 * bench.timed(lambda: model.denoiser.dtype, 1, 10)
    direct_ms = 1e3 * bench.timed(lambda: weight_dtype(model.denoiser), 1, 10)
    bench.record({"case": case, "variant": "info: per-call CPU overheads", "note":
                  f"adapters off/on {toggle_ms:.1f} ms per reference pass; ModelMixin.dtype {walk_ms:.1f} ms "
                  f"(3 calls per VC2 forward before, now weight_dtype {direct_ms:.3f} ms)"})


# --- cases: torch.compile --------------------------------------------------------------------------------------------
def run_compile_child(bench: Bench, case: str, kind: str, cap_s: float) -> dict[str, Any] | None:
    """Run `--compile-child kind` in a subprocess killed at the cap (compiling takes minutes); return its results
    (every JSON line it printed before it ended or was killed), or None with the reason noted."""
    cap = min(cap_s, bench.remaining() - 5.0)
    if cap < (20.0 if bench.tiny else 90.0):
        bench.note("skipped", case, f"{cap:.0f} s left: not enough to compile")
        return None
    command = [sys.executable, os.path.abspath(__file__), "--compile-child", kind] + (["--tiny"] if bench.tiny else [])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    lines = [json.loads(line.removeprefix(RESULT)) for line in output.splitlines() if line.startswith(RESULT)]
    if not lines:
        bench.note("errors", case, f"child exited {process.returncode} with no result: {output[-800:]}")
        return None
    result = {key: value for line in lines for key, value in line.items()}
    backend = "eager backend (tiny: dynamo capture only)" if bench.tiny else "inductor"
    if "compiled_s" not in result:
        bench.note("skipped", case, f"compiling did not finish within {cap:.0f} s; the eager time is recorded")
        result["note"] = f"{backend}: compiling did not finish within {cap:.0f} s"
        return result
    result["note"] = f"{backend}; compile took {result['compile_s']:.0f} s" + (
        "; COMPILATION FAILED, ran eager" if result["fell_back"] else "")
    return result


def compile_sampling_case(bench: Bench, family: str) -> None:
    """Sampling with `compile: true`: the UNet forward eager vs compiled, then `sample()` end to end (VC2: 5 of 50
    steps, extrapolated; T2V-Turbo: all 4)."""
    case = f"{LABELS[family]} sampling, torch.compile"
    result = run_compile_child(bench, case, f"sampling-{family}", 300.0)
    if result is None:
        return
    batch, rows = result["batch"], result["rows"]
    bench.record({"case": case, "variant": "UNet forward, eager", "batch": rows, "step_s": result["eager_s"]})
    if "compiled_s" not in result:
        return
    bench.record({"case": case, "variant": "UNet forward, compiled", "batch": rows, "step_s": result["compiled_s"],
                  "speedup": result["eager_s"] / result["compiled_s"], "note": "bf16 weights, " + result["note"]})
    if "sample_s" not in result:
        bench.note("skipped", case, "sample() end to end did not finish within the cap")
        return
    steps = SAMPLING[family][0]
    extra = result["sample_s"] - result["check_steps"] * result["compiled_s"]  # decode + text + loop, measured
    total = steps * result["compiled_s"] + extra
    bench.record(with_mfu(bench, {
        "case": case, "variant": "compile: true, sample() end to end", "batch": batch,
        "s_per_video": total / batch, "videos_per_s": batch / total, "step_s": result["compiled_s"],
        "note": f"sample() with {result['check_steps']} steps took {result['sample_s']:.2f} s; {steps} steps = "
                f"{steps} x compiled step + the rest of that run ({extra:.2f} s: text, noise, decode)"},
        bench.results.get("flops", {}).get(f"{LABELS[family]} sampling"), result["compiled_s"]))


def compile_training_case(bench: Bench) -> None:
    """VC2 full-finetune DPO with `compile: true` (the denoiser and its reference copy), eager vs compiled steps, 1
    pair without checkpointing: what `auto` picks on an H200."""
    case = "VC2 full DPO, torch.compile"
    result = run_compile_child(bench, case, "training", 400.0)
    if result is None:
        return
    pairs, flops_pair = result["pairs"], bench.results.get("flops", {}).get("VC2 full DPO, no checkpointing")
    timed = [("eager", result["eager_s"])] + ([("compiled", result["compiled_s"])] if "compiled_s" in result else [])
    for variant, seconds in timed:
        row = {"case": case, "variant": f"fast, {variant}", "pairs": pairs, "step_s": seconds,
               "pairs_per_s": pairs / seconds,
               "note": "bf16 autocast, no checkpointing, fused AdamW; " + result["note"]}
        if variant == "compiled":
            row["speedup"] = result["eager_s"] / seconds
        bench.record(with_mfu(bench, row, flops_pair and flops_pair * pairs, seconds))


def compile_child(kind: str, tiny: bool) -> None:
    """Subprocess body: eager then compiled times, for sampling-<family> (the bf16 UNet forward at the sampler's
    batch, CFG rows included, then one `sample()` with `compile: true`: UNet and VAE decoder) or training (a VC2
    full-finetune DPO step of 1 pair without checkpointing); prints a JSON line after each part (a kill at the cap
    keeps what finished)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    bench = Bench(device, tiny, time.monotonic() + 1e9, None)
    if kind.startswith("sampling-"):
        family = kind.removeprefix("sampling-")  # at the sampler's fps: the graph `sample()` runs, compiled once
        model = build(bench, family, mixed_precision=bench.precision, fps=model_class(family).sample_fps)
        model.freeze_for_sampling()
        batch = 2 if tiny else SAMPLING[family][2]
        rows = batch if family == "t2v_turbo" else 2 * batch  # CFG rows in one call, as sample()
        latents, timesteps, text = random_inputs(bench, model, rows)
        sizes = {"batch": batch, "rows": rows}

        def work() -> None:
            with torch.no_grad():
                model.predict(latents, timesteps, text)
    else:
        model = build(bench, "vc2", finetune="full", mixed_precision=bench.precision, gradient_checkpointing=False)
        pairs = 1
        steps = DPOSteps(bench, model, pairs)
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-6, weight_decay=0.01, fused=bench.cuda)
        sizes = {"pairs": pairs}

        def work() -> None:
            steps(pairs, optimizer)

    sampling = kind != "training"
    eager_s = bench.timed(work, 2 if sampling else 1, 5 if sampling else 3)
    print(RESULT + json.dumps({**sizes, "eager_s": eager_s}), flush=True)  # kept if the compile runs past the cap
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("videodpo_ray.models").addHandler(handler)  # compile_module warns on its fallback
    backend = "eager" if tiny else "inductor"
    if sampling:
        model.compile_for_sampling(backend)
    else:
        model.compile_denoiser(backend)
    start = time.perf_counter()
    work()
    bench.sync()
    compile_s = time.perf_counter() - start
    compiled_s = bench.timed(work, 1, 5 if sampling else 3)
    print(RESULT + json.dumps({"compiled_s": compiled_s, "compile_s": compile_s, "fell_back": bool(warnings)}),
          flush=True)
    if sampling:
        check_steps = min(SAMPLING[family][0], 2 if tiny else 5)  # VC2: a divisor of 1000 (its DDIM grid)
        prompts = [f"{PROMPT} {index}" for index in range(batch)]
        model.sample(prompts, list(range(batch)), num_inference_steps=check_steps)  # warm-up: encoder, decoder
        sample_s = bench.timed(lambda: model.sample(prompts, list(range(batch)), num_inference_steps=check_steps),
                               0, 1)
        print(RESULT + json.dumps({"sample_s": sample_s, "check_steps": check_steps}), flush=True)


# --- main ------------------------------------------------------------------------------------------------------------
CASES: list[tuple[str, float, Callable[[Bench], None]]] = [  # name, H200 estimate (s), body; most important first
    ("vc2-sampling", 60, lambda bench: sampling_case(bench, "vc2")),
    ("vc2-compile-sampling", 250, lambda bench: compile_sampling_case(bench, "vc2")),
    ("vc2-dpo-full", 70, lambda bench: dpo_case(bench, "vc2", "full", (1, 2, 4))),
    ("vc2-dpo-lora", 65, lambda bench: dpo_case(bench, "vc2", "lora", (1, 2, 4))),
    ("t2v-turbo-sampling", 25, lambda bench: sampling_case(bench, "t2v_turbo")),
    ("t2v-turbo-compile-sampling", 150, lambda bench: compile_sampling_case(bench, "t2v_turbo")),
    ("vc2-compile-training", 400, compile_training_case),
    ("wan-dpo-lora", 40, lambda bench: dpo_case(bench, "wan", "lora", (1,))),
    ("wan-dpo-full", 45, lambda bench: dpo_case(bench, "wan", "full", (1,))),
    ("cogvideox-sampling", 35, lambda bench: sampling_case(bench, "cogvideox")),
    ("wan-sampling", 50, lambda bench: sampling_case(bench, "wan")),
    ("cogvideox-dpo-lora", 30, lambda bench: dpo_case(bench, "cogvideox", "lora", (1,))),
]


def selected_cases(cases: str | None) -> list[tuple[str, float, Callable[[Bench], None]]]:
    """The CASES matching the comma-separated name prefixes, in the order the prefixes are given (all without)."""
    if not cases:
        return list(CASES)
    prefixes = [prefix.strip() for prefix in cases.split(",")]
    chosen = [case for prefix in prefixes for case in CASES if case[0].startswith(prefix)]
    return list({case[0]: case for case in chosen}.values())  # each once, where it was first named


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here after every measurement")
    parser.add_argument("--cases", help=f"comma-separated name prefixes of: {', '.join(name for name, *_ in CASES)}")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the cases that no longer fit")
    parser.add_argument("--tiny", action="store_true", help="tiny presets (automatic without CUDA)")
    parser.add_argument("--compile-child", choices=("sampling-vc2", "sampling-t2v_turbo", "training"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiny = args.tiny or not torch.cuda.is_available()
    if tiny:
        torch.set_num_threads(1)  # tiny models: thread start-up costs more than it saves
    if args.compile_child:
        compile_child(args.compile_child, tiny)
        return
    started = time.monotonic()
    device = torch.device("cpu" if tiny else "cuda")
    bench = Bench(device, tiny, started + args.budget_s, args.json)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    bench.results.update(device=name, torch=torch.__version__, tiny=tiny, peak_tflops=PEAK_TFLOPS,
                         budget_s=args.budget_s)
    print(f"{name}, torch {torch.__version__}{', tiny presets on the CPU' if tiny else ''}; MFU against a dense "
          f"bf16 peak of {PEAK_TFLOPS:.0f} TFLOP/s; budget {args.budget_s:.0f} s", flush=True)
    matmul_rate(bench)
    for case, estimate, body in selected_cases(args.cases):
        if bench.remaining() < (estimate if not tiny else 1.0):
            bench.note("skipped", case, f"{bench.remaining():.0f} s left, needs about {estimate:.0f} s")
            continue
        start = time.monotonic()
        try:
            body(bench)
        except Exception as error:  # one case failing (OOM, a missing API) must not stop the others
            detail = "".join(traceback.format_exception_only(type(error), error)).strip()
            bench.note("errors", case, f"{detail[:600]}\n{traceback.format_exc(limit=-3)[-1200:]}")
        finally:
            bench.reset_peak()
        print(f"[{case}] took {time.monotonic() - start:.0f} s", flush=True)
    bench.results["elapsed_s"] = time.monotonic() - started
    bench.write()
    print(f"\n{name}: {bench.results['elapsed_s']:.0f} s; sampling rows are extrapolated from per-step and decode "
          "times; MFU = counted FLOPs / time / peak\n")
    print(markdown_table(bench.results.get("rows", [])))
    for kind in ("skipped", "errors"):
        for item in bench.results.get(kind, []):
            print(f"{kind}: {item['case']}: {item['reason'].splitlines()[0]}")


if __name__ == "__main__":
    main()
