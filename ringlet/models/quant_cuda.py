"""Weight-only int4 and int8 linears on CUDA GPUs (`quant.int4_linear` / `quant.int8_linear` build them for weights
on a CUDA device), packed once here and kept packed: the Triton kernels of `kernels/int4_cuda.py` dequantise tiles
of the weight next to the tensor cores.

int4: half a byte a weight plus an fp16 scale and offset per group (4 bytes per 128 weights at group size 128);
int8: a byte a weight plus a scale per output channel. A decode step reads every weight once, so these bytes set its
speed. `project` is the fused decode steps' entry (fused_decode.py, paged_decode.py): the input's RMSNorm, the SiLU
gate and the residual add run inside the product, as they do for the bf16 weights there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ringlet.models.experts import per_expert
from ringlet.models.kernels import int4_cuda
from ringlet.models.quant_format import GroupQuantized, Int8Rows, pack_nibbles, round_rows_int8

# the group size CUDA stages round to where the file gives no 4-bit groups: larger groups than the CPU's 32 halve
# the bytes of scales and offsets a decode step reads (4 bytes per 128 weights next to 64 of codes)
CUDA_GROUP_SIZE = 128


class CudaQuantizedLinear(nn.Module):
    """What the fused decode steps call instead of reading a float `.weight`."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def project(self, x: torch.Tensor, out: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 0.0,
                gated: bool = False, residual: bool = False, pdl: bool = False) -> None:
        """out [M, N] = self(x) of x [M, K] (or [K]), with `int4_cuda.int4_matmul`'s options."""
        raise NotImplementedError(f"{type(self).__name__} must define project (CudaInt4Linear and CudaInt8Linear do)")


class CudaInt4Linear(CudaQuantizedLinear):
    # buffers, registered in __init__
    packed: torch.Tensor  # uint8 [N, K / 2]: element 2j in the low nibble of byte j, 2j + 1 in the high one
    scale: torch.Tensor  # fp16 [N, K / group_size]
    offset: torch.Tensor  # fp16 [N, K / group_size]

    def __init__(self, weight: GroupQuantized, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"int4 linears on CUDA compute in bf16 or fp16, not {dtype}")
        self.out_features, self.in_features = weight.codes.shape
        self.group_size = weight.group_size
        self.register_buffer("packed", pack_nibbles(weight.codes))
        # fp16, as GGUF stores them: a file's groups unpack exactly
        self.register_buffer("scale", weight.scale.to(torch.float16))
        self.register_buffer("offset", weight.offset.to(torch.float16))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.ringlet.int4_linear(x, self.packed, self.scale, self.offset, self.group_size, self.bias)

    def project(self, x: torch.Tensor, out: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 0.0,
                gated: bool = False, residual: bool = False, pdl: bool = False) -> None:
        int4_cuda.int4_matmul(x, self.packed, self.scale, self.offset, self.group_size, out, bias=self.bias,
                              norm=norm, eps=eps, gated=gated, residual=residual, pdl=pdl)

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in fp32 (tests, references)."""
        codes = torch.stack((self.packed & 0x0F, self.packed >> 4), dim=-1).float()
        groups = codes.view(self.out_features, -1, self.group_size)
        weight = torch.addcmul(self.offset.float()[..., None], groups, self.scale.float()[..., None])
        return weight.view(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class CudaInt8Linear(CudaQuantizedLinear):
    # buffers, registered in __init__
    weight: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N]

    def __init__(self, weight: torch.Tensor | Int8Rows, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"int8 linears on CUDA compute in bf16 or fp16, not {dtype}")
        codes, scale = weight if isinstance(weight, Int8Rows) else round_rows_int8(weight)
        self.register_buffer("weight", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self.out_features, self.in_features = codes.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.ringlet.int8_linear(x, self.weight, self.scale, self.bias)

    def project(self, x: torch.Tensor, out: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 0.0,
                gated: bool = False, residual: bool = False, pdl: bool = False) -> None:
        int4_cuda.int8_matmul(x, self.weight, self.scale, out, bias=self.bias, norm=norm, eps=eps, gated=gated,
                              residual=residual, pdl=pdl)

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in fp32 (tests, references)."""
        return self.weight.float() * self.scale.float()[:, None]


class CudaInt4Experts(nn.Module):
    """A mixture-of-experts layer's experts at int4 on CUDA: every expert's packed codes, scales and offsets stacked,
    one tensor each per projection ([E, rows, ...], `CudaInt4Linear`'s layout per expert), so that the decode step's
    kernels (`expert_kernels.moe_decode`) find a chosen expert's weights by its index on the device. Eager calls run
    each expert that has rows through the int4 linear's kernels."""

    # buffers, registered in __init__
    gate_up_packed: torch.Tensor  # uint8 [E, 2I, H / 2]: each expert's gate rows, then its up rows
    gate_up_scale: torch.Tensor  # fp16 [E, 2I, H / group_size]
    gate_up_offset: torch.Tensor
    down_packed: torch.Tensor  # uint8 [E, H, I / 2]
    down_scale: torch.Tensor  # fp16 [E, H, I / group_size]
    down_offset: torch.Tensor

    def __init__(self, gate_ups: Iterable[GroupQuantized], downs: Iterable[GroupQuantized], count: int,
                 dtype: torch.dtype) -> None:
        """`count` experts' gate/up and down weights, packed one expert at a time (never all unpacked at once)."""
        super().__init__()
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"int4 experts on CUDA compute in bf16 or fp16, not {dtype}")
        self.dtype = dtype
        for name, weights in (("gate_up", gate_ups), ("down", downs)):
            for expert, weight in enumerate(weights):
                if expert == 0:
                    rows, columns = weight.codes.shape
                    self.group_size = weight.group_size
                    device, groups = weight.codes.device, columns // weight.group_size
                    self.register_buffer(f"{name}_packed",
                                         torch.empty(count, rows, columns // 2, dtype=torch.uint8, device=device))
                    for part in ("scale", "offset"):
                        self.register_buffer(f"{name}_{part}",
                                             torch.empty(count, rows, groups, dtype=torch.float16, device=device))
                getattr(self, f"{name}_packed")[expert] = pack_nibbles(weight.codes)
                getattr(self, f"{name}_scale")[expert] = weight.scale
                getattr(self, f"{name}_offset")[expert] = weight.offset
        self.num_experts, self.hidden_size = count, self.down_packed.shape[1]
        self.intermediate_size = self.down_packed.shape[2] * 2

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, H] sorted by expert, `counts` [E] rows for each; returns each row's expert output [N, H]."""
        def project(name: str) -> Callable[[int, torch.Tensor], torch.Tensor]:
            packed, scale, offset = (getattr(self, f"{name}_{part}") for part in ("packed", "scale", "offset"))
            return lambda e, x: torch.ops.ringlet.int4_linear(x, packed[e], scale[e], offset[e], self.group_size,
                                                              None)

        return per_expert(rows, counts, project("gate_up"), project("down"))

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, group_size={self.group_size}")
