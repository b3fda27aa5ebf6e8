"""Triton kernels of the weight-only int4 / int8 linears: out[M, N] = x[M, K] @ W[N, K]^T, W dequantised in tiles.

The gemv kernels cover one row (a decode step of one sequence), their `_rows` forms a few (a batch's decode step:
`int4_cuda.GEMV_MAX_ROWS`, `INT8_GEMV_MAX_ROWS`): x is rounded to int8 and each word of codes multiplied by `dp4a`.
The matmul kernels take the int8 products of more rows (and int4 ones whose K the dp4a steps do not divide): the rows
of x are the M side of a tensor core product, so the multiply-adds cost nothing next to reading the weights; from
`int4_cuda.DENSE_FROM_ROWS` rows `int4_dequantize_kernel` writes slices of an int4 weight for cuBLAS instead. In
the matmul kernels the work per weight is unpacking its code: a nibble OR'd into the bits of MAGIC is the number
MAGIC + code, exactly, in bf16 (128) or fp16 (1024), with no integer-to-float conversion. Each group's product is
then corrected in fp32:
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
def int4_dequantize_kernel(words_ptr, scale_ptr, offset_ptr, out_ptr, N, K, GROUP: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (n, k): out [N, K] at rows [n * BLOCK_N, ...) and columns [k * BLOCK_K, ...) (one group: GROUP is a
    multiple of BLOCK_K) = code * scale + offset in fp32, rounded once to out's dtype."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    k0 = tl.program_id(1) * BLOCK_K
    words = tl.load(words_ptr + rows[:, None] * (K // 8) + k0 // 8 + tl.arange(0, BLOCK_K // 8)[None, :],
                    mask=row_ok[:, None], other=0)
    codes = tl.reshape((words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF, [BLOCK_N, BLOCK_K])
    g = k0 // GROUP
    scale = tl.load(scale_ptr + rows * (K // GROUP) + g, mask=row_ok, other=0.0).to(tl.float32)
    offset = tl.load(offset_ptr + rows * (K // GROUP) + g, mask=row_ok, other=0.0).to(tl.float32)
    weight = codes.to(tl.float32) * scale[:, None] + offset[:, None]
    tl.store(out_ptr + rows[:, None] * K + k0 + tl.arange(0, BLOCK_K)[None, :],
             weight.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def int4_rows_kernel(tokens_ptr, packed_ptr, step_ptr, minimum_ptr, out_ptr, K, GROUP: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """Program (t, k): out [T, K] at row t, columns [k * BLOCK_K, ...) = row tokens[t] of a 4-bit table (two codes a
    byte, the low nibble first) as code * step + minimum of its group, in fp32, rounded once to out's dtype."""
    row = tl.load(tokens_ptr + tl.program_id(0)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = cols < K
    pairs = tl.load(packed_ptr + row * (K // 2) + cols // 2, mask=ok, other=0).to(tl.int32)
    codes = (pairs >> ((cols % 2) * 4)) & 0xF
    g = row * (K // GROUP) + cols // GROUP
    step = tl.load(step_ptr + g, mask=ok, other=0.0).to(tl.float32)
    minimum = tl.load(minimum_ptr + g, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0).to(tl.int64) * K + cols,
             (codes.to(tl.float32) * step + minimum).to(out_ptr.dtype.element_ty), mask=ok)


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
# `gemv_finish_kernel` adds before applying what `_finish` applies (widths that are not whole blocks of 32); the
# one-row kernels below round x to int8 and write the finished output in one pass.


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




# One row of x: x is rounded to int8 per block of 32 (absmax scale, as llama.cpp's q8_1) inside each program, so a
# word of 8 codes costs two `dp4a` instructions (four byte products each) and the masks that split its nibbles. In
# the machine code of `int4_gemv_dp4a_kernel` for sm_90 (16 rows, 128 words a step, compiled with Triton 3.9 and read
# with cuobjdump -sass) a loop step takes 2.4 instructions a weight with the rounding of x; unpacking each code to a
# float and multiplying took about 4, which held that kernel to 26-44% of the copy bandwidth.


@triton.jit
def _dp4a_word(words, x_even, x_odd, ASM: tl.constexpr):
    """int32 per word: its 8 codes (nibble i = element i) times 8 int8 values of x, x_even holding elements 0, 2, 4,
    6 of the word as bytes 0-3 and x_odd elements 1, 3, 5, 7 (byte j of `w & 0x0F0F0F0F` is nibble 2j). Without ASM
    (Triton's interpreter, which runs no PTX) the same sum in plain integer operations."""
    if not ASM:  # whole arrays a step: the interpreter's cost is per operation
        nibbles = (tl.expand_dims(words, -1) >> (4 * tl.arange(0, 8))) & 0xF
        shifts = 24 - 8 * tl.arange(0, 4)
        x = tl.join((tl.expand_dims(x_even, -1) << shifts) >> 24,
                    (tl.expand_dims(x_odd, -1) << shifts) >> 24)  # [..., 4, 2]: element 2j, then 2j + 1
        return tl.sum(nibbles * tl.reshape(x, nibbles.shape), axis=-1)
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 lo, hi, t;
        and.b32 lo, $1, 0x0F0F0F0F;
        shr.u32 hi, $1, 4;
        and.b32 hi, hi, 0x0F0F0F0F;
        dp4a.u32.s32 t, lo, $2, 0;
        dp4a.u32.s32 $0, hi, $3, t;
        }""",
        "=r,r,r,r", [words, x_even, x_odd], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _int8_x_words(x, WORDS: tl.constexpr):
    """x [WORDS * 8] (fp32) rounded to int8 per block of 32: the even and odd elements of each word packed four to an
    int32 (`_dp4a_word`'s operands), the blocks' scales [WORDS / 4] and the rounded x summed per block (the groups'
    offsets multiply the same x as their codes: with the float sum, the rounding errors of a group would not cancel)."""
    blocks = tl.reshape(x, [WORDS // 4, 32])
    amax = tl.max(tl.abs(blocks), axis=1)
    inverse = tl.where(amax > 0, 127.0 / amax, 0.0)
    q = tl.floor(blocks * inverse[:, None] + 0.5).to(tl.int32)
    scale = amax / 127.0
    even, odd = tl.split(tl.reshape(q & 0xFF, [WORDS, 4, 2]))
    shifts = (8 * tl.arange(0, 4))[None, :]
    return tl.sum(even << shifts, axis=1), tl.sum(odd << shifts, axis=1), scale, tl.sum(q, axis=1) * scale


@triton.jit
def _int4_weights(words_ptr, scale_ptr, offset_ptr, rows, row_ok, w, g, K, GROUP: tl.constexpr):
    """The loop step's words `w` [WORDS] of the weight rows `rows` (int64), their groups' scales and offsets (groups
    `g`): what the products read from memory, none of it from x. Rows where row_ok is false read 0s."""
    starts = tl.multiple_of(rows * (K // 8), 4)
    words = tl.load(words_ptr + starts[:, None] + w[None, :], mask=row_ok[:, None], other=0)
    scale = tl.load(scale_ptr + rows[:, None] * (K // GROUP) + g[None, :], mask=row_ok[:, None], other=0.0)
    offset = tl.load(offset_ptr + rows[:, None] * (K // GROUP) + g[None, :], mask=row_ok[:, None], other=0.0)
    return words, scale, offset


@triton.jit
def _int4_dp4a_groups(words, scale, offset, x_even, x_odd, x_scale, x_groups,
                      BLOCK_N: tl.constexpr, WORDS: tl.constexpr, GROUP: tl.constexpr, ASM: tl.constexpr):
    """[BLOCK_N, WORDS * 8 / GROUP]: the products of a loop step's weight rows (`_int4_weights`) with the int8 x over
    the step's groups; x_groups: the rounded x summed per group, for the offsets."""
    STEP_GROUPS: tl.constexpr = WORDS * 8 // GROUP
    dots = _dp4a_word(words, tl.broadcast_to(x_even[None, :], [BLOCK_N, WORDS]),
                      tl.broadcast_to(x_odd[None, :], [BLOCK_N, WORDS]), ASM)
    blocks = tl.sum(tl.reshape(dots, [BLOCK_N, WORDS // 4, 4]), axis=2).to(tl.float32) * x_scale[None, :]
    dot = tl.sum(tl.reshape(blocks, [BLOCK_N, STEP_GROUPS, GROUP // 32]), axis=2)
    return scale.to(tl.float32) * dot + offset.to(tl.float32) * x_groups[None, :]


@triton.jit
def int4_gemv_dp4a_kernel(
    x_ptr, words_ptr, scale_ptr, offset_ptr, out_ptr, norm_ptr, bias_ptr, N, K, eps,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, AHEAD: tl.constexpr, STAGES: tl.constexpr,
    NORM: tl.constexpr, GATED: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
    ASM: tl.constexpr,
):
    """out[0, rows] for one row of x: each program takes BLOCK_N weight rows over all of K, WORDS int32 words
    (8 codes each) of every row a loop step, so one pass writes the finished output. The weight is int32 words
    [N (2N when GATED), K / 8] (element 8w + i is nibble i of word w), scale and offset [rows, K / GROUP]; K is a
    multiple of 8 * WORDS, 8 * WORDS of GROUP, and GROUP of 32. x is rounded to int8 per block of 32 as each step
    reads it (the RMSNorm's 1/rms is a factor of the whole row, applied at the end). AHEAD: each step's weights are
    read one step ahead, the first ones before the PDL wait (they do not depend on the kernel before, so their
    reads overlap its last programs), at the cost of the registers that hold them. STAGES > 1: the loop's loads are
    pipelined that many steps deep through shared memory (Triton does so for loads that feed no `tl.dot` only when
    the loop asks)."""
    STEP_GROUPS: tl.constexpr = WORDS * 8 // GROUP
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    if PDL:
        gdc_launch_dependents()
    w = tl.arange(0, WORDS)
    g = tl.arange(0, STEP_GROUPS)
    if AHEAD:
        words, scale, offset = _int4_weights(words_ptr, scale_ptr, offset_ptr, rows, row_ok, w, g, K, GROUP)
        words_up, scale_up, offset_up = words, scale, offset
        if GATED:
            words_up, scale_up, offset_up = _int4_weights(words_ptr, scale_ptr, offset_ptr, rows + N, row_ok, w, g,
                                                          K, GROUP)
    if PDL:
        gdc_wait()
    acc = tl.zeros([BLOCK_N, STEP_GROUPS], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, STEP_GROUPS], dtype=tl.float32)
    squares = tl.zeros([WORDS * 8], dtype=tl.float32)
    for w0 in tl.range(0, K // 8, WORDS, num_stages=STAGES):
        k = w0 * 8 + tl.arange(0, WORDS * 8)
        x = tl.load(x_ptr + k).to(tl.float32)
        if NORM:
            squares += x * x
            x = x * tl.load(norm_ptr + k).to(tl.float32)
        x_even, x_odd, x_scale, x_blocks = _int8_x_words(x, WORDS)
        x_groups = tl.sum(tl.reshape(x_blocks, [STEP_GROUPS, GROUP // 32]), axis=1)
        if AHEAD:
            ahead = row_ok & (tl.full([BLOCK_N], w0 + WORDS, tl.int32) < K // 8)  # none after the last step
            next_w = w0 + WORDS + w
            next_g = (w0 + WORDS) * 8 // GROUP + g
            next_words, next_scale, next_offset = _int4_weights(words_ptr, scale_ptr, offset_ptr, rows, ahead,
                                                                next_w, next_g, K, GROUP)
            acc += _int4_dp4a_groups(words, scale, offset, x_even, x_odd, x_scale, x_groups, BLOCK_N, WORDS, GROUP,
                                     ASM)
            words, scale, offset = next_words, next_scale, next_offset
            if GATED:
                next_words, next_scale, next_offset = _int4_weights(words_ptr, scale_ptr, offset_ptr, rows + N,
                                                                    ahead, next_w, next_g, K, GROUP)
                acc_up += _int4_dp4a_groups(words_up, scale_up, offset_up, x_even, x_odd, x_scale, x_groups, BLOCK_N,
                                            WORDS, GROUP, ASM)
                words_up, scale_up, offset_up = next_words, next_scale, next_offset
        else:
            here_w = w0 + w
            here_g = w0 * 8 // GROUP + g
            words, scale, offset = _int4_weights(words_ptr, scale_ptr, offset_ptr, rows, row_ok, here_w, here_g, K,
                                                 GROUP)
            acc += _int4_dp4a_groups(words, scale, offset, x_even, x_odd, x_scale, x_groups, BLOCK_N, WORDS, GROUP,
                                     ASM)
            if GATED:
                words, scale, offset = _int4_weights(words_ptr, scale_ptr, offset_ptr, rows + N, row_ok, here_w,
                                                     here_g, K, GROUP)
                acc_up += _int4_dp4a_groups(words, scale, offset, x_even, x_odd, x_scale, x_groups, BLOCK_N, WORDS,
                                            GROUP, ASM)
    m = tl.arange(0, 1)
    total = tl.zeros([1], dtype=tl.float32) + tl.sum(squares, axis=0)
    _finish(tl.sum(acc, axis=1)[None, :], tl.sum(acc_up, axis=1)[None, :], total, out_ptr, bias_ptr, m, m < 1, rows,
            row_ok, N, K, eps, NORM, GATED, BIAS, RESIDUAL)


@triton.jit
def _int8_x_rows(x, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """`_int8_x_words` for x [ROWS, WORDS * 8]: words [ROWS, WORDS], scales and rounded sums [ROWS, WORDS / 4]."""
    blocks = tl.reshape(x, [ROWS, WORDS // 4, 32])
    amax = tl.max(tl.abs(blocks), axis=2)
    q = tl.floor(blocks * (127.0 / tl.maximum(amax, 1e-30))[:, :, None] + 0.5).to(tl.int32)  # a block of 0s: 0s
    scale = amax / 127.0
    even, odd = tl.split(tl.reshape(q & 0xFF, [ROWS, WORDS, 4, 2]))
    shifts = (8 * tl.arange(0, 4))[None, None, :]
    return tl.sum(even << shifts, axis=2), tl.sum(odd << shifts, axis=2), scale, tl.sum(q, axis=2) * scale


@triton.jit
def _int4_dp4a_rows(words_ptr, scale_ptr, offset_ptr, rows, row_ok, w, g, x_even, x_odd, x_scale, x_groups, K,
                    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, GROUP: tl.constexpr,
                    ASM: tl.constexpr):
    """[ROWS, BLOCK_N, WORDS * 8 / GROUP]: `_int4_dp4a_groups` for ROWS rows of x, the weight's words read once."""
    STEP_GROUPS: tl.constexpr = WORDS * 8 // GROUP
    starts = tl.multiple_of(rows * (K // 8), 4)
    words = tl.load(words_ptr + starts[:, None] + w[None, :], mask=row_ok[:, None], other=0)
    dots = _dp4a_word(tl.broadcast_to(words[None, :, :], [ROWS, BLOCK_N, WORDS]),
                      tl.broadcast_to(x_even[:, None, :], [ROWS, BLOCK_N, WORDS]),
                      tl.broadcast_to(x_odd[:, None, :], [ROWS, BLOCK_N, WORDS]), ASM)
    blocks = tl.sum(tl.reshape(dots, [ROWS, BLOCK_N, WORDS // 4, 4]), axis=3).to(tl.float32) * x_scale[:, None, :]
    dot = tl.sum(tl.reshape(blocks, [ROWS, BLOCK_N, STEP_GROUPS, GROUP // 32]), axis=3)
    scale = tl.load(scale_ptr + rows[:, None] * (K // GROUP) + g[None, :], mask=row_ok[:, None], other=0.0)
    offset = tl.load(offset_ptr + rows[:, None] * (K // GROUP) + g[None, :], mask=row_ok[:, None], other=0.0)
    return scale.to(tl.float32)[None, :, :] * dot + offset.to(tl.float32)[None, :, :] * x_groups[:, None, :]


@triton.jit
def int4_gemv_rows_dp4a_kernel(
    x_ptr, words_ptr, scale_ptr, offset_ptr, out_ptr, norm_ptr, bias_ptr, M, N, K, eps,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, ROWS: tl.constexpr,
    NORM: tl.constexpr, GATED: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
    ASM: tl.constexpr,
):
    """Program (n, r): `int4_gemv_dp4a_kernel` for rows [r * ROWS, ...) of x [M, K] (a batch's decode step), each
    loop step's words of the weight read once for all of them."""
    STEP_GROUPS: tl.constexpr = WORDS * 8 // GROUP
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    m = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    m_ok = m < M
    x_rows = x_ptr + m.to(tl.int64)[:, None] * K
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    acc = tl.zeros([ROWS, BLOCK_N, STEP_GROUPS], dtype=tl.float32)
    acc_up = tl.zeros([ROWS, BLOCK_N, STEP_GROUPS], dtype=tl.float32)
    squares = tl.zeros([ROWS, WORDS * 8], dtype=tl.float32)
    for w0 in range(0, K // 8, WORDS):
        w = w0 + tl.arange(0, WORDS)
        g = w0 * 8 // GROUP + tl.arange(0, STEP_GROUPS)
        k = w0 * 8 + tl.arange(0, WORDS * 8)
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        if NORM:
            squares += x * x
            x = x * tl.load(norm_ptr + k).to(tl.float32)[None, :]
        x_even, x_odd, x_scale, x_blocks = _int8_x_rows(x, ROWS, WORDS)
        x_groups = tl.sum(tl.reshape(x_blocks, [ROWS, STEP_GROUPS, GROUP // 32]), axis=2)
        acc += _int4_dp4a_rows(words_ptr, scale_ptr, offset_ptr, rows, row_ok, w, g, x_even, x_odd, x_scale,
                               x_groups, K, ROWS, BLOCK_N, WORDS, GROUP, ASM)
        if GATED:
            acc_up += _int4_dp4a_rows(words_ptr, scale_ptr, offset_ptr, rows + N, row_ok, w, g, x_even, x_odd,
                                      x_scale, x_groups, K, ROWS, BLOCK_N, WORDS, GROUP, ASM)
    _finish(tl.sum(acc, axis=2), tl.sum(acc_up, axis=2), tl.sum(squares, axis=1), out_ptr, bias_ptr, m, m_ok, rows,
            row_ok, N, K, eps, NORM, GATED, BIAS, RESIDUAL)


@triton.jit
def _dp4a_int8(codes, x_words, ASM: tl.constexpr):
    """int32 per word: 4 int8 codes (byte j = element j) times 4 int8 values of x packed alike."""
    if not ASM:
        total = tl.zeros(codes.shape, dtype=tl.int32)
        for j in tl.static_range(4):
            total += ((codes << (24 - 8 * j)) >> 24) * ((x_words << (24 - 8 * j)) >> 24)
        return total
    return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, 0;", "=r,r,r", [codes, x_words], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def int8_gemv_dp4a_kernel(
    x_ptr, codes_ptr, scale_ptr, out_ptr, norm_ptr, bias_ptr, N, K, eps,
    BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
    NORM: tl.constexpr, GATED: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
    ASM: tl.constexpr,
):
    """out[0, rows] for one row of x and int8 codes [N (2N when GATED), K] with a scale per row: each program takes
    BLOCK_N rows over all of K, WORDS int32 words (4 codes) of every row a step, x rounded to int8 per block of 32 as
    it is read. K is a multiple of 4 * WORDS, and WORDS of 8."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    acc = tl.zeros([BLOCK_N, WORDS // 8], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, WORDS // 8], dtype=tl.float32)
    squares = tl.zeros([WORDS * 4], dtype=tl.float32)
    for w0 in range(0, K // 4, WORDS):
        w = w0 + tl.arange(0, WORDS)
        k = w0 * 4 + tl.arange(0, WORDS * 4)
        x = tl.load(x_ptr + k).to(tl.float32)
        if NORM:
            squares += x * x
            x = x * tl.load(norm_ptr + k).to(tl.float32)
        blocks = tl.reshape(x, [WORDS // 8, 32])
        amax = tl.max(tl.abs(blocks), axis=1)
        q = tl.floor(blocks * tl.where(amax > 0, 127.0 / amax, 0.0)[:, None] + 0.5).to(tl.int32) & 0xFF
        x_words = tl.sum(tl.reshape(q, [WORDS, 4]) << (8 * tl.arange(0, 4))[None, :], axis=1)
        x_scale = amax / 127.0
        starts = tl.multiple_of(rows * (K // 4), 4)
        codes = tl.load(codes_ptr + starts[:, None] + w[None, :], mask=row_ok[:, None], other=0)
        dots = _dp4a_int8(codes, tl.broadcast_to(x_words[None, :], [BLOCK_N, WORDS]), ASM)
        acc += tl.sum(tl.reshape(dots, [BLOCK_N, WORDS // 8, 8]), axis=2).to(tl.float32) * x_scale[None, :]
        if GATED:
            up = tl.load(codes_ptr + starts[:, None] + N * (K // 4) + w[None, :], mask=row_ok[:, None], other=0)
            dots = _dp4a_int8(up, tl.broadcast_to(x_words[None, :], [BLOCK_N, WORDS]), ASM)
            acc_up += tl.sum(tl.reshape(dots, [BLOCK_N, WORDS // 8, 8]), axis=2).to(tl.float32) * x_scale[None, :]
    total = tl.sum(acc, axis=1) * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    total_up = tl.sum(acc_up, axis=1)
    if GATED:
        total_up *= tl.load(scale_ptr + rows + N, mask=row_ok, other=0.0).to(tl.float32)
    m = tl.arange(0, 1)
    squared = tl.zeros([1], dtype=tl.float32) + tl.sum(squares, axis=0)
    _finish(total[None, :], total_up[None, :], squared, out_ptr, bias_ptr, m, m < 1, rows, row_ok, N, K, eps,
            NORM, GATED, BIAS, RESIDUAL)


@triton.jit
def int8_gemv_rows_dp4a_kernel(
    x_ptr, codes_ptr, scale_ptr, out_ptr, norm_ptr, bias_ptr, M, N, K, eps,
    BLOCK_N: tl.constexpr, WORDS: tl.constexpr, ROWS: tl.constexpr,
    NORM: tl.constexpr, GATED: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
    ASM: tl.constexpr,
):
    """Program (n, r): `int8_gemv_dp4a_kernel` for rows [r * ROWS, ...) of x [M, K] (a batch's decode step), each
    loop step's codes read once for all of them."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    m = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    m_ok = m < M
    x_rows = x_ptr + m.to(tl.int64)[:, None] * K
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    acc = tl.zeros([ROWS, BLOCK_N, WORDS // 8], dtype=tl.float32)
    acc_up = tl.zeros([ROWS, BLOCK_N, WORDS // 8], dtype=tl.float32)
    squares = tl.zeros([ROWS, WORDS * 4], dtype=tl.float32)
    for w0 in range(0, K // 4, WORDS):
        w = w0 + tl.arange(0, WORDS)
        k = w0 * 4 + tl.arange(0, WORDS * 4)
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        if NORM:
            squares += x * x
            x = x * tl.load(norm_ptr + k).to(tl.float32)[None, :]
        blocks = tl.reshape(x, [ROWS, WORDS // 8, 32])
        amax = tl.max(tl.abs(blocks), axis=2)
        q = tl.floor(blocks * (127.0 / tl.maximum(amax, 1e-30))[:, :, None] + 0.5).to(tl.int32) & 0xFF
        x_words = tl.broadcast_to(tl.sum(tl.reshape(q, [ROWS, WORDS, 4]) << (8 * tl.arange(0, 4))[None, None, :],
                                         axis=2)[:, None, :], [ROWS, BLOCK_N, WORDS])
        x_scale = (amax / 127.0)[:, None, :]
        starts = tl.multiple_of(rows * (K // 4), 4)
        codes = tl.load(codes_ptr + starts[:, None] + w[None, :], mask=row_ok[:, None], other=0)
        dots = _dp4a_int8(tl.broadcast_to(codes[None, :, :], [ROWS, BLOCK_N, WORDS]), x_words, ASM)
        acc += tl.sum(tl.reshape(dots, [ROWS, BLOCK_N, WORDS // 8, 8]), axis=3).to(tl.float32) * x_scale
        if GATED:
            up = tl.load(codes_ptr + starts[:, None] + N * (K // 4) + w[None, :], mask=row_ok[:, None], other=0)
            dots = _dp4a_int8(tl.broadcast_to(up[None, :, :], [ROWS, BLOCK_N, WORDS]), x_words, ASM)
            acc_up += tl.sum(tl.reshape(dots, [ROWS, BLOCK_N, WORDS // 8, 8]), axis=3).to(tl.float32) * x_scale
    total = tl.sum(acc, axis=2) * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    total_up = tl.sum(acc_up, axis=2)
    if GATED:
        total_up *= tl.load(scale_ptr + rows + N, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    _finish(total, total_up, tl.sum(squares, axis=1), out_ptr, bias_ptr, m, m_ok, rows, row_ok, N, K, eps,
            NORM, GATED, BIAS, RESIDUAL)
