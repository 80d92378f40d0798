"""The toy text-to-video world: coloured shapes moving in named directions on a plain background.

Everything is made in code and deterministic from a seed. A prompt is "a {colour} {shape} moving {direction}"
(6 colours x 5 shapes x 4 directions = 120 prompts); a video is uint8 (8, 16, 16, 3): one shape of that colour,
radius 3-4 px, moving 1 px per frame in that direction through the middle of the frame (7 px in 8 frames, start
jittered by 1 px). `split_prompts` gives the fixed
DPO-training / held-out split of the 120 prompts. Named "toy" everywhere: nothing here is VBench.

The settings of the world's two trained models (the base model, `stages/toy_pretrain.py`, and the classifier,
`scoring/toy_semantic.py`) live here too, torch-free: they are their cache keys, which a pipeline config needs
before anything is imported or trained.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from videodpo_ray.seeds import derive_seed

WORLD_VERSION = 5  # bump whenever rendering changes: every cache key (VAE, base model, classifier) includes it
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 215, 40),
    "magenta": (215, 50, 215),
    "cyan": (40, 215, 225),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond", "cross")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND: tuple[int, int, int] = (20, 20, 20)
NUM_FRAMES, HEIGHT, WIDTH = 8, 16, 16
SPEED = 1  # pixels per frame
RADIUS_RANGE = (3, 4)  # inclusive, pixels
JITTER = 1  # pixels: the path passes through the centre of the frame, give or take JITTER
NUM_HELD_OUT = 64


@dataclass(frozen=True)
class Caption:
    """What a toy prompt says: a colour, a shape and a direction."""

    colour: str
    shape: str
    direction: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"


@dataclass(frozen=True)
class VideoSpec:
    """One toy video: what moves (caption), where it starts (centre x0, y0) and how big it is (radius)."""

    caption: Caption
    x0: int
    y0: int
    radius: int


def all_captions() -> list[Caption]:
    """Every colour x shape x direction, in vocabulary order (120)."""
    return [Caption(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def parse_prompt(prompt: str) -> Caption:
    """The caption a toy prompt names; ValueError for anything else."""
    words = prompt.strip().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"not a toy prompt (expected 'a <colour> <shape> moving <direction>'): {prompt!r}")
    caption = Caption(words[1], words[2], words[4])
    if caption.colour not in COLOURS or caption.shape not in SHAPES or caption.direction not in DIRECTIONS:
        raise ValueError(f"unknown colour, shape or direction in toy prompt {prompt!r}")
    return caption


def split_prompts(seed: int = 0, num_held_out: int = NUM_HELD_OUT) -> tuple[list[str], list[str]]:
    """(DPO-training prompts, held-out prompts): a fixed seeded shuffle of the 120 prompts, each list sorted."""
    prompts = [caption.prompt for caption in all_captions()]
    random.Random(derive_seed(seed, "toy-split")).shuffle(prompts)
    return sorted(prompts[num_held_out:]), sorted(prompts[:num_held_out])


def sample_spec(caption: Caption, seed: int) -> VideoSpec:
    """A random radius and a path through the middle of the frame (start jittered by up to JITTER px each way)."""
    rng = random.Random(seed)
    radius = rng.randint(*RADIUS_RANGE)
    dx, dy = DIRECTIONS[caption.direction]
    half_travel = SPEED * (NUM_FRAMES - 1) / 2
    x0 = (WIDTH - 1) / 2 - dx * half_travel + rng.randint(-JITTER, JITTER)
    y0 = (HEIGHT - 1) / 2 - dy * half_travel + rng.randint(-JITTER, JITTER)
    return VideoSpec(caption, round(x0), round(y0), radius)


def shape_mask(shape: str, cx: float, cy: float, radius: int) -> np.ndarray:
    """Boolean (HEIGHT, WIDTH) mask of `shape` centred at (cx, cy) with half-size `radius`."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    u, v = xs - cx, ys - cy
    if shape == "square":
        return (np.abs(u) <= radius) & (np.abs(v) <= radius)
    if shape == "circle":
        return u**2 + v**2 <= (radius + 0.5) ** 2
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= radius + 0.5
    if shape == "triangle":  # apex up, base at the bottom
        return (v <= radius) & (v >= -radius) & (np.abs(u) <= (v + radius) / 2.0 + 0.5)
    if shape == "cross":
        arm = max(1, radius // 3)
        inside = (np.abs(u) <= radius) & (np.abs(v) <= radius)
        return inside & ((np.abs(u) <= arm) | (np.abs(v) <= arm))
    raise ValueError(f"unknown toy shape {shape!r}")


def render(spec: VideoSpec) -> np.ndarray:
    """The video of `spec`: uint8 (NUM_FRAMES, HEIGHT, WIDTH, 3)."""
    dx, dy = DIRECTIONS[spec.caption.direction]
    colour = np.array(COLOURS[spec.caption.colour], dtype=np.uint8)
    video = np.empty((NUM_FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    video[:] = np.array(BACKGROUND, dtype=np.uint8)
    for t in range(NUM_FRAMES):
        mask = shape_mask(spec.caption.shape, spec.x0 + dx * SPEED * t, spec.y0 + dy * SPEED * t, spec.radius)
        video[t][mask] = colour
    return video


def render_prompt(prompt: str, seed: int) -> np.ndarray:
    """A clean video of a toy prompt for a seed."""
    return render(sample_spec(parse_prompt(prompt), seed))


def corrupt(caption: Caption, rng: random.Random, p_colour: float, p_direction: float) -> Caption:
    """A possibly wrong caption: the colour replaced by another one with probability p_colour, the direction by
    another one with probability p_direction (independently)."""
    colour, direction = caption.colour, caption.direction
    if rng.random() < p_colour:
        colour = rng.choice([c for c in COLOURS if c != colour])
    if rng.random() < p_direction:
        direction = rng.choice([d for d in DIRECTIONS if d != direction])
    return Caption(colour, caption.shape, direction)


def dataset(
    size: int, seed: int, p_colour: float = 0.0, p_direction: float = 0.0, captions: Sequence[Caption] | None = None
) -> tuple[np.ndarray, list[Caption], list[Caption]]:
    """`size` random videos: (videos uint8 (size, T, H, W, 3), the true captions, the captions given for training
    (corrupted with the given probabilities)). Captions are drawn uniformly from `captions` (default: all)."""
    pool = list(captions or all_captions())
    rng = random.Random(derive_seed(seed, "toy-dataset"))
    videos = np.empty((size, NUM_FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    truth, given = [], []
    for index in range(size):
        caption = rng.choice(pool)
        videos[index] = render(sample_spec(caption, derive_seed(seed, "toy-video", index)))
        truth.append(caption)
        given.append(corrupt(caption, rng, p_colour, p_direction))
    return videos, truth, given


# --- the toy world's two trained models: settings and cache keys ----------------------------------------------------
PRETRAIN_CODE_VERSION = 1  # bump when stages/toy_pretrain.py's training changes (invalidates cached base models)
CLASSIFIER_CODE_VERSION = 1  # bump when scoring/toy_semantic.py's training or architecture changes

TOY_VC2_PRESET: dict[str, Any] = {
    # UNet ~2M parameters on (8, 8, 4, 4) latents: one level at 4x4 with spatial + temporal attention. 64 channels,
    # not 32: lvdm's GroupNorm has 32 groups, and with one channel per group the resnets' norm2 subtracts the
    # per-channel timestep (and fps) embedding exactly, so a 32-channel UNet is blind to the noise level.
    "unet": {
        "in_channels": 8,
        "out_channels": 8,
        "model_channels": 64,
        "channel_mult": [1],
        "num_res_blocks": 1,
        "attention_resolutions": [1],
        "num_head_channels": 16,
        "context_dim": 64,
    },
    # kl-f4 VAE (16x16 -> 4x4), 8 latent channels: three levels, 16/32/32 channels
    "vae": {
        "latent_channels": 8,
        "scaling_factor": 1.0,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
    },
    # the 1-layer OpenCLIP-style tower of "tiny", with an 8-token context (toy prompts are 7 tokens with SOT/EOT)
    "text_encoder": {"hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128, "max_position_embeddings": 8},
    "video_size": (NUM_FRAMES, HEIGHT, WIDTH),
}
"""The "toy" VC2 preset (`models.vc2.VC2Preset` fields): the family's architecture sized for 8 x 16 x 16 toy videos
on a CPU."""


def _settings_key(settings: Any, code_version: int) -> str:
    text = json.dumps({**asdict(settings), "code": code_version, "world": WORLD_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class PretrainSettings:
    """Everything the pretrained toy base model depends on (its cache key)."""

    seed: int = 0
    videos: int = 2048  # toy videos in the pretraining set (all 120 prompts)
    p_wrong_colour: float = 0.15  # probability a training caption names another colour
    p_wrong_direction: float = 0.15  # ... another direction (independently)
    p_empty_prompt: float = 0.1  # CFG dropout
    vae_steps: int = 250
    vae_batch_frames: int = 32
    vae_lr: float = 3e-3
    vae_latent_noise: float = 0.1  # decoder robustness: noise on the latents (x their std) while training
    unet_steps: int = 400
    unet_batch: int = 8  # small batches, many steps: what helps most early in training
    unet_lr: float = 2e-3
    attn2_lr_mult: float = 5.0  # learning-rate multiplier of the cross-attention ("attn2") layers: text binding
    temporal_lr_mult: float = 3.0  # learning-rate multiplier of the temporal layers (motion)
    preset: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(TOY_VC2_PRESET))

    def key(self) -> str:
        return _settings_key(self, PRETRAIN_CODE_VERSION)


@dataclass(frozen=True)
class ClassifierSettings:
    """How the toy classifier is trained (also its cache key)."""

    seed: int = 0
    train_videos: int = 3000
    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    noise_std: float = 12.0  # pixel noise (0..255 scale) added at training time
    width: int = 16

    def key(self) -> str:
        return _settings_key(self, CLASSIFIER_CODE_VERSION)
