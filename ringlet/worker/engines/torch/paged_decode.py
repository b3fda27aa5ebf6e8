"""The CUDA decode step of a batch of sequences over the paged KV cache, replayed from one CUDA graph per batch size.

A decode step of B sequences reads every weight once whatever B is, so a batch of 64 costs little more than a
batch of one; what grows with B is the attention, which reads each sequence's own cached keys and values. Here:
  - attention is one Triton kernel over the block tables (program (b, g, s): sequence b's query heads that share
    key/value head g, over split s of its positions; it rotates the new query and key, writes the new key and value
    to the sequence's slot and attends to them from registers; the last split of each to finish joins the splits,
    and a sequence of one split needs no join);
  - at a batch of one the projections are the fused GEMV kernels of `fused_decode` (RMSNorm, bias, SiLU gate and
    the residual add inside them); at larger batches they are cuBLAS matrix products, the residual added in the
    product's epilogue (`addmm_`).
Rows beyond the live batch are padding: position 0, writing to the cache's scratch slot, never read back.

Batch sizes are bucketed (powers of two up to `max_batch`); each bucket's step is captured once, at warm-up. The
inputs of a step (token, position, slot and block table of each row) are one pinned host buffer copied to the
device in one transfer, and the graphs read them from fixed addresses.

A step that also carries prompt chunks runs on graphs of its own (`mixed` buckets, up to `max_rows` rows): each
token of a chunk is a row, at its own position over its sequence's block table, so the same attention kernel is
causal within the chunk. Such a step first writes every row's key and value to the cache (`_write_kv`), then
attends (a row reads the chunk's earlier tokens from the cache), and computes logits only for the rows that want
them: each sequence's last row, gathered in the steps' order.

A tensor-parallel rank's share of a model (`models/tensor_parallel.py`) runs the same kernels over its heads and
columns: its attention output and its MLP output are projected into a buffer of their own and all-reduced over the
ranks' group before the residual add, the embedding is its masked lookup summed over the ranks, and the logits its
vocabulary rows gathered from every rank; the collectives are captured in the graphs with the kernels (NCCL), so
every rank replays its graph and the ranks meet in them.

Every step also picks each row's greedy token (the argmax of its logits) on the device and copies the picks to the
host behind the step (`picks`). A row whose token id is given as `FED` takes the previous step's pick of the same
row: the host can launch the next step of greedy sequences before it has read their tokens, so the GPU does not
wait for the host between two steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import numpy as np
import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch import nn
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ringlet.models.kernels.int4_cuda import pdl_available
from ringlet.models.llama import Attention, Block, RMSNorm, Transformer
from ringlet.models.moe import SparseMoE
from ringlet.models.paged_cache import FED, PagedKVCache, SequenceStep
from ringlet.models.quant import embed_rows
from ringlet.models.quant_cuda import CudaQuantizedLinear
from ringlet.models.tensor_parallel import RowParallelLinear, is_sharded, local_linear
from ringlet.worker.engines.torch.expert_kernels import ExpertBuffers, moe_decode
from ringlet.worker.engines.torch.fused_decode import (
    _INTERPRETED,
    JOIN_SPLITS,
    _rotate,
    prefetch_l2,
    project,
    store_split,
    tune_one_row,
    unsupported_reason,
)

# cached positions one loop iteration of the attention reads (two blocks of 16): a Llama-3.1-8B int4 step at 256 and
# 4,064 positions took 1,731 and 1,993 us at 32, 1,753 and 2,062 at 64, 1,701 and 2,229 at 16 (joining 16 splits a
# step) on an H200 (`python scripts/tune_attention_gpu.py --tiles 64:8 32:8 16:16`)
POSITIONS_PER_TILE = 32
# attention programs a step aims for: splits per sequence fill the GPU at small batches (Triton's interpreter runs
# programs one at a time: there, a few splits a sequence)
TARGET_PROGRAMS = 64 if _INTERPRETED else 2048


@triton.jit
def _paged_attention_split(
    qkv_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, table_ptr, q_norm_ptr, k_norm_ptr,
    part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, count_ptr, table_width, eps, scale,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, GROUP_PAD: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK: tl.constexpr, TILE: tl.constexpr, QK_NORM: tl.constexpr, PDL: tl.constexpr, PRECISION: tl.constexpr,
    JOIN: tl.constexpr, ROW_LINES: tl.constexpr = 0,
):
    """Program (b, g, s): row b's query heads sharing key/value head g, over split s of its positions 0..pos.

    Cached position t of row b lives in slot table[b, t // BLOCK] * BLOCK + t % BLOCK; the cache is
    [slots, KV_HEADS, D]. The split holding `pos` rotates the new key, writes it and the value to slot_ptr[b] and
    attends to them from registers. The splits' partial softmaxes are joined into out [rows, HEADS * D] by the
    last split of (b, g) to finish (`join_splits`, count_ptr [rows, KV_HEADS]), as `fused_decode._attention_split`
    does for one sequence (JOIN splits a step of its loop); a row whose positions make one split writes out
    itself. ROW_LINES (with PDL): the 128-byte lines of one position's key (or value) of a head; the
    split asks the L2 cache for its cached keys and values before it waits for the q/k/v projection (earlier steps
    wrote them)."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    GROUP: tl.constexpr = HEADS // KV_HEADS
    HALF: tl.constexpr = D // 2
    ROW: tl.constexpr = (HEADS + 2 * KV_HEADS) * D
    pos = tl.load(pos_ptr + b)
    d = tl.arange(0, D)
    partner = (d + HALF) % D
    sign = tl.where(d < HALF, -1.0, 1.0)
    cos = tl.load(cos_ptr + pos * D + d).to(tl.float32)
    sin = tl.load(sin_ptr + pos * D + d).to(tl.float32)
    total = pos + 1
    chunk = tl.cdiv(total, SPLITS * TILE) * TILE
    begin = s * chunk
    end = tl.minimum(begin + chunk, total)
    cached_end = tl.minimum(end, pos)
    table = table_ptr + b.to(tl.int64) * table_width
    used = tl.cdiv(total, chunk)  # the splits that hold positions
    if PDL:
        gdc_launch_dependents()
    if s >= used:  # nothing to attend, nothing for the join to read
        return
    if PDL:
        if ROW_LINES > 0:  # the block table and the cached positions come from before the graph
            for t0 in range(begin, cached_end, TILE):
                t = tl.minimum(t0 + tl.arange(0, TILE), cached_end - 1)
                slot = tl.load(table + t // BLOCK).to(tl.int64) * BLOCK + t % BLOCK
                lines = (slot[:, None] * KV_HEADS + g) * D + (tl.arange(0, ROW_LINES) * (D // ROW_LINES))[None, :]
                prefetch_l2(k_cache_ptr + lines)
                prefetch_l2(v_cache_ptr + lines)
        gdc_wait()

    row = qkv_ptr + b.to(tl.int64) * ROW
    i = tl.arange(0, GROUP_PAD)
    heads = g * GROUP + tl.minimum(i, GROUP - 1)  # padding rows repeat the last head and are never stored
    q = _rotate(row + heads[:, None] * D, d[None, :], partner[None, :], sign[None, :], cos[None, :], sin[None, :],
                q_norm_ptr, eps, QK_NORM, D) * scale
    dtype = k_cache_ptr.dtype.element_ty
    q_tile = q.to(dtype)

    best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total_exp = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for t0 in range(begin, cached_end, TILE):
        t = t0 + tl.arange(0, TILE)
        t_ok = t < cached_end
        block = tl.load(table + t // BLOCK, mask=t_ok, other=0).to(tl.int64)
        slot = block * BLOCK + t % BLOCK
        offsets = (slot[:, None] * KV_HEADS + g) * D + d[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=t_ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=t_ok[:, None], other=0.0)
        # the query heads as the rows of two small matrix products (tensor cores; fp32 caches in full precision)
        scores = tl.dot(q_tile, tl.trans(k), input_precision=PRECISION)
        scores = tl.where(t_ok[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        alpha = tl.exp(best - new_best)
        p = tl.exp(scores - new_best[:, None])
        total_exp = total_exp * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=PRECISION)
        best = new_best
    if (begin <= pos) & (pos < end):
        k_new = _rotate(row + (HEADS + g) * D, d, partner, sign, cos, sin, k_norm_ptr, eps, QK_NORM, D)
        v_new = tl.load(row + (HEADS + KV_HEADS + g) * D + d).to(tl.float32)
        new = (tl.load(slot_ptr + b).to(tl.int64) * KV_HEADS + g) * D + d
        tl.store(k_cache_ptr + new, k_new.to(dtype))
        tl.store(v_cache_ptr + new, v_new.to(dtype))
        score = tl.sum(q * k_new[None, :], axis=1)
        new_best = tl.maximum(best, score)
        alpha = tl.exp(best - new_best)
        p = tl.exp(score - new_best)
        total_exp = total_exp * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new[None, :]
        best = new_best
    store_split(acc, best, total_exp, part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr,
                count_ptr + b * KV_HEADS + g, b * HEADS + heads, i < GROUP, s, used, SPLITS, D, JOIN)


@triton.jit
def _write_kv(qkv_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_norm_ptr, eps,
              HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, QK_NORM: tl.constexpr):
    """Program (r, g): row r's key of key/value head g (normalised and rotated, as `_paged_attention_split` does)
    and its value, into the row's cache slot."""
    r = tl.program_id(0)
    g = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    ROW: tl.constexpr = (HEADS + 2 * KV_HEADS) * D
    pos = tl.load(pos_ptr + r)
    d = tl.arange(0, D)
    partner = (d + HALF) % D
    sign = tl.where(d < HALF, -1.0, 1.0)
    cos = tl.load(cos_ptr + pos * D + d).to(tl.float32)
    sin = tl.load(sin_ptr + pos * D + d).to(tl.float32)
    row = qkv_ptr + r.to(tl.int64) * ROW
    dtype = k_cache_ptr.dtype.element_ty
    k = _rotate(row + (HEADS + g) * D, d, partner, sign, cos, sin, k_norm_ptr, eps, QK_NORM, D)
    v = tl.load(row + (HEADS + KV_HEADS + g) * D + d).to(tl.float32)
    new = (tl.load(slot_ptr + r).to(tl.int64) * KV_HEADS + g) * D + d
    tl.store(k_cache_ptr + new, k.to(dtype))
    tl.store(v_cache_ptr + new, v.to(dtype))


@triton.jit
def _rms_norm(x_ptr, weight_ptr, out_ptr, H, eps, BLOCK: tl.constexpr):
    """Program r: out[r] = RMSNorm(x[r]) * weight, in fp32, rounded once (one kernel where eager takes several)."""
    row = tl.program_id(0).to(tl.int64) * H
    h = tl.arange(0, BLOCK)
    ok = h < H
    x = tl.load(x_ptr + row + h, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(weight_ptr + h, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row + h, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_gate(gate_up_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """Program (r, c): out[r, cols] = SiLU(gate) * up, where row r of gate_up is [gate (N), up (N)]; rounded where
    eager rounds (SiLU's output, then the product)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * 2 * N + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * N + N + cols, mask=ok, other=0.0).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * N + cols, (silu * up).to(dtype), mask=ok)


@triton.jit
def _argmax_parts(x_ptr, top_ptr, first_ptr, n, row_stride, PARTS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (r, p): the largest of row r's elements [p * BLOCK, (p + 1) * BLOCK) of x [rows, n] and the first
    index holding it, into slot r * PARTS + p. NaN counts as the largest value, as torch.argmax has it."""
    r = tl.program_id(0)
    p = tl.program_id(1)
    i = p * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r.to(tl.int64) * row_stride + i, mask=i < n, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # noqa: PLR0124 (NaN, the one value unequal to itself)
    top = tl.max(x, axis=0)
    tl.store(top_ptr + r * PARTS + p, top)
    tl.store(first_ptr + r * PARTS + p, tl.min(tl.where((x == top) & (i < n), i, n), axis=0))


@triton.jit
def _argmax_join(top_ptr, first_ptr, out_ptr, n, count, PARTS: tl.constexpr):
    """Program r: row r's argmax (the first of equal maxima) from the maxima and first indices of its `count`
    parts."""
    r = tl.program_id(0)
    j = tl.arange(0, PARTS)
    top = tl.load(top_ptr + r * PARTS + j, mask=j < count, other=float("-inf"))
    first = tl.load(first_ptr + r * PARTS + j, mask=j < count, other=n)
    best = tl.max(top, axis=0)
    tl.store(out_ptr + r, tl.min(tl.where(top == best, first, n), axis=0).to(out_ptr.dtype.element_ty))


ARGMAX_BLOCK = 2048  # elements of a row one program of the greedy pick reduces


def greedy_picks(logits: torch.Tensor, out: torch.Tensor, parts: tuple[torch.Tensor, torch.Tensor]) -> None:
    """out[r] = the argmax of logits[r] (as torch.argmax: the first of equal maxima, NaN the largest) in two kernels:
    parts of ARGMAX_BLOCK elements in parallel, then a join a row (torch's argmax reduces a row in one block of
    threads). `parts` (`argmax_parts`) hold the parts' maxima and indices: the caller's buffers, which a CUDA graph
    can replay."""
    rows, n = logits.shape
    count = triton.cdiv(n, ARGMAX_BLOCK)
    padded = triton.next_power_of_2(count)
    top, first = parts
    _argmax_parts[(rows, count)](logits, top, first, n, logits.stride(0), PARTS=padded, BLOCK=ARGMAX_BLOCK, num_warps=4)
    _argmax_join[(rows,)](top, first, out, n, count, PARTS=padded, num_warps=4)


def argmax_parts(rows: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The buffers `greedy_picks` needs for up to `rows` rows of `n` logits."""
    size = rows * triton.next_power_of_2(triton.cdiv(n, ARGMAX_BLOCK))
    return torch.empty(size, device=device), torch.empty(size, dtype=torch.int32, device=device)


def batch_buckets(max_batch: int, least: int = 1) -> list[int]:
    """Batch sizes with a graph of their own: powers of two from `least` up to the first one holding `max_batch`."""
    buckets = [least]
    while buckets[-1] < max_batch:
        buckets.append(buckets[-1] * 2)
    return buckets


LEAST_MIXED_ROWS = 16  # the smallest bucket of a step with prompt chunks


class PagedDecodeStep:
    """Steps of a whole model over `cache` for up to `max_batch` sequences, one CUDA graph per bucket: decode steps,
    and steps with prompt chunks of up to `max_rows` tokens in all.

    `__call__(tokens, steps)` runs one step (token ids on the CPU, or `FED` in a decode step) and returns the logits
    [R, V] of the steps that want them, a view of a buffer the next step overwrites; `last_picks` are their greedy
    tokens, in the same order."""

    def __init__(self, model: Transformer, cache: PagedKVCache, context_length: int, max_batch: int,
                 max_rows: int = 0) -> None:
        reason = unsupported_reason(model, experts=True)
        if reason is not None:
            raise ValueError(f"the paged decode step cannot run this model: {reason}")
        args = model.args
        device = next(model.parameters()).device
        self.model, self.cache, self.device = model, cache, device
        self.dtype = next(model.parameters()).dtype
        self.quantized = isinstance(model.lm_head, CudaQuantizedLinear)
        first = cast(Block, model.layers[0])
        # this rank's heads and MLP columns (all of them, unsharded)
        self.heads, self.kv_heads, self.head_dim = first.self_attn.n_heads, model.kv_heads, args.head_dim
        self.sharded = is_sharded(model)
        self.group = cast(RowParallelLinear, first.self_attn.o_proj).group if self.sharded else None
        self.hidden_size = args.hidden_size
        self.intermediate = (local_linear(first.mlp.down_proj).in_features if self.sharded
                             else args.intermediate_size)
        self.eps = args.rms_norm_eps
        self.group_pad = max(16, triton.next_power_of_2(self.heads // self.kv_heads))  # a matrix product's least rows
        self.pdl = pdl_available(device)
        self.launch = {"launch_pdl": True} if self.pdl else {}
        self.row_lines = max(1, self.head_dim * cache.keys[0].element_size() // 128)  # of a head's key at a position
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.mixed_buckets = batch_buckets(max_rows, LEAST_MIXED_ROWS) if max_rows > 1 else []
        self.max_rows = max([self.max_batch, *self.mixed_buckets])
        self.table_width = -(-context_length // cache.block_size)
        model.prepare_positions(context_length)
        self.cos, self.sin = model._cos, model._sin  # held: the graphs read these addresses
        # token, position and slot of each row, the rows that want logits, then each row's block table
        size = self.max_rows * (3 + self.table_width) + self.max_batch
        # without a GPU (Triton's interpreter, in tests) the step runs eagerly, from the same buffers
        self.graphed = device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.int32)
        if self.graphed:
            self.host = self.host.pin_memory()
        self.inputs = torch.zeros(size, dtype=torch.int32, device=device)
        self.copied = torch.cuda.Event() if self.graphed else None
        self.picked = torch.zeros(self.max_batch, dtype=torch.long, device=device)  # the last step's greedy tokens
        # two host copies, a step's and its successor's: the host reads one step's picks after launching the next
        self._pick_copies = [Picks(self.max_batch, self.graphed) for _ in range(2)]
        self.last_picks: Picks | None = None
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        n = self.max_rows

        def buffer(*shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype or self.dtype, device=device)

        self.hidden = buffer(n, args.hidden_size)
        self.partial = buffer(n, args.hidden_size) if self.sharded else self.hidden  # a rank's share, then the sum
        self.qkv = buffer(n, q_dim + 2 * kv_dim)
        self.attention = buffer(n, q_dim)
        self.gated = buffer(n, self.intermediate)
        self.logits = buffer(self.max_batch, args.vocab_size)
        self.argmax_parts = argmax_parts(self.max_batch, args.vocab_size, device)
        sparse = [block.mlp for block in cast("Iterable[Block]", model.layers) if isinstance(block.mlp, SparseMoE)]
        self.experts = ExpertBuffers(sparse[0], n, self.dtype, device) if sparse else None
        most_parts = self.heads * max(b * self._splits(b) for b in self.buckets + self.mixed_buckets)
        self.part_acc = buffer(most_parts, self.head_dim, dtype=torch.float32)
        self.part_max = buffer(most_parts, dtype=torch.float32)
        self.part_sum = buffer(most_parts, dtype=torch.float32)
        self.arrived = buffer(n, self.kv_heads, dtype=torch.int32)  # splits done, per row and key/value head
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # by (bucket, mixed)

    def _splits(self, batch: int) -> int:
        """Splits of each sequence's positions: enough programs to fill the GPU, a power of two from 1 to 64."""
        return min(64, triton.next_power_of_2(max(1, TARGET_PROGRAMS // (batch * self.kv_heads))))

    def _views(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens, positions, slots [rows], the rows that want logits [max_batch] and tables [rows, width] of the
        device inputs."""
        n, w, m = self.max_rows, self.table_width, self.max_batch
        return (self.inputs[:rows], self.inputs[n:n + rows], self.inputs[2 * n:2 * n + rows],
                self.inputs[3 * n:3 * n + m], self.inputs[3 * n + m:3 * n + m + rows * w].view(rows, w))

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def mixed_bucket(self, rows: int) -> int:
        return next(b for b in self.mixed_buckets if b >= rows)

    def takes(self, steps: Sequence[SequenceStep]) -> bool:
        """A step over `steps` runs on a graph: a decode step of at most `max_batch` sequences, or one with prompt
        chunks of at most `max_rows` tokens in all."""
        if len(steps) > self.max_batch:
            return False
        if all(s.count == 1 and s.wants_logits for s in steps):
            return True
        return bool(self.mixed_buckets) and sum(s.count for s in steps) <= self.mixed_buckets[-1]

    def _run(self, batch: int, mixed: bool = False) -> None:
        """The step of a `batch`-row bucket, from the device inputs to `self.logits` (a decode step: `[:batch]`; a
        mixed one: one row for each of the first min(batch, max_batch) rows that want logits)."""
        model = self.model
        assert model.embed_tokens is not None and model.norm is not None and model.lm_head is not None
        tokens, positions, slots, wanted, tables = self._views(batch)
        hidden, qkv = self.hidden[:batch], self.qkv[:batch]
        attention, gated, logits = self.attention[:batch], self.gated[:batch], self.logits[:batch]
        if not mixed:  # only a decode step follows on from the previous one's picks, row for row
            tokens = torch.where(tokens == FED, self.picked[:batch], tokens)
        if self.sharded:  # this rank's vocabulary rows, summed over the ranks
            hidden.copy_(model.embed_tokens(tokens))
        else:
            embed_rows(model.embed_tokens, tokens, hidden)
        splits = self._splits(batch)
        # the GEMV kernels at a batch of one; a quantised model's kernels at any batch (they take many rows)
        fused = batch == 1 or self.quantized
        pdl = self.pdl and batch == 1
        for i, block in enumerate(cast("Iterable[Block]", model.layers)):
            attn, mlp = block.self_attn, block.mlp
            if fused:
                project(hidden, attn.qkv_proj, qkv, self.eps, pdl, norm=block.input_layernorm.weight)
            else:
                normed = self._norm(hidden, block.input_layernorm.weight)
                if attn.qkv_proj.bias is not None:
                    torch.addmm(attn.qkv_proj.bias, normed, attn.qkv_proj.weight.t(), out=qkv)
                else:
                    torch.mm(normed, attn.qkv_proj.weight.t(), out=qkv)
            if mixed:  # a row reads its chunk's earlier keys and values from the cache
                _write_kv[(batch, self.kv_heads)](
                    self.qkv, self.cache.keys[i], self.cache.values[i], self.cos, self.sin, positions, slots,
                    self._k_norm(attn), self.eps, HEADS=self.heads, KV_HEADS=self.kv_heads, D=self.head_dim,
                    QK_NORM=attn.q_norm is not None, num_warps=1)
            self._attend(i, attn, batch, splits, positions, slots, tables)
            o_proj = local_linear(attn.o_proj)
            if self.sharded:
                self._reduced(attention, o_proj, hidden, fused, pdl)
            elif fused:
                project(attention, o_proj, hidden, self.eps, pdl, residual=True)
            else:
                hidden.addmm_(attention, o_proj.weight.t())
            if isinstance(mlp, SparseMoE):
                assert self.experts is not None  # made for a model with sparse layers
                moe_decode(mlp, self._norm(hidden, block.post_attention_layernorm.weight), hidden, self.experts)
            else:
                down = local_linear(mlp.down_proj)
                if fused:
                    project(hidden, mlp.gate_up_proj, gated, self.eps, pdl,
                            norm=block.post_attention_layernorm.weight, gated=True)
                else:
                    gate_up = torch.mm(self._norm(hidden, block.post_attention_layernorm.weight),
                                       mlp.gate_up_proj.weight.t())
                    _silu_gate[(batch, triton.cdiv(self.intermediate, 1024))](gate_up, gated, self.intermediate,
                                                                              BLOCK=1024, num_warps=4)
                if self.sharded:
                    self._reduced(gated, down, hidden, fused, pdl)
                elif fused:
                    project(gated, down, hidden, self.eps, pdl, residual=True)
                else:
                    hidden.addmm_(gated, down.weight.t())
        head = cast("nn.Linear | CudaQuantizedLinear", model.lm_head)  # as the constructor checked
        if mixed:
            sampled = min(batch, self.max_batch)
            last = torch.index_select(hidden, 0, wanted[:sampled])
            if self.sharded:  # every rank's vocabulary rows, gathered
                self.logits[:sampled].copy_(model.lm_head(self._norm(last, model.norm.weight)))
            elif self.quantized:
                project(last, head, self.logits[:sampled], self.eps, False, norm=model.norm.weight)
            else:
                torch.mm(self._norm(last, model.norm.weight), cast(nn.Linear, head).weight.t(), out=self.logits[:sampled])
            greedy_picks(self.logits[:sampled], self.picked[:sampled], self.argmax_parts)
            return
        if self.sharded:
            logits.copy_(model.lm_head(self._norm(hidden, model.norm.weight)))
        elif fused:
            project(hidden, head, logits, self.eps, pdl, norm=model.norm.weight)
        else:
            torch.mm(self._norm(hidden, model.norm.weight), cast(nn.Linear, head).weight.t(), out=logits)
        greedy_picks(logits, self.picked[:batch], self.argmax_parts)

    def _reduced(self, x: torch.Tensor, linear: nn.Linear, hidden: torch.Tensor, fused: bool, pdl: bool) -> None:
        """hidden += the sum over the ranks of x @ linear (each rank's share of a row-parallel projection)."""
        partial = self.partial[:x.shape[0]]
        if fused:
            project(x, linear, partial, self.eps, pdl)
        else:
            torch.mm(x, linear.weight.t(), out=partial)
        dist.all_reduce(partial, group=self.group)
        hidden.add_(partial)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        _rms_norm[(x.shape[0],)](x, weight, out, self.hidden_size, self.eps,
                                 BLOCK=triton.next_power_of_2(self.hidden_size), num_warps=8)
        return out

    def _k_norm(self, attention: Attention) -> torch.Tensor:
        """The key norm's weight, or any tensor where the model has none (the kernels then leave it unread)."""
        return cast(RMSNorm, attention.k_norm).weight if attention.k_norm is not None else self.cos

    def _attend(self, layer: int, attention: Attention, batch: int, splits: int, positions: torch.Tensor,
                slots: torch.Tensor, tables: torch.Tensor) -> None:
        qk_norm = attention.q_norm is not None
        q_norm = cast(RMSNorm, attention.q_norm).weight if qk_norm else self.cos  # k_norm exists with q_norm
        k_norm = self._k_norm(attention)
        # PDL only where the neighbours are this module's kernels (a batch of one)
        pdl = self.pdl and batch == 1
        launch = self.launch if pdl else {}
        _paged_attention_split[(batch, self.kv_heads, splits)](
            self.qkv, self.cache.keys[layer], self.cache.values[layer], self.cos, self.sin, positions, slots, tables,
            q_norm, k_norm, self.part_acc, self.part_max, self.part_sum, self.attention, self.arrived,
            self.table_width, self.eps,
            self.head_dim ** -0.5, HEADS=self.heads, KV_HEADS=self.kv_heads, D=self.head_dim,
            GROUP_PAD=self.group_pad, SPLITS=splits, BLOCK=self.cache.block_size, TILE=POSITIONS_PER_TILE,
            QK_NORM=qk_norm, PDL=pdl, PRECISION="ieee" if self.dtype == torch.float32 else "tf32",
            ROW_LINES=self.row_lines if pdl else 0, JOIN=JOIN_SPLITS, num_warps=4, **launch,
        )

    def _stage(self, tokens: torch.Tensor, steps: Sequence[SequenceStep], bucket: int) -> None:
        """Write the step's inputs into the host buffer (a row for each token) and copy them to the device."""
        if self.copied is not None:
            self.copied.synchronize()  # the previous copy has left the host buffer
        n, w, m, block_size = self.max_rows, self.table_width, self.max_batch, self.cache.block_size
        host = self.host.numpy()
        rows = len(tokens)
        host[:rows] = tokens.numpy()
        host[rows:bucket] = 0
        host[2 * n + rows:2 * n + bucket] = self.cache.scratch_slot
        host[n + rows:n + bucket] = 0  # padding rows: position 0, the scratch slot
        tables = host[3 * n + m:3 * n + m + bucket * w].reshape(bucket, w)
        row, wanted = 0, []
        for step in steps:
            positions = np.arange(step.start, step.start + step.count)
            blocks = np.asarray(step.blocks)
            host[n + row:n + row + step.count] = positions
            host[2 * n + row:2 * n + row + step.count] = blocks[positions // block_size] * block_size + (
                positions % block_size)
            tables[row:row + step.count, :len(blocks)] = blocks
            row += step.count
            if step.wants_logits:
                wanted.append(row - 1)
        host[3 * n:3 * n + len(wanted)] = wanted
        host[3 * n + len(wanted):3 * n + m] = 0
        used = 3 * n + m + bucket * w
        self.inputs[:used].copy_(self.host[:used], non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def capture(self, bucket: int, mixed: bool = False) -> None:
        """Record the graph of a bucket (warmed up first on a side stream, as CUDA graphs require)."""
        if (bucket, mixed) in self.graphs:
            return
        n, m = self.max_rows, self.max_batch
        self.inputs[:2 * n].zero_()  # warm-up rows: token 0 at position 0, written to the scratch slot only
        self.inputs[2 * n:3 * n].fill_(self.cache.scratch_slot)
        self.inputs[3 * n:3 * n + m].zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._run(bucket, mixed)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values())).pool() if self.graphs else None
        with torch.cuda.graph(graph, pool=pool):
            self._run(bucket, mixed)
        self.graphs[bucket, mixed] = graph

    def tune(self) -> None:
        """Choose the one-row int4 tilings for this GPU before any graph holds a launch of them."""
        if self.quantized and self.graphed:
            tune_one_row(self.model, self.device, residual=not self.sharded)

    @torch.inference_mode()
    def warm(self) -> None:
        """Choose the int4 tilings, then capture every bucket, largest first (its memory pool then serves the
        others)."""
        self.tune()
        for bucket, mixed in sorted([(b, True) for b in self.mixed_buckets] + [(b, False) for b in self.buckets],
                                    reverse=True):
            self.capture(bucket, mixed)
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def replay_ms(self, batch: int, repeats: int = 20) -> float:
        """GPU time of one step of `batch`'s bucket, its graph replayed back to back over the inputs of the last
        step (a benchmark's: the host's part of a step is what the serving loop adds to this). The replays write
        the last step's slots again; call it only when no sequence is running."""
        graph = self.graphs[self.bucket(batch), False]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, steps: Sequence[SequenceStep]) -> torch.Tensor:
        mixed = not all(s.count == 1 and s.wants_logits for s in steps)
        bucket = self.mixed_bucket(len(tokens)) if mixed else self.bucket(len(steps))
        if self.graphed:
            self.capture(bucket, mixed)  # before the inputs are staged: a capture's runs overwrite them
            self._stage(tokens, steps, bucket)
            self.graphs[bucket, mixed].replay()
        else:
            self._stage(tokens, steps, bucket)
            self._run(bucket, mixed)
        sampled = sum(s.wants_logits for s in steps)
        picks = self._pick_copies[self._pick_copies[0] is self.last_picks]
        picks.fetch(self.picked, sampled)
        self.last_picks = picks
        return self.logits[:sampled]


class Picks:
    """A step's greedy tokens on their way to the host, behind the step."""

    def __init__(self, size: int, pinned: bool) -> None:
        self.host = torch.zeros(size, dtype=torch.long)
        self.copied: torch.cuda.Event | None = None
        if pinned:
            self.host, self.copied = self.host.pin_memory(), torch.cuda.Event()
        self.rows = 0

    def fetch(self, picked: torch.Tensor, rows: int) -> None:
        self.host[:rows].copy_(picked[:rows], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        self.rows = rows

    def tokens(self) -> list[int]:
        """Each row's token, once its step has run (waiting for that step alone)."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host[:self.rows].tolist()

