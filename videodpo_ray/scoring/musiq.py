"""MUSIQ multi-scale image quality transformer (Ke et al., ICCV 2021), as pyiqa implements it.

Re-implemented from chaofengc/IQA-PyTorch `pyiqa/archs/musiq_arch.py` and `pyiqa/data/multiscale_trans_util.py`
with the same module names and shapes, so pyiqa's released `musiq_spaq_ckpt-358bb6af.pth` (a flat state dict, what
VBench imaging quality loads) loads strictly. Inference only: the image (0..1) is mapped to [-1, 1], cut into
32x32 patches at every scale (longer side 224, 384 and the original resolution), each patch gets a hash-based
spatial embedding index, a scale index and a validity mask; a ResNet stem embeds each patch; a transformer reads
them with a CLS token; a linear head gives the MOS (SPAQ: 0..100). Only the single-output head (num_class=1, the
SPAQ / KonIQ checkpoints) is implemented.
Licences: pyiqa code and its released weights NTU S-Lab License 1.0 + CC BY-NC-SA 4.0; MUSIQ (google-research)
Apache-2.0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from videodpo_ray.config import StrictConfig
from videodpo_ray.scoring.weights import load_filtered, load_state_dict

MUSIQ_LICENSE = "pyiqa code NTU S-Lab License 1.0 + CC BY-NC-SA 4.0 (chaofengc/IQA-PyTorch); MUSIQ Apache-2.0"


class MUSIQConfig(StrictConfig):
    """Defaults: pyiqa's MUSIQ as VBench builds it (`MUSIQ(pretrained_model_path=...)`)."""

    patch_size: int = 32
    hidden_size: int = 384
    mlp_dim: int = 1152
    num_heads: int = 6
    num_layers: int = 14
    spatial_pos_grid_size: int = 10
    longer_side_lengths: tuple[int, ...] = (224, 384)
    max_seq_len_from_original_res: int | None = -1
    """Patches kept from the original resolution: -1 all, None no original-resolution scale."""
    resnet_token_dim: int = 64

    @property
    def num_scales(self) -> int:
        # pyiqa always allocates 3 scale embeddings (2 resized scales + the original resolution)
        return len(self.longer_side_lengths) + 1

    @model_validator(mode="after")
    def _check(self) -> "MUSIQConfig":
        if self.patch_size % 4:
            raise ValueError(f"patch_size must be a multiple of 4 (stem downsamples by 4), got {self.patch_size}")
        if self.resnet_token_dim % 32:
            raise ValueError(f"resnet_token_dim must be a multiple of 32 (GroupNorm(32)), got {self.resnet_token_dim}")
        return self


MUSIQ_SPAQ_CONFIG = MUSIQConfig()
TINY_MUSIQ_CONFIG = MUSIQConfig(
    patch_size=8,
    hidden_size=32,
    mlp_dim=64,
    num_heads=2,
    num_layers=2,
    spatial_pos_grid_size=4,
    longer_side_lengths=(16, 24),
    resnet_token_dim=32,
)


# --- TensorFlow-style padding and patch extraction ----------------------------------------------------------------
def same_padding(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Zero padding as TensorFlow 'SAME' (extra pixel on the bottom/right)."""
    h, w = x.shape[-2:]
    pad_row = (math.ceil(h / stride) - 1) * stride + kernel - h
    pad_col = (math.ceil(w / stride) - 1) * stride + kernel - w
    return F.pad(x, (pad_col // 2, pad_col - pad_col // 2, pad_row // 2, pad_row - pad_row // 2))


def hashed_spatial_positions(grid_size: int, count_h: int, count_w: int) -> torch.Tensor:
    """Index in [0, grid_size^2) of every patch of a count_h x count_w grid (nearest-neighbour hash),
    (count_h*count_w,)."""
    grid = torch.arange(grid_size).float().reshape(1, 1, grid_size)
    hash_w = F.interpolate(grid, count_w, mode="nearest").repeat(1, count_h, 1)
    hash_h = F.interpolate(grid, count_h, mode="nearest").transpose(1, 2).repeat(1, 1, count_w)
    return (hash_h * grid_size + hash_w).reshape(-1)


def _patches_at_scale(
    images: torch.Tensor, patch_size: int, grid_size: int, scale_id: int, max_seq_len: int
) -> torch.Tensor:
    """(B, 3*P*P + 3, L): flattened patches, then rows spatial index, scale index, mask; padded/cut to max_seq_len."""
    b, _, h, w = images.shape
    patches = F.unfold(same_padding(images, patch_size, patch_size), patch_size, stride=patch_size)
    spatial = hashed_spatial_positions(grid_size, math.ceil(h / patch_size), math.ceil(w / patch_size))
    spatial = spatial.to(patches).view(1, 1, -1).repeat(b, 1, 1)
    out = torch.cat([patches, spatial, torch.full_like(spatial, scale_id), torch.ones_like(spatial)], dim=1)
    if max_seq_len >= 0:
        out = torch.cat([out, out.new_zeros(b, out.shape[1], max_seq_len)], dim=-1)[:, :, :max_seq_len]
    return out


def multiscale_patches(images: torch.Tensor, config: MUSIQConfig) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] -> (B, L, 3*P*P + 3) tokens of every scale (pyiqa `get_multiscale_patches`)."""
    _, _, h, w = images.shape
    outputs = []
    for scale_id, longer in enumerate(sorted(config.longer_side_lengths)):
        ratio = longer / max(h, w)
        resized = F.interpolate(images, (round(h * ratio), round(w * ratio)), mode="bicubic")
        max_seq_len = int(math.ceil(longer / config.patch_size) ** 2)
        outputs.append(
            _patches_at_scale(resized, config.patch_size, config.spatial_pos_grid_size, scale_id, max_seq_len)
        )
    if config.max_seq_len_from_original_res is not None:
        scale_id = len(config.longer_side_lengths)
        outputs.append(
            _patches_at_scale(
                images, config.patch_size, config.spatial_pos_grid_size, scale_id, config.max_seq_len_from_original_res
            )
        )
    return torch.cat(outputs, dim=-1).transpose(1, 2)


# --- patch stem ---------------------------------------------------------------------------------------------------
class StdConv(nn.Conv2d):
    """Weight-standardised convolution with TensorFlow 'SAME' padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = same_padding(x, self.kernel_size[0], self.stride[0])
        weight = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        weight = weight / (weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, weight, self.bias, self.stride)


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, outplanes: int) -> None:
        super().__init__()
        width = inplanes
        self.conv1 = StdConv(inplanes, width, 1, 1, bias=False)
        self.gn1 = nn.GroupNorm(32, width, eps=1e-4)
        self.conv2 = StdConv(width, width, 3, 1, bias=False)
        self.gn2 = nn.GroupNorm(32, width, eps=1e-4)
        self.conv3 = StdConv(width, outplanes, 1, 1, bias=False)
        self.gn3 = nn.GroupNorm(32, outplanes, eps=1e-4)
        self.relu = nn.ReLU(True)
        self.conv_proj = StdConv(inplanes, outplanes, 1, 1, bias=False)
        self.gn_proj = nn.GroupNorm(32, outplanes, eps=1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.gn_proj(self.conv_proj(x))
        x = self.relu(self.gn1(self.conv1(x)))
        x = self.relu(self.gn2(self.conv2(x)))
        return self.relu(self.gn3(self.conv3(x)) + identity)


# --- transformer --------------------------------------------------------------------------------------------------
class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._split_heads(self.query(x)), self._split_heads(self.key(x)), self._split_heads(self.value(x))
        attn = (q @ k.transpose(-2, -1)) * self.scale
        mask2d = mask.reshape(b, 1, n, 1) * mask.reshape(b, 1, 1, n)
        attn = attn.masked_fill(mask2d == 0, -1e3).softmax(dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class AddHashSpatialPositionEmbs(nn.Module):
    def __init__(self, grid_size: int, dim: int) -> None:
        super().__init__()
        self.position_emb = nn.Parameter(torch.randn(1, grid_size * grid_size, dim) * 0.02)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self.position_emb.squeeze(0)[positions.long()]


class AddScaleEmbs(nn.Module):
    def __init__(self, num_scales: int, dim: int) -> None:
        super().__init__()
        self.scale_emb = nn.Parameter(torch.randn(num_scales, dim) * 0.02)

    def forward(self, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x + self.scale_emb[scales.long()]


class TransformerEncoder(nn.Module):
    def __init__(self, config: MUSIQConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.posembed_input = AddHashSpatialPositionEmbs(config.spatial_pos_grid_size, dim)
        self.scaleembed_input = AddScaleEmbs(config.num_scales, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.transformer = nn.ModuleDict(
            {
                f"encoderblock_{i}": TransformerBlock(dim, config.mlp_dim, config.num_heads)
                for i in range(config.num_layers)
            }
        )

    def forward(self, x: torch.Tensor, spatial: torch.Tensor, scales: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.scaleembed_input(self.posembed_input(x, spatial), scales)
        x = torch.cat([self.cls.repeat(x.shape[0], 1, 1), x], dim=1)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        for block in self.transformer.values():
            x = block(x, mask)
        return self.encoder_norm(x)


class MUSIQ(nn.Module):
    """`forward(images)`: (B, 3, H, W) RGB in [0, 1] -> predicted MOS (B,) (SPAQ weights: 0..100)."""

    def __init__(self, config: MUSIQConfig = MUSIQ_SPAQ_CONFIG) -> None:
        super().__init__()
        self.config = config
        token_dim = config.resnet_token_dim
        self.conv_root = StdConv(3, token_dim, 7, 2, bias=False)
        self.gn_root = nn.GroupNorm(32, token_dim, eps=1e-6)
        self.block1 = Bottleneck(token_dim, token_dim * 4)
        self.embedding = nn.Linear(token_dim * 4 * (config.patch_size // 4) ** 2, config.hidden_size)
        self.transformer_encoder = TransformerEncoder(config)
        self.head = nn.Linear(config.hidden_size, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = multiscale_patches((images - 0.5) * 2, self.config)
        b, seq_len, _ = tokens.shape
        spatial, scales, mask = tokens[:, :, -3], tokens[:, :, -2], tokens[:, :, -1].bool()
        p = self.config.patch_size
        x = self.gn_root(self.conv_root(tokens[:, :, :-3].reshape(-1, 3, p, p)))
        x = F.max_pool2d(same_padding(F.relu(x), 3, 2), 3, 2)
        x = self.block1(x)
        x = self.embedding(x.permute(0, 2, 3, 1).reshape(b, seq_len, -1))  # channels-last, as TensorFlow
        x = self.transformer_encoder(x, spatial, scales, mask)
        return self.head(x[:, 0]).squeeze(-1)


def load_musiq(location: str, config: MUSIQConfig = MUSIQ_SPAQ_CONFIG) -> MUSIQ:
    """MUSIQ with the weights of a pyiqa MUSIQ checkpoint (a flat state dict; path or fsspec URL), strictly."""
    return load_filtered(MUSIQ(config), load_state_dict(location), f"MUSIQ weights {location}")
