"""Memory traffic of a VC2 UNet forward under CUDA bf16 autocast, counted without a GPU.

The UNet runs on fake CUDA tensors (`FakeTensorMode`: shapes and dtypes, no data), with CUDA's autocast policy
switched on directly (`torch.autocast("cuda")` refuses without a GPU). A dispatch mode adds up the bytes each aten op
reads and writes, by op class. The bytes that are not GEMM, convolution or attention are memory-bound kernels, so
they bound elementwise time from below on any GPU. `F.scaled_dot_product_attention` is counted as one fused kernel
(q, k, v, out), as cuDNN / flash attention run it on the H200; the fake tensors would otherwise take the math path.

Compared side by side in one run: plain `nn.GroupNorm` / `nn.LayerNorm` (autocast runs them in float32), against the
repo's `norms_in_input_dtype` (bf16 in, bf16 out, float32 statistics), at VC2's full size (batch 8 rows of 16x40x64
latents: the sampler's CFG batch) and for the training policy's forward (float32 master weights, 2 rows = 1 pair;
the backward mirrors it, but autograd needs a real CUDA context, so it is not counted here), with the activations
that forward saves for backward (what activation checkpointing would recompute instead).

`--lora`: a VC2 LoRA r64 policy forward and backward (bf16 frozen base, float32 adapter, bf16 autocast), three
ways: peft's own layers (each adapted layer's input cast to the adapter's float32, `cast_input_dtype_enabled`, and
the adapter added in three kernels), the input as is, and the input as is with the adapter added in its GEMM
(`FusedAddLoraLinear`, the repo's layers). peft builds its layers with `.to()`, which fake tensors refuse, so this
one runs real CPU tensors under CPU autocast (the cast and the adds are peft's own, whatever the autocast policy) on
smaller latents (2 rows of 4x8x20x32, an eighth of VC2's 4x16x40x64): minutes at full size. Its attention is CPU
SDPA's own kernels, forward and backward (the same in every column), not the one fused kernel counted above.

Run: `python benchmarks/traffic.py` (CPU, under a minute; `--tiny` for the tiny preset; `--lora` adds the LoRA case).
"""

from __future__ import annotations

import argparse
import collections
import time
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.models.base import VideoDiffusionModel
from videodpo_ray.models.lora_linear import FusedAddLoraLinear
from videodpo_ray.models.lvdm_layout import LvdmUNetConfig
from videodpo_ray.models.modules import InputDtypeGroupNorm, InputDtypeLayerNorm
from videodpo_ray.models.vc2 import PRESETS
from videodpo_ray.models.vc2_unet import VC2UNet3DConditionModel

VIEWS = {  # no kernel: metadata only
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
    "squeeze", "split", "split_with_sizes", "chunk", "unbind", "detach", "alias", "as_strided", "unflatten",
    "flatten", "_reshape_alias", "empty", "empty_like", "empty_strided", "lift_fresh", "device", "zeros_like",
    "ones_like",
}
COMPUTE = ("convolution", "gemm", "attention")
LATENTS = {"full": (4, 16, 40, 64), "tiny": (4, 4, 8, 8)}  # full: VC2 at 16x320x512
LORA_LATENTS = {"full": (4, 8, 20, 32), "tiny": (4, 4, 16, 16)}  # real CPU tensors: an eighth of VC2's full latents
PROMPT_TOKENS = 77


def op_class(name: str) -> str:
    if name.startswith("convolution"):
        return "convolution"
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        return "gemm"
    if name.startswith(("native_group_norm", "native_layer_norm")):
        return "norm"
    if name == "_to_copy":
        return "cast"
    if name in ("clone", "copy_"):
        return "copy"
    return "elementwise"


class TrafficCounter(TorchDispatchMode):
    """Bytes read + written per op class, and the float32 activations the memory-bound ops write (fp32 islands)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.float32_written = 0
        self.saved_for_backward = 0  # what autograd keeps: each tensor once, autocast's weight copies, no parameters
        self._saved: dict[int, torch.Tensor] = {}  # held, so that no id is reused by another tensor

    def save(self, tensor: torch.Tensor) -> torch.Tensor:
        """A `saved_tensors_hooks` pack hook: count each saved activation once."""
        if not isinstance(tensor, nn.Parameter) and id(tensor) not in self._saved:
            self._saved[id(tensor)] = tensor
            self.saved_for_backward += tensor.numel() * tensor.element_size()
        return tensor

    def add(self, kind: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        self.bytes[kind] += sum(tensor.numel() * tensor.element_size() for tensor in inputs + outputs)
        if kind not in COMPUTE:
            self.float32_written += sum(t.numel() * t.element_size() for t in outputs if t.dtype == torch.float32)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            inputs, outputs = ([x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]
                               for tree in ((args, kwargs), output))
            self.add(op_class(name), inputs, outputs)
        return output


@contextmanager
def fused_attention(counter: TrafficCounter) -> Iterator[None]:
    """SDPA as one kernel: q, k, v read and out written (what flash / cuDNN attention moves)."""
    original = F.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):
        output = torch.empty_like(query)
        counter.add("attention", [query, key, value], [output])
        return output

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextmanager
def cuda_bf16_autocast() -> Iterator[None]:
    """CUDA's autocast policy (norms, softmax, exp in float32; GEMMs and convolutions in bf16), without a GPU."""
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.set_autocast_enabled("cuda", True)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", False)


def plain_norms(module: nn.Module) -> int:
    """Undo `norms_in_input_dtype` (the autocast-policy norms VC2's UNet had in the reference figures); return how
    many norms it changed."""
    plain = {InputDtypeGroupNorm: nn.GroupNorm, InputDtypeLayerNorm: nn.LayerNorm}
    changed = [submodule for submodule in module.modules() if type(submodule) in plain]
    for submodule in changed:
        submodule.__class__ = plain[type(submodule)]
    return len(changed)


def set_lora_layers(model: VideoDiffusionModel, *, cast_input: bool, fused_add: bool) -> None:
    """LoRA layers with peft's cast of each input to the adapter's float32 or the input as is, and with the adapter
    added in three kernels (peft's `Linear`) or in its GEMM (`FusedAddLoraLinear`). peft's own layers, the reference
    figures' setting: cast_input=True, fused_add=False; the repo's: the opposite."""
    from peft.tuners.lora import Linear

    for layer in model._tuner_layers:
        layer.cast_input_dtype_enabled = cast_input
        layer.__class__ = FusedAddLoraLinear if fused_add else Linear


def unet_traffic(variant: str, rows: int, *, plain: bool, weights: torch.dtype) -> TrafficCounter:
    """Traffic of one UNet forward of `rows` latents, bf16 autocast, on fake CUDA tensors, weights in `weights`
    (bf16: the sampler; float32: a full finetune's trained master weights, cast by autocast on every call)."""
    preset = PRESETS[variant]
    channels, frames, height, width = LATENTS[variant]
    counter = TrafficCounter()
    default_dtype = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        torch.set_default_dtype(weights)  # `.to(dtype)` cannot swap fake parameters: build them in the dtype
        try:
            unet = VC2UNet3DConditionModel(**LvdmUNetConfig(**preset.unet).diffusers_config())
        finally:
            torch.set_default_dtype(default_dtype)
        if plain:
            plain_norms(unet)
        unet.requires_grad_(weights == torch.float32)
        latents = torch.randn(rows, channels, frames, height, width, dtype=torch.bfloat16)
        context = torch.randn(rows, PROMPT_TOKENS, unet.config.cross_attention_dim, dtype=torch.bfloat16)
        timesteps = torch.full((rows,), 500, dtype=torch.int64)
        with cuda_bf16_autocast(), counter, fused_attention(counter), saved_tensors_hooks(counter.save, lambda x: x):
            unet(latents, timesteps, encoder_hidden_states=context, fps=16)
    return counter


def lora_traffic(variant: str) -> list[tuple[str, TrafficCounter]]:
    """A LoRA r64 policy forward + backward's traffic with peft's layers, with the input as is, and with the input
    as is and the fused add (real CPU tensors)."""
    config = ModelConfig(family="vc2", variant=variant, finetune="lora", lora={"rank": 64}, mixed_precision="bf16",
                         build_text_encoder=False)
    model = build_model(config, seed=0)
    rows, (channels, frames, height, width) = 2, LORA_LATENTS[variant]
    latents = torch.randn(rows, channels, frames, height, width)
    context = torch.randn(rows, PROMPT_TOKENS, model.unet.config.cross_attention_dim)
    columns = []
    for column, cast_input, fused_add in (("peft's layers", True, False), ("input as is", False, False),
                                          ("input as is, fused add", False, True)):
        set_lora_layers(model, cast_input=cast_input, fused_add=fused_add)
        counter = TrafficCounter()  # attention as CPU's SDPA runs it (the fused stand-in has no backward): the same
        with counter:  # in all three columns, so only the totals it is part of differ from a GPU's
            model.predict(latents, torch.full((rows,), 500), context).float().square().mean().backward()
        columns.append((column, counter))
    return columns


def report(label: str, columns: list[tuple[str, TrafficCounter]]) -> None:
    """Print the counts side by side, and the last against the first."""
    gb = 1e-9
    counters = [counter for _, counter in columns]
    first, last = counters[0], counters[-1]
    print(f"\n{label}")
    print("| op class | " + " | ".join(f"{column} GB" for column, _ in columns) + " |")
    print("|---|" + "---:|" * len(columns))

    def row(name: str, values: list[float]) -> None:
        print(f"| {name} | " + " | ".join(f"{value * gb:.1f}" for value in values) + " |")

    for kind in sorted(set().union(*(c.bytes for c in counters)), key=lambda k: -first.bytes[k]):
        row(kind, [c.bytes[kind] for c in counters])
    memory_bound = [sum(v for k, v in c.bytes.items() if k not in COMPUTE) for c in counters]
    totals = [sum(c.bytes.values()) for c in counters]
    row("**total**", totals)
    row("memory-bound (not GEMM / conv / attention)", memory_bound)
    row("float32 activations written", [c.float32_written for c in counters])
    if first.saved_for_backward:
        row("saved for backward (no checkpointing; attention: q, k, v, out only)",
            [c.saved_for_backward for c in counters])
    print(f"memory-bound traffic x{memory_bound[-1] / memory_bound[0]:.2f}; total x{totals[-1] / totals[0]:.2f}"
          f"; elementwise x{last.bytes['elementwise'] / first.bytes['elementwise']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny preset (seconds) instead of VC2's full size")
    parser.add_argument("--lora", action="store_true", help="also the LoRA input-cast case (minutes at full size)")
    args = parser.parse_args()
    variant = "tiny" if args.tiny else "full"
    start = time.perf_counter()
    for label, rows, weights in (("sampler forward, bf16 weights, batch 8 rows", 8, torch.bfloat16),
                                 ("training policy forward, float32 weights, 1 pair = 2 rows", 2, torch.float32)):
        report(f"VC2 UNet ({variant}): {label}",
               [(column, unet_traffic(variant, rows, plain=plain, weights=weights))
                for column, plain in (("plain norms", True), ("input-dtype norms", False))])
    if args.lora:
        latents = "x".join(map(str, LORA_LATENTS[variant]))
        report(f"VC2 UNet ({variant}): LoRA r64 policy forward + backward, 2 rows of {latents} latents",
               lora_traffic(variant))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
