"""Overall consistency (VBench): ViCLIP text-video cosine similarity.

8 frames sampled "middle" (padded with the last index when the video is shorter, as VBench's `get_frame_indices`),
CLIP transform at the model's input resolution on uint8 frames as VBench's decord loader gives them: the bicubic
resize output is clamped and rounded to integers (torchvision's float path; its native CPU uint8 bicubic kernel
gives different values); score = cos(video embedding, text embedding) (plain cosine, not x100).

Weights: the ORIGINAL `ViClip-InternVid-10M-FLT.pth` (``{"model": ...}``), loaded strictly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from videodpo_ray.scoring import ModelSpec
from videodpo_ray.scoring.preprocessing import check_frames, clip_transform, encode_in_batches
from videodpo_ray.scoring.viclip import TINY_VICLIP_CONFIG, VICLIP_LICENSE, ViCLIP, load_viclip, tokenize
from videodpo_ray.scoring.weights import ModelInfo, device_dtype, seeded
from videodpo_ray.video import middle_indices

NAME = "overall_consistency"
MODELS = (
    ModelInfo(
        name="ViCLIP-L/14 InternVid-10M-FLT (ViClip-InternVid-10M-FLT.pth)",
        licence=VICLIP_LICENSE,
        source="https://huggingface.co/OpenGVLab/ViCLIP "
        "(pjlab-gvm-data.oss-cn-shanghai.aliyuncs.com/internvideo/viclip/)",
    ),
)
CUDA_DTYPE = torch.float32
NUM_FRAMES = 8
VIDEOS_PER_CALL = 8


def tiny_model() -> ViCLIP:
    return seeded(lambda: ViCLIP(TINY_VICLIP_CONFIG))


def load_model(spec: ModelSpec) -> ViCLIP:
    """ViCLIP-L/14 with the original `ViClip-InternVid-10M-FLT.pth` (path or fsspec URL; its "model" entry)."""
    return load_viclip(spec.weights)


def frame_indices(num_frames: int, count: int = NUM_FRAMES) -> list[int]:
    """VBench "middle" sampling of `count` frames, padded with the last index when the video is shorter."""
    indices = middle_indices(num_frames, count)
    return indices + [indices[-1]] * (count - len(indices))


def resize_rounded(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> float (T, 3, h, w): short side to `size` (bicubic, no antialias), clamped to 0..255 and
    rounded as torchvision rounds a uint8 image (the CLIP transform's own resize is then a no-op)."""
    resized = TF.resize(frames.float(), [size], interpolation=InterpolationMode.BICUBIC, antialias=False)
    return resized.clamp_(0, 255).round_()


def video_embeddings(videos: Sequence[np.ndarray], model: ViCLIP) -> torch.Tensor:
    """L2-normalised ViCLIP video embeddings (B, D), float32."""
    device, dtype = device_dtype(model)
    size = model.config.vision.input_resolution
    clips = []
    for frames in videos:
        check_frames(frames)
        sampled = torch.from_numpy(np.ascontiguousarray(frames[frame_indices(len(frames))])).to(device)
        clips.append(clip_transform(resize_rounded(sampled.permute(0, 3, 1, 2), size), size).to(dtype)[None])
    with torch.inference_mode():
        embeddings = torch.cat(encode_in_batches(clips, model.encode_vision, VIDEOS_PER_CALL))
    return F.normalize(embeddings.float(), dim=-1)


def text_embeddings(prompts: Sequence[str], model: ViCLIP) -> torch.Tensor:
    """L2-normalised ViCLIP text embeddings (B, D), float32 (CLIP BPE, context length 32)."""
    device, _ = device_dtype(model)
    tokens = tokenize(prompts, model.config.text.context_length).to(device)
    with torch.inference_mode():
        return F.normalize(model.encode_text(tokens).float(), dim=-1)


def score_batch(
    videos: Sequence[np.ndarray], model: ViCLIP, prompts: Sequence[str] | None = None, fps=None
) -> list[float]:
    if prompts is None or len(prompts) != len(videos) or any(p is None for p in prompts):
        raise ValueError(f"{NAME} needs one prompt per video, got {prompts!r} for {len(videos)} videos")
    similarity = (video_embeddings(videos, model) * text_embeddings(prompts, model)).sum(dim=-1)
    return similarity.tolist()


def score(frames: np.ndarray, model: ViCLIP, prompt: str | None = None, fps: float | None = None) -> float:
    return score_batch([frames], model, [prompt])[0]
