"""VideoCrafter2's noise schedule: scaled-linear betas, the `scale_arr` data scaling, and its DDIM sampler.

No diffusers scheduler scales x0 by `scale_arr[t]` when noising and un-scales the predicted x0 when stepping, so
VC2 gets its own q_sample and DDIM step (lvdm `LatentDiffusion.q_sample` and `DDIMSampler.p_sample_ddim`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from videodpo_ray.config import StrictConfig

SCHEDULE_FILE = "scheduler_config.json"


class VC2ScheduleConfig(StrictConfig):
    """The lvdm schedule settings (VC2 config names); `use_scale` False gives the plain DDPM forward process."""

    num_train_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    use_scale: bool = True
    scale_a: float = 1.0
    scale_b: float = 0.7
    mid_step: int = 400

    def save(self, directory: str | Path) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / SCHEDULE_FILE).write_text(json.dumps(self.model_dump(), indent=2) + "\n")


def _gather(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = values.to(like.device)[timesteps.to(like.device).long()].to(like.dtype)
    return out.reshape((-1,) + (1,) * (like.ndim - 1))


class VC2NoiseSchedule:
    """Tensors of one schedule (float32, as lvdm registers them) and the two formulas that use them."""

    def __init__(self, config: VC2ScheduleConfig | None = None) -> None:
        self.config = config or VC2ScheduleConfig()
        c = self.config
        betas = torch.linspace(c.linear_start**0.5, c.linear_end**0.5, c.num_train_timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)
        if c.use_scale:
            ramp = torch.linspace(c.scale_a, c.scale_b, c.mid_step, dtype=torch.float64)
            self.scale_arr = torch.cat([ramp, torch.full((c.num_train_timesteps,), c.scale_b, dtype=torch.float64)])
        else:
            self.scale_arr = torch.ones(c.num_train_timesteps, dtype=torch.float64)
        self.scale_arr = self.scale_arr.to(torch.float32)

    def q_sample(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) * x0 * scale_arr[t] + sqrt(1 - abar_t) * noise."""
        abar = _gather(self.alphas_cumprod, timesteps, x0)
        return abar.sqrt() * x0 * _gather(self.scale_arr, timesteps, x0) + (1.0 - abar).sqrt() * noise

    def ddim_timesteps(self, num_steps: int) -> list[int]:
        """lvdm's "uniform" DDIM grid: 0, c, 2c, ... (c = 1000 // num_steps) shifted by one (1, 21, ..., 981 for 50
        steps). Every point of it, as lvdm, so the sampler starts near t = 1000 whatever the count: where c does not
        divide 1000 there are more points than `num_steps` (7 steps: 8, from 1 to 995); only a point past the last
        timestep is left out (3 steps: 1, 334, 667; lvdm would index 1000)."""
        total = self.config.num_train_timesteps
        return [t + 1 for t in range(0, total, total // num_steps) if t + 1 < total]

    @torch.no_grad()
    def ddim_sample(
        self,
        predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        latents: torch.Tensor,
        num_steps: int,
        eta: float,
        generators: Sequence[torch.Generator],
    ) -> torch.Tensor:
        """Run lvdm's DDIM sampler from x_T = `latents`; step noise for sample i comes from `generators[i]`.

        `predict_noise(x, t)` returns epsilon (already guided) for x (B, ...) at t (B,). Returns the final x_0
        sample (lvdm returns the last `x_prev`, which includes the last step's noise when eta > 0).
        """
        steps = self.ddim_timesteps(num_steps)
        abar = self.alphas_cumprod.double()
        x = latents
        for index in reversed(range(len(steps))):
            t, t_prev = steps[index], steps[index - 1] if index > 0 else 0
            a_t, a_prev = abar[t], abar[t_prev]
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
            eps = predict_noise(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
            pred_x0 = (x - (1 - a_t).sqrt().item() * eps) / a_t.sqrt().item()
            pred_x0 = pred_x0 / self.scale_arr[t].item()
            direction = (1 - a_prev - sigma**2).sqrt().item() * eps
            noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x)
            x = a_prev.sqrt().item() * self.scale_arr[t_prev].item() * pred_x0 + direction + sigma.item() * noise
        return x
