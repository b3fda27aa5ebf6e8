"""Triton kernels of the weight-only int4 / int8 linears: out[M, N] = x[M, K] @ W[N, K]^T, W dequantised in tiles.

The matmul kernels cover many rows (a prompt chunk, a batch's decode step): the rows of x are the M side of a tensor
core product, so the multiply-adds cost nothing next to reading the weights; the gemv kernels cover one row (a
decode step of one sequence). The work per weight is unpacking its code: a nibble OR'd into the bits of MAGIC is the number MAGIC + code, exactly, in
bf16 (128) or fp16 (1024), with no integer-to-float conversion. Each group's product is then corrected in fp32:
    sum_k x_k * (code_k * scale + offset) = scale * (sum_k x_k * (MAGIC + code_k)) + (offset - MAGIC * scale) * sum_k x_k
Options fuse what sits around a projection in a decode step: NORM (RMSNorm of x first: its 1/rms scales the sums),
GATED (W holds 2N rows, gate then up: out = SiLU(gate) * up), BIAS, RESIDUAL (out += the product) and PDL (launched
with programmatic dependent launch, as fused_decode's kernels are).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _normed(x, k, norm_ptr, squares, NORM: tl.constexpr):
    """x [BLOCK_M, BLOCK_K] times the norm's weight at columns k (NORM), and the running sum of squares."""
    if NORM:
        xf = x.to(tl.float32)
        squares += tl.sum(xf * xf, axis=1)
        x = (xf * tl.load(norm_ptr + k).to(tl.float32)[None, :]).to(x.dtype)
    return x, squares


@triton.jit
def _int4_group(acc, x, x_sum, words_ptr, scale_ptr, offset_ptr, rows, row_ok, K, g,
                GROUP: tl.constexpr, BLOCK_N: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] plus x [BLOCK_M, GROUP] times group g of the weight rows `rows` (int64)."""
    words = tl.load(words_ptr + rows[:, None] * (K // 8) + g * (GROUP // 8) + tl.arange(0, GROUP // 8)[None, :],
                    mask=row_ok[:, None], other=0)
    nibbles = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF  # element 8w + i: nibble i of w
    codes = tl.reshape(nibbles | MAGIC_BITS, [BLOCK_N, GROUP]).to(tl.int16).to(x.dtype, bitcast=True)
    scale = tl.load(scale_ptr + rows * (K // GROUP) + g, mask=row_ok, other=0.0).to(tl.float32)
    offset = tl.load(offset_ptr + rows * (K // GROUP) + g, mask=row_ok, other=0.0).to(tl.float32)
    product = tl.dot(x, tl.trans(codes))
    return acc + product * scale[None, :] + x_sum[:, None] * (offset - MAGIC * scale)[None, :]


@triton.jit
def _finish(acc, acc_up, squares, out_ptr, bias_ptr, m, m_ok, rows, row_ok, N, K, eps,
            NORM: tl.constexpr, GATED: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr):
    """Norm, bias, SiLU gate and residual, rounded where the eager path rounds; stored to out [M, N]."""
    dtype = out_ptr.dtype.element_ty
    if NORM:
        rstd = tl.rsqrt(squares / K + eps)
        acc *= rstd[:, None]
        acc_up *= rstd[:, None]
    if BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    out = acc.to(dtype).to(tl.float32)
    if GATED:
        silu = (out * tl.sigmoid(out)).to(dtype).to(tl.float32)
        out = silu * acc_up.to(dtype).to(tl.float32)
    offsets = out_ptr + m.to(tl.int64)[:, None] * N + rows[None, :]
    ok = m_ok[:, None] & row_ok[None, :]
    if RESIDUAL:
        out += tl.load(offsets, mask=ok, other=0.0).to(tl.float32)
    tl.store(offsets, out.to(dtype), mask=ok)


@triton.jit
def int4_matmul_kernel(
    x_ptr, words_ptr, scale_ptr, offset_ptr, out_ptr, norm_ptr, bias_ptr, M, N, K, eps,
    GROUP: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC: tl.constexpr,
    NORM: tl.constexpr, GATED: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS_PER_STEP: tl.constexpr,
):
    """Program (n, m): output columns [n * BLOCK_N, ...) of rows [m * BLOCK_M, ...). The weight is packed codes as
    int32 words [N (2N when GATED), K / 8] (element 8w + i is nibble i of word w), scale and offset [rows, K / GROUP].
    K is a multiple of GROUP * GROUPS_PER_STEP."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    x_rows = x_ptr + m.to(tl.int64)[:, None] * K
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, GROUP * GROUPS_PER_STEP):
        for j in tl.static_range(GROUPS_PER_STEP):
            k = k0 + j * GROUP + tl.arange(0, GROUP)
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None], other=0.0)
            x, squares = _normed(x, k, norm_ptr, squares, NORM)
            x_sum = tl.sum(x.to(tl.float32), axis=1)
            g = k0 // GROUP + j
            acc = _int4_group(acc, x, x_sum, words_ptr, scale_ptr, offset_ptr, rows, row_ok, K, g,
                              GROUP, BLOCK_N, MAGIC_BITS, MAGIC)
            if GATED:
                acc_up = _int4_group(acc_up, x, x_sum, words_ptr, scale_ptr, offset_ptr, rows + N, row_ok, K, g,
                                     GROUP, BLOCK_N, MAGIC_BITS, MAGIC)
    _finish(acc, acc_up, squares, out_ptr, bias_ptr, m, m_ok, rows, row_ok, N, K, eps, NORM, GATED, BIAS, RESIDUAL)


@triton.jit
def int8_matmul_kernel(
    x_ptr, codes_ptr, scale_ptr, out_ptr, norm_ptr, bias_ptr, M, N, K, eps,
    NORM: tl.constexpr, GATED: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """As `int4_matmul_kernel` for int8 codes [N (2N when GATED), K] with one scale per weight row."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    x_rows = x_ptr + m.to(tl.int64)[:, None] * K
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            squares += tl.sum(xf * xf, axis=1)
            x = (xf * tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]).to(x.dtype)
        tile = row_ok[:, None] & k_ok[None, :]
        codes = tl.load(codes_ptr + rows[:, None] * K + k[None, :], mask=tile, other=0).to(x.dtype)
        acc = tl.dot(x, tl.trans(codes), acc)
        if GATED:
            up = tl.load(codes_ptr + (rows + N)[:, None] * K + k[None, :], mask=tile, other=0).to(x.dtype)
            acc_up = tl.dot(x, tl.trans(up), acc_up)
    acc *= tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        acc_up *= tl.load(scale_ptr + rows + N, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    _finish(acc, acc_up, squares, out_ptr, bias_ptr, m, m_ok, rows, row_ok, N, K, eps, NORM, GATED, BIAS, RESIDUAL)



# One row of x (a decode step of one sequence): no tensor-core tile to fill, so the multiply-adds run on the CUDA cores
# and each program streams a slab of weight rows. int8: the splits of K write float32 partial sums, which
# `gemv_finish_kernel` adds before applying what `_finish` applies; int4 (`int4_gemv_rows_kernel`, below) in one pass.


@triton.jit
def int8_gemv_kernel(
    x_ptr, codes_ptr, part_ptr, squares_ptr, norm_ptr, N, K, k_per_split,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr,
):
    """Program (n, split): part[split, rows] = sum over the split's columns of x[k] * codes[row, k], x times the
    norm's weight (NORM; squares[split] = the split's sum of x^2, written by the programs of the first row block), for
    int8 codes [N, K] (the row scales are applied by `gemv_finish_kernel`)."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    split = tl.program_id(1)
    first = split * k_per_split
    end = tl.minimum(first + k_per_split, K)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(first, end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < end
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        if NORM:
            squares += x * x
            x = x * tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        codes = tl.load(codes_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0)
        acc += codes.to(tl.float32) * x[None, :]
    tl.store(part_ptr + split * N + rows, tl.sum(acc, axis=1), mask=row_ok)
    if NORM:  # once per split: by the programs of the first row block
        tl.store(squares_ptr + split, tl.sum(squares, axis=0), mask=tl.program_id(0) == 0)


@triton.jit
def gemv_finish_kernel(
    part_ptr, squares_ptr, row_scale_ptr, out_ptr, bias_ptr, N, K, splits, eps,
    NORM: tl.constexpr, GATED: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr,
    PDL: tl.constexpr, BLOCK_N: tl.constexpr, MAX_SPLITS: tl.constexpr,
):
    """out[0, rows] from the splits' partial sums part[splits, N (2N when GATED)]: row scales (int8), then `_finish`."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    width = 2 * N if GATED else N
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(part_ptr + s * width + rows, mask=row_ok, other=0.0)
        if GATED:
            acc_up += tl.load(part_ptr + s * width + N + rows, mask=row_ok, other=0.0)
    if ROW_SCALE:
        acc *= tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if GATED:
            acc_up *= tl.load(row_scale_ptr + N + rows, mask=row_ok, other=0.0).to(tl.float32)
    index = tl.arange(0, MAX_SPLITS)
    squares = tl.zeros([1], dtype=tl.float32)
    if NORM:
        squares += tl.sum(tl.load(squares_ptr + index, mask=index < splits, other=0.0), axis=0)
    m = tl.arange(0, 1)
    _finish(acc[None, :], acc_up[None, :], squares, out_ptr, bias_ptr, m, m < 1, rows, row_ok, N, K, eps,
            NORM, GATED, BIAS, RESIDUAL)




@triton.jit
def _int4_row_groups(words_ptr, scale_ptr, offset_ptr, rows, row_ok, w, g, x_ptr, norm_ptr, K,
                     BLOCK_N: tl.constexpr, WORDS: tl.constexpr, GROUP: tl.constexpr, NORM: tl.constexpr):
    """[BLOCK_N, WORDS * 8 / GROUP]: the products of weight rows `rows` with x over the groups `g` of the loop step,
    whose int32 words are `w` [WORDS]. A nibble moved to bits 16-19 of 128.0's bits is the float 128 + code, with no
    conversion instruction; the 128s come off with the offset, once per group."""
    starts = tl.multiple_of(rows * (K // 8), 4)  # K is a multiple of 32: each row's words start 16-byte aligned
    words = tl.load(words_ptr + starts[:, None] + w[None, :], mask=row_ok[:, None], other=0)
    dot = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    x_sum = tl.zeros([WORDS], dtype=tl.float32)
    for i in tl.static_range(8):
        x = tl.load(x_ptr + w * 8 + i).to(tl.float32)
        if NORM:
            x = x * tl.load(norm_ptr + w * 8 + i).to(tl.float32)
        x_sum += x
        if i < 4:
            bits = (words << (16 - 4 * i)) & 0xF0000
        elif i == 4:
            bits = words & 0xF0000
        else:
            bits = (words >> (4 * i - 16)) & 0xF0000
        dot += (bits | 0x43000000).to(tl.float32, bitcast=True) * x[None, :]
    STEP_GROUPS: tl.constexpr = WORDS * 8 // GROUP
    dot = tl.sum(tl.reshape(dot, [BLOCK_N, STEP_GROUPS, GROUP // 8]), axis=2)
    x_groups = tl.sum(tl.reshape(x_sum, [STEP_GROUPS, GROUP // 8]), axis=1)
    scale = tl.load(scale_ptr + rows[:, None] * (K // GROUP) + g[None, :], mask=row_ok[:, None], other=0.0)
    offset = tl.load(offset_ptr + rows[:, None] * (K // GROUP) + g[None, :], mask=row_ok[:, None], other=0.0)
    scale = scale.to(tl.float32)
    return scale * dot + (offset.to(tl.float32) - 128.0 * scale) * x_groups[None, :]


@triton.jit
def int4_gemv_rows_kernel(
    x_ptr, words_ptr, scale_ptr, offset_ptr, out_ptr, norm_ptr, bias_ptr, N, K, eps,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
    NORM: tl.constexpr, GATED: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    """out[0, rows] for one row of x: each program takes BLOCK_N weight rows over all of K, WORDS int32 words
    (8 codes each) of every row a loop step, so one pass writes the finished output (no partial sums for a second
    kernel). The weight is int32 words [N (2N when GATED), K / 8] (element 8w + i is nibble i of word w), scale and
    offset [rows, K / GROUP]; K is a multiple of 32 and of 8 * WORDS, and 8 * WORDS of GROUP."""
    STEP_GROUPS: tl.constexpr = WORDS * 8 // GROUP
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    acc = tl.zeros([BLOCK_N, STEP_GROUPS], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, STEP_GROUPS], dtype=tl.float32)
    squares = tl.zeros([WORDS * 8], dtype=tl.float32)
    for w0 in range(0, K // 8, WORDS):
        w = w0 + tl.arange(0, WORDS)
        g = w0 * 8 // GROUP + tl.arange(0, STEP_GROUPS)
        if NORM:
            x = tl.load(x_ptr + w0 * 8 + tl.arange(0, WORDS * 8)).to(tl.float32)
            squares += x * x
        acc += _int4_row_groups(words_ptr, scale_ptr, offset_ptr, rows, row_ok, w, g, x_ptr, norm_ptr, K,
                                BLOCK_N, WORDS, GROUP, NORM)
        if GATED:
            acc_up += _int4_row_groups(words_ptr, scale_ptr, offset_ptr, rows + N, row_ok, w, g, x_ptr, norm_ptr, K,
                                       BLOCK_N, WORDS, GROUP, NORM)
    m = tl.arange(0, 1)
    total = tl.zeros([1], dtype=tl.float32) + tl.sum(squares, axis=0)
    _finish(tl.sum(acc, axis=1)[None, :], tl.sum(acc_up, axis=1)[None, :], total, out_ptr, bias_ptr, m, m < 1, rows,
            row_ok, N, K, eps, NORM, GATED, BIAS, RESIDUAL)
