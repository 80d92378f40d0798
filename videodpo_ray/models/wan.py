"""Wan2.1 text-to-video (1.3B, 14B) on the diffusers classes: a `DiffusersTransformerModel` (`transformer_family`).

- denoiser: `WanTransformer3DModel` on latents (B, C, F, H, W), patch (1, 2, 2), 3D RoPE inside the model;
- VAE: `AutoencoderKLWan` (frames 1 + 4k -> 1 + k latent frames, 8x spatial); latents are normalised per channel
  with the VAE's statistics: encode (z - latents_mean) / latents_std, decode z * latents_std + latents_mean;
- text: umT5-XXL through `UMT5PromptEncoder` (512 tokens, masked), loaded on first use only;
- diffusion: rectified flow. With s = t / 1000 (`noise_level`), x_t = (1 - s) x0 + s eps and the target is the
  velocity v = eps - x0; t is drawn logit-normal or uniform (`FlowTimestepSampling`). Sampling: the directory's
  flow scheduler (UniPC with flow sigmas and flow_shift by default) with CFG against the empty prompt, the loop of
  diffusers' `WanPipeline` with the conditional and unconditional rows in one denoiser call.

Weights come from a diffusers-format directory (`ModelConfig.path`: local path or fsspec URL, through
`storage.local_directory`) with transformer/, vae/, optional scheduler/ and optional text_encoder/ + tokenizer/,
loaded strictly; `save_pretrained` writes that layout. Finetune modes "full" and "lora" (base class).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanTransformer3DModel,
)
from diffusers.training_utils import compute_density_for_timestep_sampling
from transformers import UMT5Config, UMT5EncoderModel

from videodpo_ray import storage
from videodpo_ray.errors import CheckpointError
from videodpo_ray.models.config import ModelConfig
from videodpo_ray.models.transformer_family import DiffusersTransformerModel
from videodpo_ray.models.wan_presets import (
    PRESETS,
    TRANSFORMER_ARCHITECTURE_KEYS,
    VAE_ARCHITECTURE_KEYS,
    UMT5PromptEncoder,
    WanPreset,
)

FlowScheduler = UniPCMultistepScheduler | FlowMatchEulerDiscreteScheduler
SCHEDULERS: dict[str, type[FlowScheduler]] = {
    "UniPCMultistepScheduler": UniPCMultistepScheduler,
    "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler,
}
NUM_TRAIN_TIMESTEPS = 1000


def flow_scheduler(config: dict[str, Any], source: str) -> FlowScheduler:
    """The sampling scheduler a config describes; CheckpointError unless it is a 1000-step flow-matching one."""
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise CheckpointError(f"{source}: scheduler {name!r} is not supported; expected one of {', '.join(SCHEDULERS)}")
    scheduler = SCHEDULERS[name].from_config(config)
    settings = scheduler.config
    is_flow = name != "UniPCMultistepScheduler" or (
        settings.use_flow_sigmas and settings.prediction_type == "flow_prediction"
    )
    if not is_flow or settings.num_train_timesteps != NUM_TRAIN_TIMESTEPS:
        raise CheckpointError(
            f"{source}: {name} must be a flow-matching scheduler over {NUM_TRAIN_TIMESTEPS} steps "
            "(UniPC: use_flow_sigmas=true, prediction_type='flow_prediction')"
        )
    return scheduler


class Wan(DiffusersTransformerModel):
    """Wan2.1 text-to-video with a trainable policy and a frozen DPO reference.

    Submodules: `denoiser` (the policy transformer, also `transformer`), `vae` (frozen), `reference_denoiser`
    (full finetune only: a frozen copy, bf16 when mixed_precision is "bf16"); with a LoRA the reference is the
    transformer with adapters off. `timestep_sampling` is the preset's training timestep distribution.
    """

    family = "wan"
    prediction_type = "flow_prediction"
    PRESETS = PRESETS
    text_encoder_name = "umT5"
    latent_layout = "B, C, F, H, W"
    transformer_class = WanTransformer3DModel
    vae_class = AutoencoderKLWan
    architecture_keys = {"transformer": TRANSFORMER_ARCHITECTURE_KEYS, "vae": VAE_ARCHITECTURE_KEYS}

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        vae: AutoencoderKLWan,
        scheduler: FlowScheduler,
        config: ModelConfig,
        preset: WanPreset,
        *,
        prompt_encoder: UMT5PromptEncoder | None = None,
        prompt_encoder_directory: Path | None = None,
    ) -> None:
        super().__init__(
            transformer,
            vae,
            scheduler,
            config,
            preset,
            preset.video_size,
            prompt_encoder=prompt_encoder,
            prompt_encoder_directory=prompt_encoder_directory,
        )
        self.timestep_sampling = preset.timestep_sampling

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: WanPreset, config: ModelConfig) -> "Wan":
        """Random init from explicit component configs (with a random umT5 if the preset has an offline tokenizer)."""
        transformer, vae = cls.transformer_and_vae(preset, None, config.variant)
        prompt_encoder = None
        if preset.offline_tokenizer is not None and config.build_text_encoder:
            encoder = UMT5EncoderModel(UMT5Config(**preset.text_encoder))
            prompt_encoder = UMT5PromptEncoder(preset.offline_tokenizer(), encoder, preset.text_length)
        scheduler = flow_scheduler(preset.scheduler, "preset")
        return cls(transformer, vae, scheduler, config, preset, prompt_encoder=prompt_encoder)

    @classmethod
    def from_config(cls, config: ModelConfig) -> "Wan":
        """Build `config.variant`: random init without `config.path`, else load the diffusers-format directory.

        `path` (local or fsspec URL, e.g. a copy of `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`) must hold transformer/ and
        vae/ matching the variant; they load strictly (missing, unexpected or mis-shaped weights raise
        CheckpointError). A scheduler/ folder, when present, is the sampling scheduler (else the variant's). The umT5
        comes from `text_encoder_path` or else `path` (text_encoder/ + tokenizer/) and loads on first use of
        encode_prompts, so training on precomputed embeddings never loads it.
        """
        preset = cls.preset(config.variant)
        if config.path is None and config.text_encoder_path is None:
            return cls.from_preset(preset, config)

        directory = storage.local_directory(config.path) if config.path is not None else None
        transformer, vae = cls.transformer_and_vae(preset, directory, config.variant)
        scheduler = flow_scheduler(preset.scheduler, "preset")
        if directory is not None and (directory / "scheduler" / "scheduler_config.json").is_file():
            stored = UniPCMultistepScheduler.load_config(str(directory / "scheduler"))
            scheduler = flow_scheduler(stored, str(directory / "scheduler"))
        text_directory = cls.prompt_encoder_directory(config, directory)
        return cls(transformer, vae, scheduler, config, preset, prompt_encoder_directory=text_directory)

    # --- text ---------------------------------------------------------------------------------------------------
    def load_prompt_encoder(self, directory: Path) -> UMT5PromptEncoder:
        return UMT5PromptEncoder.from_directory(
            directory, self.preset.text_length, self.preset.text_encoder, self.config.variant
        )

    @property
    def text_shape(self) -> tuple[int, int]:
        return self.preset.text_length, self.transformer.config.text_dim

    # --- VAE ----------------------------------------------------------------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F, H, W) latents of a video of num_frames x height x width: frames must be 1 + 4k, height and width
        multiples of 16 (the VAE's 8x times the transformer's 2x2 patch)."""
        temporal, spatial = self.vae.config.scale_factor_temporal, self.vae.config.scale_factor_spatial
        multiple = spatial * self.transformer.config.patch_size[1]
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise ValueError(f"Wan needs 1 + k*{temporal} frames (e.g. 81), got {num_frames}")
        if height % multiple or width % multiple:
            raise ValueError(f"Wan needs height and width divisible by {multiple}, got {height}x{width}")
        channels = self.transformer.config.in_channels
        return channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latents_mean and latents_std, shaped (1, C, 1, 1, 1) like `like`."""
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(like)
        return mean, std

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> normalised latents (B, C, F, H/8, W/8): (z - latents_mean) / latents_std."""
        posterior = self.vae.encode(self.vae_input(videos)).latent_dist
        latents = (posterior.mean if generator is None else posterior.sample(generator)).float()
        mean, std = self._latent_statistics(latents)
        return (latents - mean) / std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, F, H, W) -> uint8 videos (B, 1 + 4(F-1), 8H, 8W, 3) on the CPU."""
        if latents.ndim != 5 or latents.shape[1] != self.vae.config.z_dim:
            raise ValueError(f"expected latents (B, {self.vae.config.z_dim}, F, H, W), got {tuple(latents.shape)}")
        vae_parameter = next(self.vae.parameters())
        z = latents.to(device=vae_parameter.device, dtype=torch.float32)
        mean, std = self._latent_statistics(z)
        return self.vae_output_videos(self.vae.decode((z * std + mean).to(vae_parameter.dtype)).sample)

    # --- diffusion ----------------------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """t = floor(1000 u), u from the preset's `FlowTimestepSampling` (logit-normal or uniform)."""
        device = generator.device if generator is not None else torch.device("cpu")
        sampling = self.timestep_sampling
        u = compute_density_for_timestep_sampling(
            weighting_scheme=sampling.scheme,
            batch_size=batch_size,
            logit_mean=sampling.logit_mean,
            logit_std=sampling.logit_std,
            device=device,
            generator=generator,
        )
        return (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)

    def noise_level(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The flow-matching noise level s = t / 1000 in [0, 1) of each timestep (float32)."""
        return timesteps.to(torch.float32) / NUM_TRAIN_TIMESTEPS

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - s) x0 + s eps."""
        s = self.noise_level(timesteps).to(latents).view(-1, *([1] * (latents.ndim - 1)))
        return (1.0 - s) * latents + s * noise

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity v = eps - x0 (independent of t)."""
        return noise - latents

    # --- sampling -----------------------------------------------------------------------------------------------
    def start_sampling(self, noise: torch.Tensor, num_inference_steps: int) -> tuple[FlowScheduler, torch.Tensor]:
        """A fresh copy of the checkpoint's flow scheduler (UniPC or Euler), as the WanPipeline loop."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=noise.device)
        scheduler.set_begin_index(0)
        return scheduler, noise
