"""The CogVideoX presets (`ModelConfig.variant`): "tiny" (random, CPU tests), "2b" and "5b" (the released configs).

A preset fixes the component configs (transformer, VAE, scheduler, T5 text encoder) and the sampling defaults; a
loaded checkpoint directory must agree with its variant on the architecture keys (`loading.check_preset_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from transformers import PreTrainedTokenizerBase

from videodpo_ray.models.t5_prompt_encoder import tiny_t5_tokenizer

_TRANSFORMER_2B: dict[str, Any] = {
    "num_attention_heads": 30,
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embed_dim": 512,
    "text_embed_dim": 4096,
    "num_layers": 30,
    "dropout": 0.0,
    "attention_bias": True,
    "sample_width": 90,
    "sample_height": 60,
    "sample_frames": 49,
    "patch_size": 2,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 226,
    "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu",
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "spatial_interpolation_scale": 1.875,
    "temporal_interpolation_scale": 1.0,
    "use_rotary_positional_embeddings": False,
    "use_learned_positional_embeddings": False,
}
_TRANSFORMER_5B = {
    **_TRANSFORMER_2B,
    "num_attention_heads": 48,
    "num_layers": 42,
    "use_rotary_positional_embeddings": True,
}
_TRANSFORMER_TINY = {
    **_TRANSFORMER_2B,
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 2,
    "text_embed_dim": 32,
    "num_layers": 1,
    "sample_width": 2,
    "sample_height": 2,
    "sample_frames": 9,
    "max_text_seq_length": 16,
}

_VAE_2B: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["CogVideoXDownBlock3D"] * 4,
    "up_block_types": ["CogVideoXUpBlock3D"] * 4,
    "block_out_channels": [128, 256, 256, 512],
    "latent_channels": 16,
    "layers_per_block": 3,
    "act_fn": "silu",
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "temporal_compression_ratio": 4,
    "sample_height": 480,
    "sample_width": 720,
    "scaling_factor": 1.15258426,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
_VAE_5B = {**_VAE_2B, "scaling_factor": 0.7}
_VAE_TINY = {
    **_VAE_2B,
    "block_out_channels": [8, 8, 8, 8],
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 2,
}

# The noise schedule. The released scheduler configs ship "linspace" spacing; the official CogVideoX inference
# overrides it with "trailing" (which, unlike linspace, starts sampling at t = 999, the zero-SNR step).
_SCHEDULER_2B: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "snr_shift_scale": 3.0,
    "timestep_spacing": "trailing",
}
_SCHEDULER_5B = {**_SCHEDULER_2B, "snr_shift_scale": 1.0}

# google/t5-v1_1-xxl, as shipped in the CogVideoX text_encoder/ folder.
_T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "tie_word_embeddings": False,
}
_T5_TINY = {**_T5_XXL, "vocab_size": 1103, "d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 5, "num_heads": 4}

# Config keys a checkpoint directory must agree on with the variant it is loaded as.
TRANSFORMER_ARCHITECTURE_KEYS = (
    "num_attention_heads",
    "attention_head_dim",
    "num_layers",
    "in_channels",
    "out_channels",
    "text_embed_dim",
    "patch_size",
    "use_rotary_positional_embeddings",
)
VAE_ARCHITECTURE_KEYS = ("latent_channels", "block_out_channels", "temporal_compression_ratio", "scaling_factor")
T5_ARCHITECTURE_KEYS = ("vocab_size", "d_model", "num_layers", "num_heads", "feed_forward_proj")
SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "prediction_type",
    "rescale_betas_zero_snr",
    "snr_shift_scale",
)


@dataclass(frozen=True)
class CogVideoXPreset:
    """Everything a CogVideoX variant fixes: the component configs and the sampling defaults.

    The default video size is the transformer's sample size: sample_frames frames of (sample_height, sample_width)
    latents times the VAE's spatial factor (49 x 480 x 720 for 2B and 5B). `text_encoder` is the T5 config a
    loaded text encoder must match; a preset with an `offline_tokenizer` also builds a random T5 from it.
    """

    transformer: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    text_encoder: dict[str, Any]
    offline_tokenizer: Callable[[], PreTrainedTokenizerBase] | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 6.0


PRESETS: dict[str, CogVideoXPreset] = {
    "tiny": CogVideoXPreset(_TRANSFORMER_TINY, _VAE_TINY, _SCHEDULER_2B, _T5_TINY, offline_tokenizer=tiny_t5_tokenizer),
    "2b": CogVideoXPreset(_TRANSFORMER_2B, _VAE_2B, _SCHEDULER_2B, _T5_XXL),
    "5b": CogVideoXPreset(_TRANSFORMER_5B, _VAE_5B, _SCHEDULER_5B, _T5_XXL),
}
