"""VideoCrafter2's UNet on diffusers: `UNet3DConditionModel` plus the fps embedding, with working activation
checkpointing."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.unets.unet_3d_condition import UNet3DConditionModel, UNet3DConditionOutput
from torch import nn

from videodpo_ray.models.modules import norms_in_input_dtype


class VC2UNet3DConditionModel(UNet3DConditionModel):
    """`UNet3DConditionModel` with VC2's fps conditioning and T2V-Turbo's guidance conditioning.

    - `fps_embedding` (TimestepEmbedding(C, 4C) on the same sinusoid as the timestep, `Timesteps(C, True, 0)`) is
      added to `time_embedding`'s output, as in the lvdm UNet with `fps_cond=True`;
    - T2V-Turbo's `time_cond_proj` is diffusers' `time_embedding.cond_proj` (`time_cond_proj_dim=256`), fed the
      guidance-scale embedding as `timestep_cond`;
    - every norm runs in its input's dtype under bf16 autocast (`norms_in_input_dtype`: no fp32 islands, as lvdm's
      GroupNorm32 returns its input's dtype); float32 forwards are unchanged;
    - every dropout is disabled: DPO compares policy and reference predictions, which must be deterministic
      (the original temporal convolutions use dropout 0.1 in training);
    - `enable_gradient_checkpointing()` checkpoints `transformer_in` and every down/mid/up block (diffusers 0.42's
      3D blocks ignore their own flag).

    Call: `unet(x, t, encoder_hidden_states=ctx, fps=fps, timestep_cond=None).sample` with x (B, C, T, H, W).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "DownBlock3D",
        ),
        up_block_types: tuple[str, ...] = (
            "UpBlock3D",
            "CrossAttnUpBlock3D",
            "CrossAttnUpBlock3D",
            "CrossAttnUpBlock3D",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1024,
        attention_head_dim: int | tuple[int] = 64,
        num_attention_heads: int | tuple[int] | None = None,
        time_cond_proj_dim: int | None = None,
        fps_cond: bool = True,
    ):
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            time_cond_proj_dim=time_cond_proj_dim,
        )
        channels = block_out_channels[0]
        self.fps_embedding = TimestepEmbedding(channels, channels * 4, act_fn=act_fn) if fps_cond else None
        self.checkpoint_blocks = False
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        norms_in_input_dtype(self)

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        """Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant)."""
        self.checkpoint_blocks = True

    def disable_gradient_checkpointing(self) -> None:
        self.checkpoint_blocks = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.checkpoint_blocks

    def _run(self, block: nn.Module, *args, **kwargs):
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def _embed(
        self, values: torch.Tensor | int | float, batch: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        values = torch.as_tensor(values, device=device)
        return self.time_proj(values.reshape(-1).expand(batch)).to(dtype=dtype)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        encoder_hidden_states: torch.Tensor,
        fps: torch.Tensor | int | None = None,
        timestep_cond: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet3DConditionOutput | tuple[torch.Tensor]:
        batch, _, num_frames = sample.shape[:3]
        dtype = sample.dtype  # the embeddings' dtype: a bf16 copy of a float32 policy adds them as the policy does
        emb = self.time_embedding(self._embed(timestep, batch, sample.device, dtype), timestep_cond)
        if self.fps_embedding is not None:
            if fps is None:
                raise ValueError("this UNet is fps-conditioned (fps_cond=True): pass fps")
            emb = emb + self.fps_embedding(self._embed(fps, batch, sample.device, dtype))
        emb = emb.repeat_interleave(num_frames, dim=0)
        context = encoder_hidden_states.repeat_interleave(num_frames, dim=0)

        hidden = sample.permute(0, 2, 1, 3, 4).reshape((batch * num_frames, -1) + sample.shape[3:])
        hidden = self.conv_in(hidden)
        hidden = self._run(self.transformer_in, hidden, num_frames=num_frames, return_dict=False)[0]

        skips = (hidden,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, res = self._run(
                    block, hidden_states=hidden, temb=emb, encoder_hidden_states=context, num_frames=num_frames
                )
            else:
                hidden, res = self._run(block, hidden_states=hidden, temb=emb, num_frames=num_frames)
            skips += res

        hidden = self._run(self.mid_block, hidden, emb, encoder_hidden_states=context, num_frames=num_frames)

        upsample_factor = 2**self.num_upsamplers
        forward_upsample_size = any(size % upsample_factor for size in sample.shape[-2:])
        for index, block in enumerate(self.up_blocks):
            res = skips[-len(block.resnets) :]
            skips = skips[: -len(block.resnets)]
            upsample_size = skips[-1].shape[2:] if forward_upsample_size and index < len(self.up_blocks) - 1 else None
            kwargs = {
                "hidden_states": hidden,
                "temb": emb,
                "res_hidden_states_tuple": res,
                "upsample_size": upsample_size,
            }
            if getattr(block, "has_cross_attention", False):
                kwargs["encoder_hidden_states"] = context
            hidden = self._run(block, num_frames=num_frames, **kwargs)

        if self.conv_norm_out is not None:
            hidden = self.conv_act(self.conv_norm_out(hidden))
        hidden = self.conv_out(hidden)
        output = hidden.reshape((batch, num_frames) + hidden.shape[1:]).permute(0, 2, 1, 3, 4)
        if not return_dict:
            return (output,)
        return UNet3DConditionOutput(sample=output)
