"""ViCLIP (InternVid, Wang et al. 2023): a CLIP ViT-L/14 made space-time plus the CLIP text encoder.

Re-implemented from OpenGVLab/InternVideo Data/InternVid/viclip/{viclip.py, viclip_vision.py, viclip_text.py} (the
copy VBench vendors in vbench/third_party/ViCLIP) with the same module names and shapes, so the released
`ViClip-InternVid-10M-FLT.pth` (``{"model": state_dict}``: ``vision_encoder.*``, ``text_encoder.*``, ``temp``) loads
strictly. Inference only (no token masking, no drop path). Text: CLIP BPE (the vocabulary shipped in
open_clip_torch), context length 32, truncated with the end-of-text token kept.
Licences: weights MIT (huggingface.co/OpenGVLab/ViCLIP, gated: not for experiments that harm human subjects);
original code Apache-2.0 (OpenGVLab/InternVideo).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from videodpo_ray.config import StrictConfig
from videodpo_ray.scoring.weights import load_filtered, load_state_dict

VICLIP_LICENSE = "MIT (ViCLIP weights, huggingface.co/OpenGVLab/ViCLIP); code Apache-2.0 (OpenGVLab/InternVideo)"


class ViCLIPVisionConfig(StrictConfig):
    input_resolution: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    output_dim: int = 768
    num_frames: int = 8
    temporal_kernel_size: int = 1


class ViCLIPTextConfig(StrictConfig):
    context_length: int = 32
    vocab_size: int = 49408
    width: int = 768
    heads: int = 12
    layers: int = 12
    embed_dim: int = 768


class ViCLIPConfig(StrictConfig):
    """Both towers; the defaults are the released ViCLIP-L/14 (InternVid-10M-FLT)."""

    vision: ViCLIPVisionConfig = ViCLIPVisionConfig()
    text: ViCLIPTextConfig = ViCLIPTextConfig()


VICLIP_L14_CONFIG = ViCLIPConfig()
TINY_VICLIP_CONFIG = ViCLIPConfig(
    vision=ViCLIPVisionConfig(input_resolution=28, patch_size=14, width=32, layers=2, heads=2, output_dim=16),
    text=ViCLIPTextConfig(width=32, heads=2, layers=2, embed_dim=16),
)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block on (L, N, D) sequences in CLIP's layout
    (`attn`, `ln_1`, `mlp.c_fc`, `mlp.c_proj`, `ln_2`)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]
            )
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class ViCLIPVisionTransformer(nn.Module):
    """Space-time ViT: per-frame patches + spatial and temporal position embeddings, joint attention, CLS out."""

    def __init__(self, config: ViCLIPVisionConfig) -> None:
        super().__init__()
        width, patch, kernel = config.width, config.patch_size, config.temporal_kernel_size
        self.conv1 = nn.Conv3d(3, width, (kernel, patch, patch), (kernel, patch, patch), (0, 0, 0), bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((config.input_resolution // patch) ** 2 + 1, width)
        )
        self.ln_pre = nn.LayerNorm(width)
        self.temporal_positional_embedding = nn.Parameter(torch.zeros(1, config.num_frames, width))
        self.transformer = Transformer(width, config.layers, config.heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, config.output_dim))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, 3, T, H, W) normalised -> (B, output_dim)."""
        x = self.conv1(video)
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, c, dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        cls_tokens = x[:b, :1, :]
        n = h * w
        x = x[:, 1:].reshape(b, t, n, c).permute(0, 2, 1, 3).reshape(b * n, t, c)  # (b t) n c -> (b n) t c
        x = x + (self.temporal_positional_embedding.mean(1) if t == 1 else self.temporal_positional_embedding)
        x = x.reshape(b, n * t, c)  # (b n) t c -> b (n t) c
        x = self.ln_pre(torch.cat([cls_tokens, x], dim=1))
        x = self.transformer(x.permute(1, 0, 2))
        return self.ln_post(x)[0] @ self.proj


class ViCLIPTextTransformer(nn.Module):
    """CLIP text encoder (causal), features of the end-of-text token projected to `embed_dim`."""

    def __init__(self, config: ViCLIPTextConfig) -> None:
        super().__init__()
        self.transformer = Transformer(config.width, config.layers, config.heads)
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.ln_final = nn.LayerNorm(config.width)
        self.text_projection = nn.Parameter(torch.empty(config.width, config.embed_dim))
        mask = torch.full((config.context_length, config.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=config.width**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, context_length) int -> (B, embed_dim)."""
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2), self.attn_mask.to(x.dtype)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection


class ViCLIP(nn.Module):
    """`encode_vision` (B, T, 3, H, W) and `encode_text` (B, L) tokens -> unnormalised embeddings."""

    def __init__(self, config: ViCLIPConfig = VICLIP_L14_CONFIG) -> None:
        super().__init__()
        self.config = config
        self.vision_encoder = ViCLIPVisionTransformer(config.vision)
        self.text_encoder = ViCLIPTextTransformer(config.text)
        self.temp = nn.Parameter(torch.ones([]) / 100.0)

    def encode_vision(self, frames: torch.Tensor) -> torch.Tensor:
        return self.vision_encoder(frames.permute(0, 2, 1, 3, 4).contiguous())

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(tokens)


def load_viclip(location: str, config: ViCLIPConfig = VICLIP_L14_CONFIG) -> ViCLIP:
    """ViCLIP with the weights of an original ViCLIP checkpoint (``{"model": ...}``; path or fsspec URL), strictly."""
    return load_filtered(ViCLIP(config), load_state_dict(location, key="model"), f"ViCLIP weights {location}")


def tokenize(prompts: Sequence[str], context_length: int) -> torch.Tensor:
    """CLIP BPE tokens (B, context_length) int64: <sot> text <eot>, zero padded; too long -> cut, last = <eot>."""
    from open_clip import tokenize as clip_bpe_tokenize

    return clip_bpe_tokenize(list(prompts), context_length=context_length)
