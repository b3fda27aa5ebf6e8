"""Weight-only int4 and int8 matrix products on CUDA: launchers of the Triton kernels (`int4_triton.py`) and the
torch custom ops `ringlet::int4_linear` / `ringlet::int8_linear` that the linears' forward calls, so that
torch.compile keeps them whole (an opaque op with a fake implementation) and CUDA graphs replay them.

Triton is imported at the first launch, not here: CPU machines without it import this module too.
"""

import functools
import math
import os
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

# bits OR'd into a 4-bit code to make the floating-point number MAGIC + code (int4_triton.py says why)
_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


@dataclass(frozen=True)
class Tiling:
    """A launch of the kernels: rows of x and of W per program, the K a loop step covers, warps and pipeline
    stages. For int4, `k_step` is a multiple of the group size."""

    block_m: int
    block_n: int
    k_step: int
    warps: int = 4
    stages: int = 4


# Which kernel a product of M rows of x runs, from `scripts/bench_int4_gemv.py --rows 2 4 8 16 32 64` on an H100
# (Llama-3.1-8B's four projections, us a layer): int4 up to GEMV_MAX_ROWS rows (a batch's decode step) on the dp4a
# kernels, a program taking the rows over its weight rows (2 rows 78, 8 rows 249, where the tile kernel took 606 and
# 603; at 16 rows 457 in two programs along the rows); from DENSE_FROM_ROWS rows the weight dequantised a slice at a
# time for cuBLAS (16 rows 406, 64 rows 403, where the tile kernel took 601 and 428); the int8 lm_head up to
# INT8_GEMV_MAX_ROWS rows on the dp4a kernel (2 rows 248 us, 4 rows 405), the tile kernel beyond (419 at 8).
GEMV_MAX_ROWS = 8
INT8_GEMV_MAX_ROWS = 4
DENSE_FROM_ROWS = GEMV_MAX_ROWS + 1
DENSE_SLICE_BYTES = 32 << 20


def tiling(rows: int, n: int, k: int, group: int) -> Tiling:
    """The tiling for `rows` of x against W [n, k] (`group`: the int4 group size, 0 for int8)."""
    step = next(s for s in (512, 256, 128, group) if s % group == 0 and k % s == 0) if group else 256
    if rows <= 16:  # a decode step: each program streams a few weight rows; many programs keep loads in flight
        return Tiling(16, 16 if n <= 8192 else 32, step, 4, 4)
    if rows <= 64:
        return Tiling(32 if rows <= 32 else 64, 64, min(step, 256), 4, 4)
    return Tiling(128, 128, min(step, 128), 8, 3)


GEMV_INT8_BLOCK_K = 128
FINISH_BLOCK_N = 256
PROGRAMS_PER_SM = 4  # programs of a one-row int8 product per SM: enough loads in flight to stream the weight


@functools.cache
def _sm_count(device: int) -> int:
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _splits(blocks: int, steps: int, device: torch.device) -> tuple[int, int]:
    """K cut into splits (of `steps` loop steps in all) so that `blocks` row blocks times the splits fill the SMs:
    (steps per split, splits)."""
    wanted = max(1, min(steps, -(-PROGRAMS_PER_SM * _sm_count(device.index or 0) // blocks)))
    per_split = -(-steps // wanted)
    return per_split, -(-steps // per_split)


def _finish_gemv(part: torch.Tensor, squares: torch.Tensor, splits: int, out: torch.Tensor, n: int, k: int,
                 row_scale: torch.Tensor | None, bias: torch.Tensor | None, norm: torch.Tensor | None, eps: float,
                 gated: bool, residual: bool, pdl: bool) -> None:
    _kernels().gemv_finish_kernel[(-(-n // FINISH_BLOCK_N),)](
        part, squares, row_scale if row_scale is not None else part, out, bias if bias is not None else part, n, k,
        splits, eps, NORM=norm is not None, GATED=gated, BIAS=bias is not None, RESIDUAL=residual,
        ROW_SCALE=row_scale is not None, PDL=pdl, BLOCK_N=FINISH_BLOCK_N,
        MAX_SPLITS=triton_next_power_of_2(splits), num_warps=4, **({"launch_pdl": True} if pdl else {}),
    )


def triton_next_power_of_2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


@dataclass(frozen=True)
class GemvTiling:
    """A launch of `int4_gemv_dp4a_kernel`: weight rows per program, int32 words (8 codes) of each row a loop step,
    warps, how many steps deep the loads are pipelined through shared memory (1: none), whether each step's weights
    are read a step ahead into registers, and a cap on the registers a thread holds (None: the compiler's choice),
    which sets how many programs an SM runs at once."""

    block_n: int
    words: int
    warps: int = 4
    stages: int = 1
    ahead: bool = False
    registers: int | None = None


def gemv_tiling(n: int, k: int, group: int, gated: bool = False, sms: int = 132) -> GemvTiling:
    """The one-row int4 tiling for W [n, k] (`gated`: gate and up rows, 2n in all) on a GPU of `sms` SMs, from
    `scripts/bench_int4_gemv.py --sweep` on an H100 (Llama-3.1-8B's projections; each choice the fastest or within
    7% of it): gate/up 32 rows a program, 128 words (1,024 columns) a step, 8 warps; a long K (more than 4 steps, as
    the down projection's) 8 rows of 256 words, 8 warps of at most 64 registers (4 programs an SM); the rest (q/k/v,
    o: two steps) 16 rows of 256 words, each step's weights read a step ahead (the first before the PDL wait), with
    the registers capped (to no fewer than 64) so that every program runs at once: q/k/v's 384 programs took 8.3 us
    in two waves, 6.6 us at 80 registers on an H100. No default pipelines through shared memory: 2 and 4 stages were
    slower at every tiling swept on an H100 (`--sweep --stages 2 4`). A decode step starts from these: `gemv_tuning`
    moves a shape to a faster neighbour found on the GPU at hand (`use_tiling`)."""
    widest = 128 if gated else 256
    words = next(w for w in (256, 128, 64, 32, 16, 8, 4)
                 if w <= widest and (k // 8) % w == 0 and (8 * w) % group == 0 and w % 4 == 0)
    warps = 8 if words >= 128 else 4
    if gated:
        return GemvTiling(32, words, warps)
    if k // (8 * words) > 4:
        return GemvTiling(8, words, warps, registers=64)
    per_sm = -(-n // (16 * sms))
    registers = 65536 // (per_sm * warps * 32) // 8 * 8
    return GemvTiling(16, words, warps, ahead=True, registers=registers if 64 <= registers < 128 else None)


# tilings chosen on the GPU at hand (`gemv_tuning`), by (device index, n, k, group, gated); the rest take gemv_tiling's
_CHOSEN: dict[tuple[int, int, int, int, bool], GemvTiling] = {}


def use_tiling(device: torch.device, n: int, k: int, group: int, gated: bool, tiling: GemvTiling) -> None:
    """Launch the one-row products of W [n, k] (gate/up: 2n rows) on `device` at `tiling`."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    _CHOSEN[index, n, k, group, gated] = tiling


def pdl_available(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper or later, and a Triton that launches with it."""
    if interpreted() or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    from triton.backends.nvidia.compiler import CUDAOptions

    return "launch_pdl" in CUDAOptions.__dataclass_fields__


def _int4_gemv_rows(row: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    group_size: int, out: torch.Tensor, n: int, k: int, bias: torch.Tensor | None,
                    norm: torch.Tensor | None, eps: float, gated: bool, residual: bool, pdl: bool,
                    t: GemvTiling | None = None) -> None:
    assert k % 32 == 0 and k % group_size == 0 and group_size % 32 == 0, \
        f"int4 rows of {k} columns in groups of {group_size}"
    if t is None and row.is_cuda:
        t = _CHOSEN.get((row.device.index, n, k, group_size, gated))
    t = t or gemv_tiling(n, k, group_size, gated, _sm_count(row.device.index or 0) if row.is_cuda else 132)
    _kernels().int4_gemv_dp4a_kernel[(-(-n // t.block_n),)](
        row, packed.view(torch.int32), scale, offset, out, norm if norm is not None else row,
        bias if bias is not None else row, n, k, eps, GROUP=group_size, BLOCK_N=t.block_n, WORDS=t.words,
        AHEAD=t.ahead, STAGES=t.stages, NORM=norm is not None, GATED=gated, BIAS=bias is not None, RESIDUAL=residual,
        PDL=pdl, num_warps=t.warps, num_stages=t.stages, ASM=not interpreted(), **({"launch_pdl": True} if pdl else {}),
        **({"maxnreg": t.registers} if t.registers else {}),
    )


def _int4_gemv_many(rows: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    group_size: int, out: torch.Tensor, n: int, k: int, bias: torch.Tensor | None,
                    norm: torch.Tensor | None, eps: float, gated: bool, residual: bool, pdl: bool) -> bool:
    """`_int4_gemv_rows` for 2 to GEMV_MAX_ROWS rows of x, all in each program (a power of two, the rest masked):
    256 / that words a step, so a program's products of a step stay as many as the one-row kernel's. False (nothing
    run) where K or the groups do not divide into such steps."""
    per_program = triton_next_power_of_2(rows.shape[0])
    block_n = 16 if n >= 6144 else 8
    words = next((w for w in (256 // per_program, 32, 16, 8, 4)
                  if w <= 256 // per_program and (k // 8) % w == 0 and (8 * w) % group_size == 0), None)
    if words is None or k % 32 or group_size % 32:
        return False
    _kernels().int4_gemv_rows_dp4a_kernel[(-(-n // block_n), 1)](
        rows, packed.view(torch.int32), scale, offset, out, norm if norm is not None else rows,
        bias if bias is not None else rows, rows.shape[0], n, k, eps, GROUP=group_size, BLOCK_N=block_n, WORDS=words,
        ROWS=per_program, NORM=norm is not None, GATED=gated, BIAS=bias is not None, RESIDUAL=residual, PDL=pdl,
        num_warps=4, num_stages=3, ASM=not interpreted(), **({"launch_pdl": True} if pdl else {}),
    )
    return True


def _int8_gemv_many(rows: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, n: int, k: int,
                    bias: torch.Tensor | None, norm: torch.Tensor | None, eps: float, gated: bool, residual: bool,
                    pdl: bool) -> bool:
    """`_int8_gemv_rows` for 2 to INT8_GEMV_MAX_ROWS rows of x, all in each program, as `_int4_gemv_many`; False
    (nothing run) where K does not divide into words of 4 codes a multiple of 8 at a time."""
    words = next((w for w in (128, 64, 32, 16, 8) if (k // 4) % w == 0), None)
    if words is None:
        return False
    per_program = triton_next_power_of_2(rows.shape[0])
    _kernels().int8_gemv_rows_dp4a_kernel[(-(-n // 16), 1)](
        rows, codes.view(torch.int32), scale, out, norm if norm is not None else rows,
        bias if bias is not None else rows, rows.shape[0], n, k, eps, BLOCK_N=16,
        WORDS=max(8, min(words, 256 // per_program)), ROWS=per_program, NORM=norm is not None, GATED=gated,
        BIAS=bias is not None, RESIDUAL=residual, PDL=pdl, ASM=not interpreted(), num_warps=4, num_stages=3,
        **({"launch_pdl": True} if pdl else {}),
    )
    return True


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (the CPU tests), which executes no inline PTX."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _int8_gemv(row: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, n: int, k: int,
               bias: torch.Tensor | None, norm: torch.Tensor | None, eps: float, gated: bool, residual: bool,
               pdl: bool) -> None:
    width = codes.shape[0]
    blocks = -(-width // 32)
    per_step, splits = _splits(blocks, -(-k // GEMV_INT8_BLOCK_K), row.device)
    part = torch.empty(splits, width, dtype=torch.float32, device=row.device)
    squares = torch.empty(splits, dtype=torch.float32, device=row.device)
    _kernels().int8_gemv_kernel[(blocks, splits)](
        row, codes, part, squares, norm if norm is not None else row, width, k, per_step * GEMV_INT8_BLOCK_K,
        BLOCK_N=32, BLOCK_K=GEMV_INT8_BLOCK_K, NORM=norm is not None, PDL=pdl, num_warps=4, num_stages=3,
        **({"launch_pdl": True} if pdl else {}),
    )
    _finish_gemv(part, squares, splits, out, n, k, scale, bias, norm, eps, gated, residual, pdl)


def _int8_gemv_rows(row: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, n: int, k: int,
                    bias: torch.Tensor | None, norm: torch.Tensor | None, eps: float, gated: bool, residual: bool,
                    pdl: bool, block_n: int = 16) -> None:
    words = next((w for w in (256, 128, 64, 32, 16, 8) if (k // 4) % w == 0 and k % 16 == 0), None)
    if words is None:  # x rounds to int8 in blocks of 32 columns: other widths take the split-K float kernel
        _int8_gemv(row, codes, scale, out, n, k, bias, norm, eps, gated, residual, pdl)
        return
    _kernels().int8_gemv_dp4a_kernel[(-(-n // block_n),)](
        row, codes.view(torch.int32), scale, out, norm if norm is not None else row, bias if bias is not None else row,
        n, k, eps, BLOCK_N=block_n, WORDS=words, NORM=norm is not None, GATED=gated, BIAS=bias is not None,
        RESIDUAL=residual, PDL=pdl, ASM=not interpreted(), num_warps=8 if words >= 256 else 4, num_stages=3,
        **({"launch_pdl": True} if pdl else {}),
    )


def _kernels() -> ModuleType:
    from ringlet.models.kernels import int4_triton

    return int4_triton


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    assert x.shape[-1] == k, f"input of {x.shape[-1]} features for a weight of {k}"
    rows = x.reshape(-1, k)
    return rows if rows.is_contiguous() else rows.contiguous()


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
                out: torch.Tensor | None = None, *, bias: torch.Tensor | None = None, norm: torch.Tensor | None = None,
                eps: float = 0.0, gated: bool = False, residual: bool = False, pdl: bool = False,
                config: Tiling | None = None) -> torch.Tensor:
    """out [M, N] = x [..., K] @ W^T of W given as `packed` nibbles uint8 [N, K / 2] (element 2j in the low nibble
    of byte j, 2j + 1 in the high one), `scale` and `offset` [N, K / group_size]: w = code * scale + offset.

    `norm`: x is RMSNorm(x) * norm first (`eps`); `gated`: W holds gate then up rows and out [M, N / 2] is
    SiLU(gate) * up; `residual`: out += the product; `pdl`: launched with programmatic dependent launch."""
    n, k = packed.shape[0], packed.shape[1] * 2
    n = n // 2 if gated else n
    rows = _rows(x, k)
    m = rows.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 1 and config is None:
        _int4_gemv_rows(rows, packed, scale, offset, group_size, out, n, k, bias, norm, eps, gated, residual, pdl)
        return out
    if m <= GEMV_MAX_ROWS and config is None and _int4_gemv_many(rows, packed, scale, offset, group_size, out, n, k,
                                                                 bias, norm, eps, gated, residual, pdl):
        return out
    if m >= DENSE_FROM_ROWS and config is None:
        _dense_int4(rows, packed, scale, offset, group_size, out, n, bias, norm, eps, gated, residual)
        return out
    magic_bits, magic = _MAGIC[x.dtype]
    t = config or tiling(m, n, k, group_size)
    grid = (-(-n // t.block_n), -(-m // t.block_m))
    _kernels().int4_matmul_kernel[grid](
        rows, packed.view(torch.int32), scale, offset, out, norm if norm is not None else rows,
        bias if bias is not None else rows, m, n, k, eps, GROUP=group_size, MAGIC_BITS=magic_bits, MAGIC=magic,
        NORM=norm is not None, GATED=gated, BIAS=bias is not None, RESIDUAL=residual, PDL=pdl,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, GROUPS_PER_STEP=t.k_step // group_size, num_warps=t.warps,
        num_stages=t.stages, **({"launch_pdl": True} if pdl else {}),
    )
    return out


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] of `int4_matmul`'s layout in `dtype` (code * scale + offset, rounded once)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    block_k = math.gcd(group_size, 128)
    _kernels().int4_dequantize_kernel[(-(-n // 32), k // block_k)](
        packed.view(torch.int32), scale, offset, out, n, k, GROUP=group_size, BLOCK_N=32, BLOCK_K=block_k,
        num_warps=4)
    return out


def int4_rows(tokens: torch.Tensor, packed: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor,
              out: torch.Tensor) -> None:
    """out [T, K] = the rows `tokens` [T] of a 4-bit table (`quant_format.Int4Rows`: packed, step, minimum), in out's
    dtype: one kernel, for a decode step's embedding."""
    t, k = out.shape
    if t:
        _kernels().int4_rows_kernel[(t, -(-k // 1024))](tokens, packed, step, minimum, out, k,
                                                         GROUP=k // step.shape[1], BLOCK_K=1024, num_warps=4)


def _dense_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
                out: torch.Tensor, n: int, bias: torch.Tensor | None, norm: torch.Tensor | None, eps: float,
                gated: bool, residual: bool) -> None:
    """`int4_matmul` for many rows of x through cuBLAS: the weight dequantised a slice of rows at a time (at most
    DENSE_SLICE_BYTES, so the slice is still in the L2 cache when cuBLAS reads it and no whole bf16 copy is ever
    held), the options as torch operations (each output rounded as the eager path rounds it)."""
    k = x.shape[-1]
    if norm is not None:
        x = F.rms_norm(x, (k,), norm, eps)
    step = max(128, DENSE_SLICE_BYTES // (k * x.element_size()) // 128 * 128)

    def product(first: int, end: int) -> torch.Tensor:
        weight = int4_dequantize(packed[first:end], scale[first:end], offset[first:end], group_size, x.dtype)
        y = torch.mm(x, weight.t())
        return y if bias is None else y.add_(bias[first:end])

    for first in range(0, n, step):
        end = min(first + step, n)
        y = product(first, end)
        if gated:
            y = F.silu(y) * product(n + first, n + end)
        if residual:
            out[:, first:end] += y
        else:
            out[:, first:end] = y


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None, *,
                bias: torch.Tensor | None = None, norm: torch.Tensor | None = None, eps: float = 0.0,
                gated: bool = False, residual: bool = False, pdl: bool = False,
                config: Tiling | None = None) -> torch.Tensor:
    """As `int4_matmul` for int8 `codes` [N, K] with one `scale` per weight row: w = code * scale."""
    n, k = codes.shape
    n = n // 2 if gated else n
    rows = _rows(x, k)
    m = rows.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 1 and config is None:
        _int8_gemv_rows(rows, codes, scale, out, n, k, bias, norm, eps, gated, residual, pdl)
        return out
    if m <= INT8_GEMV_MAX_ROWS and config is None and _int8_gemv_many(rows, codes, scale, out, n, k, bias, norm, eps,
                                                                      gated, residual, pdl):
        return out
    t = config or tiling(m, n, k, 0)
    grid = (-(-n // t.block_n), -(-m // t.block_m))
    _kernels().int8_matmul_kernel[grid](
        rows, codes, scale, out, norm if norm is not None else rows, bias if bias is not None else rows, m, n, k,
        eps, NORM=norm is not None, GATED=gated, BIAS=bias is not None, RESIDUAL=residual, PDL=pdl,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=min(t.k_step, 256), num_warps=t.warps, num_stages=t.stages,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


@torch.library.custom_op("ringlet::int4_linear", mutates_args=(), device_types="cuda")
def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, W, bias) of an int4 weight (`int4_matmul`'s layout)."""
    return int4_matmul(x, packed, scale, offset, group_size, bias=bias).view(*x.shape[:-1], packed.shape[0])


@int4_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
      bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])


@torch.library.custom_op("ringlet::int8_linear", mutates_args=(), device_types="cuda")
def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, W, bias) of a per-channel int8 weight (`int8_matmul`'s layout)."""
    return int8_matmul(x, codes, scale, bias=bias).view(*x.shape[:-1], codes.shape[0])


@int8_linear.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], codes.shape[0])
