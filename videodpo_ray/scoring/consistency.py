"""VBench's frame-to-frame consistency formula, shared by subject consistency (DINO) and background consistency
(CLIP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from videodpo_ray.errors import VideoTooShortError


def consistency(features: torch.Tensor) -> float:
    """Consistency of one video from per-frame features (T, D).

    f_i = features_i / |features_i|; for i >= 1: s_i = (max(0, cos(f_{i-1}, f_i)) + max(0, cos(f_0, f_i))) / 2;
    the score is the mean of s_i over the T - 1 frames after the first (VBench's per-video value; VideoDPO's
    reference divides the sum by 16 frames instead, a quirk not reproduced). Computed in float64.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise VideoTooShortError(f"consistency needs features (T >= 2, D), got shape {tuple(features.shape)}")
    unit = F.normalize(features.double(), dim=-1)
    to_previous = (unit[1:] * unit[:-1]).sum(-1).clamp(min=0)
    to_first = (unit[1:] @ unit[0]).clamp(min=0)
    return ((to_previous + to_first) / 2).mean().item()
