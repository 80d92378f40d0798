"""Aesthetic quality (VBench): LAION aesthetic predictor (linear head on CLIP ViT-L/14 image embeddings), per frame.

Weights: `weights` = a HF CLIP ViT-L/14 checkpoint (file, folder, fsspec or hf:// URL); `head` = LAION's
`sa_0_4_vit_l_14_linear.pth` (keys `weight` (1, 768), `bias` (1,)).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModelWithProjection

from videodpo_ray.scoring import ModelSpec
from videodpo_ray.scoring.clip import INFO, VISION, image_embeddings, image_tower, load_image_tower
from videodpo_ray.scoring.preprocessing import check_frames
from videodpo_ray.scoring.weights import ModelInfo, load_filtered, load_state_dict, seeded

NAME = "aesthetic_quality"
VARIANT = "ViT-L/14"
MODELS = (
    INFO[VARIANT],
    ModelInfo(
        name="LAION aesthetic predictor linear head (sa_0_4_vit_l_14_linear.pth)",
        licence="MIT",
        source="https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth",
    ),
)
CUDA_DTYPE = torch.float16


class AestheticModel(torch.nn.Module):
    """CLIP image tower + LAION linear head on its L2-normalised embedding (the head stays float32, as in VBench)."""

    def __init__(self, clip: CLIPVisionModelWithProjection, head: torch.nn.Linear):
        super().__init__()
        self.clip = clip
        self.head = head

    def rate(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Aesthetic rating 0..10 (N,) of CLIP image embeddings (N, P)."""
        return self.head(F.normalize(embeddings.float(), dim=-1)).squeeze(-1)


def _head(projection_dim: int) -> torch.nn.Linear:
    return torch.nn.Linear(projection_dim, 1)


def tiny_model() -> AestheticModel:
    return AestheticModel(image_tower("tiny/32"), seeded(lambda: _head(VISION["tiny/32"]["projection_dim"])))


def load_head(location: str, projection_dim: int = VISION[VARIANT]["projection_dim"]) -> torch.nn.Linear:
    """LAION's linear head (`weight` (1, 768), `bias` (1,)) from a path or fsspec URL, loaded strictly."""
    return load_filtered(_head(projection_dim), load_state_dict(location), f"{NAME} head {location}")


def load_model(spec: ModelSpec) -> AestheticModel:
    if not spec.head:
        raise ValueError(f"{NAME}: set models.{NAME}.head to the LAION head (sa_0_4_vit_l_14_linear.pth)")
    return AestheticModel(load_image_tower(VARIANT, spec.weights), load_head(spec.head))


def place(model: AestheticModel, device: torch.device, dtype: torch.dtype) -> AestheticModel:
    model.clip.to(device=device, dtype=dtype)
    model.head.to(device=device, dtype=torch.float32)
    return model


def score_batch(videos: Sequence[np.ndarray], model: AestheticModel, prompts=None, fps=None) -> list[float]:
    """Mean over all frames of head(normalised CLIP embedding) / 10, per video."""
    for frames in videos:
        check_frames(frames)
    with torch.inference_mode():
        return [(model.rate(embeddings) / 10).mean().item() for embeddings in image_embeddings(videos, model.clip)]


def score(frames: np.ndarray, model: AestheticModel, prompt: str | None = None, fps: float | None = None) -> float:
    return score_batch([frames], model)[0]
