"""A mixture-of-experts layer's experts: SiLU-gated MLPs whose weights are stacked, one tensor per projection
([E, out, in]), and run as a grouped computation over the rows routed to them.

The rows come sorted by expert with `counts` rows for each; float experts run each projection as one grouped matmul
where PyTorch has one (`torch._grouped_mm`, on CPUs, for rows of a multiple of 16 bytes), else one matmul per expert
that has rows. Int8 experts keep one
scale per output row of each expert, as `Int8Linear` does, and run its kernel on each expert's rows; int4 experts are
an int4 linear per expert and projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ringlet.models.quant_format import round_rows_int8


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        # random as transformers initialises them (a stage built without weights); a load assigns the checkpoint's
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * intermediate_size, hidden_size) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden_size, intermediate_size) * 0.02)

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, H] sorted by expert, `counts` [E] rows for each; returns each row's expert output [N, H]."""
        if rows.is_cpu and hasattr(torch, "_grouped_mm") and self._rows_aligned():
            ends = counts.cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs=ends).chunk(2, dim=-1)
            return torch._grouped_mm((F.silu(gate) * up).contiguous(), self.down_proj.transpose(1, 2), offs=ends)
        return per_expert(rows, counts, lambda e, x: F.linear(x, self.gate_up_proj[e]),
                           lambda e, x: F.linear(x, self.down_proj[e]))

    @property
    def intermediate_size(self) -> int:
        return self.down_proj.shape[-1]

    def _rows_aligned(self) -> bool:
        """Whether the rows of the weights and activations start every 16 bytes, as `torch._grouped_mm` needs."""
        return all(size * self.down_proj.element_size() % 16 == 0 for size in self.down_proj.shape[1:])


class Int8Experts(nn.Module):
    """Experts whose weights are int8 with a scale per output row of each expert (a quarter of fp32's bytes)."""

    # buffers, registered in __init__
    gate_up_proj: torch.Tensor  # int8 [E, 2I, H]
    gate_up_scales: torch.Tensor  # [E, 2I]
    down_proj: torch.Tensor  # int8 [E, H, I]
    down_scales: torch.Tensor  # [E, H]

    def __init__(self, experts: Experts, dtype: torch.dtype) -> None:
        super().__init__()
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, name).data
            codes, step = round_rows_int8(weight.reshape(-1, weight.shape[-1]))
            self.register_buffer(name, codes.view(weight.shape))
            self.register_buffer(name.replace("proj", "scales"), step.view(weight.shape[:2]).to(dtype))

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return per_expert(rows, counts, lambda e, x: _int8_mm(x, self.gate_up_proj[e], self.gate_up_scales[e]),
                           lambda e, x: _int8_mm(x, self.down_proj[e], self.down_scales[e]))


class Int4Experts(nn.Module):
    """Experts whose projections are int4 linears in groups (`quant.quantize_experts_int4` makes them: the CPU's
    int4 kernel, or CUDA's), one gate/up and one down linear per expert: half a byte a weight and a scale and offset
    per group."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module]) -> None:
        super().__init__()
        self.gate_up, self.down = nn.ModuleList(gate_up), nn.ModuleList(down)

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return per_expert(rows, counts, lambda e, x: self.gate_up[e](x), lambda e, x: self.down[e](x))


def _int8_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if x.is_cpu:
        return torch._weight_int8pack_mm(x, codes, scales.to(x.dtype))
    return F.linear(x, codes.to(x.dtype) * scales.to(x.dtype)[:, None])


Projection = Callable[[int, torch.Tensor], torch.Tensor]  # (expert, its rows) -> the rows projected


def per_expert(rows: torch.Tensor, counts: torch.Tensor, gate_up: Projection, down: Projection) -> torch.Tensor:
    """The gated MLP of each expert over its slice of `rows`: one pair of matmuls per expert that has rows."""
    out = torch.empty_like(rows)
    first = 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            gate, up = gate_up(expert, rows[first:first + count]).chunk(2, dim=-1)
            out[first:first + count] = down(expert, F.silu(gate) * up)
            first += count
    return out


def quantize_experts_int8(module: nn.Module, dtype: torch.dtype) -> None:
    """Every `Experts` inside `module` as `Int8Experts`, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, Experts):
            setattr(module, name, Int8Experts(child, dtype))
        else:
            quantize_experts_int8(child, dtype)
