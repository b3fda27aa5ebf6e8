"""GGML's block types decoded in torch with ggml's own arithmetic (its dequantize_row_*: fp16 scales widened to fp32,
then one multiply and one add or subtract per value), so the values are bit-identical to llama.cpp's and gguf.quants'.

- `decode_groups`: Q4_0, Q4_1 and Q4_K as they are stored, 4-bit codes with a scale and offset per 32 values, the
  layout the int4 linear takes (`GroupQuantized`); Q5_0, Q5_1 and Q5_K the same way in 5 bits, which the int4 linear
  takes on CPUs with ringlet's kernels (`kernels/cpu_vnni`).
- `dequantize`: a tensor of any type as values of the dtype asked for, a run of rows at a time, so a decoder's
  temporaries stay a few MB whatever the tensor's size. The types in `DECODED_TYPES` are decoded here; the others
  (Q2_K, Q3_K, the IQ types...) by gguf.quants' numpy block decoders, run by run all the same.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from ringlet.models.quant import GroupQuantized

Q = GGMLQuantizationType
FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})
GROUP = 32  # values per scale and offset in every grouped type
RUN_VALUES = 1 << 20  # values decoded at once: a run's fp32 temporaries are 4 MB each

# a decoder takes a run of blocks, uint8 [n, type_size], and returns their values, float32 [n, block_size]
BlockDecoder = Callable[[torch.Tensor], torch.Tensor]
# a grouped decoder returns codes uint8 [n, block_size] and scale, offset float32 [n, block_size // GROUP]
GroupDecoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32, row_order: torch.Tensor | None = None) -> torch.Tensor:
    """The values of a tensor stored as `data` (its bytes, as the GGUF reader maps them) in `shape` (outermost
    first) and `dtype`. With `row_order`, stored row r lands in row `row_order[r]` of a 2-d result."""
    decode = _DECODERS.get(qtype) or functools.partial(_by_blocks, qtype=qtype)
    rows, columns = _rows(shape)
    out = torch.empty(rows, columns, dtype=dtype)
    for first, blocks in _runs(data, qtype, rows, columns):
        values = decode(blocks).view(-1, columns)
        if row_order is None:
            out[first:first + values.shape[0]] = values  # cast to `dtype` here, run by run
        else:
            out.index_copy_(0, row_order[first:first + values.shape[0]], values.to(dtype))
    return out.view(shape)


def decode_groups(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> GroupQuantized:
    """A Q4_0/Q4_1/Q4_K (or Q5_0/Q5_1/Q5_K) weight [N, K] as its own codes, with the scale and offset of each group of
    32 inputs."""
    decode = _GROUP_DECODERS[qtype]
    rows, columns = shape
    codes = torch.empty(rows, columns, dtype=torch.uint8)
    scale = torch.empty(rows, columns // GROUP, dtype=torch.float32)
    offset = torch.empty_like(scale)
    for first, blocks in _runs(data, qtype, rows, columns):
        run_codes, run_scale, run_offset = decode(blocks)
        count = run_codes.numel() // columns
        codes[first:first + count] = run_codes.view(count, columns)
        scale[first:first + count] = run_scale.view(count, -1)
        offset[first:first + count] = run_offset.view(count, -1)
    return GroupQuantized(codes, scale, offset, GROUP, 5 if qtype in GROUPED5_TYPES else 4)


def dequantize_groups(groups: GroupQuantized, dtype: torch.dtype) -> torch.Tensor:
    """`groups.dequantize()` in `dtype`, a run of rows at a time: the values the file's type decodes to, exactly."""
    rows, columns = groups.codes.shape
    out = torch.empty(rows, columns, dtype=dtype)
    step = max(1, RUN_VALUES // columns)
    for first in range(0, rows, step):
        part = slice(first, first + step)
        codes = groups.codes[part].view(-1, columns // groups.group_size, groups.group_size).float()
        values = codes * groups.scale[part, :, None] + groups.offset[part, :, None]
        out[part] = values.view(-1, columns)
    return out


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    columns = shape[-1] if shape else 1
    return math.prod(shape) // columns, columns


def _runs(data: np.ndarray, qtype: GGMLQuantizationType, rows: int, columns: int
          ) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, blocks of the rows from there) over the tensor, about RUN_VALUES values at a time, each run's bytes
    copied out of the file's map (so torch never holds a read-only buffer)."""
    if qtype not in GGML_QUANT_SIZES:
        raise NotImplementedError(f"no block layout known for GGML type {qtype.name}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.asarray(data).reshape(-1).view(np.uint8)
    if columns % block_size != 0 or raw.size != rows * columns // block_size * type_size:
        raise ValueError(f"{raw.size} bytes of {qtype.name} do not hold a [{rows}, {columns}] tensor")
    row_bytes = columns // block_size * type_size
    step = max(1, RUN_VALUES // columns)
    for first in range(0, rows, step):
        part = raw[first * row_bytes:min(rows, first + step) * row_bytes]
        yield first, torch.from_numpy(part.copy()).view(-1, type_size)


def _by_blocks(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """gguf.quants' numpy block decoder for the types not decoded here."""
    decoder = getattr(gguf_quants, qtype.name, None)
    if decoder is None:
        raise NotImplementedError(f"gguf.quants has no decoder for {qtype.name}")
    decoder.init_grid()  # the IQ types' lookup tables
    values = decoder.dequantize_blocks(blocks.numpy())
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


# ---- pieces of a block ---------------------------------------------------------------------------------------------

def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 number at byte `at` of each block, as a float32 column [n, 1]."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """ggml packs value j in the low nibble and j + 16 (of 32) in the high nibble of byte j: along the last dim, the
    low nibbles, then the high ones."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1)


def _bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Fields of `width` bits of each byte, lowest first: [..., m] -> [..., 8 // width, m]."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8).view(-1, 1)
    return (packed.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 6-bit scales and mins of a K-quant super-block's 8 groups, packed in 12 bytes: [n, 8] each."""
    low, high, extra = packed.view(-1, 3, 4).unbind(1)
    scales = torch.cat((low & 0x3F, (extra & 0x0F) | ((low >> 2) & 0x30)), dim=-1)
    mins = torch.cat((high & 0x3F, (extra >> 4) | ((high >> 2) & 0x30)), dim=-1)
    return scales, mins


# ---- the types --------------------------------------------------------------------------------------------------
# Block layouts as in ggml-common.h; every value is x = d * q, d * q + m, or d * sc * q - dmin * mn.

def _q4_0(blocks: torch.Tensor) -> torch.Tensor:  # fp16 d, 16 bytes of 4-bit q; x = d * (q - 8)
    return _half(blocks, 0) * (_nibbles(blocks[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:  # fp16 d, fp16 m, 16 bytes of 4-bit q; x = d * q + m
    return _half(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _half(blocks, 2)


def _q5_codes(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The 5-bit codes of a Q5_0/Q5_1 block whose 32 fifth bits (bit j: value j) start at byte `at`, 16 bytes of low
    nibbles after them."""
    return _nibbles(blocks[:, at + 4:]) | (_bits(blocks[:, at:at + 4], 1).transpose(1, 2).reshape(-1, 32) << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:  # fp16 d, 32 high bits, 16 bytes of low nibbles; x = d * (q - 16)
    return _half(blocks, 0) * (_q5_codes(blocks, 2).to(torch.int8) - 16).float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:  # fp16 d, fp16 m, 32 high bits, 16 bytes; x = d * q + m
    return _half(blocks, 0) * _q5_codes(blocks, 4).float() + _half(blocks, 2)


def _q5_0_groups(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # x = d * q - 16 d
    d = _half(blocks, 0)
    return _q5_codes(blocks, 2), d, -16 * d


def _q5_1_groups(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # x = d * q + m
    return _q5_codes(blocks, 4), _half(blocks, 0), _half(blocks, 2)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:  # fp16 d, 32 x int8 q; x = q * d
    return blocks[:, 2:].view(torch.int8).float() * _half(blocks, 0)


def _k_quant(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K values from their codes q [n, 8, 32]: the block starts with fp16 d, fp16 dmin and 12 bytes of 6-bit
    scales and mins; x = d * sc * q - dmin * mn."""
    n = blocks.shape[0]
    scales, mins = _k_scales(blocks[:, 4:16])
    d = (_half(blocks, 0) * scales.float()).view(n, 8, 1)
    dm = (_half(blocks, 2) * mins.float()).view(n, 8, 1)
    return (d * q.float() - dm).view(n, -1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:  # header, 128 bytes of codes (see _q4_k_groups)
    return _k_quant(blocks, _nibbles(blocks[:, 16:].view(-1, 4, 32)).view(-1, 8, GROUP))


def _q5_k_codes(blocks: torch.Tensor) -> torch.Tensor:
    """Header, 32 bytes of 5th bits (bit g of byte j: value j of group g), 128 bytes of low nibbles as Q4_K's."""
    low = _nibbles(blocks[:, 48:].view(-1, 4, 32)).view(-1, 8, GROUP)
    return low | (_bits(blocks[:, 16:48], 1) << 4)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    return _k_quant(blocks, _q5_k_codes(blocks))


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """128 bytes of low nibbles (two halves of 128 values), 64 bytes of 2-bit high parts, 16 int8 scales (one per 16
    values), fp16 d; x = d * sc * (q - 32)."""
    n = blocks.shape[0]
    low = _nibbles(blocks[:, :128].view(n, 2, 64)).view(n, 8, GROUP)
    high = _bits(blocks[:, 128:192].view(n, 2, 32), 2).reshape(n, 8, GROUP)
    q = ((low | (high << 4)).to(torch.int8) - 32).view(n, 16, 16).float()
    d = (_half(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    return (d * q).view(n, -1)


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float32)


def _f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float16).float()


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.bfloat16).float()


def _q4_0_groups(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # x = d * q - 8 d
    d = _half(blocks, 0)
    return _nibbles(blocks[:, 2:]), d, -8 * d


def _q4_1_groups(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # x = d * q + m
    return _nibbles(blocks[:, 4:]), _half(blocks, 0), _half(blocks, 2)


def _q4_k_groups(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Super-blocks of 256: fp16 d and dmin, the 6-bit scales and mins of its 8 groups of 32, 128 bytes of codes (64
    values per 32 bytes: the low nibbles, then the high ones); x = d * sc * q - dmin * mn."""
    n = blocks.shape[0]
    scales, mins = _k_scales(blocks[:, 4:16])
    codes = _nibbles(blocks[:, 16:].view(n, 4, 32)).view(n, -1)
    return codes, _half(blocks, 0) * scales.float(), -(_half(blocks, 2) * mins.float())


def _q5_k_groups(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K's scales and mins over 5-bit codes (`_q5_k_codes`)."""
    n = blocks.shape[0]
    scales, mins = _k_scales(blocks[:, 4:16])
    return _q5_k_codes(blocks).view(n, -1), _half(blocks, 0) * scales.float(), -(_half(blocks, 2) * mins.float())


_DECODERS: dict[GGMLQuantizationType, BlockDecoder] = {
    Q.F32: _f32, Q.F16: _f16, Q.BF16: _bf16, Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
}
DECODED_TYPES = frozenset(_DECODERS)
_GROUP_DECODERS: dict[GGMLQuantizationType, GroupDecoder] = {
    Q.Q4_0: _q4_0_groups, Q.Q4_1: _q4_1_groups, Q.Q4_K: _q4_k_groups,
    Q.Q5_0: _q5_0_groups, Q.Q5_1: _q5_1_groups, Q.Q5_K: _q5_k_groups,
}
GROUPED5_TYPES = frozenset({Q.Q5_0, Q.Q5_1, Q.Q5_K})  # 5-bit codes: kept as such where a CPU's kernels take them
GROUPED_TYPES = frozenset(_GROUP_DECODERS) - GROUPED5_TYPES  # 4-bit codes, which every engine's int4 linear takes
