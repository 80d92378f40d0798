"""The formulas every family applies the same way, as plain functions (the families and the toy world call them):
uint8 pixels <-> the VAE's [-1, 1] range, classifier-free guidance with both halves in one denoiser call, and the
name of a VAE's latent space."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Mapping

import torch


def pixels_to_vae_input(videos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 pixels (any layout) -> values in [-1, 1] in `dtype`, computed in float32."""
    return (videos.float() / 127.5 - 1.0).to(dtype)


def vae_output_to_pixels(frames: torch.Tensor) -> torch.Tensor:
    """A VAE decoder's output (any layout, nominally in [-1, 1]) -> uint8 pixels: clamped, then rounded."""
    return ((frames.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def guidance_embeddings(text_embeddings: torch.Tensor, empty_embedding: torch.Tensor | None) -> torch.Tensor:
    """The text rows of every denoiser call in a sampling loop, built once before it: [text; empty] for guidance
    against the empty prompt, the text alone without guidance (`empty_embedding` None: each family decides which
    scales guide, as its reference sampler does)."""
    if empty_embedding is None:
        return text_embeddings
    return torch.cat([text_embeddings, empty_embedding.to(text_embeddings).expand_as(text_embeddings)])


def classifier_free_guidance(
    denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    embeddings: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """`denoise(x, t, text)` on `guidance_embeddings`' rows: with twice the latents' rows, the guided
    out(empty) + w (out(text) - out(empty)), conditional and unconditional rows in one call; else the plain output."""
    if embeddings.shape[0] == latents.shape[0]:
        return denoise(latents, timesteps, embeddings)
    out = denoise(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), embeddings)
    conditional, unconditional = out.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def latent_space_name(family: str, settings: Mapping[str, Any]) -> str:
    """`family:` + the first 12 hex digits of the sha256 of `settings` as sorted JSON."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return f"{family}:{digest[:12]}"
