"""The device-independent forms of quantised weights: 4-bit (or 5-bit) codes in groups with a scale and offset each,
and int8 rows with a step each; rounding to them, a slice of rows at a time where a weight is vocabulary-sized. The
linears that run them on each device are in `quant` (CPU) and `quant_cuda`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

GROUP_SIZE = 32


@dataclass
class GroupQuantized:
    """A weight [N, K] as codes [N, K] (0..15, or 0..31 where `bits` is 5: GGUF's Q5 types) with `scale` and
    `offset` per group of `group_size` inputs: w = codes * scale + offset."""

    codes: torch.Tensor  # uint8
    scale: torch.Tensor  # float32 [N, K // group_size]
    offset: torch.Tensor  # float32 [N, K // group_size]
    group_size: int = GROUP_SIZE
    bits: int = 4

    @classmethod
    def round(cls, weight: torch.Tensor, group_size: int = GROUP_SIZE) -> GroupQuantized:
        """Round-to-nearest over each group's [min, max] in 16 levels."""
        n, k = weight.shape
        groups = weight.float().reshape(n, k // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
        return cls(codes.reshape(n, k), scale, low, group_size)

    @classmethod
    def cat(cls, parts: list[GroupQuantized]) -> GroupQuantized:
        """Stacked along the output dimension (fused q/k/v, gate/up); in 5 bits where any part is (a 4-bit code is a
        5-bit one of the same value)."""
        return cls(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                   torch.cat([p.offset for p in parts]), parts[0].group_size, max(p.bits for p in parts))

    def rows(self, first: int, end: int) -> GroupQuantized:
        """Output rows [first, end) (an expert's, of a stack of experts' weights)."""
        return GroupQuantized(self.codes[first:end], self.scale[first:end], self.offset[first:end], self.group_size,
                              self.bits)

    def to(self, device: torch.device) -> GroupQuantized:
        """On `device` (itself where it is there already)."""
        if self.codes.device == device:
            return self
        return GroupQuantized(self.codes.to(device), self.scale.to(device), self.offset.to(device), self.group_size,
                              self.bits)

    def dequantize(self) -> torch.Tensor:
        expand = lambda t: t.repeat_interleave(self.group_size, dim=1)
        return self.codes.float() * expand(self.scale) + expand(self.offset)


VALUES_AT_ONCE = 1 << 20  # values rounded at a time (4 MB in float32): a weight is never copied whole in float32


class Int8Rows(NamedTuple):
    """A weight [N, K] rounded to int8 per output row: w = codes * step[:, None]."""

    codes: torch.Tensor  # int8 [N, K]
    step: torch.Tensor  # float32 [N]


class Int4Rows(NamedTuple):
    """A weight [N, K] in 4-bit codes over groups of `group_size` along each row, two codes a byte (column 2j in
    the low nibble of byte j, 2j + 1 in the high): w = code * step + minimum."""

    packed: torch.Tensor  # uint8 [N, K // 2]
    step: torch.Tensor  # float16 [N, K // group_size]
    minimum: torch.Tensor  # float16 [N, K // group_size]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15) as bytes [N, K / 2]: element 2j in the low nibble of byte j, 2j + 1 in the high."""
    pairs = codes.view(codes.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def read_rows_int4(rows: int, read: Callable[[int, int], torch.Tensor], columns: int, device: torch.device | str,
                   group_size: int = GROUP_SIZE) -> Int4Rows:
    """Round-to-nearest over each group's [min, max] in 16 levels, `read(first, end)` giving about VALUES_AT_ONCE
    values of rows at a time (as `read_rows_int8`); the codes are those of the fp16 step and minimum kept."""
    if columns % group_size or group_size % 2:
        raise ValueError(f"a row of {columns} values is not whole groups of {group_size}")
    packed = torch.empty(rows, columns // 2, dtype=torch.uint8, device=device)
    step = torch.empty(rows, columns // group_size, dtype=torch.float16, device=device)
    minimum = torch.empty_like(step)
    at_once = max(1, VALUES_AT_ONCE // columns)
    for first in range(0, rows, at_once):
        end = min(rows, first + at_once)
        part = read(first, end).to(device=device, dtype=torch.float32)
        if part.shape != (end - first, columns):
            raise ValueError(f"rows {first}-{end} of a [{rows}, {columns}] weight came as {list(part.shape)}")
        groups = part.view(end - first, -1, group_size)
        low = groups.amin(-1).half()  # fp16 cannot hold a weight past 65504: no embedding comes near
        width = ((groups.amax(-1) - low.float()) / 15).clamp(min=1e-7).half()
        codes = ((groups - low.float()[..., None]) / width.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        packed[first:end] = pack_nibbles(codes.view(end - first, columns))
        step[first:end], minimum[first:end] = width, low
    return Int4Rows(packed, step, minimum)


def round_rows_int8(weight: torch.Tensor) -> Int8Rows:
    """Symmetric int8 per output row of a weight held whole."""
    return read_rows_int8(weight.shape[0], lambda first, end: weight[first:end], weight.shape[1], weight.device)


def read_rows_int8(rows: int, read: Callable[[int, int], torch.Tensor], columns: int,
                   device: torch.device | str) -> Int8Rows:
    """Symmetric int8 per output row of a weight whose rows `read(first, end)` gives about VALUES_AT_ONCE values at a
    time, so a vocabulary-sized embedding or lm_head is never held whole in a float type."""
    codes = torch.empty(rows, columns, dtype=torch.int8, device=device)
    step = torch.empty(rows, dtype=torch.float32, device=device)
    at_once = max(1, VALUES_AT_ONCE // columns)
    for first in range(0, rows, at_once):
        end = min(rows, first + at_once)
        part = read(first, end).to(device=device, dtype=torch.float32, copy=True)  # rounded in place below
        if part.shape != (end - first, columns):
            raise ValueError(f"rows {first}-{end} of a [{rows}, {columns}] weight came as {list(part.shape)}")
        step[first:end] = torch.linalg.vector_norm(part, ord=float("inf"), dim=1).clamp(min=1e-8) / 127.0  # max |w|
        codes[first:end] = part.div_(step[first:end, None]).round_().clamp_(-127, 127)
    return Int8Rows(codes, step)
