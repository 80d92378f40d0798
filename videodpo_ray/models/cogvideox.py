"""CogVideoX (2B, 5B) on the diffusers classes, behind the `VideoDiffusionModel` interface.

- denoiser: `CogVideoXTransformer3DModel` on latents (B, F, C, H, W); the 5B takes 3D RoPE (`image_rotary_emb`);
- VAE: `AutoencoderKLCogVideoX` (49 frames -> 13 latent frames, 8x spatial), latents scaled by its scaling_factor;
- text: T5-v1.1-XXL through `T5PromptEncoder` (226 tokens, no attention mask), loaded on first use;
- diffusion: `CogVideoXDDIMScheduler`, v-prediction, SNR shift then zero-terminal-SNR rescale, trailing spacing;
  training target v = sqrt(abar_t) * e - sqrt(1 - abar_t) * x0; DDIM (eta 0) sampling with CFG on the empty prompt.

Presets live in `cogvideox_presets`. Weights come from a diffusers-format directory (`ModelConfig.path`: local path
or fsspec URL, through `storage.local_directory`) with transformer/, vae/ and optionally text_encoder/ + tokenizer/
subfolders, loaded strictly; `save_pretrained` writes that layout. Finetune modes "full" and "lora" (base class).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from transformers import T5Config, T5EncoderModel

from videodpo_ray import storage
from videodpo_ray.errors import CheckpointError
from videodpo_ray.models.base import (
    VideoDiffusionModel,
    classifier_free_guidance,
    pixels_to_vae_input,
    vae_output_to_pixels,
)
from videodpo_ray.models.cogvideox_presets import (
    PRESETS,
    SCHEDULE_KEYS,
    T5_ARCHITECTURE_KEYS,
    TRANSFORMER_ARCHITECTURE_KEYS,
    VAE_ARCHITECTURE_KEYS,
    CogVideoXPreset,
)
from videodpo_ray.models.config import ModelConfig
from videodpo_ray.models.loading import check_preset_config, load_pretrained_component
from videodpo_ray.models.modules import weight_dtype
from videodpo_ray.models.t5_prompt_encoder import T5PromptEncoder


class CogVideoX(VideoDiffusionModel):
    """CogVideoX text-to-video with a trainable policy and a frozen DPO reference.

    Submodules: `denoiser` (the policy transformer, also `transformer`), `vae` (frozen), `reference_denoiser`
    (full finetune only: a frozen copy, bf16 when mixed_precision is "bf16"); with a LoRA the reference is the
    transformer with adapters off.
    """

    family = "cogvideox"
    prediction_type = "v_prediction"
    PRESETS = PRESETS

    def __init__(
        self,
        transformer: CogVideoXTransformer3DModel,
        vae: AutoencoderKLCogVideoX,
        scheduler: CogVideoXDDIMScheduler,
        config: ModelConfig,
        preset: CogVideoXPreset,
        *,
        prompt_encoder: T5PromptEncoder | None = None,
        prompt_encoder_directory: Path | None = None,
    ) -> None:
        super().__init__(config)
        if transformer.config.patch_size_t is not None:
            raise CheckpointError("CogVideoX 1.5 transformers (patch_size_t set) are not supported; use 2b or 5b")
        self.preset = preset
        self.denoiser = transformer
        self.vae = vae.eval().requires_grad_(False)
        self.scheduler = scheduler
        self._prompt_encoder = prompt_encoder
        self._prompt_encoder_directory = prompt_encoder_directory
        spatial = self.vae_spatial_factor
        sample = transformer.config
        self.video_size = (sample.sample_frames, sample.sample_height * spatial, sample.sample_width * spatial)
        self.default_num_inference_steps = preset.num_inference_steps
        self.default_guidance_scale = preset.guidance_scale
        self.configure_training()

    @property
    def transformer(self) -> CogVideoXTransformer3DModel:
        """The policy transformer (the base class's `denoiser`)."""
        return self.denoiser

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: CogVideoXPreset, config: ModelConfig) -> "CogVideoX":
        """Random init from explicit component configs (with a random T5 if the preset has an offline tokenizer)."""
        transformer = CogVideoXTransformer3DModel.from_config(preset.transformer)
        vae = AutoencoderKLCogVideoX.from_config(preset.vae)
        scheduler = CogVideoXDDIMScheduler.from_config(preset.scheduler)
        prompt_encoder = None
        if preset.offline_tokenizer is not None and config.build_text_encoder:
            encoder = T5EncoderModel(T5Config(**preset.text_encoder))
            max_length = transformer.config.max_text_seq_length
            prompt_encoder = T5PromptEncoder(preset.offline_tokenizer(), encoder, max_length)
        return cls(transformer, vae, scheduler, config, preset, prompt_encoder=prompt_encoder)

    @classmethod
    def from_config(cls, config: ModelConfig) -> "CogVideoX":
        """Build `config.variant`: random init without `config.path`, else load the diffusers-format directory.

        `path` (local or fsspec URL) must hold transformer/ and vae/ matching the variant; it is loaded strictly
        (missing, unexpected or mis-shaped weights raise CheckpointError). The T5 comes from
        `text_encoder_path` or else `path` (text_encoder/ + tokenizer/ subfolders) and is loaded on first use of
        encode_prompts, so training on precomputed embeddings never loads it. The scheduler is the variant's
        (a scheduler/ subfolder must agree on the noise schedule).
        """
        preset = cls.preset(config.variant)
        if config.path is None and config.text_encoder_path is None:
            return cls.from_preset(preset, config)

        text_path = config.text_encoder_path if config.build_text_encoder else None
        text_directory = storage.local_directory(text_path) if text_path else None
        if config.path is None:
            transformer = CogVideoXTransformer3DModel.from_config(preset.transformer)
            vae = AutoencoderKLCogVideoX.from_config(preset.vae)
        else:
            directory = storage.local_directory(config.path)
            transformer = load_pretrained_component(CogVideoXTransformer3DModel, directory, "transformer")
            check_preset_config(
                directory / "transformer",
                transformer.config,
                preset.transformer,
                TRANSFORMER_ARCHITECTURE_KEYS,
                config.variant,
            )
            vae = load_pretrained_component(AutoencoderKLCogVideoX, directory, "vae")
            check_preset_config(directory / "vae", vae.config, preset.vae, VAE_ARCHITECTURE_KEYS, config.variant)
            scheduler_directory = directory / "scheduler"
            if (scheduler_directory / "scheduler_config.json").is_file():
                stored = CogVideoXDDIMScheduler.load_config(str(scheduler_directory))
                check_preset_config(scheduler_directory, stored, preset.scheduler, SCHEDULE_KEYS, config.variant)
            if text_directory is None and (directory / "text_encoder").is_dir():
                text_directory = directory
        if not config.build_text_encoder:
            text_directory = None
        if text_directory is not None:
            for subfolder in ("text_encoder", "tokenizer"):
                if not (text_directory / subfolder).is_dir():
                    raise CheckpointError(f"{text_directory}: no {subfolder}/ folder for the T5 prompt encoder")
        scheduler = CogVideoXDDIMScheduler.from_config(preset.scheduler)
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
    def prompt_encoder(self) -> T5PromptEncoder:
        """The T5 prompt encoder, loaded from its directory on first use."""
        if self._prompt_encoder is None:
            if self._prompt_encoder_directory is None:
                raise RuntimeError(
                    "this CogVideoX has no T5 text encoder: set ModelConfig.text_encoder_path (or a path with "
                    "text_encoder/ and tokenizer/), or pass precomputed text embeddings"
                )
            prompt_encoder = T5PromptEncoder.from_directory(
                self._prompt_encoder_directory, self.transformer.config.max_text_seq_length
            )
            check_preset_config(
                self._prompt_encoder_directory / "text_encoder",
                prompt_encoder.encoder.config.to_dict(),
                self.preset.text_encoder,
                T5_ARCHITECTURE_KEYS,
                self.config.variant,
            )
            self._prompt_encoder = prompt_encoder
        return self._prompt_encoder

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.prompt_encoder(prompts, self.device)

    # --- VAE ----------------------------------------------------------------------------------------------------
    @property
    def vae_spatial_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def vae_temporal_factor(self) -> int:
        return int(self.vae.config.temporal_compression_ratio)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(F, C, H, W) latents of a video of num_frames x height x width.

        Frames must be 1 + 2k * temporal factor (1, 9, ..., 49): the VAE decodes latent frames in pairs after an
        odd first one, so only an odd latent count decodes back to the same number of frames. Height and width
        must be multiples of the VAE's spatial factor times the patch size (16)."""
        temporal, spatial = self.vae_temporal_factor, self.vae_spatial_factor
        multiple = spatial * self.transformer.config.patch_size
        if num_frames < 1 or (num_frames - 1) % (2 * temporal):
            raise ValueError(f"CogVideoX needs 1 + k*{2 * temporal} frames (e.g. 49), got {num_frames}")
        if height % multiple or width % multiple:
            raise ValueError(f"CogVideoX needs height and width divisible by {multiple}, got {height}x{width}")
        return (
            (num_frames - 1) // temporal + 1,
            self.transformer.config.in_channels,
            height // spatial,
            width // spatial,
        )

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"expected uint8 videos (B, T, H, W, 3), got {videos.dtype} {tuple(videos.shape)}")
        self.latent_shape(videos.shape[1], videos.shape[2], videos.shape[3])
        vae_parameter = next(self.vae.parameters())
        pixels = pixels_to_vae_input(videos.to(vae_parameter.device).permute(0, 4, 1, 2, 3), vae_parameter.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mean if generator is None else posterior.sample(generator)
        return (latents.float() * self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4).contiguous()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, F, C, H, W), F odd -> uint8 videos (B, 1 + 4(F-1), H, W, 3) on the CPU."""
        if latents.ndim != 5 or latents.shape[1] % 2 == 0:
            raise ValueError(f"expected latents (B, F, C, H, W) with an odd F, got {tuple(latents.shape)}")
        vae_parameter = next(self.vae.parameters())
        z = latents.to(device=vae_parameter.device, dtype=vae_parameter.dtype).permute(0, 2, 1, 3, 4)
        frames = self.vae.decode(z / self.vae.config.scaling_factor).sample
        return vae_output_to_pixels(frames).permute(0, 2, 3, 4, 1).cpu()

    # --- diffusion ----------------------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform over 0..999 (as the diffusers CogVideoX training scripts)."""
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randint(
            0, self.scheduler.config.num_train_timesteps, (batch_size,), generator=generator, device=device
        )

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * latents."""
        return self.scheduler.get_velocity(latents, noise, timesteps)

    def rotary_embedding(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """3D RoPE (cos, sin) for latents (B, F, C, H, W) when the transformer uses it (5B), else None; the grid is
        crop-fitted to the transformer's sample size exactly as diffusers' CogVideoXPipeline does."""
        transformer_config = self.transformer.config
        if not transformer_config.use_rotary_positional_embeddings:
            return None
        patch = transformer_config.patch_size
        grid = (latents.shape[3] // patch, latents.shape[4] // patch)
        crop = get_resize_crop_region_for_grid(
            grid, transformer_config.sample_width // patch, transformer_config.sample_height // patch
        )
        return get_3d_rotary_pos_embed(
            embed_dim=transformer_config.attention_head_dim,
            crops_coords=crop,
            grid_size=grid,
            temporal_size=latents.shape[1],
            device=latents.device,
        )

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
        expected_text = (transformer_config.max_text_seq_length, transformer_config.text_embed_dim)
        if noisy_latents.ndim != 5 or noisy_latents.shape[2] != transformer_config.in_channels:
            raise ValueError(
                f"expected latents (B, F, {transformer_config.in_channels}, H, W), got {tuple(noisy_latents.shape)}"
            )
        if tuple(text_embeddings.shape[1:]) != expected_text:
            raise ValueError(
                f"expected text embeddings (B, {expected_text[0]}, {expected_text[1]}), "
                f"got {tuple(text_embeddings.shape)}"
            )
        rotary = self.rotary_embedding(noisy_latents)
        if not reference:
            return self._denoise(self.transformer, noisy_latents, timesteps, text_embeddings, rotary)
        with torch.no_grad(), self.reference_model() as transformer:
            return self._denoise(transformer, noisy_latents, timesteps, text_embeddings, rotary)

    def _denoise(
        self,
        transformer: CogVideoXTransformer3DModel,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeddings: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        dtype = weight_dtype(transformer)
        device = noisy_latents.device
        with self.autocast(device):
            output = transformer(
                hidden_states=noisy_latents.to(dtype),
                encoder_hidden_states=text_embeddings.to(device=device, dtype=dtype),
                timestep=timesteps.to(device),
                image_rotary_emb=rotary,
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
        """DDIM (eta 0, trailing timesteps: deterministic, `generators` unused) from `noise` to clean latents with the
        policy; classifier-free guidance against the empty prompt when guidance_scale > 1 (the CogVideoXPipeline
        loop)."""
        scheduler = CogVideoXDDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=noise.device)
        latents = noise * scheduler.init_noise_sigma
        empty = self.empty_prompt_embedding() if guidance_scale > 1.0 else None
        with self.eval_mode():
            for timestep in scheduler.timesteps:
                velocity = classifier_free_guidance(
                    self.predict, latents, timestep.expand(latents.shape[0]), text_embeddings, empty, guidance_scale
                )
                latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0]
        return latents
