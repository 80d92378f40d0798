"""Dynamic degree: how much of a video moves, from RAFT optical flow between frames sampled at ~8 fps.

Two outputs from the same flows:
- `dynamic_degree` (OmniScore): the fraction of frame pairs whose motion exceeds the threshold;
- `dynamic_degree_vbench` (VBench): 1.0 if at least round(4 n / 16) pairs exceed it (n sampled frames), else 0.0.
Motion of a pair = mean of the top 5% flow magnitudes (on the flow of the frames padded to multiples of 8, as VBench
computes it); threshold = 6 * min(H, W) / 256.

Weights: torchvision's `raft_large` C_T_V1 file (the original raft-things weights), path or URL.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.optical_flow import RAFT, Raft_Large_Weights, raft_large
from torchvision.models.optical_flow._utils import make_coords_grid, upsample_flow
from torchvision.models.optical_flow.raft import MaskPredictor, ResidualBlock, _raft

from videodpo_ray.dimensions import VBENCH_OUTPUTS
from videodpo_ray.errors import VideoTooShortError
from videodpo_ray.scoring import ModelSpec
from videodpo_ray.scoring.preprocessing import check_frames, check_padded_size, encode_in_batches, frames_to_tensor
from videodpo_ray.scoring.weights import ModelInfo, device_dtype, load_filtered, load_state_dict, seeded

NAME = "dynamic_degree"
VBENCH_NAME = VBENCH_OUTPUTS[NAME]
OUTPUTS = (NAME, VBENCH_NAME)
MODELS = (
    ModelInfo(
        name="RAFT large (raft-things; torchvision Raft_Large_Weights.C_T_V1)",
        licence="BSD-3-Clause",
        source=Raft_Large_Weights.C_T_V1.url,
    ),
)
CUDA_DTYPE = torch.float32
FLOW_UPDATES = 20
TARGET_FPS = 8.0
TOP_FRACTION = 0.05
PAIRS_PER_CALL = 32


def frame_interval(fps: float) -> int:
    """Keep every `interval`-th frame: round(fps / 8), at least 1 (VBench)."""
    return max(1, round(fps / TARGET_FPS))


def motion_threshold(height: int, width: int) -> float:
    """Flow magnitude above which a frame pair counts as moving: 6 * min(H, W) / 256."""
    return 6.0 * min(height, width) / 256.0


def top_magnitude(flows: torch.Tensor) -> torch.Tensor:
    """Mean of the largest int(H * W * 0.05) flow magnitudes of each flow field (N, 2, H, W) -> (N,) float64."""
    magnitudes = flows.double().square().sum(dim=1).sqrt().flatten(1)
    count = int(magnitudes.shape[1] * TOP_FRACTION)
    if count == 0:
        raise VideoTooShortError(f"flow of {tuple(flows.shape[-2:])} pixels is too small for a top-5% mean")
    return magnitudes.topk(count, dim=1).values.mean(dim=1)


def motion_outputs(magnitudes: Sequence[float], height: int, width: int) -> dict[str, float]:
    """Both dynamic-degree outputs from per-pair motions of a video with frames of (height, width)."""
    if len(magnitudes) == 0:
        raise VideoTooShortError(f"{NAME} needs at least 2 frames after ~{TARGET_FPS:g} fps sampling")
    threshold = motion_threshold(height, width)
    moving = sum(float(m) > threshold for m in magnitudes)
    sampled_frames = len(magnitudes) + 1
    return {NAME: moving / len(magnitudes), VBENCH_NAME: float(moving >= round(4 * sampled_frames / 16))}


def min_raft_side(model: RAFT) -> int:
    """Smallest padded side torchvision's RAFT takes: its 1/8-resolution features pooled num_levels - 1 times must
    keep 2 px (the original RAFT, which VBench runs, takes half of that: 64 px for raft-things)."""
    return 8 * 2 * 2 ** (model.corr_block.num_levels - 1)


def pad_to_multiple_of_8(images: torch.Tensor) -> torch.Tensor:
    """RAFT's InputPadder ("sintel" mode): replicate-pad H and W up to multiples of 8, split evenly."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % 8, -width % 8
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], mode="replicate")


def final_flow(model: RAFT, image1: torch.Tensor, image2: torch.Tensor, num_flow_updates: int) -> torch.Tensor:
    """`model(image1, image2, num_flow_updates)[-1]`, computed like the original RAFT's test mode: torchvision's
    forward upsamples the flow after every update (for training losses); only the last one is needed here."""
    batch_size, _, height, width = image1.shape
    if height % 8 or width % 8:
        raise ValueError(f"RAFT input sides must be multiples of 8, got {height}x{width}")
    fmap1, fmap2 = model.feature_encoder(torch.cat([image1, image2], dim=0)).chunk(2, dim=0)
    model.corr_block.build_pyramid(fmap1, fmap2)
    hidden_size = model.update_block.hidden_state_size
    context_out = model.context_encoder(image1)
    hidden_state, context = context_out.split([hidden_size, context_out.shape[1] - hidden_size], dim=1)
    hidden_state, context = torch.tanh(hidden_state), F.relu(context)
    coords0 = make_coords_grid(batch_size, height // 8, width // 8).to(fmap1.device)
    coords1 = coords0.clone()
    for _ in range(num_flow_updates):
        corr_features = model.corr_block.index_pyramid(centroids_coords=coords1)
        hidden_state, delta_flow = model.update_block(hidden_state, context, corr_features, coords1 - coords0)
        coords1 = coords1 + delta_flow
    up_mask = None if model.mask_predictor is None else model.mask_predictor(hidden_state)
    return upsample_flow(flow=coords1 - coords0, up_mask=up_mask)


def pair_motion(model: RAFT, pairs: torch.Tensor) -> torch.Tensor:
    """Top-5% flow magnitude (N,) of frame pairs (N, 2, 3, H, W) in 0..255, via RAFT with 20 updates."""
    images = 2.0 * (pad_to_multiple_of_8(pairs.flatten(0, 1)).unflatten(0, (-1, 2)) / 255.0) - 1.0
    return top_magnitude(final_flow(model, images[:, 0], images[:, 1], FLOW_UPDATES))


def sampled_pairs(frames: np.ndarray, fps: float, device: torch.device) -> torch.Tensor:
    """Consecutive pairs (P, 2, 3, H, W), float 0..255, of the frames kept at ~8 fps."""
    kept = frames_to_tensor(frames[:: frame_interval(fps)], device)
    return torch.stack([kept[:-1], kept[1:]], dim=1)


def score_outputs_batch(
    videos: Sequence[np.ndarray], model: RAFT, prompts=None, fps: Sequence[float | None] | None = None
) -> list[dict[str, float]]:
    if fps is None or any(rate is None or rate <= 0 for rate in fps):
        raise ValueError(f"{NAME} needs the frame rate of every video, got {fps}")
    for frames in videos:
        check_frames(frames, min_frames=2)
        check_padded_size(frames, 8, min_raft_side(model), "RAFT")
    device, _ = device_dtype(model)
    pairs = (sampled_pairs(frames, rate, device) for frames, rate in zip(videos, fps))
    with torch.inference_mode():
        motions = encode_in_batches(pairs, lambda chunk: pair_motion(model, chunk), PAIRS_PER_CALL)
    return [motion_outputs(m.tolist(), *frames.shape[1:3]) for m, frames in zip(motions, videos)]


def score_batch(videos: Sequence[np.ndarray], model: RAFT, prompts=None, fps=None) -> list[float]:
    """The OmniScore rate of each video."""
    return [outputs[NAME] for outputs in score_outputs_batch(videos, model, fps=fps)]


def score(frames: np.ndarray, model: RAFT, prompt: str | None = None, fps: float | None = None) -> float:
    return score_batch([frames], model, fps=[fps])[0]


TINY = dict(
    feature_encoder_layers=(8, 8, 8, 8, 16), feature_encoder_block=ResidualBlock,
    feature_encoder_norm_layer=torch.nn.InstanceNorm2d,
    context_encoder_layers=(8, 8, 8, 8, 24), context_encoder_block=ResidualBlock,
    context_encoder_norm_layer=torch.nn.BatchNorm2d,
    corr_block_num_levels=2, corr_block_radius=1,
    motion_encoder_corr_layers=(8, 8), motion_encoder_flow_layers=(8, 8), motion_encoder_out_channels=16,
    recurrent_block_hidden_state_size=16, recurrent_block_kernel_size=((1, 5), (5, 1)),
    recurrent_block_padding=((0, 2), (2, 0)), flow_head_hidden_size=16, use_mask_predictor=True,
)


def tiny_model() -> RAFT:
    """torchvision RAFT with tiny encoders / update block (random init)."""
    return seeded(lambda: _raft(**TINY, mask_predictor=MaskPredictor(in_channels=16, hidden_size=16, multiplier=0.25)))


def load_model(spec: ModelSpec) -> RAFT:
    """torchvision raft_large with the C_T_V1 weights file (path, fsspec or https URL), loaded strictly."""
    return load_filtered(raft_large(weights=None), load_state_dict(spec.weights), f"{NAME} weights {spec.weights}")
