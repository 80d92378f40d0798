"""Scoring throughput: videos/s of every dimension, one video per call vs batched (score_outputs), in one run.

CPU: tiny random-init models on small videos (the batching gain comes from fewer, larger model calls).
CUDA (when available): real-size architectures (random weights; speed does not depend on the values) on 320x512
16-frame videos, in each dimension's VBench dtype.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from videodpo_ray.scoring import DIMENSIONS, ModelSpec, dimension_module, load_scorer_model, place_model, score_outputs

PROMPT = "a corgi running on the beach at sunset"
FPS = 8
# every scorer but the toy world's classifier (it scores toy prompts only: `toy_world.parse_prompt`)
SCORERS = tuple(name for name in DIMENSIONS if name != "toy_semantic")


def videos(count: int, frames: int, height: int, width: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (height, width + 2 * frames, 3), dtype=np.uint8)
    clip = np.stack([texture[:, 2 * t : 2 * t + width] for t in range(frames)])
    return [np.roll(clip, shift=7 * i, axis=2) for i in range(count)]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(function, repeats: int = 5) -> float:
    """Best of `repeats` wall-clock timings (the machine may be shared)."""
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        function()
        synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def one_by_one(name: str, clips: list[np.ndarray], model) -> None:
    module = dimension_module(name)
    for clip in clips:
        module.score(clip, model, prompt=PROMPT, fps=FPS)


def batched(name: str, clips: list[np.ndarray], model) -> None:
    score_outputs(name, clips, model, prompts=[PROMPT] * len(clips), fps=[FPS] * len(clips))


def full_size_model(name: str):
    """The real-size architecture of `name` with random weights (no checkpoint needed to time it)."""
    from torchvision.models.optical_flow import raft_large

    from videodpo_ray.scoring import aesthetic_quality, clip, subject_consistency
    from videodpo_ray.scoring.amt import AMT_S_CONFIG, AMTS
    from videodpo_ray.scoring.musiq import MUSIQ, MUSIQ_SPAQ_CONFIG
    from videodpo_ray.scoring.viclip import VICLIP_L14_CONFIG, ViCLIP

    builders = {
        "subject_consistency": lambda: subject_consistency.build_model(subject_consistency.VIT_BASE_PATCH16_224),
        "background_consistency": lambda: clip.image_tower("ViT-B/32"),
        "temporal_flickering": lambda: None,
        "motion_smoothness": lambda: AMTS(AMT_S_CONFIG),
        "dynamic_degree": lambda: raft_large(),
        "aesthetic_quality": lambda: aesthetic_quality.AestheticModel(
            clip.image_tower("ViT-L/14"), torch.nn.Linear(768, 1)
        ),
        "imaging_quality": lambda: MUSIQ(MUSIQ_SPAQ_CONFIG),
        "overall_consistency": lambda: ViCLIP(VICLIP_L14_CONFIG),
        "clip_score": lambda: clip.full_clip("ViT-B/32"),
    }
    return builders[name]()


def compare_batching(clips: list[np.ndarray]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray CPU actor (OMP_NUM_THREADS=1); stable on a shared machine
    print(f"CPU (1 thread), tiny models, {len(clips)} videos of {clips[0].shape}: videos/s")
    print(f"{'dimension':24s} {'one by one':>11s} {'batched':>9s} {'speed-up':>9s}")
    for name in SCORERS:
        model = load_scorer_model(name, ModelSpec(tiny=True))
        batched(name, clips[:2], model)  # warm-up
        single_s = seconds(lambda: one_by_one(name, clips, model))
        batch_s = seconds(lambda: batched(name, clips, model))
        note = "" if batch_s < single_s else "  (batched NOT faster)"
        print(f"{name:24s} {len(clips) / single_s:11.2f} {len(clips) / batch_s:9.2f} {single_s / batch_s:8.2f}x{note}")
    torch.set_num_threads(threads)


def full_size_throughput(clips: list[np.ndarray]) -> None:
    print(f"\nCUDA ({torch.cuda.get_device_name()}), real-size models, {len(clips)} videos of {clips[0].shape}")
    print(f"{'dimension':24s} {'dtype':>9s} {'videos/s':>9s}")
    for name in SCORERS:
        model = place_model(name, full_size_model(name), "cuda")
        batched(name, clips[:2], model)  # warm-up
        elapsed = seconds(lambda model=model: batched(name, clips, model), repeats=2)
        dtype = "-" if model is None else str(next(model.parameters()).dtype).removeprefix("torch.")
        print(f"{name:24s} {dtype:>9s} {len(clips) / elapsed:9.2f}")
        del model
        torch.cuda.empty_cache()


def main() -> None:
    torch.set_grad_enabled(False)
    compare_batching(videos(count=16, frames=8, height=32, width=48))
    if torch.cuda.is_available():
        full_size_throughput(videos(count=8, frames=16, height=320, width=512))
    else:
        print("\nno CUDA device: full-size throughput skipped")


if __name__ == "__main__":
    main()
