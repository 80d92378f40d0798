"""What the model families do to their `nn.Module`s, the same way: dtypes, compilation and LoRA.

- `weight_dtype`: diffusers' `ModelMixin.dtype` without its walk over every submodule;
- `norms_in_input_dtype`: GroupNorm / LayerNorm that stay in their input's dtype under autocast;
- `hold_frozen_in`: frozen weights stored in the compute dtype (diffusers' fp32 modules kept);
- `compile_module`: `torch.compile` in place with an eager fallback;
- LoRA through peft (imported on first use): `inject_lora_adapter` (returns the tuner layers, cached once; plain
  `Linear` layers add the adapter in its GEMM: `lora_linear.py`) and `adapters_disabled`, the adapters-off DPO
  reference.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # peft is imported where LoRA is used: parsing a config must not pay for it (seconds)
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

logger = logging.getLogger(__name__)


# --- dtypes, layouts, compilation ------------------------------------------------------------------------------------
def _keep_in_fp32(module: nn.Module) -> frozenset[str]:
    return frozenset(getattr(module, "_keep_in_fp32_modules", None) or ())


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of `module`'s first floating parameter outside diffusers' `_keep_in_fp32_modules`: what
    `ModelMixin.dtype` returns, without its walk over every submodule (~10 ms per call on VC2's UNet, 20 with LoRA)."""
    keep = _keep_in_fp32(module)
    for name, parameter in module.named_parameters():
        if parameter.is_floating_point() and not keep & set(name.split(".")):
            return parameter.dtype
    return torch.float32


# The layers bf16 autocast computes from bf16 copies of their float32 weights: held in bf16, they compute the same.
AUTOCAST_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def hold_frozen_in(module: nn.Module, dtype: torch.dtype, layers: tuple[type[nn.Module], ...] | None = None) -> None:
    """Store `module`'s frozen floating weights in `dtype`: every parameter without requires_grad, and the buffers
    when nothing in `module` trains. Diffusers' `_keep_in_fp32_modules` (RoPE tables, time embedders, modulation
    tables, norms) stay as they are, as `from_pretrained(torch_dtype=...)` keeps them; trainable weights too.

    `layers` (e.g. AUTOCAST_LAYERS): only the weights of those layers, no buffers. A frozen copy held so computes
    under bf16 autocast exactly what its float32 original computes (the DPO reference of a float32 policy): the
    norms, embeddings and tables autocast leaves in float32 keep their float32 weights."""
    cast_buffers = layers is None and not any(parameter.requires_grad for parameter in module.parameters())

    def visit(owner: nn.Module, keep: frozenset[str], kept: bool) -> None:
        keep = _keep_in_fp32(owner) or keep
        for name, child in owner.named_children():
            visit(child, keep, kept or name in keep)
        if kept or (layers is not None and not isinstance(owner, layers)):
            return
        for name, parameter in owner.named_parameters(recurse=False):
            if parameter.is_floating_point() and not parameter.requires_grad and name not in keep:
                parameter.data = parameter.data.to(dtype)
        for name, buffer in owner.named_buffers(recurse=False):
            if cast_buffers and buffer.is_floating_point() and name not in keep:
                owner._buffers[name] = buffer.to(dtype)

    visit(module, frozenset(), False)


CompileBackend = str | Callable[..., Any]  # a torch.compile backend: "inductor", "eager", ... or a callable


def compile_module(module: nn.Module, backend: CompileBackend = "inductor") -> None:
    """`torch.compile` `module`'s forward in place (same parameters, names and state dict). Compilation happens on
    the first call; if that call fails, a warning is logged and the module runs eager from then on."""
    eager = module.forward
    compiled = torch.compile(eager, backend=backend)
    checked = False

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal checked
        if checked:
            return compiled(*args, **kwargs)
        try:
            output = compiled(*args, **kwargs)
        except Exception as error:  # any compiler failure: eager gives the same outputs, only slower
            logger.warning("torch.compile of %s failed, running eager: %s: %s", type(module).__name__,
                           type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            module.forward = eager
            return eager(*args, **kwargs)
        checked = True
        return output

    module.forward = forward


class InputDtypeGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` computed in its input's dtype, also under autocast. Autocast runs every norm in float32: an
    fp32 island per norm (cast in, fp32 norm, fp32 activation after it, cast out), 39% of a bf16 VC2 UNet forward's
    memory traffic (benchmarks/traffic.py). The bf16 kernels accumulate their statistics in float32, as lvdm's
    GroupNorm32 does; the output is in the input's dtype, as GroupNorm32's is. A float32 input gives exactly
    `nn.GroupNorm`'s result."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        with _autocast_off(input):
            return F.group_norm(input, self.num_groups, _as_dtype(self.weight, input), _as_dtype(self.bias, input),
                                self.eps)


class InputDtypeLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` computed in its input's dtype, also under autocast (see `InputDtypeGroupNorm`)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        with _autocast_off(input):
            return F.layer_norm(input, self.normalized_shape, _as_dtype(self.weight, input),
                                _as_dtype(self.bias, input), self.eps)


def _autocast_off(input: torch.Tensor) -> AbstractContextManager[Any]:
    """Autocast disabled on `input`'s device, entered only when it is on (5 us per entry, 265 norms per VC2 forward)."""
    device = input.device.type
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext()


def _as_dtype(weight: torch.Tensor | None, input: torch.Tensor) -> torch.Tensor | None:
    return None if weight is None else weight.to(input.dtype)


def norms_in_input_dtype(module: nn.Module) -> None:
    """Every plain `nn.GroupNorm` / `nn.LayerNorm` in `module` becomes its `InputDtype...` subclass, in place (the
    same parameters, names and state dict; only `forward` differs)."""
    swaps: dict[type, type] = {nn.GroupNorm: InputDtypeGroupNorm, nn.LayerNorm: InputDtypeLayerNorm}
    for submodule in module.modules():
        if type(submodule) in swaps:
            submodule.__class__ = swaps[type(submodule)]


# --- LoRA (peft) ----------------------------------------------------------------------------------------------------
def inject_lora_adapter(
    module: nn.Module, config: PeftLoraConfig, adapter_name: str = "default"
) -> list[BaseTunerLayer]:
    """Inject a peft LoRA adapter into `module` in place; return its tuner layers (to cache: no module walks later).

    The layers feed their input to the adapter as it is (`cast_input_dtype_enabled = False`): peft would first cast
    a bf16 activation to the float32 adapter's dtype, an fp32 copy of every adapted layer's input that autocast then
    casts back to bf16 for the matmul. Under autocast the result is the same; in float32 nothing is cast either way.
    peft's plain `Linear` layers become `FusedAddLoraLinear` (same parameters and state dict): the adapter's scaling
    and add run in its up-projection's GEMM."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import Linear
    from peft.tuners.tuners_utils import BaseTunerLayer

    from videodpo_ray.models.lora_linear import FusedAddLoraLinear

    inject_adapter_in_model(config, module, adapter_name=adapter_name)
    layers = [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
        if type(layer) is Linear:
            layer.__class__ = FusedAddLoraLinear
    return layers


@contextmanager
def adapters_disabled(layers: Sequence[BaseTunerLayer]) -> Iterator[None]:
    """Every adapter of `layers` off for the duration (their forward is the base layer's, exactly), then the layers
    that were on are back on. Only the flag the layers' forward reads is flipped: peft's `enable_adapters` also resets
    requires_grad on every adapter weight, twice per layer (24 ms per off/on at VC2's 264 LoRA layers on a CPU, against
    1.2 ms). The adapter weights keep requires_grad: use it for a forward under no_grad, as the DPO reference."""
    enabled = [layer for layer in layers if not layer.disable_adapters]
    for layer in enabled:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in enabled:
            layer._disable_adapters = False
