"""VC2's text encoder: the OpenCLIP ViT-H-14 text tower at its penultimate layer, as a transformers CLIPTextModel.

lvdm's `FrozenOpenCLIPEmbedder(layer="penultimate")` runs all but the last residual block, then `ln_final`. That
is exactly a `CLIPTextModel` with one layer fewer (23 for ViT-H-14; GELU, causal mask, no padding mask), whose
`last_hidden_state` (B, 77, 1024) is the cross-attention context. Tokens come from OpenCLIP's own BPE tokenizer,
whose vocabulary ships inside the open_clip_torch wheel (no hub access).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from videodpo_ray.errors import CheckpointError
from videodpo_ray.models.loading import describe_key_mismatch

OPENCLIP_HEAD_WIDTH = 64  # every OpenCLIP text tower uses 64-wide heads (ViT-H-14: 1024 / 16)
OPENCLIP_CONTEXT_LENGTH = 77  # tokens per prompt, SOT and EOT included


def clip_text_config(
    hidden_size: int = 1024,
    num_hidden_layers: int = 23,
    intermediate_size: int = 4096,
    vocab_size: int = 49408,
    max_position_embeddings: int = OPENCLIP_CONTEXT_LENGTH,
) -> CLIPTextConfig:
    """The CLIPTextConfig of an OpenCLIP text tower cut at its penultimate block (defaults: ViT-H-14)."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=hidden_size // OPENCLIP_HEAD_WIDTH,
        max_position_embeddings=max_position_embeddings,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )


def convert_openclip_text_state_dict(
    openclip: dict[str, torch.Tensor], *, source: str
) -> tuple[CLIPTextConfig, dict[str, torch.Tensor]]:
    """OpenCLIP text-tower keys (`token_embedding.weight`, `transformer.resblocks.N.*`, ...) -> CLIPTextModel keys.

    The last residual block, `text_projection` and `logit_scale` are dropped (penultimate-layer output); any other
    key that does not map is an error.
    """
    try:
        token_embedding = openclip["token_embedding.weight"]
        positions = openclip["positional_embedding"]
        num_blocks = 1 + max(int(key.split(".")[2]) for key in openclip if key.startswith("transformer.resblocks."))
        ffn = openclip["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{source}: not an OpenCLIP text tower state dict ({error!r} missing)") from None
    config = clip_text_config(
        token_embedding.shape[1], num_blocks - 1, ffn, token_embedding.shape[0], positions.shape[0]
    )
    hidden = config.hidden_size
    converted = {
        "embeddings.token_embedding.weight": token_embedding,
        "embeddings.position_embedding.weight": positions,
    }
    renames = {"ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    ignored = {"text_projection", "logit_scale", "attn_mask"}
    ignored |= {key for key in openclip if key.startswith(f"transformer.resblocks.{num_blocks - 1}.")}
    for i in range(num_blocks - 1):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        renames |= {
            f"{src}ln_1.weight": f"{dst}layer_norm1.weight",
            f"{src}ln_1.bias": f"{dst}layer_norm1.bias",
            f"{src}ln_2.weight": f"{dst}layer_norm2.weight",
            f"{src}ln_2.bias": f"{dst}layer_norm2.bias",
            f"{src}attn.out_proj.weight": f"{dst}self_attn.out_proj.weight",
            f"{src}attn.out_proj.bias": f"{dst}self_attn.out_proj.bias",
            f"{src}mlp.c_fc.weight": f"{dst}mlp.fc1.weight",
            f"{src}mlp.c_fc.bias": f"{dst}mlp.fc1.bias",
            f"{src}mlp.c_proj.weight": f"{dst}mlp.fc2.weight",
            f"{src}mlp.c_proj.bias": f"{dst}mlp.fc2.bias",
        }
        for kind in ("weight", "bias"):
            key = f"{src}attn.in_proj_{kind}"
            if key in openclip:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), openclip[key].split(hidden, dim=0)):
                    converted[f"{dst}self_attn.{name}.{kind}"] = part.clone()
                ignored.add(key)
    for old, new in renames.items():
        if old in openclip:
            converted[new] = openclip[old]
    handled = set(renames) | ignored | {"token_embedding.weight", "positional_embedding"}
    unexpected = [key for key in openclip if key not in handled]
    if unexpected:
        raise CheckpointError(describe_key_mismatch(f"{source} (OpenCLIP text encoder)", [], unexpected))
    return config, converted


class OpenCLIPTextEncoder(nn.Module):
    """Prompts -> (B, 77, D) penultimate-layer OpenCLIP text features (the UNet's cross-attention context)."""

    def __init__(self, text_model: CLIPTextModel) -> None:
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer

        self.text_model = text_model
        self.tokenizer = SimpleTokenizer(context_length=text_model.config.max_position_embeddings)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """OpenCLIP BPE ids (B, 77): SOT 49406, tokens, EOT 49407, padded with 0 (truncated keeping EOT)."""
        return self.tokenizer(list(prompts))

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        device = self.text_model.embeddings.token_embedding.weight.device
        return self.text_model(input_ids=self.tokenize(prompts).to(device)).last_hidden_state
