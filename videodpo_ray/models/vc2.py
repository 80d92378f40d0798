"""VideoCrafter2 behind the `VideoDiffusionModel` interface: UNet + kl-f8 VAE + OpenCLIP-H text encoder.

Owns the VC2 presets ("tiny": random, CPU tests; "full": VC2's real size), the model (epsilon prediction, scale_arr
noising, lvdm DDIM + CFG sampling, fps conditioning) and `write_pretrained` (the converted-directory layout of
`convert_vc2.save_components`). Finetune modes are the base class's: "full" and "temporal" (only `transformer_in`,
`temp_convs`, `temp_attentions` train) keep a frozen copy as the DPO reference; "lora" adds a fresh peft LoRA and
the reference is the same UNet with the adapters off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from diffusers import AutoencoderKL
from torch import nn
from transformers import CLIPTextModel

from videodpo_ray.models.base import VideoDiffusionModel
from videodpo_ray.models.config import ModelConfig
from videodpo_ray.models.convert_vc2 import VC2Components, load_components, load_text_encoder, save_components
from videodpo_ray.models.functional import (
    classifier_free_guidance,
    guidance_embeddings,
    pixels_to_vae_input,
    vae_output_to_pixels,
)
from videodpo_ray.models.lvdm_layout import LvdmUNetConfig
from videodpo_ray.models.modules import weight_dtype
from videodpo_ray.models.openclip_text import OPENCLIP_CONTEXT_LENGTH, OpenCLIPTextEncoder, clip_text_config
from videodpo_ray.models.vc2_schedule import VC2NoiseSchedule, VC2ScheduleConfig
from videodpo_ray.models.vc2_unet import VC2UNet3DConditionModel

TEMPORAL_MODULES = ("transformer_in.", ".temp_convs.", ".temp_attentions.")
FULL_VIDEO_SIZE = (16, 320, 512)  # frames, height, width of VC2 / T2V-Turbo v1 samples


@dataclass(frozen=True)
class VC2Preset:
    """A VC2-shaped architecture for random init: lvdm UNet kwargs, AutoencoderKL kwargs, the OpenCLIP text tower
    (`clip_text_config` kwargs) and the default sample size (frames, height, width)."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    video_size: tuple[int, int, int]

    def components(self, time_cond_proj_dim: int | None = None, text_encoder: bool = True) -> VC2Components:
        """Random-init components (T2V-Turbo: with a `time_cond_proj` of that width). Without the text encoder
        (`text_encoder=False`) it is still drawn, then dropped: every other weight is the same either way."""
        layout = LvdmUNetConfig(**self.unet, time_cond_proj_dim=time_cond_proj_dim)
        vae = AutoencoderKL(**self.vae)
        drawn = OpenCLIPTextEncoder(CLIPTextModel(clip_text_config(**self.text_encoder)).eval())
        text = drawn if text_encoder else None
        return VC2Components(
            unet=VC2UNet3DConditionModel(**layout.diffusers_config()),
            unet_layout=layout,
            vae=vae,
            text_encoder=text,
            schedule=VC2ScheduleConfig(),
        )


_KL_F8 = {"latent_channels": 4, "scaling_factor": 0.18215}
PRESETS: dict[str, VC2Preset] = {
    # UNet ~1M parameters
    "tiny": VC2Preset(
        unet={
            "model_channels": 32,
            "channel_mult": [1, 2],
            "num_res_blocks": 1,
            "attention_resolutions": [1, 2],
            "num_head_channels": 16,
            "context_dim": 64,
        },
        vae={
            **_KL_F8,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "block_out_channels": [32, 32],
            "layers_per_block": 1,
            "norm_num_groups": 32,
        },
        text_encoder={"hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128},
        video_size=(4, 16, 16),
    ),
    # VC2's real size: 1.4B-parameter UNet (the lvdm defaults), kl-f8 VAE, OpenCLIP-H text tower at layer 23
    "full": VC2Preset(
        unet={},
        vae={
            **_KL_F8,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
        },
        text_encoder={},
        video_size=FULL_VIDEO_SIZE,
    ),
}


class VideoCrafter2(VideoDiffusionModel):
    """VideoCrafter2 (epsilon prediction, scale_arr noising, DDIM + CFG sampling, fps conditioning)."""

    family = "vc2"
    prediction_type = "epsilon"
    PRESETS = PRESETS
    temporal_modules = TEMPORAL_MODULES
    latent_layout = "B, C, T, H, W"
    fixed_text_length = False  # the UNet's cross-attention takes any number of tokens; OpenCLIP gives 77
    time_cond_proj_dim: ClassVar[int | None] = None
    sample_fps: ClassVar[int] = 28  # the official VC2 sampling script
    default_num_inference_steps: ClassVar[int] = 50
    default_guidance_scale: ClassVar[float] = 12.0
    ddim_eta: ClassVar[float] = 1.0
    vae_decode_frames: int = 16  # frames per VAE decoder call (frames of every video in the batch are pooled)

    def __init__(
        self,
        components: VC2Components,
        config: ModelConfig,
        video_size: tuple[int, int, int] = FULL_VIDEO_SIZE,
    ) -> None:
        super().__init__(config)
        self.denoiser = components.unet
        self.unet_layout = components.unet_layout
        self.vae = components.vae.eval().requires_grad_(False)
        self.text_encoder = components.text_encoder
        if self.text_encoder is not None:
            self.text_encoder.eval().requires_grad_(False)
        self.checkpoint_schedule = components.schedule  # as loaded (saved back by write_pretrained)
        self.schedule = VC2NoiseSchedule(self.training_schedule(components.schedule))
        self.scale_factor = components.scale_factor
        self.turbo_lora_merged = components.turbo_lora_merged
        self.video_size = video_size
        self.configure_training()

    @property
    def unet(self) -> VC2UNet3DConditionModel:
        """The policy UNet (the base class's `denoiser`)."""
        return self.denoiser

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def training_schedule(cls, schedule: VC2ScheduleConfig) -> VC2ScheduleConfig:
        """The forward process used for training; VC2 keeps its checkpoint's (scale_arr) schedule."""
        return schedule

    @classmethod
    def load_components(cls, config: ModelConfig) -> VC2Components:
        """path None: the `variant` preset with random weights; else a converted directory or an original
        checkpoint (local or fsspec URL). `text_encoder_path` adds/replaces the text encoder; none is built or
        loaded when `config.build_text_encoder` is false."""
        preset = cls.preset(config.variant)
        with_text = config.build_text_encoder
        if config.path is not None:
            components = load_components(config.path, time_cond_proj_dim=cls.time_cond_proj_dim, text_encoder=with_text)
        else:
            components = preset.components(cls.time_cond_proj_dim, text_encoder=with_text)
        if config.text_encoder_path is not None and with_text:
            components.text_encoder = load_text_encoder(config.text_encoder_path)
        return components

    @classmethod
    def video_size_for(cls, config: ModelConfig) -> tuple[int, int, int]:
        """Default sample size: the preset's for random weights, VC2's 16 x 320 x 512 for loaded weights."""
        return cls.preset(config.variant).video_size if config.path is None else FULL_VIDEO_SIZE

    @classmethod
    def from_config(cls, config: ModelConfig) -> "VideoCrafter2":
        return cls(cls.load_components(config), config, cls.video_size_for(config))

    def write_pretrained(self, directory: Path) -> None:
        """The converted-directory layout (`convert_vc2.save_components`), with this model's family."""
        components = VC2Components(
            unet=self.unet,
            unet_layout=self.unet_layout,
            vae=self.vae,
            text_encoder=self.text_encoder,
            schedule=self.checkpoint_schedule,
            scale_factor=self.scale_factor,
            turbo_lora_merged=self.turbo_lora_merged,
        )
        save_components(components, directory, family=self.family)

    # --- text -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.text_encoder is None:
            raise RuntimeError(
                f"{type(self).__name__} has no text encoder: its checkpoint has no cond_stage_model; set "
                "model.text_encoder_path (a converted text_encoder/ directory or an OpenCLIP ViT-H-14 checkpoint)"
            )
        return self.text_encoder(prompts).float()

    @property
    def text_shape(self) -> tuple[int, int]:
        return OPENCLIP_CONTEXT_LENGTH, self.unet.config.cross_attention_dim

    # --- VAE (a 2D VAE: frame by frame, as lvdm's encode_first_stage_2DAE; decoding pools frames) --------------
    @property
    def compilable_decoder(self) -> nn.Module:
        """The 2D decoder: one graph for every chunk of `vae_decode_frames` frames (a third of T2V-Turbo's time)."""
        return self.vae.decoder

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_settings(self) -> dict[str, Any]:
        return {**super().latent_settings(), "scale_factor": self.scale_factor}  # the factor encode_videos applies

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        pixels = pixels_to_vae_input(videos.to(self.vae.device).permute(0, 1, 4, 2, 3), weight_dtype(self.vae))
        frames = []
        for index in range(pixels.shape[1]):
            posterior = self.vae.encode(pixels[:, index]).latent_dist
            frames.append(posterior.mean if generator is None else posterior.sample(generator))
        return torch.stack(frames, dim=2).float() * self.scale_factor  # B, C, T, h, w

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Every frame of every video through the 2D decoder, `vae_decode_frames` frames per call."""
        batch, _, num_frames = latents.shape[:3]
        flat = latents.to(self.vae.device, torch.float32).transpose(1, 2).flatten(0, 1) / self.scale_factor
        flat = flat.to(weight_dtype(self.vae))  # (B * T, C, h, w), video-major
        frames = torch.cat([self.vae.decode(chunk).sample for chunk in flat.split(self.vae_decode_frames)])
        pixels = vae_output_to_pixels(frames).unflatten(0, (batch, num_frames))  # B, T, 3, H, W
        return pixels.permute(0, 1, 3, 4, 2).contiguous()

    # --- diffusion --------------------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else torch.device("cpu")
        num = self.schedule.config.num_train_timesteps
        return torch.randint(0, num, (batch_size,), generator=generator, device=device, dtype=torch.int64)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.schedule.q_sample(latents, noise, timesteps)

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise

    def timestep_condition(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """Extra UNet conditioning (`timestep_cond`) in training predictions; VC2 has none."""
        return None

    def _denoise(
        self,
        unet: VC2UNet3DConditionModel,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        fps: int,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = weight_dtype(self.unet)  # the policy's, also for its reference copy (bf16 matmul weights)
        with self.autocast(latents.device):
            output = unet(
                latents.to(dtype),
                timesteps,
                encoder_hidden_states=context.to(dtype),
                fps=fps,
                timestep_cond=None if condition is None else condition.to(dtype),
            ).sample
        return output.to(latents.dtype)

    def run_denoiser(
        self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """At the training fps, with the family's `timestep_condition`."""
        condition = self.timestep_condition(noisy_latents.shape[0], noisy_latents.device)
        return self._denoise(denoiser, noisy_latents, timesteps, text_embeddings, self.config.fps, condition)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, H/8, W/8): height and width must be multiples of the VAE's 8x times the UNet's downsampling."""
        multiple = self.vae_scale * 2**self.unet.num_upsamplers
        if height % multiple or width % multiple:
            raise ValueError(f"height {height} and width {width} must be multiples of {multiple}")
        return self.unet.config.in_channels, num_frames, height // self.vae_scale, width // self.vae_scale

    def denoise(
        self,
        noise: torch.Tensor,
        text_embeddings: torch.Tensor,
        generators: Sequence[torch.Generator],
        *,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> torch.Tensor:
        """x_T -> x_0: lvdm DDIM (eta 1.0, sample i's noise from generators[i]) with classifier-free guidance
        against "" (none at scale 1, as lvdm) at the sampling fps (28)."""
        empty = None if guidance_scale == 1.0 else self.empty_prompt_embedding().to(self.device)
        embeddings = guidance_embeddings(text_embeddings, empty)

        def unet(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return self._denoise(self.unet, x, t, context, self.sample_fps)

        def predict_noise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return classifier_free_guidance(unet, x, t, embeddings, guidance_scale)

        return self.schedule.ddim_sample(predict_noise, noise, num_inference_steps, self.ddim_eta, generators)
