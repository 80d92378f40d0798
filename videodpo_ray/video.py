"""mp4 (h264, yuv420p) encoding and decoding in memory with PyAV, and the frame-sampling rules the scorers use."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import torch

from videodpo_ray.errors import VideoDecodeError
from videodpo_ray.video_format import CODEC, DEFAULT_CRF, DEFAULT_MACROBLOCK_TREE, DEFAULT_PRESET, PIXEL_FORMAT


def encode_mp4(
    frames: torch.Tensor | np.ndarray,
    fps: int,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    macroblock_tree: bool = DEFAULT_MACROBLOCK_TREE,
) -> bytes:
    """Encode uint8 RGB frames (T, H, W, 3) as an h264 / yuv420p mp4 and return its bytes.

    crf 17 keeps smooth generated clips above ~40 dB PSNR; H and W must be even (yuv420p halves chroma). The output
    is deterministic for the same frames and settings because x264's macroblock-tree rate control is off by default:
    its AVX-512 code gives some clips, 32x32 to 480x832, different bytes from one encode to the next (a rerun then
    rescored them). Off, a 320x512 clip's file is 1.4x (noisy) to 2.9x (smooth) larger at the same crf, and no
    worse (`benchmarks/video.py`).
    """
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.dtype != np.uint8:
        raise ValueError(f"encode_mp4: frames must be uint8, got {array.dtype}")
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"encode_mp4: frames must have shape (T, H, W, 3), got {tuple(array.shape)}")
    num_frames, height, width, _ = array.shape
    if num_frames == 0:
        raise ValueError("encode_mp4: no frames to encode")
    if height % 2 or width % 2:
        raise ValueError(f"encode_mp4: h264 yuv420p needs even height and width, got {height}x{width} (crop or pad)")
    if not isinstance(fps, int) or isinstance(fps, bool) or fps <= 0:
        raise ValueError(f"encode_mp4: fps must be a positive int, got {fps!r}")

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, PIXEL_FORMAT
        stream.time_base = Fraction(1, fps)
        stream.options = {"crf": str(crf), "preset": preset, "x264-params": f"mbtree={int(macroblock_tree)}"}
        for frame in np.ascontiguousarray(array):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def encode_gif(frames: torch.Tensor | np.ndarray, fps: int) -> bytes:
    """Encode uint8 RGB frames (T, H, W, 3) as a looping animated GIF (for galleries; lossy palette)."""
    from PIL import Image

    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or len(array) == 0:
        raise ValueError(f"encode_gif: expected uint8 frames (T, H, W, 3), got {array.dtype} {tuple(array.shape)}")
    images = [Image.fromarray(frame) for frame in array]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buffer.getvalue()


def decode_mp4(data: bytes, name: str = "<mp4 bytes>") -> tuple[torch.Tensor, float]:
    """Decode mp4 bytes into (uint8 frames (T, H, W, 3), the stream's exact frame rate: 59.94, not 60, which
    dynamic degree's ~8 fps sampling tells apart).

    Raises VideoDecodeError naming `name` for empty, corrupt or truncated data (fewer frames than the container
    declares) and for files without a video stream.
    """
    if not data:
        raise VideoDecodeError(f"{name}: empty video data (0 bytes)")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{name}: no video stream in the container")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            declared = stream.frames
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except av.FFmpegError as error:
        raise VideoDecodeError(f"{name}: cannot decode mp4 ({error.strerror or error})") from error
    if not frames:
        raise VideoDecodeError(f"{name}: the video stream has no decodable frames")
    if declared and len(frames) < declared:
        raise VideoDecodeError(f"{name}: truncated video, decoded {len(frames)} of {declared} frames")
    if not rate:
        raise VideoDecodeError(f"{name}: the video stream has no frame rate")
    return torch.from_numpy(np.stack(frames)), float(rate)


def middle_indices(num_frames: int, n: int) -> list[int]:
    """VBench "middle" sampling: split [0, num_frames) into n equal intervals and take the middle of each.

    intervals = linspace(0, T, n + 1) truncated to ints; index_i = (start_i + end_i - 1) // 2. Like VBench, n is
    capped at num_frames (a 4-frame clip yields 4 indices for n = 8).
    """
    if num_frames <= 0 or n <= 0:
        raise ValueError(f"middle_indices: num_frames and n must be positive, got {num_frames} and {n}")
    count = min(n, num_frames)
    bounds = np.linspace(0, num_frames, count + 1).astype(int)
    return [int(start + end - 1) // 2 for start, end in zip(bounds[:-1], bounds[1:])]


def stride_indices(num_frames: int, stride: int) -> list[int]:
    """Every `stride`-th frame starting at 0 (e.g. stride round(fps / 8) subsamples to ~8 fps)."""
    if num_frames <= 0 or stride <= 0:
        raise ValueError(f"stride_indices: num_frames and stride must be positive, got {num_frames} and {stride}")
    return list(range(0, num_frames, stride))
