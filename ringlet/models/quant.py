"""Weight-only int8 and int4 linears for memory-bound decoding on CPUs (and, dequantising in the matmul, on any
device: `dequantizing_in_matmul`).

Decoding one token reads every weight once, so bytes per weight set the speed. With bf16 activations
(AMX / AVX-512 BF16):
- int8: one scale per output channel, a quarter of fp32's bytes; PyTorch's `_weight_int8pack_mm`.
- int4: 4-bit codes with a scale and offset per group of 32 inputs, an eighth of fp32's bytes; PyTorch's
  `_weight_int4pack_mm_for_cpu`. A GGUF file's Q4_0/Q4_1/Q4_K tensors are exactly this layout, so their codes
  are used as they are (no second rounding); a file's wider tensors become int8; the weights of a file with no
  4-bit tensors are rounded to the nearest of 16 levels.
- 5-bit codes (GGUF's Q5_0/Q5_1/Q5_K, which llama.cpp's Q4_K_M uses where a row is not whole K-quant blocks): kept as
  they are by an Int4Linear on CPUs where ringlet's kernels run (`kernels/cpu_vnni`: the int4 tiles plus a fifth-bit
  mask, 6 bits a weight with the bf16 scales), else int8.
The lm_head stays int8 under int4: its logits decide every token; the embedding is int8 too (`Int8Embedding`), or
int4 where a CUDA stage holds it apart from the lm_head (`Int4Embedding`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ringlet.models.experts import Experts, Int4Experts, Int8Experts, quantize_experts_int8
from ringlet.models.kernels import cpu_vnni
from ringlet.models.quant_format import (
    GROUP_SIZE,
    GroupQuantized,
    Int4Rows,
    Int8Rows,
    read_rows_int8,
    round_rows_int8,
)

log = logging.getLogger(__name__)

# the dtype a model computes in at each precision (weight-only int8/int4 compute in bf16)
COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                                          "int8": torch.bfloat16, "int4": torch.bfloat16}


class Int8Embedding(nn.Module):
    """A token embedding kept as int8 rows with a step each (half of bf16's bytes); a looked-up row is scaled back in
    float32 and given in `dtype`. Its codes are also a tied lm_head's (`head`): on a CPU with AVX-512 VNNI both use
    the tiles of ringlet's int8 kernel (`kernels/cpu_vnni.tile_int8`), which a lookup reads a row of in place."""

    # buffers, registered in __init__
    weight: torch.Tensor  # int8 [V, H], or its tiles (uint8 [V / 16, H * 16])
    step: torch.Tensor  # float32 [V]

    def __init__(self, rows: Int8Rows, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = rows.codes.shape
        self.tiled = rows.codes.device.type == "cpu" and cpu_vnni.takes_int8_tiles(*rows.codes.shape)
        self.register_buffer("weight", cpu_vnni.tile_int8(rows.codes) if self.tiled else rows.codes)
        self.register_buffer("step", rows.step)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tiled:  # row r: tile r // 16, lane r % 16 of each 4 columns' 64 bytes, codes + 128
            tiles = self.weight.view(-1, self.embedding_dim // 4, cpu_vnni.TILE_ROWS, 4)
            codes = tiles[ids // cpu_vnni.TILE_ROWS, :, ids % cpu_vnni.TILE_ROWS, :].reshape(*ids.shape, -1)
            return ((codes.float() - 128) * self.step[ids, None]).to(self.dtype)
        return (F.embedding(ids, self.weight).float() * F.embedding(ids, self.step[:, None])).to(self.dtype)

    def codes(self) -> torch.Tensor:
        """The int8 codes, [V, H]."""
        return cpu_vnni.untile_int8(self.weight) if self.tiled else self.weight

    def head(self, dtype: torch.dtype) -> nn.Module:
        """The tied lm_head over these codes (the same tensor: nothing is kept twice)."""
        return Int8Linear(Int8Rows(self.weight, self.step), None, dtype, tiles=False, tiled_codes=self.tiled)

    def untile(self) -> None:
        """Plain int8 codes, for a device without ringlet's kernels (`dequantizing_in_matmul`)."""
        if self.tiled:
            self.weight = cpu_vnni.untile_int8(self.weight)
            self.tiled = False

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8" + (", tiled" if self.tiled else "")


class Int4Embedding(nn.Module):
    """A token embedding kept as 4-bit codes in groups along each row with an fp16 step and minimum a group
    (`Int4Rows`: 5 bits a weight in groups of 32, where int8 rows take 8), for a stage whose linears are all int4 and
    whose lm_head is not this tensor; a looked-up row is code * step + minimum, in float32, given in `dtype`."""

    # buffers, registered in __init__
    packed: torch.Tensor  # uint8 [V, H // 2]
    step: torch.Tensor  # float16 [V, H // group]
    minimum: torch.Tensor  # float16 [V, H // group]

    def __init__(self, rows: Int4Rows, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = rows.packed.shape[0], rows.packed.shape[1] * 2
        self.group_size = self.embedding_dim // rows.step.shape[1]
        self.register_buffer("packed", rows.packed)
        self.register_buffer("step", rows.step)
        self.register_buffer("minimum", rows.minimum)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        pairs = torch.index_select(self.packed, 0, flat)
        codes = torch.stack((pairs & 15, pairs >> 4), dim=-1).view(flat.shape[0], -1, self.group_size)
        step = torch.index_select(self.step, 0, flat).float()[..., None]
        minimum = torch.index_select(self.minimum, 0, flat).float()[..., None]
        return torch.addcmul(minimum, codes.float(), step).to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int4 in groups of {self.group_size}"


def embed_rows(embedding: nn.Module, tokens: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, H] = the embedding's rows of `tokens` [T], written in place (what a captured decode step runs); a 4-bit
    table's through one Triton kernel on a GPU (or in Triton's interpreter)."""
    if isinstance(embedding, Int4Embedding):
        from ringlet.models.kernels import int4_cuda  # imports no Triton until a kernel runs

        if out.is_cuda or int4_cuda.interpreted():
            int4_cuda.int4_rows(tokens, embedding.packed, embedding.step, embedding.minimum, out)
        else:
            out.copy_(embedding(tokens))
    elif isinstance(embedding, Int8Embedding) and embedding.tiled:
        out.copy_(embedding(tokens))
    elif isinstance(embedding, Int8Embedding):
        torch.mul(torch.index_select(embedding.weight, 0, tokens), embedding.step[tokens, None], out=out)
    else:
        torch.index_select(cast(nn.Embedding, embedding).weight, 0, tokens, out=out)


class Int8Linear(nn.Module):
    """Codes a row rounded to int8 with a scale each. On a CPU with AVX-512 VNNI the codes are kept in the tiles of
    ringlet's int8 kernel (`kernels/cpu_vnni`: 16 rows a tile, no horizontal sums), which runs every product short of
    the dense path below; codes shared with a tied embedding stay as they are (the embedding looks rows up in them),
    with ringlet's one-row kernel for a one-sequence step and PyTorch's `_weight_int8pack_mm` for more rows."""

    # buffers, registered in __init__
    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    dequantize_in_matmul = False  # `dequantizing_in_matmul` sets it: the packed kernel is a CPU one
    # from these rows on (a prompt chunk) a weight of up to DENSE_VALUES is made dense and multiplied in the
    # activations' dtype (AMX where the CPU has it), as Int4Linear does: `_weight_int8pack_mm`'s cost grows with the
    # rows (`scripts/bench_cpu_kernels.py`); a larger weight (a big vocabulary's lm_head) would take too much memory
    DENSE_FROM_ROWS = 64
    DENSE_FROM_ROWS_TILED = 128  # the tiles run as fast as unpacking them and a dense matmul up to 128-192 rows
    DENSE_VALUES = 1 << 27

    def __init__(self, weight: torch.Tensor | Int8Rows, bias: torch.Tensor | None, dtype: torch.dtype,
                 tiles: bool = True, tiled_codes: bool = False) -> None:
        """`tiles`: keep the codes in the int8 kernel's tiles where it runs; `tiled_codes`: `weight`'s codes are such
        tiles already (a tiled embedding's, shared)."""
        super().__init__()
        codes, scale = weight if isinstance(weight, Int8Rows) else round_rows_int8(weight)
        if tiled_codes:
            self.out_features, self.in_features = codes.shape[0] * cpu_vnni.TILE_ROWS, codes.shape[1] // 16
        else:
            self.out_features, self.in_features = codes.shape
        self.tiled = tiled_codes or (tiles and codes.device.type == "cpu"
                                     and cpu_vnni.takes_int8_tiles(*codes.shape))
        self.register_buffer("weight", cpu_vnni.tile_int8(codes) if self.tiled and not tiled_codes else codes)
        self.register_buffer("scales", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        # codes kept as they are: a one-row product (a one-sequence decode step) runs ringlet's one-row kernel
        self.vnni = not self.tiled and cpu_vnni.takes(codes)

    def codes(self) -> torch.Tensor:
        """The int8 codes, [N, K]."""
        return cpu_vnni.untile_int8(self.weight) if self.tiled else self.weight

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """codes * scale in `dtype` (the tiles' codes + 128 unpacked in one copy; 128 taken in `dtype`, exactly)."""
        scales = self.scales.to(dtype)[:, None]
        if self.tiled:
            return (cpu_vnni.untile_int8(self.weight, shifted=True).to(dtype) - 128) * scales
        return self.weight.to(dtype) * scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        dense_from = self.DENSE_FROM_ROWS_TILED if self.tiled else self.DENSE_FROM_ROWS
        if self.dequantize_in_matmul or (rows.shape[0] >= dense_from and self.weight.numel() <= self.DENSE_VALUES):
            return F.linear(x, self.dense_weight(x.dtype), self.bias)
        if self.tiled:
            y = torch.ops.ringlet_cpu.int8_tiled_linear(rows, self.weight, self.scales)
        elif self.vnni and rows.shape[0] == 1 and x.device.type == "cpu":
            y = torch.ops.ringlet_cpu.int8_linear(rows, self.weight, self.scales)
        else:
            y = torch._weight_int8pack_mm(rows, self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """Decode steps (few rows) run an int4 kernel: ringlet's (`kernels/cpu_vnni`, tiles of 16 rows) on a CPU with
    AVX-512 VNNI, else PyTorch's. Their cost grows with the rows (PyTorch's: 16 ms for 512 rows of a 3072x576 weight
    here), so a long prompt chunk unpacks the weight and runs a dense bf16 matmul (AMX): 3.6 ms for the same 512
    rows; PyTorch's kernel costs as much at 128 rows, ringlet's at 400-550 (`scripts/bench_cpu_kernels.py`).
    The codes are kept once, in the kernel's layout (half a byte a weight), and unpacked from it; where a PyTorch
    build packs them in a layout that unpacking does not reproduce (`_cpu_packed_codes`), plain nibble pairs are
    kept beside them."""

    DENSE_FROM_ROWS = 128
    DENSE_FROM_ROWS_TILED = 384
    dequantize_in_matmul = False  # `dequantizing_in_matmul` sets it: every call unpacks, as a long chunk does
    # buffers, registered in __init__
    weight: torch.Tensor
    scale_zero: torch.Tensor
    high: torch.Tensor | None  # the fifth bits of 5-bit codes (`cpu_vnni.tile_int5`)
    nibbles: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, weight: GroupQuantized, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.codes.shape
        self.group_size = weight.group_size
        self.bits = weight.bits
        # the kernel computes (code - 8) * scale + zero, so zero = offset + 8 * scale; [K / group, N, 2]
        scale_zero = torch.stack((weight.scale, weight.offset + 8 * weight.scale), dim=-1).transpose(0, 1)
        self.tiled = takes_tiles(weight, dtype)
        high = None
        if self.bits > 4 and not self.tiled:
            raise ValueError("5-bit codes run on ringlet's CPU kernels only (int4_linear rounds them to int8 "
                             "elsewhere)")
        if self.bits > 4:
            packed, high = cpu_vnni.tile_int5(weight.codes)
        elif self.tiled:
            packed = cpu_vnni.tile_int4(weight.codes)
        else:  # a slice of rows at a time: the kernel takes int32 codes, 8 bytes for each byte kept
            packed = torch.cat([torch._convert_weight_to_int4pack_for_cpu(rows.to(torch.int32), 1)
                                for rows in weight.codes.split(_PACK_ROWS)])
        self.register_buffer("weight", packed)
        self.register_buffer("high", high)
        self.register_buffer("scale_zero", scale_zero.contiguous().to(dtype))
        unpacks = self.tiled or _unpacks(packed, weight.codes)
        self.register_buffer("nibbles", None if unpacks else _nibble_pairs(weight.codes))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def codes(self) -> torch.Tensor:
        """The 4-bit (or 5-bit) codes, uint8 [N, K]."""
        if self.high is not None:
            return cpu_vnni.untile_int5(self.weight, self.high)
        if self.tiled:
            return cpu_vnni.untile_int4(self.weight)
        if self.nibbles is not None:
            return torch.stack((self.nibbles & 0x0F, self.nibbles >> 4), dim=-1).view(self.out_features, -1)
        return _cpu_packed_codes(self.weight, self.out_features, self.in_features)

    def groups(self) -> GroupQuantized:
        """The layer's weight as codes, scales and offsets (in the dtype the layer computes its scales in)."""
        scale, zero = self.scale_zero.float().transpose(0, 1).unbind(-1)
        return GroupQuantized(self.codes(), scale.contiguous(), (zero - 8 * scale).contiguous(), self.group_size,
                              self.bits)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(code - 8) * scale + zero, as the kernel computes it."""
        scale, zero = self.scale_zero.to(dtype).transpose(0, 1).contiguous().unbind(-1)  # [N, K / group]
        centred = self.codes().view(self.out_features, -1, self.group_size).to(dtype) - 8
        return torch.addcmul(zero[..., None], centred, scale[..., None]).view(self.out_features, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        dense_from = self.DENSE_FROM_ROWS_TILED if self.tiled else self.DENSE_FROM_ROWS
        if self.dequantize_in_matmul or rows.shape[0] >= dense_from:
            return F.linear(x, self.dense_weight(x.dtype), self.bias)
        if self.high is not None:
            y = torch.ops.ringlet_cpu.int5_linear(rows, self.weight, self.high, self.scale_zero, self.group_size)
        elif self.tiled:
            y = torch.ops.ringlet_cpu.int4_linear(rows, self.weight, self.scale_zero, self.group_size)
        else:
            y = torch._weight_int4pack_mm_for_cpu(rows, self.weight, self.group_size, self.scale_zero)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def cpu_tiles(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether Int4Linears computing in `dtype` on `device` run ringlet's CPU kernels, which alone take 5-bit codes (a
    GGUF file's Q5_0/Q5_1/Q5_K weights, kept as they are rather than rounded to int8)."""
    return torch.device(device).type == "cpu" and dtype == torch.bfloat16 and cpu_vnni.available()


def takes_tiles(weight: GroupQuantized, dtype: torch.dtype) -> bool:
    """Whether an Int4Linear of `weight` computing in `dtype` keeps it in the tiles of ringlet's CPU kernels."""
    n, k = weight.codes.shape
    return cpu_tiles(weight.codes.device, dtype) and cpu_vnni.takes_int4(n, k, weight.group_size)


_PACK_BLOCK = 64  # rows of a block in the CPU kernel's layout (AVX-512 builds)
_PACK_ROWS = 64 * _PACK_BLOCK  # rows packed at a time: whole blocks, which pack alone as they do in the whole
_unpack_checked: dict[tuple[int, int], bool] = {}  # (N, K) -> whether `_cpu_packed_codes` reproduces the codes


def _nibble_pairs(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes as [N, K / 2] bytes: element 2j in the low nibble, 2j + 1 in the high one."""
    pairs = codes.view(codes.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _cpu_packed_codes(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Codes [N, K] from `_convert_weight_to_int4pack_for_cpu`'s layout: blocks of 64 rows, each input column's
    32 bytes holding row j in the low nibble and row j + 32 in the high one; the rows past the last whole block
    column by column, each byte holding a pair of neighbouring rows."""
    full = n // _PACK_BLOCK * _PACK_BLOCK
    blocks = packed[:full].reshape(-1, k, _PACK_BLOCK // 2).transpose(1, 2)  # [blocks, 32, K]
    codes = torch.cat((blocks & 0x0F, blocks >> 4), dim=1).reshape(full, k)
    if full == n:
        return codes
    tail = packed[full:].reshape(k, (n - full) // 2).t()  # [pairs of rows, K]
    return torch.cat((codes, torch.stack((tail & 0x0F, tail >> 4), dim=1).reshape(n - full, k)))


def _unpacks(packed: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether `_cpu_packed_codes` gives `codes` back from `packed`: checked once per shape, on the first weight."""
    shape = (int(codes.shape[0]), int(codes.shape[1]))
    if shape not in _unpack_checked:
        ok = packed.shape == (shape[0], shape[1] // 2) and torch.equal(_cpu_packed_codes(packed, *shape), codes)
        _unpack_checked[shape] = ok
        if not ok:
            log.info("this PyTorch packs int4 weights of shape %s in a layout not unpacked here: their codes are "
                     "kept a second time for long prompt chunks", shape)
    return _unpack_checked[shape]


# the model's fused linears -> the Hugging Face weights they stack, inside model.layers.{i}.
FUSED_PARTS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def fused_with(weight: str) -> list[str]:
    """The Hugging Face weights (`model.layers.{i}.{part}.weight`) of the fused linear that `weight` is part of."""
    prefix, _, part = weight.removesuffix(".weight").partition(".layers.")
    index, _, part = part.partition(".")
    parts = next((parts for parts in FUSED_PARTS.values() if part in parts), (part,))
    return [f"{prefix}.layers.{index}.{p}.weight" for p in parts]


def quantize_int4(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
                  source: Mapping[str, GroupQuantized] | None = None) -> nn.Module:
    """Int4 linears in every decoder layer of a stage (`ringlet.models.llama.Transformer`), in place.

    `source` maps Hugging Face weight names (global layer indices, e.g. `model.layers.3.mlp.up_proj.weight`) to
    the file's own 4-bit groups (`quantize_layer_int4` says how they are used). The lm_head becomes int8. Returns
    the model.
    """
    for i, layer in enumerate(model.layers):  # type: ignore[arg-type]
        quantize_layer_int4(layer, cast(int, model.start) + i, dtype, source or {}, file_groups=bool(source))
    if getattr(model, "lm_head", None) is not None:
        model.lm_head = int8_linear(cast(nn.Linear, model.lm_head).weight.data, None, dtype)
    return model


def int4_linear(groups: GroupQuantized, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """The int4 linear for the device the codes are on: CUDA's Triton kernels, else the CPU one. 5-bit codes that
    ringlet's CPU kernels cannot take become int8 rows of their values."""
    if groups.bits > 4 and not takes_tiles(groups, dtype):
        n, k = groups.codes.shape
        rows = read_rows_int8(n, lambda first, end: groups.rows(first, end).dequantize(), k, groups.codes.device)
        return int8_linear(rows, bias, dtype)
    if groups.codes.device.type == "cuda":
        from ringlet.models.quant_cuda import CudaInt4Linear

        return CudaInt4Linear(groups, bias, dtype)
    return Int4Linear(groups, bias, dtype)


def int4_experts(gate_ups: Iterable[GroupQuantized], downs: Iterable[GroupQuantized], count: int, dtype: torch.dtype,
                 device: torch.device) -> nn.Module:
    """`count` experts' int4 weights (each one's gate/up and down groups, on `device`) for the device: stacked for
    CUDA's kernels, else an int4 linear per expert and projection."""
    if device.type == "cuda":
        from ringlet.models.quant_cuda import CudaInt4Experts

        return CudaInt4Experts(gate_ups, downs, count, dtype)
    return Int4Experts([int4_linear(g, None, dtype) for g in gate_ups], [int4_linear(g, None, dtype) for g in downs])


def int8_linear(weight: torch.Tensor | Int8Rows, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """The per-channel int8 linear for the device `weight` (float, or already rounded) is on: CUDA's Triton kernels,
    else the CPU one."""
    if (weight.codes if isinstance(weight, Int8Rows) else weight).device.type == "cuda":
        from ringlet.models.quant_cuda import CudaInt8Linear

        return CudaInt8Linear(weight, bias, dtype)
    return Int8Linear(weight, bias, dtype)


def quantize_layer_int4(layer: nn.Module, index: int, dtype: torch.dtype, source: Mapping[str, GroupQuantized],
                        file_groups: bool, group_size: int = GROUP_SIZE, device: torch.device | str | None = None
                        ) -> None:
    """The linears of decoder layer `index` (global) as int4, in place, on `device` (by default the linears'). A linear
    whose parts are all in `source` runs the file's own codes (its float weight may be a meta tensor: it is not read).
    Where the file gives 4-bit groups (`file_groups`), a linear it stores in more bits (Q4_K_M keeps some in Q6_K)
    becomes int8 rather than losing them; otherwise every linear is rounded to 4 bits."""
    prefix = f"model.layers.{index}."
    # a mixture-of-experts layer's experts: the file's own 4-bit groups where it stores all three stacks in them, else
    # int4 where the codes are rounded here and their widths are whole groups; a file's experts in more bits than 4
    # keep them as int8 rows
    if not _experts_from_groups(layer, prefix, source, dtype, device):
        if file_groups:
            quantize_experts_int8(layer, dtype)
        else:
            quantize_experts_int4(layer, dtype, group_size, device)
    present = {name for name, _ in layer.named_modules()}
    for path, parts in FUSED_PARTS.items():
        if path not in present:  # the dense MLP of a mixture-of-experts layer
            continue
        owner_path, _, attr = path.rpartition(".")
        owner, linear = layer.get_submodule(owner_path), cast(nn.Linear, layer.get_submodule(path))
        whole = source.get(f"{prefix}{path}.weight")  # a file that stores the linear fused (Phi-3's GGUF)
        stored = [whole] if whole is not None else [source.get(f"{prefix}{part}.weight") for part in parts]
        if all(g is not None for g in stored):
            if device is None and linear.weight.is_meta:
                raise ValueError(f"layer {index}: {path}'s groups need the device to put them on")
            target = torch.device(device) if device is not None else linear.weight.device
            groups = GroupQuantized.cat(cast("list[GroupQuantized]", stored)).to(target)
            setattr(owner, attr, int4_linear(groups, linear.bias, dtype))
        elif linear.weight.is_meta:
            raise ValueError(f"layer {index}: {path} has neither weights nor the file's groups for all its parts")
        elif linear.in_features % group_size != 0 or file_groups:
            setattr(owner, attr, int8_linear(linear.weight.data, linear.bias, dtype))
        else:
            setattr(owner, attr, int4_linear(GroupQuantized.round(linear.weight.data, group_size), linear.bias, dtype))


def _experts_from_groups(layer: nn.Module, prefix: str, source: Mapping[str, GroupQuantized], dtype: torch.dtype,
                         device: torch.device | str | None) -> bool:
    """The layer's `Experts` as `Int4Experts` of the file's groups (`source`: stacks of every expert's gate, up and
    down rows, `experts.gate_proj`, `experts.up_proj`, `experts.down_proj` under the layer's MLP); whether it had
    them."""
    found = [(path, module) for path, module in layer.named_modules() if isinstance(module, Experts)]
    stacks = {part: next((g for name, g in source.items() if name.startswith(prefix) and name.endswith(part)), None)
              for part in ("experts.gate_proj", "experts.up_proj", "experts.down_proj")}
    if not found or any(g is None for g in stacks.values()):
        return False
    (path, experts), = found
    gate, up, down = (cast(GroupQuantized, g) for g in stacks.values())
    count, width = experts.gate_up_proj.shape[0], experts.down_proj.shape[-1]
    hidden = experts.down_proj.shape[1]
    target = torch.device(device) if device is not None else gate.codes.device
    gate_ups = (GroupQuantized.cat([gate.rows(e * width, (e + 1) * width), up.rows(e * width, (e + 1) * width)])
                .to(target) for e in range(count))
    downs = (down.rows(e * hidden, (e + 1) * hidden).to(target) for e in range(count))
    owner, _, attr = path.rpartition(".")
    setattr(layer.get_submodule(owner), attr, int4_experts(gate_ups, downs, count, dtype, target))
    return True


def quantize_experts_int4(module: nn.Module, dtype: torch.dtype, group_size: int = GROUP_SIZE,
                          device: torch.device | str | None = None) -> None:
    """Every `Experts` inside `module` as `Int4Experts` (rounded to 4 bits in groups of `group_size`, an expert at a
    time), or as `Int8Experts` where a width is not a whole number of groups; in place, on `device` (by default the
    experts')."""
    for name, child in list(module.named_children()):
        if not isinstance(child, Experts):
            quantize_experts_int4(child, dtype, group_size, device)
            continue
        gate_up, down = child.gate_up_proj.data, child.down_proj.data
        if gate_up.shape[-1] % group_size or down.shape[-1] % group_size:
            setattr(module, name, Int8Experts(child, dtype))
            continue
        target = torch.device(device) if device is not None else gate_up.device
        gate_ups, downs = ((GroupQuantized.round(w.to(target), group_size) for w in weights)
                           for weights in (gate_up, down))
        setattr(module, name, int4_experts(gate_ups, downs, gate_up.shape[0], dtype, target))


def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every nn.Linear of the model by an Int8Linear, and stacked experts by Int8Experts, in place; returns
    the model."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, int8_linear(child.weight.data, child.bias, dtype))
        elif isinstance(child, Experts):
            setattr(model, name, Int8Experts(child, dtype))
        else:
            quantize_int8(child, dtype)
    return model


def dequantizing_in_matmul(model: nn.Module) -> int:
    """Every quantised linear of `model` computes `F.linear` over its weight dequantised in the activations' dtype,
    with plain tensor operations that every device runs (`_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`
    are CPU kernels); an Int4Linear lets its CPU-packed codes (or tiles) go (its nibbles stay). In place; returns how
    many."""
    count = 0
    untiled: dict[int, torch.Tensor] = {}  # a tiled embedding's tiles -> its plain codes, which a tied head shares
    for module in model.modules():
        if isinstance(module, Int8Embedding) and module.tiled:
            tiles = module.weight
            module.untile()
            untiled[id(tiles)] = module.weight
    for module in model.modules():
        if isinstance(module, Int8Linear | Int4Linear):
            module.dequantize_in_matmul = True
            count += 1
        if isinstance(module, Int8Linear) and module.tiled:  # plain codes, for every device
            shared = untiled.get(id(module.weight))
            module.weight = shared if shared is not None else module.codes()
            module.tiled = False
        if isinstance(module, Int4Linear) and module.high is None:
            # its codes as nibble pairs, for every device; the CPU layout goes (5-bit codes keep their tiles, which
            # `codes` unpacks with plain tensor operations)
            if module.nibbles is None:
                module.nibbles = _nibble_pairs(module.codes())
            module.weight = torch.empty(0, dtype=module.weight.dtype, device=module.weight.device)
            module.tiled = False
    return count


def cpu_supports_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run natively (otherwise they are emulated and slow)."""
    flags = cpu_vnni.cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags
