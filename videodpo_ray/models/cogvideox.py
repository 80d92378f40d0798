"""CogVideoX (2B, 5B) on the diffusers classes: a `DiffusersTransformerModel` (`transformer_family`).

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
from typing import Any

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from transformers import T5Config, T5EncoderModel

from videodpo_ray import storage
from videodpo_ray.errors import CheckpointError
from videodpo_ray.models.cogvideox_presets import (
    PRESETS,
    SCHEDULE_KEYS,
    T5_ARCHITECTURE_KEYS,
    TRANSFORMER_ARCHITECTURE_KEYS,
    VAE_ARCHITECTURE_KEYS,
    CogVideoXPreset,
)
from videodpo_ray.models.config import ModelConfig
from videodpo_ray.models.loading import check_preset_config
from videodpo_ray.models.t5_prompt_encoder import T5PromptEncoder
from videodpo_ray.models.transformer_family import DiffusersTransformerModel


class CogVideoX(DiffusersTransformerModel):
    """CogVideoX text-to-video with a trainable policy and a frozen DPO reference.

    Submodules: `denoiser` (the policy transformer, also `transformer`), `vae` (frozen), `reference_denoiser`
    (full finetune only: a frozen copy, bf16 when mixed_precision is "bf16"); with a LoRA the reference is the
    transformer with adapters off.
    """

    family = "cogvideox"
    prediction_type = "v_prediction"
    PRESETS = PRESETS
    text_encoder_name = "T5"
    latent_layout = "B, F, C, H, W"
    transformer_class = CogVideoXTransformer3DModel
    vae_class = AutoencoderKLCogVideoX
    architecture_keys = {"transformer": TRANSFORMER_ARCHITECTURE_KEYS, "vae": VAE_ARCHITECTURE_KEYS}

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
        if transformer.config.patch_size_t is not None:
            raise CheckpointError("CogVideoX 1.5 transformers (patch_size_t set) are not supported; use 2b or 5b")
        spatial = 2 ** (len(vae.config.block_out_channels) - 1)
        sample = transformer.config
        video_size = (sample.sample_frames, sample.sample_height * spatial, sample.sample_width * spatial)
        super().__init__(
            transformer,
            vae,
            scheduler,
            config,
            preset,
            video_size,
            prompt_encoder=prompt_encoder,
            prompt_encoder_directory=prompt_encoder_directory,
        )

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: CogVideoXPreset, config: ModelConfig) -> "CogVideoX":
        """Random init from explicit component configs (with a random T5 if the preset has an offline tokenizer)."""
        transformer, vae = cls.transformer_and_vae(preset, None, config.variant)
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

        directory = storage.local_directory(config.path) if config.path is not None else None
        transformer, vae = cls.transformer_and_vae(preset, directory, config.variant)
        if directory is not None and (directory / "scheduler" / "scheduler_config.json").is_file():
            stored = CogVideoXDDIMScheduler.load_config(str(directory / "scheduler"))
            check_preset_config(directory / "scheduler", stored, preset.scheduler, SCHEDULE_KEYS, config.variant)
        text_directory = cls.prompt_encoder_directory(config, directory)
        scheduler = CogVideoXDDIMScheduler.from_config(preset.scheduler)
        return cls(transformer, vae, scheduler, config, preset, prompt_encoder_directory=text_directory)

    # --- text ---------------------------------------------------------------------------------------------------
    def load_prompt_encoder(self, directory: Path) -> T5PromptEncoder:
        prompt_encoder = T5PromptEncoder.from_directory(directory, self.transformer.config.max_text_seq_length)
        check_preset_config(
            directory / "text_encoder",
            prompt_encoder.encoder.config.to_dict(),
            self.preset.text_encoder,
            T5_ARCHITECTURE_KEYS,
            self.config.variant,
        )
        return prompt_encoder

    @property
    def text_shape(self) -> tuple[int, int]:
        return self.transformer.config.max_text_seq_length, self.transformer.config.text_embed_dim

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
        posterior = self.vae.encode(self.vae_input(videos)).latent_dist
        latents = posterior.mean if generator is None else posterior.sample(generator)
        return (latents.float() * self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4).contiguous()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, F, C, H, W), F odd -> uint8 videos (B, 1 + 4(F-1), H, W, 3) on the CPU."""
        if latents.ndim != 5 or latents.shape[1] % 2 == 0:
            raise ValueError(f"expected latents (B, F, C, H, W) with an odd F, got {tuple(latents.shape)}")
        vae_parameter = next(self.vae.parameters())
        z = latents.to(device=vae_parameter.device, dtype=vae_parameter.dtype).permute(0, 2, 1, 3, 4)
        return self.vae_output_videos(self.vae.decode(z / self.vae.config.scaling_factor).sample)

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

    def transformer_inputs(self, noisy_latents: torch.Tensor) -> dict[str, Any]:
        return {"image_rotary_emb": self.rotary_embedding(noisy_latents)}

    # --- sampling -----------------------------------------------------------------------------------------------
    def start_sampling(
        self, noise: torch.Tensor, num_inference_steps: int
    ) -> tuple[CogVideoXDDIMScheduler, torch.Tensor]:
        """DDIM (eta 0, trailing timesteps), as the CogVideoXPipeline loop."""
        scheduler = CogVideoXDDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=noise.device)
        return scheduler, noise * scheduler.init_noise_sigma
