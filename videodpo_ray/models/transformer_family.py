"""What the families built from diffusers' video transformers share (CogVideoX, Wan).

A family of this kind has a video transformer as its denoiser, a frozen 3D VAE, a sampling scheduler and a T5-style
prompt encoder. The prompt encoder loads from its directory on first use, so training on stored text embeddings never
loads it. `DiffusersTransformerModel` owns the construction, the text side, the transformer call under autocast,
the VAE's pixel conversions, the diffusers layout `save_pretrained` writes and the sampling loop (CFG in one call).
A family adds its presets, loading, latent layout, noising and sampler start.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence

import torch
from diffusers import ModelMixin
from torch import nn

from videodpo_ray import storage
from videodpo_ray.errors import CheckpointError
from videodpo_ray.models.base import VideoDiffusionModel
from videodpo_ray.models.config import ModelConfig
from videodpo_ray.models.functional import (
    classifier_free_guidance,
    guidance_embeddings,
    pixels_to_vae_input,
    vae_output_to_pixels,
)
from videodpo_ray.models.loading import check_preset_config, load_pretrained_component
from videodpo_ray.models.modules import weight_dtype


class PromptEncoder(Protocol):
    """A tokenizer + text encoder kept outside the module tree (optimizers and DeepSpeed never see it)."""

    def __call__(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor: ...

    def save_pretrained(self, directory: Path) -> None: ...


class SamplingScheduler(Protocol):
    timesteps: torch.Tensor

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool) -> Any: ...


class DiffusersTransformerModel(VideoDiffusionModel):
    """A text-to-video model on a diffusers video transformer (`denoiser`, also `transformer`), a frozen `vae`, the
    sampling `scheduler` and a lazily loaded prompt encoder; `preset` is the variant's preset object."""

    text_encoder_name: ClassVar[str]  # in messages: "T5", "umT5"
    transformer_class: ClassVar[type[ModelMixin]]
    vae_class: ClassVar[type[ModelMixin]]
    architecture_keys: ClassVar[dict[str, Sequence[str]]]  # "transformer" / "vae": config keys a checkpoint must match

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        scheduler: Any,
        config: ModelConfig,
        preset: Any,
        video_size: tuple[int, int, int],
        *,
        prompt_encoder: PromptEncoder | None = None,
        prompt_encoder_directory: Path | None = None,
    ) -> None:
        super().__init__(config)
        self.preset = preset
        self.denoiser = transformer
        self.vae = vae.eval().requires_grad_(False)
        self.scheduler = scheduler
        self._prompt_encoder = prompt_encoder
        self._prompt_encoder_directory = prompt_encoder_directory
        self.video_size = video_size
        self.default_num_inference_steps = preset.num_inference_steps
        self.default_guidance_scale = preset.guidance_scale
        self.configure_training()

    @property
    def transformer(self) -> nn.Module:
        """The policy transformer (the base class's `denoiser`)."""
        return self.denoiser

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def transformer_and_vae(cls, preset: Any, directory: Path | None, variant: str) -> tuple[ModelMixin, ModelMixin]:
        """The transformer and VAE of a diffusers-format model `directory`, loaded strictly and checked against the
        `variant`'s preset; random init from the preset when `directory` is None."""
        if directory is None:
            return cls.transformer_class.from_config(preset.transformer), cls.vae_class.from_config(preset.vae)
        components = []
        for name, component_class in (("transformer", cls.transformer_class), ("vae", cls.vae_class)):
            component = load_pretrained_component(component_class, directory, name)
            check_preset_config(directory / name, component.config, getattr(preset, name), cls.architecture_keys[name],
                                variant)
            components.append(component)
        return components[0], components[1]

    @classmethod
    def prompt_encoder_directory(cls, config: ModelConfig, model_directory: Path | None) -> Path | None:
        """Where the prompt encoder loads from on first use: `config.text_encoder_path`, else the model directory
        when it has a text_encoder/ folder; None without one or when `config.build_text_encoder` is off. A
        CheckpointError when that directory lacks text_encoder/ or tokenizer/."""
        if not config.build_text_encoder:
            return None
        if config.text_encoder_path:
            directory = storage.local_directory(config.text_encoder_path)
        elif model_directory is not None and (model_directory / "text_encoder").is_dir():
            directory = model_directory
        else:
            return None
        for subfolder in ("text_encoder", "tokenizer"):
            if not (directory / subfolder).is_dir():
                raise CheckpointError(
                    f"{directory}: no {subfolder}/ folder for the {cls.text_encoder_name} prompt encoder"
                )
        return directory

    def write_pretrained(self, directory: Path) -> None:
        """The diffusers layout from_config reads: transformer/, vae/, scheduler/ and, when this model has a
        prompt encoder, text_encoder/ + tokenizer/ (safetensors)."""
        self.transformer.save_pretrained(str(directory / "transformer"))
        self.vae.save_pretrained(str(directory / "vae"))
        self.scheduler.save_pretrained(str(directory / "scheduler"))
        if self._prompt_encoder is not None or self._prompt_encoder_directory is not None:
            self.prompt_encoder.save_pretrained(directory)

    # --- text ---------------------------------------------------------------------------------------------------
    @property
    def prompt_encoder(self) -> PromptEncoder:
        """The prompt encoder, loaded from its directory on first use."""
        if self._prompt_encoder is None:
            if self._prompt_encoder_directory is None:
                raise RuntimeError(
                    f"this {type(self).__name__} has no {self.text_encoder_name} text encoder: set "
                    "ModelConfig.text_encoder_path (or a path with text_encoder/ and tokenizer/), or pass precomputed "
                    "text embeddings"
                )
            self._prompt_encoder = self.load_prompt_encoder(self._prompt_encoder_directory)
        return self._prompt_encoder

    @abstractmethod
    def load_prompt_encoder(self, directory: Path) -> PromptEncoder:
        """The family's prompt encoder from `directory` (text_encoder/ + tokenizer/), checked against the preset."""

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.prompt_encoder(prompts, self.device)

    # --- VAE ----------------------------------------------------------------------------------------------------
    def vae_input(self, videos: torch.Tensor) -> torch.Tensor:
        """uint8 videos (B, T, H, W, 3) of a size the family makes -> the VAE's input (B, 3, T, H, W) in [-1, 1],
        on its device and in its dtype."""
        if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"expected uint8 videos (B, T, H, W, 3), got {videos.dtype} {tuple(videos.shape)}")
        self.latent_shape(videos.shape[1], videos.shape[2], videos.shape[3])
        vae_parameter = next(self.vae.parameters())
        return pixels_to_vae_input(videos.to(vae_parameter.device).permute(0, 4, 1, 2, 3), vae_parameter.dtype)

    @staticmethod
    def vae_output_videos(frames: torch.Tensor) -> torch.Tensor:
        """The VAE decoder's output (B, 3, T, H, W) -> uint8 videos (B, T, H, W, 3) on the CPU."""
        return vae_output_to_pixels(frames).permute(0, 2, 3, 4, 1).cpu()

    # --- the transformer ----------------------------------------------------------------------------------------
    def run_denoiser(
        self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text_embeddings: torch.Tensor
    ) -> torch.Tensor:
        dtype = weight_dtype(self.denoiser)  # the policy's, also for its reference copy (bf16 matmul weights)
        device = noisy_latents.device
        with self.autocast(device):
            output = denoiser(
                hidden_states=noisy_latents.to(dtype),
                encoder_hidden_states=text_embeddings.to(device=device, dtype=dtype),
                timestep=timesteps.to(device),
                return_dict=False,
                **self.transformer_inputs(noisy_latents),
            )[0]
        return output.float()

    def transformer_inputs(self, noisy_latents: torch.Tensor) -> dict[str, Any]:
        """Extra keyword inputs of the transformer call for these latents (none by default)."""
        return {}

    # --- sampling -----------------------------------------------------------------------------------------------
    @abstractmethod
    def start_sampling(self, noise: torch.Tensor, num_inference_steps: int) -> tuple[SamplingScheduler, torch.Tensor]:
        """A fresh sampling scheduler set to `num_inference_steps`, and the starting latents from `noise`."""

    @torch.no_grad()
    def denoise(
        self,
        noise: torch.Tensor,
        text_embeddings: torch.Tensor,
        generators: Sequence[torch.Generator],
        *,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> torch.Tensor:
        """From `noise` to clean latents with the policy and the family's deterministic sampler (`generators`
        unused); classifier-free guidance against the empty prompt when guidance_scale > 1, as the diffusers
        pipelines, with the conditional and unconditional rows in one transformer call."""
        scheduler, latents = self.start_sampling(noise, num_inference_steps)
        embeddings = guidance_embeddings(text_embeddings, self.empty_prompt_embedding() if guidance_scale > 1 else None)
        with self.eval_mode():
            for timestep in scheduler.timesteps:
                velocity = classifier_free_guidance(
                    self.predict, latents, timestep.expand(latents.shape[0]), embeddings, guidance_scale
                )
                latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0]
        return latents
