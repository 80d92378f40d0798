"""The toy world's semantic dimension (never VBench): a small text-video classifier.

A small 3D CNN reads a toy video (uint8 (T, H, W, 3)) and predicts its colour, shape and direction. It is trained
on CLEAN toy videos only (true captions), with pixel noise and blur so that it also reads imperfect generated
videos. For a prompt "a red square moving left" it outputs toy_colour = P(red), toy_direction = P(left) and
toy_semantic = their mean: 1 when the video shows the right colour moving the right way. Training is seeded and
deterministic for a fixed thread count; `stages.toy` trains it once per output root.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from videodpo_ray import storage
from videodpo_ray import toy_world as world
from videodpo_ray.scoring import ModelSpec
from videodpo_ray.scoring.preprocessing import check_frames
from videodpo_ray.seeds import derive_seed
from videodpo_ray.toy_world import ClassifierSettings

logger = logging.getLogger(__name__)
NAME = "toy_semantic"
OUTPUTS = (NAME, "toy_colour", "toy_direction")
MODELS = ()  # trained by the toy world stage itself (`stages.toy`), nothing to download
CUDA_DTYPE = torch.float32
WEIGHTS_FILE = "classifier.safetensors"


class ToyVideoClassifier(nn.Module):
    """3D CNN -> colour / shape / direction logits. Input: uint8 videos (B, T, H, W, 3)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        self.features = nn.Sequential(
            nn.Conv3d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.colour = nn.Linear(4 * width, len(world.COLOURS))
        self.shape = nn.Linear(4 * width, len(world.SHAPES))
        self.direction = nn.Linear(4 * width, len(world.DIRECTIONS))

    def forward(self, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        x = videos.float().permute(0, 4, 1, 2, 3) / 127.5 - 1.0  # B, 3, T, H, W
        h = self.features(x)
        pooled = torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1)
        return {"colour": self.colour(pooled), "shape": self.shape(pooled), "direction": self.direction(pooled)}


def _labels(captions: Sequence[world.Caption]) -> dict[str, torch.Tensor]:
    colours, shapes, directions = list(world.COLOURS), list(world.SHAPES), list(world.DIRECTIONS)
    return {
        "colour": torch.tensor([colours.index(c.colour) for c in captions]),
        "shape": torch.tensor([shapes.index(c.shape) for c in captions]),
        "direction": torch.tensor([directions.index(c.direction) for c in captions]),
    }


def _augment(videos: torch.Tensor, generator: torch.Generator, noise_std: float) -> torch.Tensor:
    """Float videos with Gaussian pixel noise, and a 3x3 spatial blur on a random half (imperfect generations)."""
    x = videos.float()
    blur = torch.rand(x.shape[0], generator=generator) < 0.5
    if blur.any():
        frames = x[blur].permute(0, 1, 4, 2, 3).flatten(0, 1)  # N*T, 3, H, W
        frames = F.avg_pool2d(F.pad(frames, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x[blur] = frames.unflatten(0, (-1, x.shape[1])).permute(0, 1, 3, 4, 2)
    x = x + noise_std * torch.randn(x.shape, generator=generator)
    return x.clamp(0.0, 255.0)


def train_classifier(settings: ClassifierSettings = ClassifierSettings(), log: bool = True) -> ToyVideoClassifier:
    """Train on clean toy videos (seeded; deterministic for a fixed thread count)."""
    videos, truth, _ = world.dataset(settings.train_videos, derive_seed(settings.seed, "toy-classifier", "train"))
    data, labels = torch.from_numpy(videos), _labels(truth)
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = ToyVideoClassifier(settings.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps)
    start = time.time()
    for step in range(settings.steps):
        index = torch.randint(0, len(data), (settings.batch_size,), generator=generator)
        logits = model(_augment(data[index], generator, settings.noise_std))
        loss = sum(F.cross_entropy(logits[k], labels[k][index]) for k in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step + 1) % 100 == 0:
            logger.info(
                "toy classifier step %d/%d loss %.4f (%.0fs)",
                step + 1,
                settings.steps,
                loss.item(),
                time.time() - start,
            )
    return model.eval().requires_grad_(False)


def save_classifier(model: ToyVideoClassifier, directory: str | Path) -> Path:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path / WEIGHTS_FILE))
    (path / "config.json").write_text(json.dumps({"width": model.width}) + "\n")
    return path


def load_classifier(directory: str | Path) -> ToyVideoClassifier:
    path = Path(directory)
    model = ToyVideoClassifier(**json.loads((path / "config.json").read_text()))
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(
    model: ToyVideoClassifier, videos: torch.Tensor | np.ndarray, batch_size: int = 128
) -> dict[str, torch.Tensor]:
    """Class probabilities per head for uint8 videos (B, T, H, W, 3)."""
    videos = torch.as_tensor(np.asarray(videos)) if isinstance(videos, np.ndarray) else videos
    parts: dict[str, list[torch.Tensor]] = {"colour": [], "shape": [], "direction": []}
    for start in range(0, len(videos), batch_size):
        for key, logits in model(videos[start : start + batch_size]).items():
            parts[key].append(logits.softmax(dim=-1))
    return {key: torch.cat(value) for key, value in parts.items()}


def outputs_for(probabilities: dict[str, torch.Tensor], prompts: Sequence[str]) -> list[dict[str, float]]:
    """Per (video, prompt): toy_colour = P(the prompt's colour), toy_direction = P(the prompt's direction) and
    toy_semantic = their mean (the expected fraction of the prompt's attributes the video shows)."""
    colours, directions = list(world.COLOURS), list(world.DIRECTIONS)
    rows = []
    for index, prompt in enumerate(prompts):
        caption = world.parse_prompt(prompt)
        colour = float(probabilities["colour"][index, colours.index(caption.colour)])
        direction = float(probabilities["direction"][index, directions.index(caption.direction)])
        rows.append({NAME: (colour + direction) / 2.0, "toy_colour": colour, "toy_direction": direction})
    return rows


# --- the scorer-module contract (`videodpo_ray.scoring`) -----------------------------------------------------------
def tiny_model() -> ToyVideoClassifier:
    """A random-init classifier (seeded): tests only, the scores mean nothing."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ToyVideoClassifier(width=4).eval().requires_grad_(False)


def load_model(spec: ModelSpec) -> ToyVideoClassifier:
    """The trained classifier in `spec.weights`: a directory (local or fsspec URL) `save_classifier` wrote."""
    if not spec.weights:
        raise ValueError(f"{NAME}: models.{NAME}.weights must name the toy classifier's directory")
    return load_classifier(storage.local_directory(spec.weights))


def score_outputs_batch(
    videos: Sequence[np.ndarray], model: ToyVideoClassifier, prompts: Sequence[str | None] | None = None, fps=None
) -> list[dict[str, float]]:
    """Every output for each (video, prompt); the prompts must be toy prompts ("a red square moving left")."""
    if prompts is None or any(prompt is None for prompt in prompts):
        raise ValueError(f"{NAME} needs the prompt of every video")
    for frames in videos:
        check_frames(frames, min_frames=2)
    array = torch.from_numpy(np.stack([np.asarray(frames) for frames in videos]))
    device = next(model.parameters()).device
    return outputs_for(predict(model, array.to(device)), [str(prompt) for prompt in prompts])


def score_batch(
    videos: Sequence[np.ndarray], model: ToyVideoClassifier, prompts: Sequence[str | None] | None = None, fps=None
) -> list[float]:
    return [row[NAME] for row in score_outputs_batch(videos, model, prompts)]


def score(frames: np.ndarray, model: ToyVideoClassifier, prompt: str | None = None, fps: float | None = None) -> float:
    return score_batch([frames], model, [prompt])[0]
