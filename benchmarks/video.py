"""mp4 encoding with x264's macroblock tree off (the default, deterministic) vs on: size, PSNR, distinct encodings.

Each clip is encoded `--repeats` times in this one process, with other allocations in between (as a sampler actor
makes); "encodings" counts the distinct byte strings. Run: `python benchmarks/video.py`.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

from videodpo_ray.video import decode_mp4, encode_mp4

FPS = 8


def clip(frames: int, height: int, width: int, seed: int, noise: float) -> np.ndarray:
    """Colour blobs drifting right by 2 pixels a frame plus `noise` (std, pixel levels): uint8, (T, H, W, 3).

    noise 6 is like an untrained model's sample; noise 0 like a smooth generated clip.
    """
    generator = torch.Generator().manual_seed(seed)
    canvas = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 6, generator=generator) * 255,
                                             size=(height, width + 2 * frames), mode="bicubic")[0]
    moving = torch.stack([canvas[:, :, 2 * t: 2 * t + width] for t in range(frames)])
    noisy = moving + noise * torch.randn(frames, 3, height, width, generator=generator)
    return noisy.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def measure(frames: np.ndarray, macroblock_tree: bool, repeats: int, churn: list[bytes]) -> tuple[int, float, int]:
    """(bytes, PSNR in dB, distinct encodings) of `repeats` encodes of `frames`."""
    generator = random.Random(0)
    encodings = set()
    for _ in range(repeats):
        churn.append(generator.randbytes(generator.randint(1, 50_000)))
        encodings.add(encode_mp4(frames, FPS, macroblock_tree=macroblock_tree))
    first = min(encodings)
    return len(first), psnr(decode_mp4(first)[0].numpy(), frames), len(encodings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    churn: list[bytes] = []
    print("clip (T x H x W, seed, noise) | tree off: bytes   dB  encodings | tree on: bytes   dB  encodings | on/off")
    for frames, height, width, seed, noise in [(16, 32, 32, 0, 6), (16, 32, 32, 1, 6), (16, 96, 160, 0, 6),
                                               (16, 320, 512, 0, 6), (16, 320, 512, 0, 0), (16, 480, 832, 0, 0)]:
        video = clip(frames, height, width, seed, noise)
        off = measure(video, False, args.repeats, churn)
        on = measure(video, True, args.repeats, churn)
        label = f"{frames} x {height} x {width}, {seed}, {noise:<2}".ljust(29)
        print(f"{label}| {off[0]:>9} {off[1]:6.2f} {off[2]:>3}         | {on[0]:>9} {on[1]:6.2f} {on[2]:>3}        | "
              f"{on[0] / off[0]:.2f}", flush=True)

if __name__ == "__main__":
    main()
