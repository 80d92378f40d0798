"""CLIP score: mean over frames of the cosine between CLIP ViT-B/32 image and prompt embeddings (not x100).

A cheap text-video alignment alternative to overall consistency (ViCLIP); not part of OmniScore.
Weights: a full HF CLIP ViT-B/32 checkpoint (both towers; the same file background consistency loads).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from videodpo_ray.scoring import ModelSpec
from videodpo_ray.scoring.clip import INFO, full_clip, image_embeddings, load_full_clip, text_embeddings
from videodpo_ray.scoring.preprocessing import check_frames

NAME = "clip_score"
VARIANT = "ViT-B/32"
MODELS = (INFO[VARIANT],)
CUDA_DTYPE = torch.float16


def tiny_model() -> CLIPModel:
    return full_clip("tiny/32")


def load_model(spec: ModelSpec) -> CLIPModel:
    return load_full_clip(VARIANT, spec.weights)


def score_batch(
    videos: Sequence[np.ndarray], model: CLIPModel, prompts: Sequence[str | None] | None = None, fps=None
) -> list[float]:
    if prompts is None or any(prompt is None for prompt in prompts):
        raise ValueError(f"{NAME} needs a prompt for every video")
    if len(prompts) != len(videos):
        raise ValueError(f"{NAME}: {len(videos)} videos but {len(prompts)} prompts")
    for frames in videos:
        check_frames(frames)
    texts = F.normalize(text_embeddings(prompts, model), dim=-1)
    return [
        (F.normalize(images, dim=-1) @ text).mean().item()
        for images, text in zip(image_embeddings(videos, model), texts)
    ]


def score(frames: np.ndarray, model: CLIPModel, prompt: str | None = None, fps: float | None = None) -> float:
    return score_batch([frames], model, prompts=[prompt])[0]
