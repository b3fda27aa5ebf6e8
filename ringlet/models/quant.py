"""Weight-only int8 linears for memory-bound decoding on CPUs.

Decoding one token reads every weight once, so bytes per weight set the speed: int8 weights with one
scale per output channel read a quarter of fp32's bytes, with bf16 activations (AMX / AVX-512 BF16).
The matmul is PyTorch's own `_weight_int8pack_mm` kernel.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every nn.Linear of the model by an Int8Linear, in place; returns the model."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear(child.weight.data, child.bias, dtype))
        else:
            quantize_int8(child, dtype)
    return model


def cpu_supports_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run natively (otherwise they are emulated and slow)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
