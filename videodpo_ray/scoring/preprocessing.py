"""VBench's frame preprocessing for the CLIP and DINO scorers, and batching frames of many videos through a model.

Frames enter as uint8 (T, H, W, 3) RGB and are converted to float32 0..255 without rounding (VBench's loader), then
resized on the model's device. Resizing follows torchvision's `Resize(224)`: the short side becomes 224 and the long
side int(224 * long / short).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from videodpo_ray.errors import VideoTooShortError
from videodpo_ray.video import middle_indices

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE = 224


def check_frames(frames: np.ndarray, min_frames: int = 1) -> None:
    """Raise ValueError unless `frames` is uint8 (T, H, W, 3); VideoTooShortError below `min_frames` frames."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        described = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"frames must be a uint8 array (T, H, W, 3), got {described}")
    if frames.shape[0] < min_frames:
        raise VideoTooShortError(f"need at least {min_frames} frames, got {frames.shape[0]}")


def check_padded_size(frames: np.ndarray, multiple: int, min_side: int, model: str) -> None:
    """VideoTooShortError (the video's row fails, not its batch) when a frame side padded up to a multiple of
    `multiple` is below `min_side` pixels, the smallest input `model` takes."""
    height, width = frames.shape[1:3]
    if min(-(-side // multiple) * multiple for side in (height, width)) < min_side:
        raise VideoTooShortError(f"frames of {height}x{width} pixels: {model} takes sides of at least {min_side} px "
                                 f"(padded to multiples of {multiple})")


def frames_to_tensor(frames: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (T, 3, H, W) in 0..255 on `device` (copied as uint8, converted there)."""
    check_frames(frames)
    return torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()


def clip_transform(frames: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """VBench clip_transform on float 0..255 (T, 3, H, W): short side to `size` (bicubic, no antialias), center
    crop `size`, /255, CLIP mean/std."""
    frames = TF.resize(frames, [size], interpolation=InterpolationMode.BICUBIC, antialias=False)
    frames = TF.center_crop(frames, [size, size])
    return TF.normalize(frames / 255.0, CLIP_MEAN, CLIP_STD)


def dino_transform(frames: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """VBench dino_transform on float 0..255 (T, 3, H, W): short side to `size` (bilinear, no antialias), no crop,
    /255, ImageNet mean/std."""
    frames = TF.resize(frames, [size], interpolation=InterpolationMode.BILINEAR, antialias=False)
    return TF.normalize(frames / 255.0, IMAGENET_MEAN, IMAGENET_STD)


def sample_middle(frames: np.ndarray, count: int) -> np.ndarray:
    """VBench's "middle" sampling: the middle frame of each of `count` equal intervals."""
    return frames[middle_indices(len(frames), count)]


def encode_in_batches(
    inputs: Iterable[torch.Tensor],
    encode: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
) -> list[torch.Tensor]:
    """Run `encode` over the items of several (N_i, ...) tensors, `batch_size` items a call.

    Items of consecutive inputs with the same item shape share calls (short videos fill a batch together); inputs
    may be a generator, consumed as batches fill, so only about one batch is held at a time. Returns one
    (N_i, ...) tensor per input, in input order.
    """
    outputs: list[list[torch.Tensor]] = []
    pending: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}

    def flush(shape: tuple[int, ...]) -> None:
        parts = pending.pop(shape)
        encoded = encode(torch.cat([items for _, items in parts]))
        for (index, items), result in zip(parts, encoded.split([len(items) for _, items in parts])):
            outputs[index].append(result)

    for index, tensor in enumerate(inputs):
        if len(tensor) == 0:
            raise ValueError(f"input {index} has no items to encode")
        outputs.append([])
        shape = tuple(tensor.shape[1:])
        start = 0
        while start < len(tensor):
            queue = pending.setdefault(shape, [])
            room = batch_size - sum(len(items) for _, items in queue)
            queue.append((index, tensor[start : start + room]))
            start += room
            if sum(len(items) for _, items in queue) == batch_size:
                flush(shape)
    for shape in list(pending):
        flush(shape)
    return [torch.cat(parts) for parts in outputs]
