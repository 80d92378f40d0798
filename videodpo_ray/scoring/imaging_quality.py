"""Imaging quality (VBench): MUSIQ trained on SPAQ, per frame, averaged, divided by 100.

Frames are float 0..255 (VBench's loader); a frame whose longer side exceeds 512 is resized to
(int(s * H), int(s * W)) with s = 512 / max(H, W) (bilinear, no antialias: VBench's default "longer" mode); /255;
MUSIQ gives a MOS in 0..100 per frame; score = mean over frames / 100.

Weights: pyiqa's ORIGINAL `musiq_spaq_ckpt-358bb6af.pth` (a flat state dict), loaded strictly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from videodpo_ray.scoring import ModelSpec
from videodpo_ray.scoring.musiq import MUSIQ, MUSIQ_LICENSE, TINY_MUSIQ_CONFIG, load_musiq
from videodpo_ray.scoring.preprocessing import encode_in_batches, frames_to_tensor
from videodpo_ray.scoring.weights import ModelInfo, device_dtype, seeded

NAME = "imaging_quality"
MODELS = (
    ModelInfo(
        name="MUSIQ trained on SPAQ (musiq_spaq_ckpt-358bb6af.pth)",
        licence=MUSIQ_LICENSE,
        source="https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/musiq_spaq_ckpt-358bb6af.pth",
    ),
)
CUDA_DTYPE = torch.float32
MAX_SIDE = 512
FRAMES_PER_CALL = 16


def tiny_model() -> MUSIQ:
    return seeded(lambda: MUSIQ(TINY_MUSIQ_CONFIG))


def load_model(spec: ModelSpec) -> MUSIQ:
    """MUSIQ with pyiqa's `musiq_spaq_ckpt-358bb6af.pth` (path or fsspec URL), loaded strictly."""
    return load_musiq(spec.weights)


def resize_longer_side(frames: torch.Tensor, max_side: int = MAX_SIDE) -> torch.Tensor:
    """Float (T, 3, H, W): unchanged if max(H, W) <= max_side, else resized to (int(s H), int(s W)),
    s = max_side / max(H, W)."""
    height, width = frames.shape[-2:]
    if max(height, width) <= max_side:
        return frames
    scale = max_side / max(height, width)
    size = [int(scale * height), int(scale * width)]
    return TF.resize(frames, size, interpolation=InterpolationMode.BILINEAR, antialias=False)


def frame_mos(videos: Sequence[np.ndarray], model: MUSIQ) -> list[torch.Tensor]:
    """MUSIQ MOS (T_i,) float32 of every frame of every video (videos of equal size batched)."""
    device, dtype = device_dtype(model)
    inputs = [(resize_longer_side(frames_to_tensor(frames, device)) / 255.0).to(dtype) for frames in videos]
    with torch.inference_mode():
        return [mos.float() for mos in encode_in_batches(inputs, model, FRAMES_PER_CALL)]


def score_batch(videos: Sequence[np.ndarray], model: MUSIQ, prompts=None, fps=None) -> list[float]:
    return [mos.double().mean().item() / 100.0 for mos in frame_mos(videos, model)]


def score(frames: np.ndarray, model: MUSIQ, prompt: str | None = None, fps: float | None = None) -> float:
    return score_batch([frames], model)[0]
