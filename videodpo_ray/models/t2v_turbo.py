"""T2V-Turbo (v1): VideoCrafter2 + a consistency-distilled LoRA, sampled with LCM in 4 steps and no CFG pass.

The UNet is VC2's plus `time_cond_proj` (Linear(256, C), zero base), fed the guidance-scale embedding of w. The
released `unet_lora.pt` is a cloneofsimo LoRA list in lvdm module order; two DPO reference modes:
- `turbo_lora_mode="merge_and_new"`: the list is merged into the base (in lvdm key space); then the usual
  finetune modes apply (lora: a fresh zero-init peft LoRA, reference = adapters off).
- `turbo_lora_mode="train_released"` (finetune "lora" only): the released factors become a peft adapter that
  trains in place; the reference is a frozen second adapter with the released values (base + released LoRA).
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from typing import ClassVar, Iterator, Sequence

import torch
from diffusers import LCMScheduler
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from videodpo_ray.errors import ConfigError
from videodpo_ray.models.config import ModelConfig
from videodpo_ray.models.convert_vc2 import TURBO_TIME_COND_PROJ_DIM, VC2Components, merge_turbo_lora, read_lora_list
from videodpo_ray.models.lvdm_layout import check_lora_list, to_reference_state_dict
from videodpo_ray.models.modules import inject_lora_adapter
from videodpo_ray.models.vc2 import FULL_VIDEO_SIZE, VideoCrafter2
from videodpo_ray.models.vc2_schedule import VC2ScheduleConfig

RELEASED_ADAPTER = "released"
RELEASED_REFERENCE_ADAPTER = "released_reference"
LCM_ORIGIN_STEPS = 50


def guidance_scale_embedding(w: torch.Tensor, dim: int = TURBO_TIME_COND_PROJ_DIM) -> torch.Tensor:
    """T2V-Turbo's w embedding: [sin, cos] of w*1000 at frequencies exp(-ln(10000) k / (dim/2 - 1)), (B, dim)."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * frequencies.to(w.device)[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def lcm_timesteps(num_steps: int, num_train_timesteps: int = 1000, origin_steps: int = LCM_ORIGIN_STEPS) -> list[int]:
    """T2V-Turbo's LCM schedule: every k-th of the 50-step grid from the top (4 steps: 999, 759, 519, 279)."""
    stride = num_train_timesteps // origin_steps
    origin = [(i + 1) * stride - 1 for i in range(origin_steps)]
    return origin[:: -(origin_steps // num_steps)][:num_steps]


def set_active_adapter(layers: Sequence[BaseTunerLayer], adapter: str, inference_mode: bool = False) -> None:
    """Make `adapter` the active one of every layer (trainable unless inference_mode; the others frozen)."""
    for layer in layers:
        layer.set_adapter(adapter, inference_mode=inference_mode)


class T2VTurbo(VideoCrafter2):
    """T2V-Turbo v1 (epsilon; DPO timesteps on the 50-step DDIM grid; LCM sampling, w = 7.5, fps 16).

    Its presets are VC2's ("tiny", "full"), built with T2V-Turbo's `time_cond_proj`.
    """

    family = "t2v_turbo"
    time_cond_proj_dim: ClassVar[int | None] = TURBO_TIME_COND_PROJ_DIM
    sample_fps: ClassVar[int] = 16
    default_num_inference_steps: ClassVar[int] = 4
    default_guidance_scale: ClassVar[float] = 7.5  # w fed to the UNet, also in DPO training predictions

    def __init__(
        self,
        components: VC2Components,
        config: ModelConfig,
        video_size: tuple[int, int, int] = FULL_VIDEO_SIZE,
        released_lora: Sequence[torch.Tensor] | None = None,
    ) -> None:
        if config.turbo_lora_mode == "train_released":
            if config.finetune != "lora":
                raise ConfigError(
                    "model.turbo_lora_mode='train_released' trains the released LoRA: needs model.finetune='lora'"
                )
            if released_lora is None:
                raise ConfigError("model.turbo_lora_mode='train_released' needs model.turbo_lora_path (unet_lora.pt)")
        self._released_lora = released_lora  # consumed by inject_lora during VideoCrafter2.__init__
        super().__init__(components, config, video_size)
        del self._released_lora

    @classmethod
    def training_schedule(cls, schedule: VC2ScheduleConfig) -> VC2ScheduleConfig:
        """T2V-Turbo trains and samples without VC2's scale_arr (plain DDPM forward process)."""
        return schedule.model_copy(update={"use_scale": False})

    @classmethod
    def from_config(cls, config: ModelConfig) -> "T2VTurbo":
        """Base weights as for VC2 (time_cond_proj added with a zero base), the released LoRA from `turbo_lora_path`."""
        components = cls.load_components(config)
        lora = None
        if config.path is not None and config.turbo_lora_path is None and components.family != cls.family:
            raise ConfigError(f"{config.path}: VideoCrafter2 weights without the T2V-Turbo LoRA (4-step sampling needs "
                              "it): set model.turbo_lora_path to the released unet_lora.pt, or load a directory "
                              "converted with it merged (convert vc2 --lora)")
        if config.turbo_lora_path is not None:
            if components.turbo_lora_merged:
                raise ConfigError(f"{config.path}: the T2V-Turbo LoRA is already merged; drop model.turbo_lora_path")
            lora = read_lora_list(config.turbo_lora_path)
            if config.turbo_lora_mode == "merge_and_new":
                merge_turbo_lora(components.unet, components.unet_layout, lora, config.turbo_lora_path)
                components.turbo_lora_merged, lora = True, None
        return cls(components, config, cls.video_size_for(config), released_lora=lora)

    def merge_lora(self) -> None:
        """Fold the trained adapter into the base weights; the released T2V-Turbo LoRA is in them from now on (in
        train_released it is that adapter), which the saved directory records so that it is never merged twice."""
        super().merge_lora()
        self.turbo_lora_merged = True

    def inject_lora(self) -> list[BaseTunerLayer]:
        """merge_and_new: a fresh LoRA (the base class's). train_released: the released factors as two peft adapters,
        the trainable `released` one active and the frozen `released_reference` one for the DPO reference."""
        if self.config.turbo_lora_mode == "merge_and_new":
            return super().inject_lora()
        reference = to_reference_state_dict(self.unet.state_dict(), self.unet_layout)
        pairs = check_lora_list(self._released_lora, reference, self.unet_layout, source="released T2V-Turbo LoRA")
        ranks = {module.diffusers: up.shape[1] for module, up, _ in pairs}
        top = max(ranks.values())
        patterns = {f"^{re.escape(name)}": rank for name, rank in ranks.items() if rank != top}
        peft_config = PeftLoraConfig(
            r=top,
            lora_alpha=top,
            target_modules="|".join(re.escape(name) for name in ranks),  # one full-match regex: fast for 575 names
            rank_pattern=patterns,
            alpha_pattern=patterns,
        )
        for adapter in (RELEASED_ADAPTER, RELEASED_REFERENCE_ADAPTER):
            with warnings.catch_warnings():  # the second adapter is intended ("multiple adapters in the model")
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                layers = inject_lora_adapter(self.unet, peft_config, adapter_name=adapter)
            modules = dict(self.unet.named_modules())
            with torch.no_grad():
                for module, up, down in pairs:
                    layer = modules[module.diffusers]
                    layer.lora_A[adapter].weight.copy_(down)
                    layer.lora_B[adapter].weight.copy_(up)
        set_active_adapter(layers, RELEASED_ADAPTER)  # trainable; the reference adapter stays frozen and inactive
        return layers

    @contextmanager
    def reference_adapters(self) -> Iterator[None]:
        """train_released: the frozen released-LoRA adapter replaces the trained one; else adapters off."""
        if self.config.turbo_lora_mode != "train_released":
            with super().reference_adapters():
                yield
            return
        set_active_adapter(self._tuner_layers, RELEASED_REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield
        finally:
            set_active_adapter(self._tuner_layers, RELEASED_ADAPTER)

    # --- diffusion --------------------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform on the 50-step DDIM grid {19, 39, ..., 999} (VideoDPO's T2V-Turbo training)."""
        device = generator.device if generator is not None else torch.device("cpu")
        stride = self.schedule.config.num_train_timesteps // LCM_ORIGIN_STEPS
        index = torch.randint(0, LCM_ORIGIN_STEPS, (batch_size,), generator=generator, device=device)
        return index * stride + stride - 1

    def timestep_condition(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The guidance-scale embedding of w (default 7.5) for every sample."""
        return guidance_scale_embedding(torch.full((batch_size,), self.default_guidance_scale, device=device))

    def denoise(
        self,
        noise: torch.Tensor,
        text_embeddings: torch.Tensor,
        generators: Sequence[torch.Generator],
        *,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> torch.Tensor:
        """x_T -> x_0: LCM multistep (4 steps [999, 759, 519, 279], sample i's noise from generators[i]); w (7.5) is
        UNet conditioning, no CFG; fps 16."""
        w_embedding = guidance_scale_embedding(torch.full((noise.shape[0],), guidance_scale, device=self.device))
        schedule = self.schedule.config
        scheduler = LCMScheduler(
            num_train_timesteps=schedule.num_train_timesteps,
            beta_start=schedule.linear_start,
            beta_end=schedule.linear_end,
            beta_schedule="scaled_linear",
            original_inference_steps=LCM_ORIGIN_STEPS,
            timestep_scaling=10.0,
            set_alpha_to_one=True,
        )
        steps = lcm_timesteps(num_inference_steps, schedule.num_train_timesteps)
        scheduler.set_timesteps(timesteps=steps, device=self.device)
        latents = denoised = noise
        for t in scheduler.timesteps:
            timesteps = torch.full((latents.shape[0],), int(t), dtype=torch.long, device=self.device)
            eps = self._denoise(self.unet, latents, timesteps, text_embeddings, self.sample_fps, w_embedding)
            latents, denoised = scheduler.step(eps, t, latents, generator=list(generators), return_dict=False)
        return denoised
