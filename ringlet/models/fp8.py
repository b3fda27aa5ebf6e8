"""fp8 (e4m3) weights, as compressed-tensors and Hugging Face's FP8 checkpoints store them: a scale per tensor, per
output channel or per 128x128 block.

On CUDA devices with fp8 tensor cores (compute capability 8.9 and later) a linear keeps its fp8 weight and runs
`torch._scaled_mm`, each token's activations scaled to fp8 on the fly. Elsewhere the weights are dequantised once,
at load, to the compute dtype (or quantised on to int8 where the CPU engine quantises).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

FP8_MAX = 448.0  # the largest float8_e4m3fn
# the model's fused linears -> the Hugging Face linears they stack, inside model.layers.{i}.
FUSED_LINEARS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


@dataclass
class Fp8Weight:
    """A weight [N, K] as fp8 values with `scale` [N, ceil(K / block)] float32: w[n, k] = weight[n, k] *
    scale[n, k // block]. One column (block = K) is a scale per output channel."""

    weight: torch.Tensor  # float8 [N, K]
    scale: torch.Tensor  # float32 [N, K blocks]
    block: int

    @classmethod
    def from_checkpoint(cls, weight: torch.Tensor, scale: torch.Tensor, block: int = 128) -> Fp8Weight:
        """`scale` as a checkpoint stores it: one value (per tensor), [N] or [N, 1] (per channel), or
        [ceil(N / block), ceil(K / block)] (per square block)."""
        n, k = weight.shape
        scale = scale.float()
        if scale.numel() == 1:
            return cls(weight, scale.reshape(1, 1).expand(n, 1).contiguous(), k)
        if scale.numel() == n and (scale.dim() == 1 or scale.shape[-1] == 1):
            return cls(weight, scale.reshape(n, 1), k)
        if scale.dim() == 2 and tuple(scale.shape) == (-(-n // block), -(-k // block)):
            return cls(weight, scale.repeat_interleave(block, dim=0)[:n].contiguous(), block)
        raise ValueError(f"an fp8 weight of shape {list(weight.shape)} with a scale of shape {list(scale.shape)}: "
                         f"neither per tensor, per channel nor per {block}x{block} block")

    @classmethod
    def cat(cls, parts: list[Fp8Weight]) -> Fp8Weight:
        """Stacked along the output dimension (fused q/k/v, gate/up). A part scaled per channel next to parts
        scaled per block repeats its scale over the blocks."""
        block = min(p.block for p in parts)
        columns = max(p.scale.shape[1] for p in parts)
        scales = []
        for p in parts:
            if p.block != block and p.scale.shape[1] != 1:
                raise ValueError(f"fp8 parts scaled per {p.block} and per {block} columns cannot be fused")
            scales.append(p.scale.expand(-1, columns) if p.block != block else p.scale)
        return cls(torch.cat([p.weight for p in parts]), torch.cat(scales), block)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        k = self.weight.shape[1]
        scale = self.scale.repeat_interleave(self.block, dim=1)[:, :k]
        return (self.weight.float() * scale).to(dtype)


class Fp8Linear(nn.Module):
    """An fp8 weight with a scale per output channel, run by `torch._scaled_mm` with each row of the input scaled to
    fp8 by its own absolute maximum. The kernel is given unit scales and both scales are applied to its fp32
    output: tensor-wise scaling is what every fp8 GPU's `_scaled_mm` takes. A weight scaled per block instead keeps
    its fp8 values and is dequantised in the matmul: exact, at fp8's memory, without the fp8 tensor cores."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    unit: torch.Tensor

    def __init__(self, weight: Fp8Weight, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.weight.shape
        self.block = weight.block
        self.dtype = dtype
        self.register_buffer("weight", weight.weight.to(torch.float8_e4m3fn))
        self.register_buffer("scale", weight.scale.float())
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self.register_buffer("unit", torch.ones((), dtype=torch.float32, device=weight.weight.device))

    @property
    def per_channel(self) -> bool:
        return self.scale.shape[1] == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_channel:
            return F.linear(x, Fp8Weight(self.weight, self.scale, self.block).dequantize(x.dtype), self.bias)
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        row_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        quantized = (rows.float() / row_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(quantized, self.weight.t(), scale_a=self.unit, scale_b=self.unit,
                             out_dtype=torch.float32)
        y = (y * row_scale * self.scale.view(1, -1)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def runs_fp8(device: torch.device | str) -> bool:
    """Whether `device` has fp8 tensor cores for `torch._scaled_mm`: CUDA compute capability 8.9 or later."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(weight: Fp8Weight, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """An Fp8Linear where the kernel takes the shapes (`_scaled_mm` wants K and N multiples of 16), else the weight
    dequantised to `dtype` in a plain nn.Linear."""
    n, k = weight.weight.shape
    if n % 16 == 0 and k % 16 == 0:
        return Fp8Linear(weight, bias, dtype)
    linear = nn.Linear(k, n, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.dequantize(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return linear


def use_fp8_layer(layer: nn.Module, index: int, dtype: torch.dtype, source: Mapping[str, Fp8Weight]) -> int:
    """The linears of decoder layer `index` (global) whose Hugging Face parts are all in `source` (HF names, e.g.
    `model.layers.3.mlp.up_proj.weight`, on the layer's device) become fp8 linears, in place; returns how many."""
    prefix = f"model.layers.{index}."
    replaced = 0
    for path, parts in FUSED_LINEARS.items():
        stored = [source.get(f"{prefix}{part}.weight") for part in parts]
        if any(w is None for w in stored):
            continue
        owner_path, _, attr = path.rpartition(".")
        linear = cast(nn.Linear, layer.get_submodule(path))
        setattr(layer.get_submodule(owner_path), attr,
                fp8_linear(Fp8Weight.cat(cast(list[Fp8Weight], stored)), linear.bias, dtype))
        replaced += 1
    return replaced
