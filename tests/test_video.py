"""mp4 encode/decode round trips, decode failures, and the VBench frame-sampling rules."""

from __future__ import annotations

import io
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from videodpo_ray.errors import VideoDecodeError
from videodpo_ray.video import decode_mp4, encode_mp4, middle_indices, stride_indices


def smooth_clip(num_frames: int = 16, height: int = 64, width: int = 96) -> np.ndarray:
    """Slowly moving low-frequency colour waves, like a generated clip (uint8, (T, H, W, 3))."""
    t = np.arange(num_frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    red = 128 + 90 * np.sin(2 * np.pi * (x / width + t / num_frames))
    green = 128 + 90 * np.cos(2 * np.pi * (y / height - t / (2 * num_frames)))
    blue = 128 + 60 * np.sin(2 * np.pi * (x + y) / (width + height) + t / 5)
    return np.stack(np.broadcast_arrays(red, green, blue), axis=-1).round().astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.mark.parametrize("fps", [8, 16, 24])
def test_round_trip_keeps_shape_fps_and_quality(fps: int) -> None:
    clip = smooth_clip()
    frames, decoded_fps = decode_mp4(encode_mp4(clip, fps=fps))
    assert frames.dtype == torch.uint8
    assert tuple(frames.shape) == clip.shape
    assert decoded_fps == fps
    assert psnr(frames.numpy(), clip) > 35.0


def test_encode_accepts_tensors_and_is_deterministic() -> None:
    clip = smooth_clip(num_frames=4, height=32, width=48)
    data = encode_mp4(torch.from_numpy(clip), fps=16)
    assert data == encode_mp4(clip, fps=16)
    assert data[4:8] == b"ftyp"  # an mp4 container


def noisy_clip(seed: int) -> np.ndarray:
    """A tiny clip of blurred colour blobs plus noise, like an untrained model's sample (16 x 32 x 32)."""
    generator = torch.Generator().manual_seed(seed)
    blobs = torch.nn.functional.interpolate(torch.rand(16, 3, 4, 4, generator=generator) * 255, size=(32, 32),
                                            mode="bilinear")
    clip = blobs + 6 * torch.randn(16, 3, 32, 32, generator=generator)
    return clip.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_encoding_the_same_clip_again_gives_the_same_bytes() -> None:
    # with x264's macroblock tree, its AVX-512 code encoded each of these clips up to 5 different ways in 40 encodes
    generator = random.Random(0)
    churn = []  # other allocations between encodes, as a sampler actor's work makes
    for seed in (0, 2, 6, 8):
        clip = noisy_clip(seed)
        encodings = set()
        for _ in range(40):
            churn.append(generator.randbytes(generator.randint(1, 50_000)))
            encodings.add(encode_mp4(clip, fps=8))
        assert len(encodings) == 1, f"clip {seed}"


def test_single_frame_round_trip() -> None:
    clip = smooth_clip(num_frames=1, height=16, width=16)
    frames, fps = decode_mp4(encode_mp4(clip, fps=4))
    assert tuple(frames.shape) == (1, 16, 16, 3) and fps == 4


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((2, 31, 64, 3), np.uint8), "even height and width, got 31x64"),
        (np.zeros((2, 32, 63, 3), np.uint8), "even height and width, got 32x63"),
        (np.zeros((2, 32, 64, 3), np.float32), "must be uint8"),
        (np.zeros((2, 32, 64), np.uint8), "(T, H, W, 3)"),
        (np.zeros((0, 32, 64, 3), np.uint8), "no frames"),
    ],
)
def test_encode_refuses_bad_frames(frames: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encode_mp4(frames, fps=8)


def test_encode_refuses_bad_fps() -> None:
    with pytest.raises(ValueError, match="fps must be a positive int"):
        encode_mp4(smooth_clip(2, 16, 16), fps=0)


def _corruptions(data: bytes) -> dict[str, bytes]:
    middle = len(data) // 2
    return {
        "empty": b"",
        "garbage": bytes(range(256)) * 8,
        "truncated to half": data[:middle],
        "only the header": data[:64],
        "zeroed middle": data[:middle] + b"\0" * 400 + data[middle + 400 :],
    }


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated to half", "only the header", "zeroed middle"])
def test_decode_errors_name_the_video(kind: str) -> None:
    data = encode_mp4(smooth_clip(), fps=16)
    with pytest.raises(VideoDecodeError, match="^winvideos/000007.mp4: "):
        decode_mp4(_corruptions(data)[kind], name="winvideos/000007.mp4")


def test_decode_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="empty video data"):
        decode_mp4(b"")


@pytest.mark.parametrize(
    ("num_frames", "n", "expected"),
    [
        # linspace(0, 16, 9) = 0, 2, ..., 16 -> (0 + 2 - 1) // 2 = 0, (2 + 4 - 1) // 2 = 2, ...
        (16, 8, [0, 2, 4, 6, 8, 10, 12, 14]),
        # linspace(0, 16, 4) = 0, 5.33, 10.67, 16 -> ints 0, 5, 10, 16 -> 2, 7, 12
        (16, 3, [2, 7, 12]),
        # linspace(0, 10, 5) = 0, 2.5, 5, 7.5, 10 -> ints 0, 2, 5, 7, 10 -> 0, 3, 5, 8
        (10, 4, [0, 3, 5, 8]),
        # n capped at the frame count, as VBench does
        (4, 8, [0, 1, 2, 3]),
        (16, 1, [7]),
    ],
)
def test_middle_indices(num_frames: int, n: int, expected: list[int]) -> None:
    assert middle_indices(num_frames, n) == expected


def test_stride_indices() -> None:
    assert stride_indices(16, 2) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert stride_indices(16, 3) == [0, 3, 6, 9, 12, 15]
    assert stride_indices(5, 8) == [0]
    with pytest.raises(ValueError, match="stride must be positive"):
        stride_indices(16, 0)


@pytest.mark.parametrize("rate,interval", [(Fraction(60000, 1001), 7), (Fraction(12000, 1001), 1), (Fraction(30), 4)])
def test_decode_gives_the_exact_frame_rate_that_dynamic_degree_samples_from(rate: Fraction, interval: int) -> None:
    """A foreign mp4 at 59.94 fps: VBench keeps every round(59.94 / 8) = 7th frame (round(60 / 8) would be 8)."""
    import av

    from videodpo_ray.scoring.dynamic_degree import frame_interval

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for frame in smooth_clip():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    frames, fps = decode_mp4(buffer.getvalue())
    assert len(frames) == 16 and fps == pytest.approx(float(rate), rel=1e-6)
    assert frame_interval(fps) == interval
