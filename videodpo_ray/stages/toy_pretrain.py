"""Pretrain the toy base model: a tiny VideoCrafter2-family model trained by code on the toy world.

1. The VAE (diffusers AutoencoderKL, the family's VAE) is trained as a deterministic autoencoder on toy frames,
   its posterior variance then pinned to ~0 so `encode_videos` with or without a generator gives the same latents,
   and the latent scale factor set to 1 / std of the latents (what VC2's 0.18215 is for kl-f8).
2. The UNet (lvdm layout) is trained with the family's own objective on the VAE latents of toy videos:
   `model.sample_timesteps`, `model.add_noise`, `model.training_target`, `model.predict`, with text from
   `model.encode_prompts` (frozen random 1-layer OpenCLIP-style tower). A fraction of the training captions are
   WRONG (another colour and/or another direction), and 10% are empty (for CFG), so the base model often draws the
   wrong colour or direction: the room alignment can win back. Training alternates the fps condition between the
   training default (16) and the sampler's (28).

The result is written with `model.save_pretrained` and loads back with
`build_model(ModelConfig(family="vc2", path=directory))`; `stages.toy` keeps one directory per settings hash
(deterministic: same settings, same weights, for a fixed thread count).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm import tqdm

from videodpo_ray import toy_world as world
from videodpo_ray.models import ModelConfig
from videodpo_ray.models.functional import pixels_to_vae_input
from videodpo_ray.models.vc2 import TEMPORAL_MODULES, VC2Preset, VideoCrafter2
from videodpo_ray.seeds import derive_seed
from videodpo_ray.toy_world import PretrainSettings

REPORT_FILE = "toy_pretrain.json"  # written last: its presence marks a complete model directory
TRAIN_FPS = 16  # ModelConfig.fps default: what DPO trains with
SAMPLE_FPS = VideoCrafter2.sample_fps  # 28: what the VC2 sampler conditions on

def _progress(total: int, description: str, show: bool) -> tqdm:
    return tqdm(total=total, desc=description, file=sys.stderr, disable=not show, leave=False, mininterval=2.0)


def _foreground_weights(frames: torch.Tensor) -> torch.Tensor:
    """1 on background pixels, 10 on shape pixels (the shape is ~10% of a frame; plain MSE ignores it)."""
    background = pixels_to_vae_input(torch.tensor(world.BACKGROUND), frames.dtype).view(1, 3, 1, 1)
    return 1.0 + 9.0 * ((frames - background).abs().sum(dim=1, keepdim=True) > 0.05).to(frames.dtype)


def train_vae(vae: AutoencoderKL, videos: torch.Tensor, settings: PretrainSettings, progress: bool = True) -> float:
    """Train `vae` in place as an autoencoder on the frames of uint8 `videos` (N, T, H, W, 3); pin its posterior
    variance to ~0; return the latent scale factor (1 / std of the latent means)."""
    frames = pixels_to_vae_input(videos.flatten(0, 1).permute(0, 3, 1, 2), torch.float32)
    generator = torch.Generator().manual_seed(derive_seed(settings.seed, "toy-vae"))
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.vae_lr, total_steps=settings.vae_steps)
    bar = _progress(settings.vae_steps, "toy VAE", progress)
    for _ in range(settings.vae_steps):
        batch = frames[torch.randint(0, len(frames), (settings.vae_batch_frames,), generator=generator)]
        mean = vae.encode(batch).latent_dist.mean
        noise = torch.randn(mean.shape, generator=generator) * settings.vae_latent_noise * mean.detach().std()
        reconstruction = vae.decode(mean + noise).sample
        weights = _foreground_weights(batch)
        loss = (weights * (reconstruction - batch).pow(2)).mean() / weights.mean() + 1e-3 * mean.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # posterior std e^-10: sampling the posterior is the mean, to float precision
        channels = vae.config.latent_channels
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = -20.0
        means = torch.cat([vae.encode(frames[i : i + 512]).latent_dist.mean for i in range(0, len(frames), 512)])
    return float(1.0 / means.std())


def _set_fps(model: VideoCrafter2, fps: int) -> None:
    if model.config.fps != fps:
        model.config = model.config.model_copy(update={"fps": fps})


def train_unet(
    model: VideoCrafter2,
    latents: torch.Tensor,
    captions: list[str],
    settings: PretrainSettings,
    progress: bool = True,
) -> list[float]:
    """Train the model's UNet on (scaled latents, caption) with the family's diffusion objective; returns losses."""
    vocabulary = sorted(set(captions))
    table = model.encode_prompts(vocabulary + [""])  # (V + 1, L, D); the last row is the empty prompt
    index = torch.tensor([vocabulary.index(caption) for caption in captions])
    generator = torch.Generator().manual_seed(derive_seed(settings.seed, "toy-unet"))
    named = [(name, p) for name, p in model.unet.named_parameters() if p.requires_grad]

    def multiplier(name: str) -> float:
        if ".attn2." in name:
            return settings.attn2_lr_mult
        if any(module in f".{name}" for module in TEMPORAL_MODULES):
            return settings.temporal_lr_mult
        return 1.0

    multipliers = sorted({multiplier(name) for name, _ in named})
    groups = [
        {"params": [p for name, p in named if multiplier(name) == m], "lr": settings.unet_lr * m} for m in multipliers
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, [group["lr"] for group in groups], total_steps=settings.unet_steps, pct_start=0.1
    )
    model.unet.train()
    losses: list[float] = []
    bar = _progress(settings.unet_steps, "toy UNet", progress)
    for step in range(settings.unet_steps):
        batch = torch.randint(0, len(latents), (settings.unet_batch,), generator=generator)
        rows = index[batch].clone()
        rows[torch.rand(len(rows), generator=generator) < settings.p_empty_prompt] = len(vocabulary)
        x0 = latents[batch]
        timesteps = model.sample_timesteps(len(batch), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        _set_fps(model, TRAIN_FPS if step % 2 == 0 else SAMPLE_FPS)
        prediction = model.predict(model.add_noise(x0, noise, timesteps), timesteps, table[rows])
        loss = F.mse_loss(prediction, model.training_target(x0, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}", refresh=False)
    bar.close()
    _set_fps(model, TRAIN_FPS)
    model.unet.eval()
    return losses


def _random_components(settings: PretrainSettings) -> tuple[VC2Preset, Any]:
    preset = VC2Preset(**{**settings.preset, "video_size": tuple(settings.preset["video_size"])})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(settings.seed, "toy-init"))
        return preset, preset.components()


def pretrained_vae(settings: PretrainSettings, progress: bool = True) -> tuple[AutoencoderKL, float]:
    """The toy VAE trained on clean toy videos, and its latent scale factor."""
    _, components = _random_components(settings)
    videos, _, _ = world.dataset(settings.videos, derive_seed(settings.seed, "toy-vae-data"))
    scale_factor = train_vae(components.vae, torch.from_numpy(videos), settings, progress)
    return components.vae, scale_factor


def pretrain(settings: PretrainSettings, directory: str | Path, progress: bool = True) -> dict[str, Any]:
    """Build, train and save the toy base model into `directory`; returns a report (timings, losses)."""
    started = time.time()
    preset, components = _random_components(settings)
    components.vae, components.scale_factor = pretrained_vae(settings, progress)
    vae_seconds = time.time() - started
    videos, truth, given = world.dataset(
        settings.videos, derive_seed(settings.seed, "toy-pretrain"), settings.p_wrong_colour, settings.p_wrong_direction
    )
    videos_t = torch.from_numpy(videos)
    model = VideoCrafter2(components, ModelConfig(family="vc2", finetune="full"), preset.video_size)
    latents = torch.cat([model.encode_videos(videos_t[i : i + 256]) for i in range(0, len(videos_t), 256)])
    losses = train_unet(model, latents, [caption.prompt for caption in given], settings, progress)
    model.save_pretrained(directory)
    report = {
        "settings_key": settings.key(),
        "scale_factor": components.scale_factor,
        "vae_seconds": round(vae_seconds, 1),
        "unet_seconds": round(time.time() - started - vae_seconds, 1),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "captions_wrong": sum(t != g for t, g in zip(truth, given)) / len(truth),
    }
    (Path(directory) / REPORT_FILE).write_text(json.dumps({"report": report, "settings": asdict(settings)}))
    return report
