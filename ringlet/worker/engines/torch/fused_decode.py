"""The CUDA decode step of a Llama-family model as a few fused Triton kernels, for one CUDA graph.

At batch 1 a decode step reads every weight once; what else it costs is kernel launches and the small element-wise
kernels between the matrix products (about 190 kernels a step for Llama-3.2-1B compiled by inductor). Here a layer
is five kernels:
  1. RMSNorm + q/k/v projection (+ bias): every program normalises the (small) input vector itself
  2. rotary + cache write + attention, split over cache positions; each split keeps a partial softmax, and the
     last split of a key/value head to finish joins its heads' splits
  3. o projection + residual add
  4. RMSNorm + gate/up projection + SiLU(gate) * up
  5. down projection + residual add
then RMSNorm + lm_head, one more. The attention reads the position from a device buffer and visits only the
positions written so far, so one graph serves every position. On Hopper each kernel is launched with programmatic
dependent launch: it starts while the previous one drains and reads its first weights (the attention its cached keys
and values) before waiting for it.

Rounding follows the eager bf16/fp16 path: projections accumulate in fp32 and round to the model's dtype where eager
rounds (each projection's output, the rotated q and k, SiLU(gate) and its product); the normalised input of a
projection is not rounded (its 1/rms scales the sums instead).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from typing import cast

import torch
import triton
import triton.language as tl
from torch import nn
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ringlet.models.cache import StaticKVCache
from ringlet.models.experts import Experts
from ringlet.models.gemma import GemmaTransformer
from ringlet.models.kernels import gemv_tuning
from ringlet.models.kernels.int4_cuda import interpreted, pdl_available
from ringlet.models.llama import Attention, Block, RMSNorm, Transformer
from ringlet.models.moe import SparseMoE
from ringlet.models.quant import embed_rows
from ringlet.models.quant_cuda import CudaInt4Experts, CudaInt4Linear, CudaQuantizedLinear
from ringlet.models.tensor_parallel import VocabParallelHead, is_sharded, local_linear

log = logging.getLogger(__name__)

# Triton's interpreter (TRITON_INTERPRET=1) runs these kernels on CPU tensors: the CPU tests use it
_INTERPRETED = interpreted()

# (rows, columns, warps) of a projection program; each projection shape keeps the fastest, timed at warm-up. Many
# columns and warps keep enough loads in flight where a matrix has few rows (Llama-3.2-1B's o and down projections).
_GEMV_SHAPES = [(8, 128, 1)] if _INTERPRETED else [
    (1, 2048, 4), (2, 1024, 4), (2, 2048, 8), (4, 512, 4), (4, 1024, 4), (4, 2048, 8),
    (8, 256, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (32, 256, 8),
]
JOIN_SPLITS = 8  # splits whose partial outputs the join reads at once


_AUTOTUNE_OPTIONS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


@triton.jit
def _accumulate(acc, acc_up, squares, w, u, x_ptr, norm_ptr, kk, K, NORM: tl.constexpr, GATED: tl.constexpr):
    k_ok = kk < K
    xk = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
    if NORM:
        squares += xk * xk
        xk *= tl.load(norm_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
    acc += w.to(tl.float32) * xk[None, :]
    if GATED:
        acc_up += u.to(tl.float32) * xk[None, :]
    return acc, acc_up, squares


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in _GEMV_SHAPES],
    key=["N", "K", "NORM", "GATED", "RESIDUAL", "PDL"],
    restore_value=["out_ptr"],  # residual projections add into their output: timing runs must not accumulate
    **_AUTOTUNE_OPTIONS,
)
@triton.heuristics({"EVEN": lambda args: args["K"] % args["BLOCK_K"] == 0 and args["N"] % args["BLOCK_N"] == 0})
@triton.jit
def _projection(
    x_ptr, w_ptr, out_ptr, norm_ptr, bias_ptr, N, K, eps,
    NORM: tl.constexpr, GATED: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
):
    """out[N] = W[N, K] @ x[K], with options:
    NORM: x is RMSNorm(x) * norm first; GATED: W holds 2N rows (gate, then up) and out = SiLU(gate) * up;
    BIAS: + bias; RESIDUAL: out += the projection (out is the residual stream).

    Products accumulate element-wise and are summed once at the end (no reduction across threads inside the loop);
    RMSNorm's 1/rms is a scalar, applied to the sums, so the input is read once. PDL (Hopper's programmatic dependent
    launch): the kernel starts while the previous one finishes, reads its first weight tiles (which no kernel writes)
    and only then waits for the previous kernel (H200, Llama-3.2-1B shape: 793 us a step against 887 us without PDL;
    loading each next tile ahead inside the loop as well was slower, 873 us)."""
    dtype = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
    up_rows = w_rows + N * K
    if PDL:
        gdc_launch_dependents()
    first = row_ok[:, None] & (cols < K)[None, :]
    w = tl.load(w_rows + cols[None, :], mask=first, other=0.0)
    u = w
    if GATED:
        u = tl.load(up_rows + cols[None, :], mask=first, other=0.0)
    if PDL:
        gdc_wait()
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc, acc_up, squares = _accumulate(acc, acc_up, squares, w, u, x_ptr, norm_ptr, cols, K, NORM, GATED)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + cols
        if EVEN:
            w = tl.load(w_rows + kk[None, :])
            if GATED:
                u = tl.load(up_rows + kk[None, :])
        else:
            tile = row_ok[:, None] & (kk < K)[None, :]
            w = tl.load(w_rows + kk[None, :], mask=tile, other=0.0)
            if GATED:
                u = tl.load(up_rows + kk[None, :], mask=tile, other=0.0)
        acc, acc_up, squares = _accumulate(acc, acc_up, squares, w, u, x_ptr, norm_ptr, kk, K, NORM, GATED)
    out = tl.sum(acc, axis=1)
    up = tl.sum(acc_up, axis=1)
    if NORM:
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        out *= rstd
        up *= rstd
    if BIAS:
        out += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    out = out.to(dtype).to(tl.float32)
    if GATED:
        silu = (out * tl.sigmoid(out)).to(dtype).to(tl.float32)
        out = silu * up.to(dtype).to(tl.float32)
    if RESIDUAL:
        out += tl.load(out_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, out.to(dtype), mask=row_ok)


@triton.jit
def prefetch_l2(at):
    """Asks the L2 cache for the 128-byte line of each address in `at`. A hint: nothing waits for it and no register
    receives data, so a program can issue it before `gdc_wait` for memory no earlier kernel of the step writes."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [at], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def prefetch_rows(ptr, first, rows, row_elements, LINES: tl.constexpr, LINE: tl.constexpr):
    """`prefetch_l2` of rows [first, first + rows) of a row-major matrix of `row_elements` columns (contiguous
    memory): LINES addresses LINE elements (128 bytes) apart, the last repeated where fewer lines are needed."""
    end = rows * row_elements - 1
    prefetch_l2(ptr + first * row_elements + tl.minimum(tl.arange(0, LINES).to(tl.int64) * LINE, end))


@triton.jit
def _rotate(x_ptr, d, partner, sign, cos, sin, norm_ptr, eps, QK_NORM: tl.constexpr, D: tl.constexpr):
    """One head vector [D] (or rows of them: x_ptr [R, 1] + d), normalised (qk_norm) and rotated; fp32 out."""
    x = tl.load(x_ptr + d).to(tl.float32)
    pair = tl.load(x_ptr + partner).to(tl.float32)
    dtype = norm_ptr.dtype.element_ty
    if QK_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=-1, keep_dims=True) / D + eps)
        x = (x * rstd * tl.load(norm_ptr + d).to(tl.float32)).to(dtype).to(tl.float32)
        pair = (pair * rstd * tl.load(norm_ptr + partner).to(tl.float32)).to(dtype).to(tl.float32)
    return (x * cos + sign * pair * sin).to(dtype).to(tl.float32)


@triton.jit
def _attention_split(
    qkv_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, q_norm_ptr, k_norm_ptr,
    part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, count_ptr, max_len, eps, scale,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, GROUP_PAD: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_T: tl.constexpr, QK_NORM: tl.constexpr, PDL: tl.constexpr, JOIN: tl.constexpr,
    PREFETCH_LINES: tl.constexpr = 0, LINE: tl.constexpr = 64,
):
    """Program (g, s): the query heads sharing key/value head g, over split s of positions 0..pos.

    The split holding `pos` rotates the new key, writes it and the value to the cache and attends to them from
    registers; cached positions before `pos` are read from the cache. The splits' partial softmaxes are joined into
    out [HEADS, D] by the last split of the group to finish (`join_splits`, JOIN splits a step of its loop;
    count_ptr [KV_HEADS]); the only split of a short sequence writes out itself. PREFETCH_LINES (with PDL): the split
    asks the L2 cache for its cached keys and values, BLOCK_T positions at a time in that many 128-byte lines of LINE
    elements, before it waits for the q/k/v projection (earlier steps wrote them)."""
    g = tl.program_id(0)
    s = tl.program_id(1)
    GROUP: tl.constexpr = HEADS // KV_HEADS
    HALF: tl.constexpr = D // 2
    pos = tl.load(pos_ptr)
    d = tl.arange(0, D)
    partner = (d + HALF) % D
    sign = tl.where(d < HALF, -1.0, 1.0)
    cos = tl.load(cos_ptr + pos * D + d).to(tl.float32)
    sin = tl.load(sin_ptr + pos * D + d).to(tl.float32)
    total = pos + 1
    chunk = tl.cdiv(total, SPLITS * BLOCK_T) * BLOCK_T
    begin = s * chunk
    end = tl.minimum(begin + chunk, total)
    cached_end = tl.minimum(end, pos)
    head_cache = g.to(tl.int64) * max_len * D
    used = tl.cdiv(total, chunk)  # the splits that hold positions
    if PDL:
        gdc_launch_dependents()
    if s >= used:  # nothing to attend, nothing for the join to read
        return
    if PDL:  # the position and the rotary tables come from before the graph; q, k, v from the previous kernel
        if PREFETCH_LINES > 0:
            for t0 in range(begin, cached_end, BLOCK_T):
                rows = tl.minimum(cached_end - t0, BLOCK_T)
                prefetch_rows(k_cache_ptr + head_cache, t0, rows, D, PREFETCH_LINES, LINE)
                prefetch_rows(v_cache_ptr + head_cache, t0, rows, D, PREFETCH_LINES, LINE)
        gdc_wait()

    i = tl.arange(0, GROUP_PAD)
    heads = g * GROUP + tl.minimum(i, GROUP - 1)  # padding rows repeat the last head and are never stored
    q = _rotate(qkv_ptr + heads[:, None] * D, d[None, :], partner[None, :], sign[None, :], cos[None, :],
                sin[None, :], q_norm_ptr, eps, QK_NORM, D) * scale

    best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total_exp = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for t0 in range(begin, cached_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < cached_end
        offsets = head_cache + t.to(tl.int64)[:, None] * D + d[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=t_ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + offsets, mask=t_ok[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        scores = tl.where(t_ok[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        alpha = tl.exp(best - new_best)
        p = tl.exp(scores - new_best[:, None])
        total_exp = total_exp * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        best = new_best
    if (begin <= pos) & (pos < end):
        k_new = _rotate(qkv_ptr + (HEADS + g) * D, d, partner, sign, cos, sin, k_norm_ptr, eps, QK_NORM, D)
        v_new = tl.load(qkv_ptr + (HEADS + KV_HEADS + g) * D + d).to(tl.float32)
        dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + head_cache + pos * D + d, k_new.to(dtype))
        tl.store(v_cache_ptr + head_cache + pos * D + d, v_new.to(dtype))
        score = tl.sum(q * k_new[None, :], axis=1)
        new_best = tl.maximum(best, score)
        alpha = tl.exp(best - new_best)
        p = tl.exp(score - new_best)
        total_exp = total_exp * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new[None, :]
        best = new_best
    store_split(acc, best, total_exp, part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, count_ptr + g, heads,
                i < GROUP, s, used, SPLITS, D, JOIN)


@triton.jit
def store_split(acc, best, total_exp, part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, count_ptr, rows, stored, s,
                used, SPLITS: tl.constexpr, D: tl.constexpr, JOIN: tl.constexpr):
    """Split s's unnormalised output `acc`, running maximum `best` and sum of exponentials for the rows `rows` of
    out [., D] (`stored` those that are not padding): the only one of `used` splits writes out itself (its softmax is
    the whole one); the others store them in the slots rows * SPLITS + s, and the last of them joins
    (`join_splits`)."""
    d = tl.arange(0, D)
    if used == 1:
        out = out_ptr + rows.to(tl.int64)[:, None] * D + d[None, :]
        tl.store(out, (acc / total_exp[:, None]).to(out_ptr.dtype.element_ty), mask=stored[:, None])
    else:
        slot = rows * SPLITS + s
        tl.store(part_acc_ptr + slot[:, None] * D + d[None, :], acc, mask=stored[:, None])
        tl.store(part_max_ptr + slot, best, mask=stored)
        tl.store(part_sum_ptr + slot, total_exp, mask=stored)
        join_splits(part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, count_ptr, rows, stored, used, SPLITS, D, JOIN)


@triton.jit
def join_splits(part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, count_ptr, heads, stored, used,
                SPLITS: tl.constexpr, D: tl.constexpr, JOIN: tl.constexpr):
    """Called by each of the `used` splits of a group of query heads (rows `heads` of out [., D], `stored` those
    that are not padding) once its running maximum, sum of exponentials and unnormalised output are stored in the
    slots heads * SPLITS + split: the split that arrives last at `count_ptr` joins all of them into out and sets the
    count back to 0 for the next step. One kernel fewer a layer than a kernel of its own that joins them. The join
    reads JOIN splits' slots at once (one load of each a step of its loop) and merges them into a running maximum."""
    tl.debug_barrier()  # every thread's stores of this split made before the count says it is done
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if arrived == used - 1:
        tl.store(count_ptr, 0)
        first = heads.to(tl.int64) * SPLITS
        d = tl.arange(0, D)
        top = tl.full([heads.shape[0]], float("-inf"), tl.float32)
        total = tl.zeros([heads.shape[0]], tl.float32)
        acc = tl.zeros([heads.shape[0], D], tl.float32)
        for j0 in range(0, used, JOIN):
            split = j0 + tl.arange(0, JOIN)
            ok = stored[:, None] & (split < used)[None, :]
            slots = first[:, None] + split[None, :]
            # the other splits' slots are read from L2 (.cg): this SM's L1 may hold them from an earlier step
            best = tl.load(part_max_ptr + slots, mask=ok, other=float("-inf"), cache_modifier=".cg")
            sums = tl.load(part_sum_ptr + slots, mask=ok, other=0.0, cache_modifier=".cg")
            parts = tl.load(part_acc_ptr + slots[:, :, None] * D + d[None, None, :], mask=ok[:, :, None], other=0.0,
                            cache_modifier=".cg")
            new_top = tl.where(stored, tl.maximum(top, tl.max(best, axis=1)), 0.0)  # padding rows stay finite
            alpha = tl.exp(top - new_top)
            weight = tl.where(ok, tl.exp(best - new_top[:, None]), 0.0)
            total = total * alpha + tl.sum(weight * sums, axis=1)
            acc = acc * alpha[:, None] + tl.sum(weight[:, :, None] * parts, axis=1)
            top = new_top
        out = acc / tl.where(stored, total, 1.0)[:, None]
        tl.store(out_ptr + heads.to(tl.int64)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=stored[:, None])


def project(x: torch.Tensor, linear: nn.Linear | CudaQuantizedLinear, out: torch.Tensor, eps: float, pdl: bool,
            norm: torch.Tensor | None = None, gated: bool = False, residual: bool = False) -> None:
    """out = linear(x) of one vector x, with `_projection`'s options (`pdl`: launched with programmatic dependent
    launch); a quantised linear (`CudaQuantizedLinear`) runs its own kernel with the same options, over any rows."""
    if isinstance(linear, CudaQuantizedLinear):
        linear.project(x, out, norm=norm, eps=eps, gated=gated, residual=residual, pdl=pdl)
        return
    n, k = linear.weight.shape
    n = n // 2 if gated else n
    bias = linear.bias
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)
    _projection[grid](
        x, linear.weight, out, norm if norm is not None else x, bias if bias is not None else x, n, k, eps,
        NORM=norm is not None, GATED=gated, BIAS=bias is not None, RESIDUAL=residual, PDL=pdl,
        **({"launch_pdl": True} if pdl else {}),
    )


def unsupported_reason(model: nn.Module, experts: bool = False) -> str | None:
    """Why `FusedDecodeStep` cannot run `model` (with `experts`: why `PagedDecodeStep`, which also runs float
    mixture-of-experts layers, cannot), or None when it can."""
    if not isinstance(model, Transformer) or not (model.is_first and model.is_last):
        return "not a whole Llama-family model"
    args = model.args
    if isinstance(model, GemmaTransformer):
        return "Gemma's layers (scaled embeddings, norms by 1 + weight, GeGLU MLPs, soft-capped logits)"
    attentions = [block.self_attn for block in cast("Iterable[Block]", model.layers)]
    if any(not attention.fused_kernels for attention in attentions):
        return "an attention of its own (gpt_oss's sinks)"
    if any(attention.window is not None for attention in attentions):
        return "sliding-window attention layers"
    if any(attention.scale is not None for attention in attentions):
        return "an attention scale other than head_dim ** -0.5"
    if args.has_experts and not experts:
        return "mixture-of-experts layers"
    mlps = [block.mlp for block in cast("Iterable[Block]", model.layers)]
    if any(not isinstance(mlp, SparseMoE) and not isinstance(getattr(mlp, "gate_up_proj", None), nn.Module)
           for mlp in mlps):
        return "an MLP it has no kernels for"
    if any(type(mlp.experts) not in (Experts, CudaInt4Experts) for mlp in mlps if isinstance(mlp, SparseMoE)):
        return "int8 or per-expert int4 experts"
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"weights in {dtype}"
    if args.head_dim < 16 or args.head_dim & (args.head_dim - 1):
        return f"head_dim {args.head_dim} is not a power of two"
    if args.rotary_dim != args.head_dim:  # its kernels turn every dim of a head
        return f"a partial rotary embedding ({args.rotary_dim} of head_dim {args.head_dim})"
    for name, param in model.named_parameters():
        if not param.is_contiguous():
            return f"{name} is not contiguous"
    sharded = is_sharded(model)
    if sharded and not experts:
        return "a tensor-parallel rank's share of the model (the paged step runs those)"
    if sharded and not isinstance(model.lm_head, VocabParallelHead):
        return "a tensor-parallel share without its vocabulary's lm_head"
    blocks = cast("Iterable[Block]", model.layers)
    # a tensor-parallel rank's share: its own linears (its lm_head's rows run as a matrix product)
    projections = [] if sharded else [model.lm_head]
    projections += [m for block in blocks for m in (block.self_attn.qkv_proj, local_linear(block.self_attn.o_proj))]
    projections += [m for block in blocks if not isinstance(block.mlp, SparseMoE)
                    for m in (block.mlp.gate_up_proj, local_linear(block.mlp.down_proj))]
    if any(type(m) is not nn.Linear and not isinstance(m, CudaQuantizedLinear) for m in projections):
        return "projections of a kind it has no kernel for"
    if len({isinstance(m, CudaQuantizedLinear) for m in projections}) > 1:
        return "float and quantised projections mixed"
    return None


def one_row_projections(model: Transformer, residual: bool = True) -> list[gemv_tuning.Projection]:
    """The int4 projections a one-sequence decode step of `model` launches, one entry a shape with every layer's
    weight (`residual`: o and down add into the hidden state, as they do but on a tensor-parallel rank)."""
    shapes: dict[tuple[int, int, int, bool], tuple[bool, bool, list[CudaInt4Linear]]] = {}
    for block in cast("Iterable[Block]", model.layers):
        attn, mlp = block.self_attn, block.mlp
        # (linear, the input's norm inside it, gated, the residual added into its output)
        uses = [(attn.qkv_proj, True, False, False), (local_linear(attn.o_proj), False, False, residual)]
        if not isinstance(mlp, SparseMoE):
            uses += [(mlp.gate_up_proj, True, True, False), (local_linear(mlp.down_proj), False, False, residual)]
        for linear, norm, gated, adds in uses:
            if isinstance(linear, CudaInt4Linear):
                n = linear.out_features // 2 if gated else linear.out_features
                shapes.setdefault((n, linear.in_features, linear.group_size, gated), (norm, adds, []))[2].append(linear)
    return [gemv_tuning.Projection(n, k, group, gated, norm, adds, tuple(layers))
            for (n, k, group, gated), (norm, adds, layers) in shapes.items()]


@torch.inference_mode()
def tune_one_row(model: Transformer, device: torch.device, residual: bool = True) -> None:
    """Choose the one-row int4 tilings of `model`'s projections for this GPU (`gemv_tuning`); on any failure the
    defaults stay, which always run."""
    projections = [p for p in one_row_projections(model, residual) if gemv_tuning.worth_timing(p, device)]
    if not projections:
        return
    try:
        gemv_tuning.tune(projections, device)
    except Exception as error:  # noqa: BLE001
        log.warning("keeping the default int4 tilings: timing them failed: %s: %s", type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "")


class FusedDecodeStep:
    """One decode step of `model` from the token and position in device buffers to last-position logits [1, V].

    The output and every intermediate live in buffers allocated here, so a CUDA graph can replay the step."""

    def __init__(self, model: Transformer, cache: StaticKVCache, token: torch.Tensor, position: torch.Tensor) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fused decode step cannot run this model: {reason}")
        args, device = model.args, token.device
        self.model, self.cache, self.token, self.position = model, cache, token, position
        self.dtype = next(model.parameters()).dtype
        self.heads, self.kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.eps = args.rms_norm_eps
        group = self.heads // self.kv_heads
        self.group_pad = max(2, triton.next_power_of_2(group))
        self.splits = 32 if cache.max_seq_len <= 4096 else 64
        self.block_t = 16
        self.pdl = pdl_available(device)
        self.launch = {"launch_pdl": True} if self.pdl else {}
        if device.type == "cuda":  # before the engine captures a graph of the step
            tune_one_row(model, device)
        self.line = 128 // cache.keys[0].element_size()  # elements of a 128-byte cache line
        cache_lines = self.block_t * self.head_dim // self.line
        self.prefetch_lines = triton.next_power_of_2(cache_lines) if self.pdl and cache_lines else 0
        model._rope(0, cache.max_seq_len, self.dtype)
        self.cos, self.sin = model._cos, model._sin  # held: the graph reads these addresses
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim

        def buffer(*shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype or self.dtype, device=device)

        self.hidden = buffer(1, args.hidden_size)
        self.qkv = buffer(q_dim + 2 * kv_dim)
        self.attention = buffer(q_dim)
        self.gated = buffer(args.intermediate_size)
        self.logits = buffer(1, args.vocab_size)
        self.part_acc = buffer(self.heads * self.splits, self.head_dim, dtype=torch.float32)
        self.part_max = buffer(self.heads * self.splits, dtype=torch.float32)
        self.part_sum = buffer(self.heads * self.splits, dtype=torch.float32)
        self.arrived = buffer(self.kv_heads, dtype=torch.int32)  # splits done, per key/value head (join_splits)

    def _project(self, x: torch.Tensor, linear: nn.Linear | CudaQuantizedLinear, out: torch.Tensor, norm: torch.Tensor | None = None,
                 gated: bool = False, residual: bool = False) -> None:
        project(x, linear, out, self.eps, self.pdl, norm, gated, residual)

    def _attend(self, layer: int, attention: Attention) -> None:
        qk_norm = attention.q_norm is not None
        q_norm = cast(RMSNorm, attention.q_norm).weight if qk_norm else self.cos  # k_norm exists with q_norm
        k_norm = cast(RMSNorm, attention.k_norm).weight if qk_norm else self.cos
        _attention_split[(self.kv_heads, self.splits)](
            self.qkv, self.cache.keys[layer], self.cache.values[layer], self.cos, self.sin, self.position,
            q_norm, k_norm, self.part_acc, self.part_max, self.part_sum, self.attention, self.arrived,
            self.cache.max_seq_len, self.eps,
            self.head_dim ** -0.5, HEADS=self.heads, KV_HEADS=self.kv_heads, D=self.head_dim,
            GROUP_PAD=self.group_pad, SPLITS=self.splits, BLOCK_T=self.block_t, QK_NORM=qk_norm, PDL=self.pdl,
            JOIN=JOIN_SPLITS, PREFETCH_LINES=self.prefetch_lines, LINE=self.line, num_warps=4, **self.launch,
        )

    def __call__(self, kv_len: int | None = None) -> torch.Tensor:
        """Logits [1, V] of the token in `token` at `position` (`kv_len` is unused: attention reads the position)."""
        model = self.model
        # a whole model (unsupported_reason): embedding, norm and lm_head all there
        assert model.embed_tokens is not None and model.norm is not None and model.lm_head is not None
        embed_rows(model.embed_tokens, self.token.view(1), self.hidden)
        for i, block in enumerate(cast("Iterable[Block]", model.layers)):
            attention, mlp = block.self_attn, block.mlp
            self._project(self.hidden, attention.qkv_proj, self.qkv, norm=block.input_layernorm.weight)
            self._attend(i, attention)
            self._project(self.attention, attention.o_proj, self.hidden, residual=True)
            self._project(self.hidden, mlp.gate_up_proj, self.gated, norm=block.post_attention_layernorm.weight,
                          gated=True)
            self._project(self.gated, mlp.down_proj, self.hidden, residual=True)
        self._project(self.hidden, cast("nn.Linear | CudaQuantizedLinear", model.lm_head), self.logits,
                      norm=model.norm.weight)  # as unsupported_reason checked
        return self.logits
