"""Motion smoothness (VBench): how well AMT-S frame interpolation predicts each odd frame from its even neighbours.

The even frames 0, 2, 4, ... are interpolated pairwise at t = 1/2 (AMT-S, as VBench: replicate-padded to multiples
of 16, prediction truncated to uint8); midpoint k is compared with the real frame 2k + 1:

    score = (255 - mean_k mean |frame_{2k+1} - midpoint_k|) / 255

Weights: the ORIGINAL `amt-s.pth` (``{"state_dict": ...}``), loaded strictly. AMT runs in float32 only, as in VBench.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from videodpo_ray.scoring import ModelSpec
from videodpo_ray.scoring.amt import AMT_LICENSE, AMTS, TINY_AMT_CONFIG, interpolate_midpoints, load_amt
from videodpo_ray.scoring.preprocessing import check_frames, check_padded_size, encode_in_batches
from videodpo_ray.scoring.weights import ModelInfo, seeded

NAME = "motion_smoothness"
MODELS = (
    ModelInfo(
        name="AMT-S (amt-s.pth)",
        licence=AMT_LICENSE,
        source="https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth (MCG-NKU/AMT, as VBench downloads it)",
    ),
)
CUDA_DTYPE = torch.float32
PAIRS_PER_CALL = 8


def tiny_model() -> AMTS:
    return seeded(lambda: AMTS(TINY_AMT_CONFIG))


def load_model(spec: ModelSpec) -> AMTS:
    """AMT-S with the original `amt-s.pth` (path or fsspec URL; its "state_dict" entry), loaded strictly."""
    return load_amt(spec.weights)


def place(model: AMTS, device: torch.device, dtype: torch.dtype) -> AMTS:
    """AMT-S only runs in float32 (its correlation lookup is float32, as in the original)."""
    if dtype != torch.float32:
        raise ValueError(f"{NAME}: AMT-S runs in float32 only, got dtype {dtype} (set models.{NAME}.dtype: float32)")
    return model.to(device=device, dtype=torch.float32)


def smoothness(odd_frames: np.ndarray, midpoints: np.ndarray) -> float:
    """(255 - mean over k of mean |odd_k - midpoint_k|) / 255 on uint8 frames (N, H, W, 3), in float64."""
    if odd_frames.shape != midpoints.shape:
        raise ValueError(f"smoothness: odd frames {odd_frames.shape} and midpoints {midpoints.shape} differ in shape")
    per_frame = np.abs(odd_frames.astype(np.int16) - midpoints.astype(np.int16)).mean(axis=(1, 2, 3), dtype=np.float64)
    return float((255.0 - per_frame.mean()) / 255.0)


def even_pairs(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, 2, H, W, 3): the pairs (0, 2), (2, 4), ... of even frames whose midpoints are interpolated."""
    even = torch.from_numpy(np.ascontiguousarray(frames[0::2]))
    return torch.stack([even[:-1], even[1:]], dim=1)


def midpoints_batch(videos: Sequence[np.ndarray], model: AMTS) -> list[np.ndarray]:
    """AMT midpoints (N_i, H, W, 3) uint8 of every even pair of every video (videos of equal size batched)."""
    for frames in videos:
        check_frames(frames, min_frames=3)
        check_padded_size(frames, 16, model.min_size, "AMT-S")

    def interpolate(pairs: torch.Tensor) -> torch.Tensor:
        return interpolate_midpoints(model, pairs[:, 0], pairs[:, 1])

    outputs = encode_in_batches([even_pairs(frames) for frames in videos], interpolate, PAIRS_PER_CALL)
    return [midpoints.numpy() for midpoints in outputs]


def score_batch(videos: Sequence[np.ndarray], model: AMTS, prompts=None, fps=None) -> list[float]:
    midpoints = midpoints_batch(videos, model)
    return [smoothness(frames[1::2][: len(mids)], mids) for frames, mids in zip(videos, midpoints)]


def score(frames: np.ndarray, model: AMTS, prompt: str | None = None, fps: float | None = None) -> float:
    return score_batch([frames], model)[0]
