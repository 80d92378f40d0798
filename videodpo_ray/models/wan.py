"""Wan2.1 text-to-video (1.3B, 14B) on the diffusers classes, behind the `VideoDiffusionModel` interface.

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
from typing import Any, Sequence

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
from videodpo_ray.models.base import (
    VideoDiffusionModel,
    classifier_free_guidance,
    pixels_to_vae_input,
    vae_output_to_pixels,
)
from videodpo_ray.models.config import ModelConfig
from videodpo_ray.models.loading import check_preset_config, load_pretrained_component
from videodpo_ray.models.modules import weight_dtype
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


class Wan(VideoDiffusionModel):
    """Wan2.1 text-to-video with a trainable policy and a frozen DPO reference.

    Submodules: `denoiser` (the policy transformer, also `transformer`), `vae` (frozen), `reference_denoiser`
    (full finetune only: a frozen copy, bf16 when mixed_precision is "bf16"); with a LoRA the reference is the
    transformer with adapters off. `timestep_sampling` is the preset's training timestep distribution.
    """

    family = "wan"
    prediction_type = "flow_prediction"
    PRESETS = PRESETS

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
        super().__init__(config)
        self.preset = preset
        self.denoiser = transformer
        self.vae = vae.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.timestep_sampling = preset.timestep_sampling
        self._prompt_encoder = prompt_encoder
        self._prompt_encoder_directory = prompt_encoder_directory
        self.video_size = preset.video_size
        self.default_num_inference_steps = preset.num_inference_steps
        self.default_guidance_scale = preset.guidance_scale
        self.configure_training()

    @property
    def transformer(self) -> WanTransformer3DModel:
        """The policy transformer (the base class's `denoiser`)."""
        return self.denoiser

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: WanPreset, config: ModelConfig) -> "Wan":
        """Random init from explicit component configs (with a random umT5 if the preset has an offline tokenizer)."""
        transformer = WanTransformer3DModel.from_config(preset.transformer)
        vae = AutoencoderKLWan.from_config(preset.vae)
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

        text_path = config.text_encoder_path if config.build_text_encoder else None
        text_directory = storage.local_directory(text_path) if text_path else None
        scheduler = flow_scheduler(preset.scheduler, "preset")
        if config.path is None:
            transformer = WanTransformer3DModel.from_config(preset.transformer)
            vae = AutoencoderKLWan.from_config(preset.vae)
        else:
            directory = storage.local_directory(config.path)
            transformer = load_pretrained_component(WanTransformer3DModel, directory, "transformer")
            check_preset_config(
                directory / "transformer",
                transformer.config,
                preset.transformer,
                TRANSFORMER_ARCHITECTURE_KEYS,
                config.variant,
            )
            vae = load_pretrained_component(AutoencoderKLWan, directory, "vae")
            check_preset_config(directory / "vae", vae.config, preset.vae, VAE_ARCHITECTURE_KEYS, config.variant)
            scheduler_directory = directory / "scheduler"
            if (scheduler_directory / "scheduler_config.json").is_file():
                stored = UniPCMultistepScheduler.load_config(str(scheduler_directory))
                scheduler = flow_scheduler(stored, str(scheduler_directory))
            if text_directory is None and (directory / "text_encoder").is_dir():
                text_directory = directory
        if not config.build_text_encoder:
            text_directory = None
        if text_directory is not None:
            for subfolder in ("text_encoder", "tokenizer"):
                if not (text_directory / subfolder).is_dir():
                    raise CheckpointError(f"{text_directory}: no {subfolder}/ folder for the umT5 prompt encoder")
        return cls(transformer, vae, scheduler, config, preset, prompt_encoder_directory=text_directory)

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
    def prompt_encoder(self) -> UMT5PromptEncoder:
        """The umT5 prompt encoder, loaded from its directory on first use."""
        if self._prompt_encoder is None:
            if self._prompt_encoder_directory is None:
                raise RuntimeError(
                    "this Wan has no umT5 text encoder: set ModelConfig.text_encoder_path (or a path with "
                    "text_encoder/ and tokenizer/), or pass precomputed text embeddings"
                )
            self._prompt_encoder = UMT5PromptEncoder.from_directory(
                self._prompt_encoder_directory, self.preset.text_length, self.preset.text_encoder, self.config.variant
            )
        return self._prompt_encoder

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.prompt_encoder(prompts, self.device)

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
        if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"expected uint8 videos (B, T, H, W, 3), got {videos.dtype} {tuple(videos.shape)}")
        self.latent_shape(videos.shape[1], videos.shape[2], videos.shape[3])
        vae_parameter = next(self.vae.parameters())
        pixels = pixels_to_vae_input(videos.to(vae_parameter.device).permute(0, 4, 1, 2, 3), vae_parameter.dtype)
        posterior = self.vae.encode(pixels).latent_dist
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
        frames = self.vae.decode((z * std + mean).to(vae_parameter.dtype)).sample
        return vae_output_to_pixels(frames).permute(0, 2, 3, 4, 1).cpu()

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

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeddings: torch.Tensor,
        *,
        reference: bool = False,
    ) -> torch.Tensor:
        """The predicted velocity (float32, same shape as noisy_latents)."""
        transformer_config = self.transformer.config
        expected_text = (self.preset.text_length, transformer_config.text_dim)
        if noisy_latents.ndim != 5 or noisy_latents.shape[1] != transformer_config.in_channels:
            raise ValueError(
                f"expected latents (B, {transformer_config.in_channels}, F, H, W), got {tuple(noisy_latents.shape)}"
            )
        if tuple(text_embeddings.shape[1:]) != expected_text:
            raise ValueError(
                f"expected text embeddings (B, {expected_text[0]}, {expected_text[1]}), "
                f"got {tuple(text_embeddings.shape)}"
            )
        if not reference:
            return self._denoise(self.transformer, noisy_latents, timesteps, text_embeddings)
        with torch.no_grad(), self.reference_model() as transformer:
            return self._denoise(transformer, noisy_latents, timesteps, text_embeddings)

    def _denoise(
        self,
        transformer: WanTransformer3DModel,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeddings: torch.Tensor,
    ) -> torch.Tensor:
        dtype = weight_dtype(transformer)
        device = noisy_latents.device
        with self.autocast(device):
            output = transformer(
                hidden_states=noisy_latents.to(dtype),
                timestep=timesteps.to(device),
                encoder_hidden_states=text_embeddings.to(device=device, dtype=dtype),
                return_dict=False,
            )[0]
        return output.float()

    # --- sampling -----------------------------------------------------------------------------------------------
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
        """From `noise` to clean latents with the policy and a fresh copy of the sampling scheduler (a deterministic
        flow solver: `generators` unused); classifier-free guidance against the empty prompt when guidance_scale > 1,
        conditional and unconditional rows in one denoiser call (the WanPipeline loop runs them as two)."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=noise.device)
        scheduler.set_begin_index(0)
        empty = self.empty_prompt_embedding() if guidance_scale > 1.0 else None
        latents = noise
        with self.eval_mode():
            for timestep in scheduler.timesteps:
                velocity = classifier_free_guidance(
                    self.predict, latents, timestep.expand(latents.shape[0]), text_embeddings, empty, guidance_scale
                )
                latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0]
        return latents
