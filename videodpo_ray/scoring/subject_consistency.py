"""Subject consistency (VBench): consistency of DINO ViT-B/16 CLS features across frames.

Weights: the ORIGINAL DINO checkpoint `dino_vitbase16_pretrain.pth` (its keys are timm's ViT keys; loaded strictly).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from videodpo_ray.scoring import ModelSpec
from videodpo_ray.scoring.consistency import consistency
from videodpo_ray.scoring.preprocessing import check_frames, dino_transform, encode_in_batches, frames_to_tensor
from videodpo_ray.scoring.weights import ModelInfo, device_dtype, load_filtered, load_state_dict, seeded

NAME = "subject_consistency"
MODELS = (
    ModelInfo(
        name="DINO ViT-B/16 (dino_vitbase16_pretrain.pth)",
        licence="Apache-2.0",
        source="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    ),
)
CUDA_DTYPE = torch.float32
FRAMES_PER_CALL = 32

VIT_BASE_PATCH16_224 = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
"""timm `vit_base_patch16_224`'s architecture arguments (= DINO's `vit_base`, patch 16)."""
TINY = dict(img_size=224, patch_size=16, embed_dim=24, depth=1, num_heads=2, mlp_ratio=2.0)


def dino_pos_embed(pos_embed: torch.Tensor, grid_height: int, grid_width: int) -> torch.Tensor:
    """Position embeddings (1, 1 + N, C) resampled to a (grid_height, grid_width) patch grid as the original DINO
    code does: bicubic with scale factors (grid + 0.1) / sqrt(N), class token kept.

    DINO also resamples when the grid is unchanged but the input is not square (inputs of aspect < 240/224 after
    the 224 resize); here an unchanged grid keeps the table as is.
    """
    num_patches = pos_embed.shape[1] - 1
    side = math.sqrt(num_patches)
    if (grid_height, grid_width) == (side, side):
        return pos_embed
    dim = pos_embed.shape[-1]
    patch_pos = pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
        patch_pos,
        scale_factor=((grid_height + 0.1) / side, (grid_width + 0.1) / side),
        mode="bicubic",
    )
    if patch_pos.shape[-2:] != (grid_height, grid_width):
        raise RuntimeError(
            f"position embedding resampled to {tuple(patch_pos.shape[-2:])}, wanted {grid_height, grid_width}"
        )
    return torch.cat([pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


class DinoVisionTransformer(VisionTransformer):
    """timm VisionTransformer (dynamic image size, CLS output) behaving like the original DINO ViT: inputs whose
    sides are not multiples of the patch size lose their bottom / right remainder (DINO's strided conv drops it) and
    position embeddings are interpolated the DINO way."""

    def forward_features(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        patch_height, patch_width = self.patch_embed.patch_size
        height, width = x.shape[-2:]
        return super().forward_features(
            x[..., : height - height % patch_height, : width - width % patch_width], **kwargs
        )

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        batch, grid_height, grid_width, dim = x.shape
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
        return self.pos_drop(tokens + dino_pos_embed(self.pos_embed, grid_height, grid_width))


def build_model(architecture: dict) -> DinoVisionTransformer:
    """A randomly initialised DINO ViT with the given timm architecture arguments; no classifier head."""
    return DinoVisionTransformer(**architecture, num_classes=0, dynamic_img_size=True)


def tiny_model() -> DinoVisionTransformer:
    return seeded(lambda: build_model(TINY))


def load_dino(location: str, architecture: dict = VIT_BASE_PATCH16_224) -> DinoVisionTransformer:
    """A DINO ViT with an original DINO checkpoint (path, fsspec URL or hf:// URL), loaded strictly."""
    return load_filtered(build_model(architecture), load_state_dict(location), f"{NAME} weights {location}")


def load_model(spec: ModelSpec) -> DinoVisionTransformer:
    """ViT-B/16 with DINO's `dino_vitbase16_pretrain.pth`."""
    return load_dino(spec.weights)


def frame_features(videos: Sequence[np.ndarray], model: DinoVisionTransformer) -> list[torch.Tensor]:
    """CLS features (T_i, D) of every frame of every video (DINO transform, videos of equal size batched)."""
    device, dtype = device_dtype(model)
    inputs = (dino_transform(frames_to_tensor(frames, device)).to(dtype) for frames in videos)
    with torch.inference_mode():
        return encode_in_batches(inputs, model, FRAMES_PER_CALL)


def score_batch(videos: Sequence[np.ndarray], model: DinoVisionTransformer, prompts=None, fps=None) -> list[float]:
    for frames in videos:
        check_frames(frames, min_frames=2)
    return [consistency(features) for features in frame_features(videos, model)]


def score(
    frames: np.ndarray, model: DinoVisionTransformer, prompt: str | None = None, fps: float | None = None
) -> float:
    return score_batch([frames], model)[0]
