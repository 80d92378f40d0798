"""peft's LoRA `Linear` with the adapter's scaling and add in its up-projection's GEMM (imported with peft, on
first use: `modules.inject_lora_adapter` swaps the class in).

peft computes `result + lora_B(lora_A(x)) * scaling`: the up-projection writes an output-sized tensor, the scaling
reads and writes it again, and the add reads it with the base layer's output and writes a third. One
`torch.addmm(result, down, B.T, alpha=scaling)` does the same in the GEMM's epilogue: the output is read and written
once. In VC2's full-size UNet (264 adapted attention projections) that is 22% of a LoRA policy forward + backward's
elementwise traffic (`benchmarks/traffic.py --lora`).

In float32 the result is bit-identical to peft's, gradients included. Under bf16 autocast it rounds once where peft
rounds three times (the up-projection, the scaling, the add), so it is closer to the float32 result. Anything but
one plain adapter on an unmerged layer fed its input as is (DoRA and other variants, several adapters,
`adapter_names`, a bias on `lora_B`, peft's input cast, adapters off: the DPO reference) runs peft's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear


class FusedAddLoraLinear(Linear):
    """`peft.tuners.lora.Linear` whose plain one-adapter forward adds the adapter inside `torch.addmm`."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._plain_adapter()
        if adapter is None or args or kwargs:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        down = self.lora_A[adapter](self.lora_dropout[adapter](x))
        fused = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]),
                            self.lora_B[adapter].weight.t(), alpha=self.scaling[adapter])
        return fused.view(result.shape)

    def _plain_adapter(self) -> str | None:
        """The one active adapter when it is a plain LoRA that the fused forward computes as peft does, else None."""
        if (self.disable_adapters or self.merged or self.fan_in_fan_out or self.cast_input_dtype_enabled
                or len(self.active_adapters) != 1):
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A or adapter in self.lora_variant or self.lora_B[adapter].bias is not None:
            return None
        return adapter
