"""One training step's math on the `VideoDiffusionModel` interface: Diffusion-DPO and plain diffusion (SFT).

Everything random (timesteps, noise) comes from the caller's `torch.Generator`, so a seeded generator gives the
same step on every run; one generator per pair makes each pair's draw independent of the micro-batch it is in.
Optimizer, DeepSpeed and Ray stay outside: these functions only build the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from videodpo_ray.dpo import diffusion_dpo_loss, per_sample_mse
from videodpo_ray.dpo_options import BetaSchedule, DPOReduction
from videodpo_ray.errors import ConfigError
from videodpo_ray.models.base import VideoDiffusionModel
from videodpo_ray.training.config import DPOConfig


@dataclass(frozen=True)
class StepOutput:
    """The scalar loss (with grad) and detached 0-dim metric tensors, including the mean `timestep`."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


@runtime_checkable
class FlowMatchingModel(Protocol):
    """A flow-matching family: exposes the noise level s in [0, 1] of its timesteps (x_t = (1 - s) x0 + s eps),
    which the timestep-scaled Flow-DPO beta needs."""

    def noise_level(self, timesteps: torch.Tensor) -> torch.Tensor: ...


def check_beta_schedule(model: VideoDiffusionModel, beta_schedule: BetaSchedule, shared_noise: bool) -> None:
    """ConfigError unless `beta_schedule` can be used with this model and noise sharing."""
    if beta_schedule != "timestep_scaled":
        return
    if not isinstance(model, FlowMatchingModel):
        raise ConfigError(f"dpo.beta_schedule='timestep_scaled' needs a flow-matching family, not {model.family!r}")
    if not shared_noise:
        raise ConfigError("dpo.beta_schedule='timestep_scaled' needs dpo.shared_noise=true (one timestep per pair)")


def _draw_noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like `like`, drawn on the generator's device, then moved to `like`."""
    noise = torch.randn(like.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


def _draw_timesteps(
    model: VideoDiffusionModel, batch_size: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return model.sample_timesteps(batch_size, generator=generator).to(device=device, dtype=torch.int64)


def draw_pair_noise(
    model: VideoDiffusionModel,
    win_latents: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator],
    shared_noise: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps (2B,) and noise (2B, ...) for B pairs, the winners' rows first.

    One generator draws for the whole micro-batch; a sequence of B generators draws each pair from its own, exactly
    as a micro-batch of that pair alone would, so a pair trains on the same timestep and noise whatever micro-batch
    it is packed in. `shared_noise`: one timestep and one noise per pair, for the winner and the loser alike.
    """
    if not isinstance(generator, torch.Generator):
        if len(generator) != win_latents.shape[0]:
            raise ValueError(f"{len(generator)} generators for {win_latents.shape[0]} pairs: pass one per pair")
        timesteps, noise = zip(*(draw_pair_noise(model, win_latents[index : index + 1], one, shared_noise)
                                 for index, one in enumerate(generator)))
        return _winners_first(timesteps), _winners_first(noise)
    num_pairs = win_latents.shape[0]
    if shared_noise:
        timesteps = _draw_timesteps(model, num_pairs, generator, win_latents.device).repeat(2)
        noise = _draw_noise(win_latents, generator).repeat((2,) + (1,) * (win_latents.ndim - 1))
    else:
        timesteps = _draw_timesteps(model, 2 * num_pairs, generator, win_latents.device)
        noise = _draw_noise(torch.cat([win_latents, win_latents]), generator)
    return timesteps, noise


def _winners_first(per_pair: Sequence[torch.Tensor]) -> torch.Tensor:
    """One-pair draws (winner row, loser row) concatenated as a micro-batch's: every winner row, then every loser's."""
    return torch.cat([rows[:1] for rows in per_pair] + [rows[1:] for rows in per_pair])


def dpo_step(
    model: VideoDiffusionModel,
    win_latents: torch.Tensor,
    lose_latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    beta_dpo: float,
    generator: torch.Generator | Sequence[torch.Generator],
    shared_noise: bool = True,
    reduction: DPOReduction = "mean",
    beta_schedule: BetaSchedule = "constant",
) -> StepOutput:
    """Diffusion-DPO loss for B pairs.

    Args:
        model: the policy; `predict(..., reference=True)` gives the frozen reference.
        win_latents, lose_latents: scaled latents (B, ...) of winners and losers.
        text_embeddings: (B, L, D), one prompt per pair (the caller applies any CFG prompt dropout, for the
            winner and loser alike, by passing the empty-prompt embedding).
        weights: per-pair weights (B,) or None for 1.
        beta_dpo: DPO KL strength.
        generator: source of the timesteps and the noise: one for the micro-batch, or one per pair
            (`draw_pair_noise`).
        shared_noise: True (Diffusion-DPO, diffusers): one timestep and one noise per pair, used for both the
            winner and the loser. False reproduces the released VideoDPO code, which draws the timestep and
            the noise independently for all 2B samples (more variance; reproduction switch only).
        reduction: see `diffusion_dpo_loss`.
        beta_schedule: "constant" (default) or "timestep_scaled" (flow-matching families, shared noise only):
            beta_dpo * (1 - s)^2 with s = `model.noise_level(t)` of each pair; see `diffusion_dpo_loss`.
    """
    check_beta_schedule(model, beta_schedule, shared_noise)
    if win_latents.shape != lose_latents.shape:
        raise ValueError(
            f"winner latents {tuple(win_latents.shape)} and loser latents {tuple(lose_latents.shape)} differ in shape"
        )
    num_pairs = win_latents.shape[0]
    if text_embeddings.shape[0] != num_pairs:
        raise ValueError(f"text_embeddings has batch {text_embeddings.shape[0]}, expected {num_pairs} (one per pair)")

    latents = torch.cat([win_latents, lose_latents])
    timesteps, noise = draw_pair_noise(model, win_latents, generator, shared_noise)
    embeddings = torch.cat([text_embeddings, text_embeddings])

    noisy_latents = model.add_noise(latents, noise, timesteps)
    target = model.training_target(latents, noise, timesteps)
    with torch.no_grad():
        ref_pred = model.predict(noisy_latents, timesteps, embeddings, reference=True)
    model_pred = model.predict(noisy_latents, timesteps, embeddings)

    noise_levels = model.noise_level(timesteps[:num_pairs]) if beta_schedule == "timestep_scaled" else None
    output = diffusion_dpo_loss(
        model_pred,
        ref_pred,
        target,
        weights,
        beta_dpo=beta_dpo,
        reduction=reduction,
        beta_schedule=beta_schedule,
        noise_levels=noise_levels,
    )
    metrics = dict(output.metrics)
    metrics["timestep"] = timesteps.to(torch.float32).mean()
    return StepOutput(loss=output.loss, metrics=metrics)


def sft_step(
    model: VideoDiffusionModel,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    *,
    generator: torch.Generator,
) -> StepOutput:
    """Plain diffusion loss: MSE between the policy prediction and the training target (metrics: mse, timestep)."""
    if text_embeddings.shape[0] != latents.shape[0]:
        raise ValueError(f"text_embeddings has batch {text_embeddings.shape[0]}, expected {latents.shape[0]}")
    timesteps = _draw_timesteps(model, latents.shape[0], generator, latents.device)
    noise = _draw_noise(latents, generator)
    noisy_latents = model.add_noise(latents, noise, timesteps)
    target = model.training_target(latents, noise, timesteps)
    model_pred = model.predict(noisy_latents, timesteps, text_embeddings)
    loss = per_sample_mse(model_pred, target).mean()
    return StepOutput(
        loss=loss,
        metrics={"mse": loss.detach(), "timestep": timesteps.to(torch.float32).mean()},
    )


class DPOObjective(nn.Module):
    """The module DeepSpeed wraps: the model, and a forward that is one Diffusion-DPO micro-batch."""

    def __init__(self, model: VideoDiffusionModel, dpo: DPOConfig) -> None:
        super().__init__()
        check_beta_schedule(model, dpo.beta_schedule, dpo.shared_noise)
        self.model = model
        self.dpo = dpo

    def forward(
        self,
        win_latents: torch.Tensor,
        lose_latents: torch.Tensor,
        text_embeddings: torch.Tensor,
        weights: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        output = dpo_step(
            self.model,
            win_latents,
            lose_latents,
            text_embeddings,
            weights,
            beta_dpo=self.dpo.beta_dpo,
            generator=generator,
            shared_noise=self.dpo.shared_noise,
            reduction=self.dpo.reduction,
            beta_schedule=self.dpo.beta_schedule,
        )
        return output.loss, output.metrics
