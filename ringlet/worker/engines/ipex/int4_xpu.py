"""Int4 linears on an Intel GPU through PyTorch's own XPU kernel, `aten._weight_int4pack_mm`.

The kernel takes the codes two to a byte (the even input in the high nibble), packed by
`aten._convert_weight_to_int4pack` into int32 [N, K / 8] on the device, and one (scale, zero) pair per group of
inputs and output, [K / group, N, 2] in the activations' dtype, computing w = (code - 8) * scale + zero. The groups
are those of `quant.GroupQuantized` (a GGUF file's own, or rounded), so w = code * scale + offset gives
zero = offset + 8 * scale. A PyTorch whose XPU build lacks the kernel keeps quant.py's linears dequantising in the
matmul.
"""

from __future__ import annotations

import logging
from typing import cast

import torch
from torch import nn

from ringlet.models.quant import GroupQuantized, Int4Linear

log = logging.getLogger(__name__)

INNER_K_TILES = 8  # the packing's tile parameter; the XPU kernel lays out [N, K / 8] whatever it is
KERNEL_OPS = ("_convert_weight_to_int4pack", "_weight_int4pack_mm")
NO_KERNEL_FIX = "install a PyTorch 2.7 or later built for XPU (pip install torch --index-url .../whl/xpu)"


def has_int4_kernel(device: torch.device) -> bool:
    """Whether this PyTorch runs the int4 packing and matmul on `device`'s type (its dispatch key has both)."""
    key = device.type.upper()
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key) for op in KERNEL_OPS)


class XpuInt4Linear(nn.Module):
    """A linear of 4-bit groups run by `_weight_int4pack_mm`, on the device its groups are on."""

    # buffers, registered in __init__
    weight: torch.Tensor
    scale_zero: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, groups: GroupQuantized, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = groups.codes.shape
        self.group_size = groups.group_size
        codes = groups.codes.to(torch.uint8)
        pairs = (codes[:, 0::2] << 4) | codes[:, 1::2]  # [N, K / 2]: even << 4 | odd
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), INNER_K_TILES))
        scale, offset = groups.scale.float(), groups.offset.float()
        scale_zero = torch.stack((scale, offset + 8 * scale), dim=-1).transpose(0, 1)  # [K / group, N, 2]
        self.register_buffer("scale_zero", scale_zero.contiguous().to(dtype))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(self.scale_zero.dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm(rows, self.weight, self.group_size, self.scale_zero)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


def use_int4_kernel(model: nn.Module, dtype: torch.dtype) -> int:
    """Every Int4Linear of 4-bit codes of `model` (a stage already on its Intel GPU) replaced by an XpuInt4Linear built from its
    groups, in place; returns how many. Where the kernel is missing nothing changes (0) and one line says so."""
    targets = [(owner, name, cast(Int4Linear, child)) for owner in model.modules()
               for name, child in owner.named_children() if isinstance(child, Int4Linear) and child.bits == 4]
    if not targets:
        return 0
    device = next(targets[0][2].buffers()).device
    if not has_int4_kernel(device):
        log.info("ipex: this PyTorch has no int4 kernel for %s (%s); the int4 linears dequantise their weights in "
                 "every matmul, which is slower (fix: %s)", device.type, ", ".join(KERNEL_OPS), NO_KERNEL_FIX)
        return 0
    for owner, name, linear in targets:
        setattr(owner, name, XpuInt4Linear(linear.groups(), linear.bias, dtype))
    return len(targets)

