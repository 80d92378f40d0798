"""The original (lvdm) VideoCrafter2 UNet layout and its rule-wise mapping onto diffusers' UNet3DConditionModel.

The lvdm `UNetModel` and the diffusers port have the same modules under different names. Instead of a lookup table
(which only covers one size), `unet_layout` walks the lvdm module tree for ANY VC2-shaped config in lvdm
registration order and names every weight-carrying module on both sides. That one walk gives:
- the state-dict key map in both directions (`to_diffusers_state_dict`, `to_reference_state_dict`);
- the module order of T2V-Turbo's `unet_lora.pt` (cloneofsimo LoRA list) and its merge (`merge_lora_list`).
The full-size walk reproduces /work/shared/reference/vc2_to_diffusers_keymap.tsv exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from videodpo_ray.config import StrictConfig
from videodpo_ray.errors import CheckpointError
from videodpo_ray.models.loading import describe_key_mismatch

UNET_PREFIX = "model.diffusion_model."
ModuleKind = Literal["linear", "conv1d", "conv2d", "conv3d", "norm"]
LORA_KINDS: tuple[ModuleKind, ...] = ("linear", "conv2d", "conv3d")  # cloneofsimo: nn.Linear, nn.Conv2d, nn.Conv3d
INIT_ATTN_HEADS = 8  # lvdm builds init_attn with n_heads=8, d_head=num_head_channels


class LvdmUNetConfig(StrictConfig):
    """The lvdm `UNetModel` keyword arguments (same names and defaults as the original code)."""

    in_channels: int = 4
    model_channels: int = 320
    out_channels: int = 4
    num_res_blocks: int = 2
    attention_resolutions: list[int] = [4, 2, 1]
    dropout: float = 0.0
    channel_mult: list[int] = [1, 2, 4, 4]
    conv_resample: bool = True
    dims: int = 2
    context_dim: int | None = 1024
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    num_heads: int = -1
    num_head_channels: int = 64
    transformer_depth: int = 1
    use_linear: bool = True
    use_checkpoint: bool = False
    temporal_conv: bool = True
    tempspatial_aware: bool = False
    temporal_attention: bool = True
    temporal_selfatt_only: bool = True
    use_relative_position: bool = False
    use_causal_attention: bool = False
    temporal_length: int | None = None
    use_fp16: bool = False
    addition_attention: bool = True
    use_image_attention: bool = False
    temporal_transformer_depth: int = 1
    fps_cond: bool = True
    time_cond_proj_dim: int | None = None
    motion_cond_proj_dim: int | None = None
    record_attn_probs: bool = False

    def check_supported(self) -> None:
        """Raise CheckpointError for lvdm options the diffusers UNet3DConditionModel port cannot express."""
        required = {
            "dims": 2,
            "conv_resample": True,
            "use_scale_shift_norm": False,
            "resblock_updown": False,
            "transformer_depth": 1,
            "temporal_transformer_depth": 1,
            "use_linear": True,
            "temporal_conv": True,
            "tempspatial_aware": False,
            "temporal_attention": True,
            "temporal_selfatt_only": True,
            "use_relative_position": False,
            "use_causal_attention": False,
            "addition_attention": True,
            "use_image_attention": False,
            "motion_cond_proj_dim": None,
        }
        bad = [
            f"{key}={getattr(self, key)!r} (need {value!r})"
            for key, value in required.items()
            if getattr(self, key) != value
        ]
        if self.num_head_channels <= 0:
            bad.append(
                f"num_head_channels={self.num_head_channels} (need a fixed head width; num_heads is not supported)"
            )
        if self.context_dim is None:
            bad.append("context_dim=None (need cross-attention)")
        channels = [self.model_channels * mult for mult in self.channel_mult]
        if any(c % 32 for c in channels):
            bad.append(f"block channels {channels} (lvdm GroupNorm needs multiples of 32)")
        if any(c % self.num_head_channels for c in channels):
            bad.append(f"block channels {channels} not divisible by num_head_channels={self.num_head_channels}")
        if bad:
            raise CheckpointError("unsupported VC2 UNet config for the diffusers port: " + "; ".join(bad))

    def attention_levels(self) -> list[bool]:
        return [2**level in self.attention_resolutions for level in range(len(self.channel_mult))]

    def diffusers_config(self) -> dict:
        """Keyword arguments for `VC2UNet3DConditionModel`."""
        self.check_supported()
        attention = self.attention_levels()
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["CrossAttnDownBlock3D" if a else "DownBlock3D" for a in attention],
            "up_block_types": ["CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(attention)],
            "block_out_channels": [self.model_channels * mult for mult in self.channel_mult],
            "layers_per_block": self.num_res_blocks,
            "norm_num_groups": 32,
            "cross_attention_dim": self.context_dim,
            "attention_head_dim": self.num_head_channels,
            "time_cond_proj_dim": self.time_cond_proj_dim,
            "fps_cond": self.fps_cond,
        }


def infer_lvdm_unet_config(unet_state_dict: dict[str, torch.Tensor], **overrides) -> LvdmUNetConfig:
    """Recover the lvdm UNet kwargs from the tensor shapes of a reference UNet state dict (no prefix)."""
    sd = unet_state_dict
    try:
        conv_in = sd["input_blocks.0.0.weight"]
        model_channels = conv_in.shape[0]
        num_levels = 1 + sum(1 for key in sd if key.startswith("input_blocks.") and key.endswith(".0.op.weight"))
        num_input_blocks = 1 + max(int(key.split(".")[1]) for key in sd if key.startswith("input_blocks."))
        num_res_blocks = (num_input_blocks - 1 - (num_levels - 1)) // num_levels
        channel_mult, attention_resolutions = [], []
        block = 1
        for level in range(num_levels):
            channel_mult.append(sd[f"input_blocks.{block}.0.in_layers.2.weight"].shape[0] // model_channels)
            if f"input_blocks.{block}.1.norm.weight" in sd:
                attention_resolutions.append(2**level)
            block += num_res_blocks + (1 if level < num_levels - 1 else 0)
        inferred = {
            "in_channels": conv_in.shape[1],
            "model_channels": model_channels,
            "out_channels": sd["out.2.weight"].shape[0],
            "num_res_blocks": num_res_blocks,
            "attention_resolutions": attention_resolutions,
            "channel_mult": channel_mult,
            "context_dim": sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
            "num_head_channels": sd["init_attn.0.proj_in.weight"].shape[0] // INIT_ATTN_HEADS,
            "use_linear": sd["middle_block.1.proj_in.weight"].ndim == 2,
            "fps_cond": "fps_embedding.0.weight" in sd,
            "time_cond_proj_dim": sd["time_cond_proj.weight"].shape[1] if "time_cond_proj.weight" in sd else None,
        }
    except KeyError as error:
        raise CheckpointError(f"cannot infer the VC2 UNet config: key {error} is missing from the checkpoint") from None
    inferred.update(overrides)
    return LvdmUNetConfig(**inferred)


@dataclass(frozen=True)
class LayoutModule:
    """One weight-carrying module: its lvdm name, its diffusers name, what it is, and whether it has a bias."""

    reference: str
    diffusers: str
    kind: ModuleKind
    bias: bool = True


def _transformer(ref: str, dif: str, conv_proj: bool) -> list[LayoutModule]:
    proj = "conv1d" if conv_proj else "linear"
    modules = [
        LayoutModule(f"{ref}.norm", f"{dif}.norm", "norm"),
        LayoutModule(f"{ref}.proj_in", f"{dif}.proj_in", proj),
    ]
    block = "transformer_blocks.0"
    for attn in ("attn1", "ff", "attn2"):
        if attn == "ff":
            names = [("ff.net.0.proj", True), ("ff.net.2", True)]
        else:
            names = [
                (f"{attn}.to_q", False),
                (f"{attn}.to_k", False),
                (f"{attn}.to_v", False),
                (f"{attn}.to_out.0", True),
            ]
        modules += [LayoutModule(f"{ref}.{block}.{n}", f"{dif}.{block}.{n}", "linear", bias) for n, bias in names]
    modules += [LayoutModule(f"{ref}.{block}.norm{i}", f"{dif}.{block}.norm{i}", "norm") for i in (1, 2, 3)]
    modules.append(LayoutModule(f"{ref}.proj_out", f"{dif}.proj_out", proj))
    return modules


def _resblock(ref: str, resnet: str, temp_conv: str, with_shortcut: bool) -> list[LayoutModule]:
    modules = [
        LayoutModule(f"{ref}.in_layers.0", f"{resnet}.norm1", "norm"),
        LayoutModule(f"{ref}.in_layers.2", f"{resnet}.conv1", "conv2d"),
        LayoutModule(f"{ref}.emb_layers.1", f"{resnet}.time_emb_proj", "linear"),
        LayoutModule(f"{ref}.out_layers.0", f"{resnet}.norm2", "norm"),
        LayoutModule(f"{ref}.out_layers.3", f"{resnet}.conv2", "conv2d"),
    ]
    if with_shortcut:
        modules.append(LayoutModule(f"{ref}.skip_connection", f"{resnet}.conv_shortcut", "conv2d"))
    for i, conv_index in ((1, 2), (2, 3), (3, 3), (4, 3)):
        modules.append(LayoutModule(f"{ref}.temopral_conv.conv{i}.0", f"{temp_conv}.conv{i}.0", "norm"))
        modules.append(
            LayoutModule(f"{ref}.temopral_conv.conv{i}.{conv_index}", f"{temp_conv}.conv{i}.{conv_index}", "conv3d")
        )
    return modules


def _layer(ref: str, dif: str, index: int, in_ch: int, out_ch: int, attention: bool) -> list[LayoutModule]:
    """One lvdm TimestepEmbedSequential of [ResBlock, SpatialTransformer?, TemporalTransformer?]."""
    modules = _resblock(f"{ref}.0", f"{dif}.resnets.{index}", f"{dif}.temp_convs.{index}", in_ch != out_ch)
    if attention:
        modules += _transformer(f"{ref}.1", f"{dif}.attentions.{index}", conv_proj=False)
        modules += _transformer(f"{ref}.2", f"{dif}.temp_attentions.{index}", conv_proj=False)
    return modules


def unet_layout(config: LvdmUNetConfig) -> list[LayoutModule]:
    """Every weight-carrying module of the lvdm UNet in lvdm registration (`named_modules`) order."""
    config.check_supported()
    mc, attention = config.model_channels, config.attention_levels()
    modules = [
        LayoutModule("time_embed.0", "time_embedding.linear_1", "linear"),
        LayoutModule("time_embed.2", "time_embedding.linear_2", "linear"),
    ]
    if config.fps_cond:
        modules += [
            LayoutModule("fps_embedding.0", "fps_embedding.linear_1", "linear"),
            LayoutModule("fps_embedding.2", "fps_embedding.linear_2", "linear"),
        ]
    if config.time_cond_proj_dim is not None:
        modules.append(LayoutModule("time_cond_proj", "time_embedding.cond_proj", "linear", bias=False))

    # input_blocks is registered before init_attn, so the whole ModuleList comes first in the walk.
    modules.append(LayoutModule("input_blocks.0.0", "conv_in", "conv2d"))
    skip_channels, ch, block = [mc], mc, 1
    for level, mult in enumerate(config.channel_mult):
        for j in range(config.num_res_blocks):
            out = mult * mc
            modules += _layer(f"input_blocks.{block}", f"down_blocks.{level}", j, ch, out, attention[level])
            ch = out
            skip_channels.append(ch)
            block += 1
        if level != len(config.channel_mult) - 1:
            modules.append(
                LayoutModule(f"input_blocks.{block}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "conv2d")
            )
            skip_channels.append(ch)
            block += 1
    modules += _transformer("init_attn.0", "transformer_in", conv_proj=True)

    modules += _resblock("middle_block.0", "mid_block.resnets.0", "mid_block.temp_convs.0", False)
    modules += _transformer("middle_block.1", "mid_block.attentions.0", conv_proj=False)
    modules += _transformer("middle_block.2", "mid_block.temp_attentions.0", conv_proj=False)
    modules += _resblock("middle_block.3", "mid_block.resnets.1", "mid_block.temp_convs.1", False)

    block = 0
    for up_index, (level, mult) in enumerate(reversed(list(enumerate(config.channel_mult)))):
        for j in range(config.num_res_blocks + 1):
            out = mult * mc
            in_ch = ch + skip_channels.pop()
            modules += _layer(f"output_blocks.{block}", f"up_blocks.{up_index}", j, in_ch, out, attention[level])
            ch = out
            if level and j == config.num_res_blocks:
                upsample_index = 3 if attention[level] else 1
                modules.append(
                    LayoutModule(
                        f"output_blocks.{block}.{upsample_index}.conv",
                        f"up_blocks.{up_index}.upsamplers.0.conv",
                        "conv2d",
                    )
                )
            block += 1
    modules += [LayoutModule("out.0", "conv_norm_out", "norm"), LayoutModule("out.2", "conv_out", "conv2d")]
    return modules


def key_map(config: LvdmUNetConfig) -> dict[str, str]:
    """Reference UNet key (without `model.diffusion_model.`) -> diffusers key, in lvdm order."""
    mapping = {}
    for module in unet_layout(config):
        mapping[f"{module.reference}.weight"] = f"{module.diffusers}.weight"
        if module.bias:
            mapping[f"{module.reference}.bias"] = f"{module.diffusers}.bias"
    return mapping


def _conv1d_keys(config: LvdmUNetConfig) -> set[str]:
    return {f"{m.reference}.weight" for m in unet_layout(config) if m.kind == "conv1d"}


def to_diffusers_state_dict(
    reference: dict[str, torch.Tensor], config: LvdmUNetConfig, *, source: str, allow_missing: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """Map a reference UNet state dict (no prefix) to diffusers keys; strict: every key must map one to one.

    `allow_missing` names reference keys that may be absent (T2V-Turbo's `time_cond_proj.weight`, which no released
    file contains); they are left out of the result.
    """
    mapping = key_map(config)
    missing = [key for key in mapping if key not in reference and key not in allow_missing]
    unexpected = [key for key in reference if key not in mapping]
    if missing or unexpected:
        raise CheckpointError(describe_key_mismatch(f"{source} (UNet, lvdm keys)", missing, unexpected))
    squeeze = _conv1d_keys(config)
    return {mapping[key]: tensor.squeeze(-1) if key in squeeze else tensor for key, tensor in reference.items()}


def to_reference_state_dict(diffusers: dict[str, torch.Tensor], config: LvdmUNetConfig) -> dict[str, torch.Tensor]:
    """The inverse of `to_diffusers_state_dict`: diffusers UNet keys -> lvdm keys (Linear -> Conv1d where lvdm has
    one)."""
    mapping = key_map(config)
    inverse = {dif: ref for ref, dif in mapping.items()}
    missing = [key for key in inverse if key not in diffusers]
    unexpected = [key for key in diffusers if key not in inverse]
    if missing or unexpected:
        raise CheckpointError(describe_key_mismatch("diffusers UNet state dict", missing, unexpected))
    unsqueeze = _conv1d_keys(config)
    result = {}
    for ref in mapping:  # lvdm order
        tensor = diffusers[mapping[ref]]
        result[ref] = tensor.unsqueeze(-1) if ref in unsqueeze else tensor
    return result


def lora_modules(config: LvdmUNetConfig) -> list[LayoutModule]:
    """The modules a cloneofsimo LoRA list covers (every Linear/Conv2d/Conv3d), in lvdm walk order."""
    return [module for module in unet_layout(config) if module.kind in LORA_KINDS]


def lora_delta(up: torch.Tensor, down: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """The weight update of one cloneofsimo LoRA pair at scale 1: up @ down (convs: 1x1 up, base-kernel down)."""
    return (up.flatten(1).double() @ down.flatten(1).double()).reshape(weight_shape)


def check_lora_list(
    lora: Sequence[torch.Tensor], reference: dict[str, torch.Tensor], config: LvdmUNetConfig, *, source: str
) -> list[tuple[LayoutModule, torch.Tensor, torch.Tensor]]:
    """Pair a LoRA list [up0, down0, up1, down1, ...] with the UNet modules; raise CheckpointError on any mismatch.

    `reference` gives the base weight shapes (lvdm keys); a module whose weight is absent (T2V-Turbo's zero-base
    time_cond_proj) takes its shape from the config.
    """
    modules = lora_modules(config)
    if not isinstance(lora, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in lora):
        raise CheckpointError(f"{source}: expected a list of tensors [up0, down0, up1, down1, ...]")
    if len(lora) != 2 * len(modules):
        raise CheckpointError(
            f"{source}: {len(lora)} tensors ({len(lora) / 2:g} pairs), but this UNet has {len(modules)} "
            f"Linear/Conv2d/Conv3d modules, so a T2V-Turbo LoRA list must hold {2 * len(modules)} tensors"
        )
    pairs = []
    for index, module in enumerate(modules):
        up, down = lora[2 * index], lora[2 * index + 1]
        key = f"{module.reference}.weight"
        if key in reference:
            shape = reference[key].shape
        elif module.reference == "time_cond_proj":
            shape = torch.Size([config.model_channels, config.time_cond_proj_dim])
        else:
            raise CheckpointError(f"{source}: base weight {key} for LoRA pair {index} is missing")
        out_features, in_features = shape[0], shape[1]
        rank = up.shape[1] if up.ndim >= 2 else -1
        kernel = tuple(shape[2:])
        expected_up = (out_features, rank) + (1,) * len(kernel)
        expected_down = (rank, in_features) + kernel
        if (
            up.ndim != len(shape)
            or tuple(up.shape) != expected_up
            or tuple(down.shape) != expected_down
            or not 0 < rank <= min(out_features, in_features)
        ):
            raise CheckpointError(
                f"{source}: LoRA pair {index} (tensors {2 * index}, {2 * index + 1}) is for module {module.reference} "
                f"with weight {tuple(shape)}: got up {tuple(up.shape)}, down {tuple(down.shape)}; expected up "
                f"(out={out_features}, r, 1...) and down (r, in={in_features}, *kernel{kernel}) with r <= "
                f"{min(out_features, in_features)}"
            )
        pairs.append((module, up, down))
    return pairs


def merge_lora_list(
    reference: dict[str, torch.Tensor], lora: Sequence[torch.Tensor], config: LvdmUNetConfig, *, source: str
) -> dict[str, torch.Tensor]:
    """Merge a T2V-Turbo LoRA list into a reference UNet state dict (lvdm keys) at scale 1.0.

    A module whose base weight is absent (time_cond_proj) gets a zero base, so the LoRA delta is the whole weight.
    """
    merged = dict(reference)
    for module, up, down in check_lora_list(lora, reference, config, source=source):
        key = f"{module.reference}.weight"
        base = reference.get(key)
        if base is None:
            base = torch.zeros(config.model_channels, config.time_cond_proj_dim)
        merged[key] = (base.double() + lora_delta(up, down, base.shape)).to(base.dtype)
    return merged
