"""Diffusion-DPO loss (Wallace et al. 2023) as VideoDPO trains with it (method.md section 1).

Predictions and targets are stacked as one batch ``[winners..., losers...]`` of size 2B. Per sample,

    err       = mean over all non-batch dims of (pred - target)^2
    inside    = -0.5 * beta_dpo * ((err_policy(w) - err_policy(l)) - (err_ref(w) - err_ref(l)))
    loss      = mean over pairs of -weight * logsigmoid(inside)

The target is whatever the family trains on (epsilon, the velocity v, or the flow-matching velocity eps - x0); the
loss does not care. Flow-DPO (VideoAlign, arXiv 2501.13918; flow_grpo's SD3 DPO) is this loss on v-MSE errors with a
constant beta (`beta_schedule="constant"`, the default). `beta_schedule="timestep_scaled"` uses
beta_t = beta_dpo * (1 - s)^2 per pair at the flow noise level s in [0, 1], which turns v-errors into the
epsilon-errors of Diffusion-DPO; VideoAlign found it reward-hacks, so it is offered for comparison only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from videodpo_ray.dpo_options import BetaSchedule, DPOReduction


@dataclass(frozen=True)
class DPOLossOutput:
    """The scalar loss (with grad) and detached 0-dim metric tensors (``float(value)`` to log them)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean squared error over `dims` (default: all non-batch dims), in at least float32 (bf16 is too coarse
    for differences of errors scaled by beta_dpo = 5000)."""
    if dims is None:
        dims = tuple(range(1, target.ndim))
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return (pred.to(dtype) - target.to(dtype)).pow(2).mean(dim=dims)


def diffusion_dpo_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    beta_dpo: float,
    reduction: DPOReduction = "mean",
    beta_schedule: BetaSchedule = "constant",
    noise_levels: torch.Tensor | None = None,
) -> DPOLossOutput:
    """Re-weighted Diffusion-DPO loss for a stacked ``[winners..., losers...]`` batch of 2B predictions.

    Args:
        model_pred: policy predictions (2B, ...).
        ref_pred: frozen reference predictions (2B, ...); treated as constants.
        target: training target (2B, ...): the noise for epsilon models, the velocity for v-prediction.
        weights: per-pair weights (B,); None means 1 for every pair.
        beta_dpo: the KL strength (5000 in VideoDPO).
        reduction: "mean" (default, correct): the error of a sample is the mean over all its non-batch dims.
            "videodpo_reference" is a REPRODUCTION MODE ONLY of the released VideoDPO code: for a
            (2B, C, T, H, W) latent it averages over dims [1, 2, 3] only, leaving the width axis, so the loss is
            the mean of W per-column DPO terms and `implicit_accuracy` is the count of positive columns per pair
            (0..W, as the reference logs it) instead of a 0..1 fraction. Never use it for real training.
        beta_schedule: "constant" (default): beta_dpo for every pair. "timestep_scaled" (flow matching only):
            beta_dpo * (1 - s)^2 for a pair noised to level s (`noise_levels`).
        noise_levels: per-pair flow noise levels s in [0, 1] (B,); required by "timestep_scaled" only.

    Returns:
        DPOLossOutput with metrics implicit_accuracy, reward_margin (mean of `inside`), model_mse_win,
        model_mse_lose, ref_mse_win, ref_mse_lose and mean_weight.
    """
    if model_pred.shape != target.shape or ref_pred.shape != target.shape:
        raise ValueError(
            f"model_pred {tuple(model_pred.shape)}, ref_pred {tuple(ref_pred.shape)} and target "
            f"{tuple(target.shape)} must have the same shape"
        )
    if target.ndim < 2 or target.shape[0] == 0 or target.shape[0] % 2:
        raise ValueError(f"expected a stacked [winners..., losers...] batch (2B, ...), got {tuple(target.shape)}")
    num_pairs = target.shape[0] // 2

    if reduction == "mean":
        dims = None
    elif reduction == "videodpo_reference":
        if target.ndim != 5:
            raise ValueError(
                f"reduction 'videodpo_reference' needs (2B, C, T, H, W) latents, got {tuple(target.shape)}"
            )
        dims = (1, 2, 3)
    else:
        raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'videodpo_reference'")

    model_error = per_sample_mse(model_pred, target, dims)
    ref_error = per_sample_mse(ref_pred.detach(), target, dims)
    model_win, model_lose = model_error.chunk(2)
    ref_win, ref_lose = ref_error.chunk(2)
    beta = _beta(beta_dpo, beta_schedule, noise_levels, model_win)
    inside = -0.5 * beta * ((model_win - model_lose) - (ref_win - ref_lose))

    if weights is None:
        pair_weights = torch.ones(num_pairs, dtype=inside.dtype, device=inside.device)
    else:
        if weights.shape != (num_pairs,):
            raise ValueError(f"weights must have shape ({num_pairs},) (one per pair), got {tuple(weights.shape)}")
        pair_weights = weights.to(device=inside.device, dtype=inside.dtype)
    per_term_weights = pair_weights.reshape((num_pairs,) + (1,) * (inside.ndim - 1))
    loss = (-per_term_weights * F.logsigmoid(inside)).mean()

    with torch.no_grad():
        positive = (inside > 0).to(inside.dtype)
        if reduction == "mean":
            implicit_accuracy = positive.mean()
        else:  # the reference's `(inside > 0).sum() / inside.size(0)`: positive columns per pair
            implicit_accuracy = positive.sum() / num_pairs
        metrics = {
            "implicit_accuracy": implicit_accuracy,
            "reward_margin": inside.mean().detach(),
            "model_mse_win": model_win.mean().detach(),
            "model_mse_lose": model_lose.mean().detach(),
            "ref_mse_win": ref_win.mean(),
            "ref_mse_lose": ref_lose.mean(),
            "mean_weight": pair_weights.mean(),
        }
    return DPOLossOutput(loss=loss, metrics=metrics)


def _beta(
    beta_dpo: float, beta_schedule: BetaSchedule, noise_levels: torch.Tensor | None, like: torch.Tensor
) -> float | torch.Tensor:
    """beta_dpo (constant), or beta_dpo * (1 - s)^2 per pair shaped to broadcast against `like` (B, ...)."""
    if beta_schedule == "constant":
        if noise_levels is not None:
            raise ValueError("noise_levels are only used by beta_schedule='timestep_scaled'")
        return beta_dpo
    if beta_schedule != "timestep_scaled":
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected 'constant' or 'timestep_scaled'")
    num_pairs = like.shape[0]
    if noise_levels is None or noise_levels.shape != (num_pairs,):
        shape = None if noise_levels is None else tuple(noise_levels.shape)
        raise ValueError(f"beta_schedule='timestep_scaled' needs noise_levels of shape ({num_pairs},), got {shape}")
    levels = noise_levels.detach().to(device=like.device, dtype=like.dtype)
    if levels.min() < 0 or levels.max() > 1:
        raise ValueError("noise_levels must lie in [0, 1]")
    return (beta_dpo * (1.0 - levels) ** 2).reshape((num_pairs,) + (1,) * (like.ndim - 1))
