"""OpenAI CLIP (transformers classes) for the CLIP-based scorers: architectures, strict loading, embeddings.

Weights are Hugging Face CLIP checkpoints (the openai/clip-vit-* conversions of the OpenAI weights VBench loads):
a `model.safetensors` / `pytorch_model.bin` file or its folder, local, fsspec URL, or hf://openai/<repo>/<file>.
A full CLIPModel checkpoint also loads into an image tower (its text tower is dropped).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

from videodpo_ray.scoring.preprocessing import clip_transform, encode_in_batches, frames_to_tensor
from videodpo_ray.scoring.weights import ModelInfo, device_dtype, load_filtered, load_state_dict, seeded

FRAMES_PER_CALL = 32
CONTEXT_LENGTH = 77

VISION = {
    "ViT-B/32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     patch_size=32, projection_dim=512),
    "ViT-L/14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     patch_size=14, projection_dim=768),
    "tiny/32": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    patch_size=32, projection_dim=16),
}
TEXT = {
    "ViT-B/32": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                     projection_dim=512),
    "tiny/32": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    projection_dim=16),
}
COMMON = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT_COMMON = dict(vocab_size=49408, max_position_embeddings=CONTEXT_LENGTH, bos_token_id=49406, eos_token_id=49407)

INFO = {
    "ViT-B/32": ModelInfo("OpenAI CLIP ViT-B/32", "MIT", "https://huggingface.co/openai/clip-vit-base-patch32"),
    "ViT-L/14": ModelInfo("OpenAI CLIP ViT-L/14", "MIT", "https://huggingface.co/openai/clip-vit-large-patch14"),
}

TEXT_TOWER_PREFIXES = ("text_model.", "text_projection.", "logit_scale")
OBSOLETE_BUFFERS = ("position_ids",)


def vision_config(variant: str) -> CLIPVisionConfig:
    return CLIPVisionConfig(**VISION[variant], image_size=224, **COMMON)


def image_tower(variant: str) -> CLIPVisionModelWithProjection:
    """Random-init CLIP image tower + projection (`variant`: a key of VISION)."""
    return seeded(lambda: CLIPVisionModelWithProjection(vision_config(variant)))


def full_clip(variant: str) -> CLIPModel:
    """Random-init CLIP with both towers (`variant`: a key of TEXT)."""
    text = CLIPTextConfig(**TEXT[variant], **COMMON, **TEXT_COMMON)
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision_config(variant).to_dict(),
        projection_dim=VISION[variant]["projection_dim"],
    )
    return seeded(lambda: CLIPModel(config))


def load_image_tower(variant: str, location: str) -> CLIPVisionModelWithProjection:
    """Real-size image tower with weights from a HF CLIP checkpoint at `location`, loaded strictly."""
    return load_filtered(
        image_tower(variant), load_state_dict(location), f"CLIP {variant} weights {location}",
        ignore_prefixes=TEXT_TOWER_PREFIXES, ignore_suffixes=OBSOLETE_BUFFERS,
    )


def load_full_clip(variant: str, location: str) -> CLIPModel:
    """Real-size CLIPModel with weights from a HF CLIP checkpoint at `location`, loaded strictly."""
    return load_filtered(
        full_clip(variant), load_state_dict(location), f"CLIP {variant} weights {location}",
        ignore_suffixes=OBSOLETE_BUFFERS,
    )


def encode_images(model: CLIPVisionModelWithProjection | CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings (N, P) of CLIP-transformed pixels, from an image tower or a full CLIP."""
    if isinstance(model, CLIPModel):
        return model.get_image_features(pixel_values=pixel_values).pooler_output
    return model(pixel_values=pixel_values).image_embeds


def image_embeddings(
    videos: Sequence[np.ndarray], model: CLIPVisionModelWithProjection | CLIPModel
) -> list[torch.Tensor]:
    """Projected CLIP image embeddings (T_i, P), float32, of every frame of every video (VBench clip transform)."""
    device, dtype = device_dtype(model)
    inputs = (clip_transform(frames_to_tensor(frames, device)).to(dtype) for frames in videos)
    with torch.inference_mode():
        embeddings = encode_in_batches(inputs, lambda pixels: encode_images(model, pixels), FRAMES_PER_CALL)
    return [e.float() for e in embeddings]


@functools.cache
def _tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer(context_length=CONTEXT_LENGTH)


def tokenize(prompts: Sequence[str]) -> torch.Tensor:
    """CLIP BPE token ids (N, 77) with start/end tokens, zero padded (the vocabulary shipped with open_clip)."""
    return _tokenizer()(list(prompts))


def text_embeddings(prompts: Sequence[str], model: CLIPModel) -> torch.Tensor:
    """Projected CLIP text embeddings (N, P), float32."""
    device, _ = device_dtype(model)
    with torch.inference_mode():
        return model.get_text_features(input_ids=tokenize(prompts).to(device)).pooler_output.float()
