"""The Wan2.1 text-to-video presets (`ModelConfig.variant`) and its umT5 prompt encoder.

Presets: "tiny" (random init, CPU tests), "1.3b" and "14b" (the configs of `Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers`).
A preset fixes the component configs, the sampling defaults and the training timestep distribution; a loaded
checkpoint directory must agree with its variant on the architecture keys (`loading.check_preset_config`).

`UMT5PromptEncoder` turns prompts into what the transformer's cross-attention takes, as diffusers' `WanPipeline`
does: umT5 with the attention mask, positions past each prompt's length zeroed, padded to `text_length` (512). It is
not an nn.Module, so optimizers, DeepSpeed and state dicts never see the 5.7B-parameter umT5-XXL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5EncoderModel

from videodpo_ray.models.loading import check_preset_config, raise_on_loading_info
from videodpo_ray.models.t5_prompt_encoder import tiny_t5_tokenizer

_TRANSFORMER_1_3B: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
_TRANSFORMER_14B = {**_TRANSFORMER_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
_TRANSFORMER_TINY = {
    **_TRANSFORMER_1_3B,
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "rope_max_seq_len": 32,
}

# AutoencoderKLWan defaults = the released Wan2.1 VAE: 16 latent channels, stride (4, 8, 8), per-channel statistics.
_VAE_WAN21: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "is_residual": False,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
}
_VAE_TINY = {
    **_VAE_WAN21,
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "latents_mean": [-0.5, 0.25, 1.0, 0.0],  # non-trivial, so a missing normalisation shows in the tests
    "latents_std": [2.0, 0.5, 1.5, 3.0],
}

# UniPC in flow mode (what the released scheduler/ folders hold): flow_shift 3.0 for 480p, 5.0 for 720p.
_SCHEDULER_480P: dict[str, Any] = {
    "_class_name": "UniPCMultistepScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
}
_SCHEDULER_720P = {**_SCHEDULER_480P, "flow_shift": 5.0}

# google/umt5-xxl encoder, as shipped in the Wan text_encoder/ folder.
_UMT5_XXL: dict[str, Any] = {
    "vocab_size": 256384,
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
_UMT5_TINY = {**_UMT5_XXL, "vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4}

TRANSFORMER_ARCHITECTURE_KEYS = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "ffn_dim",
    "num_layers",
    "qk_norm",
    "image_dim",
    "added_kv_proj_dim",
)
VAE_ARCHITECTURE_KEYS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "is_residual")
UMT5_ARCHITECTURE_KEYS = ("vocab_size", "d_model", "num_layers", "num_heads", "feed_forward_proj")


@dataclass(frozen=True)
class FlowTimestepSampling:
    """The training timestep distribution: u in (0, 1) from diffusers' `compute_density_for_timestep_sampling`
    ("logit_normal": sigmoid(N(logit_mean, logit_std)), as SD3 and flow_grpo train; "uniform"), then
    t = floor(1000 u) and the noise level s = t / 1000."""

    scheme: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass(frozen=True)
class WanPreset:
    """Everything a Wan variant fixes: component configs, the prompt length, sampling defaults, timestep sampling.

    `scheduler` is the sampling scheduler used when a checkpoint directory has no scheduler/ folder. A preset with
    an `offline_tokenizer` also builds a random umT5 from `text_encoder` (tiny only).
    """

    transformer: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    text_encoder: dict[str, Any]
    video_size: tuple[int, int, int]  # frames, height, width
    text_length: int = 512
    offline_tokenizer: Callable[[], PreTrainedTokenizerBase] | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    timestep_sampling: FlowTimestepSampling = field(default_factory=FlowTimestepSampling)


PRESETS: dict[str, WanPreset] = {
    "tiny": WanPreset(
        _TRANSFORMER_TINY, _VAE_TINY, _SCHEDULER_480P, _UMT5_TINY, (9, 32, 32), text_length=16,
        offline_tokenizer=tiny_t5_tokenizer,
    ),
    "1.3b": WanPreset(_TRANSFORMER_1_3B, _VAE_WAN21, _SCHEDULER_480P, _UMT5_XXL, (81, 480, 832)),
    "14b": WanPreset(_TRANSFORMER_14B, _VAE_WAN21, _SCHEDULER_720P, _UMT5_XXL, (81, 720, 1280)),
}


class UMT5PromptEncoder:
    """Tokenizer + umT5 encoder -> Wan text embeddings (B, text_length, d_model), exactly as `WanPipeline` encodes
    prompts (cleaned text, attention mask, zeros past each prompt's tokens). Follows the denoiser's device on every
    call (bf16 on CUDA, float32 elsewhere)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, encoder: UMT5EncoderModel, text_length: int) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)
        self.text_length = text_length

    @classmethod
    def from_directory(
        cls, directory: Path, text_length: int, expected: dict[str, Any], variant: str
    ) -> "UMT5PromptEncoder":
        """Load `directory`/tokenizer and `directory`/text_encoder strictly; the encoder must match `expected`."""
        source = directory / "text_encoder"
        encoder, info = UMT5EncoderModel.from_pretrained(str(source), output_loading_info=True, dtype=torch.float32)
        raise_on_loading_info(source, info, target=type(encoder).__name__)
        check_preset_config(source, encoder.config.to_dict(), expected, UMT5_ARCHITECTURE_KEYS, variant)
        return cls(AutoTokenizer.from_pretrained(str(directory / "tokenizer")), encoder, text_length)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.encoder.to(device=device, dtype=dtype)
        tokens = self.tokenizer(
            [prompt_clean(prompt) for prompt in prompts],
            padding="max_length",
            max_length=self.text_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(device)
        hidden = self.encoder(tokens.input_ids.to(device), mask).last_hidden_state
        return torch.where(mask.bool()[..., None], hidden, torch.zeros_like(hidden)).float()

    def save_pretrained(self, directory: Path) -> None:
        """Write `directory`/tokenizer and `directory`/text_encoder (what from_directory reads)."""
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        self.encoder.save_pretrained(str(directory / "text_encoder"))
