"""Model-layer benchmark: the three families side by side, tiny presets on the CPU (+ VC2 full size on a GPU).

Per family (`build_model(ModelConfig(family=..., variant="tiny"))`):
- forward: one policy `predict` on 4 latents (2 pairs) at the family's default tiny video size;
- sample: `sample()` of one video, 4 steps, default size and guidance (includes text encoding and VAE decode);
- DPO forward+backward (`dpo_step`, 2 pairs, larger videos so activations dominate) without and with activation
  checkpointing: time, and peak CPU memory = the rise of the resident set across the step, in a fresh subprocess
  per configuration. torch allocations bypass tracemalloc, and a plain ru_maxrss is masked by earlier peaks
  (imports, model building), so the subprocess resets the kernel's high-water mark right before the step
  (/proc/self/clear_refs "5") and reads VmHWM after it; glibc is told to mmap every block >= 64 KiB so freed
  tensors leave the resident set at once instead of hiding the next allocations.
With CUDA: VC2 "full" (1.41B UNet, latents 4x16x40x64, 1 pair, bf16 autocast, bf16 frozen reference, AdamW):
DPO step time and peak GPU memory, with and without checkpointing.

Run: .venv/bin/python benchmarks/models.py [family ...]   (default: all three)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.training.step import dpo_step

FAMILIES = ("vc2", "t2v_turbo", "cogvideox")
PAIRS = 2
# (frames, height, width) of the videos whose latents the DPO memory runs use; valid for the family's VAE
MEMORY_VIDEO_SIZE = {"vc2": (4, 32, 32), "t2v_turbo": (4, 32, 32), "cogvideox": (33, 128, 128)}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
PROMPT = "a red panda climbing a tree"


def _tiny(family: str, **overrides):
    return build_model(ModelConfig(family=family, variant="tiny", **overrides))


def _median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _dpo_inputs(model, latent_shape: tuple[int, ...], text_shape: tuple[int, ...]):
    generator = torch.Generator().manual_seed(0)
    win = torch.randn((PAIRS, *latent_shape), generator=generator)
    lose = torch.randn((PAIRS, *latent_shape), generator=generator)
    return win, lose, torch.randn((PAIRS, *text_shape), generator=generator)


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_run(family: str, checkpointing: bool, latent_shape: list[int], text_shape: list[int]) -> dict:
    """In a fresh process: peak resident-set rise (MiB) and time of one DPO forward+backward."""
    torch.manual_seed(0)
    model = _tiny(family, gradient_checkpointing=checkpointing)
    win, lose, text = _dpo_inputs(model, tuple(latent_shape), tuple(text_shape))
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current VmRSS
    before = _resident_kib("VmRSS")
    start = time.perf_counter()
    output = dpo_step(model, win, lose, text, None, beta_dpo=5000.0, generator=torch.Generator().manual_seed(0))
    output.loss.backward()
    seconds = time.perf_counter() - start
    return {"peak_mib": (_resident_kib("VmHWM") - before) / 1024, "seconds": seconds}


def _memory_in_subprocess(family: str, checkpointing: bool, latent_shape, text_shape) -> dict:
    arguments = json.dumps([family, checkpointing, list(latent_shape), list(text_shape)])
    result = subprocess.run(
        [sys.executable, __file__, "--memory-run", arguments],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **MALLOC_ENV},
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory run {family} checkpointing={checkpointing} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_family(family: str) -> dict:
    torch.manual_seed(0)
    model = _tiny(family)
    video = model.sample([PROMPT], [0], num_inference_steps=4)
    latents = model.encode_videos(video)
    text = model.encode_prompts([PROMPT] * 2 * PAIRS)
    batch = latents.repeat((2 * PAIRS,) + (1,) * (latents.ndim - 1))
    timesteps = torch.tensor([100, 400, 700, 999])
    with torch.no_grad():
        forward = _median_seconds(lambda: model.predict(batch, timesteps, text), repeats=5)
    sample = _median_seconds(lambda: model.sample([PROMPT], [0], num_inference_steps=4), repeats=2)
    memory_shape = model.latent_shape(*MEMORY_VIDEO_SIZE[family])
    plain = _memory_in_subprocess(family, False, memory_shape, text.shape[1:])
    checkpointed = _memory_in_subprocess(family, True, memory_shape, text.shape[1:])
    return {
        "params": sum(p.numel() for p in model.trainable_parameters()),
        "video": "x".join(map(str, video.shape[1:4])),
        "forward_ms": 1000 * forward,
        "sample_s": sample,
        "memory_latents": "x".join(map(str, memory_shape)),
        "plain": plain,
        "checkpointed": checkpointed,
    }


def gpu_vc2_full(checkpointing: bool) -> dict:
    """VC2 full size, full finetune: one DPO step (forward, backward, AdamW) on 1 pair of 4x16x40x64 latents."""
    torch.cuda.empty_cache()  # the previous call's model and optimizer were freed when it returned
    torch.manual_seed(0)
    config = ModelConfig(
        family="vc2", variant="full", mixed_precision="bf16", gradient_checkpointing=checkpointing
    )
    model = build_model(config).to("cuda")
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=6e-6, weight_decay=0.01)
    generator = torch.Generator(device="cuda").manual_seed(0)
    win = torch.randn((1, 4, 16, 40, 64), device="cuda", generator=generator)
    lose = torch.randn((1, 4, 16, 40, 64), device="cuda", generator=generator)
    text = torch.randn((1, 77, 1024), device="cuda", generator=generator)

    def step() -> None:
        output = dpo_step(model, win, lose, text, None, beta_dpo=5000.0, generator=generator)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    try:
        step()  # warm-up (allocates the AdamW states)
        torch.cuda.reset_peak_memory_stats()
        seconds = _median_seconds(step, repeats=3)
        peak = torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        seconds, peak = float("nan"), float("inf")
    return {"seconds": seconds, "peak_gib": peak}


def gpu_table() -> None:
    print(f"\n{torch.cuda.get_device_name()}: VC2 full (1.41B UNet), full finetune, 1 pair of 4x16x40x64 latents,")
    print("bf16 autocast + bf16 frozen reference, AdamW; one DPO step = forward, backward, optimizer step")
    results = {checkpointing: gpu_vc2_full(checkpointing) for checkpointing in (True, False)}
    for checkpointing, result in results.items():
        label = "checkpointing" if checkpointing else "no checkpointing"
        print(f"  {label:<17} step {result['seconds']:.3f} s   peak {result['peak_gib']:.2f} GiB")
    with_ckpt, without = results[True], results[False]
    print(f"  checkpointing / none: time {with_ckpt['seconds'] / without['seconds']:.2f}x, "
          f"peak memory {with_ckpt['peak_gib'] / without['peak_gib']:.2f}x")


def main(families: list[str]) -> None:
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    started = time.perf_counter()
    print(f"CPU, tiny presets; forward = predict on {2 * PAIRS} latents; sample = 1 video, 4 steps;")
    print(f"DPO = dpo_step forward+backward on {PAIRS} pairs: seconds, and peak = its resident-set peak rise in a")
    print("fresh process (MiB), without and with activation checkpointing (ratio = ckpt / none)\n")
    header = (
        f"{'family':<10} {'params':>8} {'video':>9} {'fwd ms':>7} {'sample s':>8} {'DPO latents':>12} "
        f"{'peak':>7} {'peak ckpt':>9} {'ratio':>6} {'DPO s':>6} {'s ckpt':>6}"
    )
    print(header)
    print("-" * len(header))
    failed = []
    for family in families:
        try:
            row = cpu_family(family)
        except Exception as error:  # a family still being written must not hide the others' numbers
            print(f"{family:<10} FAILED: {type(error).__name__}: {str(error).splitlines()[0]}")
            failed.append(family)
            continue
        plain, checkpointed = row["plain"], row["checkpointed"]
        ratio = checkpointed["peak_mib"] / plain["peak_mib"] if plain["peak_mib"] > 0 else float("nan")
        print(
            f"{family:<10} {row['params']:>8,} {row['video']:>9} {row['forward_ms']:>7.1f} {row['sample_s']:>8.2f} "
            f"{row['memory_latents']:>12} {plain['peak_mib']:>7.1f} {checkpointed['peak_mib']:>9.1f} {ratio:>6.2f} "
            f"{plain['seconds']:>6.2f} {checkpointed['seconds']:>6.2f}"
        )
    print(f"\nCPU part: {time.perf_counter() - started:.0f} s")

    if not torch.cuda.is_available():
        print("no CUDA GPU: VC2 full-size DPO step skipped")
    else:
        gpu_table()
    if failed:
        sys.exit(f"failed families: {', '.join(failed)}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-run":
        print(json.dumps(memory_run(*json.loads(sys.argv[2]))))
    else:
        unknown = set(sys.argv[1:]) - set(FAMILIES)
        if unknown:
            sys.exit(f"unknown families {sorted(unknown)}; choose from {FAMILIES}")
        main(sys.argv[1:] or list(FAMILIES))
