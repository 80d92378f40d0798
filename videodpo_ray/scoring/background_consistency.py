"""Background consistency (VBench): consistency of CLIP ViT-B/32 image embeddings across frames."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from transformers import CLIPVisionModelWithProjection

from videodpo_ray.scoring import ModelSpec
from videodpo_ray.scoring.clip import INFO, image_embeddings, image_tower, load_image_tower
from videodpo_ray.scoring.consistency import consistency
from videodpo_ray.scoring.preprocessing import check_frames

NAME = "background_consistency"
VARIANT = "ViT-B/32"
MODELS = (INFO[VARIANT],)
CUDA_DTYPE = torch.float16


def tiny_model() -> CLIPVisionModelWithProjection:
    return image_tower("tiny/32")


def load_model(spec: ModelSpec) -> CLIPVisionModelWithProjection:
    """CLIP ViT-B/32 image tower from a HF CLIP checkpoint (file, folder, fsspec or hf:// URL), loaded strictly."""
    return load_image_tower(VARIANT, spec.weights)


def score_batch(
    videos: Sequence[np.ndarray], model: CLIPVisionModelWithProjection, prompts=None, fps=None
) -> list[float]:
    for frames in videos:
        check_frames(frames, min_frames=2)
    return [consistency(embeddings) for embeddings in image_embeddings(videos, model)]


def score(
    frames: np.ndarray, model: CLIPVisionModelWithProjection, prompt: str | None = None, fps: float | None = None
) -> float:
    return score_batch([frames], model)[0]
