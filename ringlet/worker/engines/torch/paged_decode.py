"""The CUDA decode step of a batch of sequences over the paged KV cache, replayed from one CUDA graph per batch size.

A decode step of B sequences reads every weight once whatever B is, so a batch of 64 costs little more than a
batch of one; what grows with B is the attention, which reads each sequence's own cached keys and values. Here:
  - attention is one Triton kernel over the block tables (program (b, g, s): sequence b's query heads that share
    key/value head g, over split s of its positions; it rotates the new query and key, writes the new key and value
    to the sequence's slot and attends to them from registers), then `_attention_combine` joins the splits;
  - at a batch of one the projections are the fused GEMV kernels of `fused_decode` (RMSNorm, bias, SiLU gate and
    the residual add inside them); at larger batches they are cuBLAS matrix products, the residual added in the
    product's epilogue (`addmm_`).
Rows beyond the live batch are padding: position 0, writing to the cache's scratch slot, never read back.

Batch sizes are bucketed (powers of two up to `max_batch`); each bucket's step is captured once, at warm-up. The
inputs of a step (token, position, slot and block table of each row) are one pinned host buffer copied to the
device in one transfer, and the graphs read them from fixed addresses.

Every step also picks each row's greedy token (the argmax of its logits) on the device and copies the picks to the
host behind the step (`picks`). A row whose token id is given as `FED` takes the previous step's pick of the same
row: the host can launch the next step of greedy sequences before it has read their tokens, so the GPU does not
wait for the host between two steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ringlet.models.llama import Attention, Block, RMSNorm, Transformer
from ringlet.models.paged_cache import FED, PagedKVCache, SequenceStep
from ringlet.worker.engines.torch.fused_decode import (
    _attention_combine,
    _pdl_available,
    _rotate,
    project,
    unsupported_reason,
)

POSITIONS_PER_TILE = 64  # cached positions one loop iteration of the attention reads (four blocks of 16)
TARGET_PROGRAMS = 2048  # attention programs a step aims for: splits per sequence fill the GPU at small batches


@triton.jit
def _paged_attention_split(
    qkv_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, table_ptr, q_norm_ptr, k_norm_ptr,
    part_acc_ptr, part_max_ptr, part_sum_ptr, table_width, eps, scale,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, GROUP_PAD: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK: tl.constexpr, TILE: tl.constexpr, QK_NORM: tl.constexpr, PDL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (b, g, s): row b's query heads sharing key/value head g, over split s of its positions 0..pos.

    Cached position t of row b lives in slot table[b, t // BLOCK] * BLOCK + t % BLOCK; the cache is
    [slots, KV_HEADS, D]. The split holding `pos` rotates the new key, writes it and the value to slot_ptr[b] and
    attends to them from registers. Each split leaves its running maximum, sum of exponentials and unnormalised
    output for `_attention_combine` (as `fused_decode._attention_split` does for one sequence)."""
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
    if PDL:
        gdc_launch_dependents()
        gdc_wait()

    row = qkv_ptr + b.to(tl.int64) * ROW
    i = tl.arange(0, GROUP_PAD)
    heads = g * GROUP + tl.minimum(i, GROUP - 1)  # padding rows repeat the last head and are never stored
    q = _rotate(row + heads[:, None] * D, d[None, :], partner[None, :], sign[None, :], cos[None, :], sin[None, :],
                q_norm_ptr, eps, QK_NORM, D) * scale
    dtype = k_cache_ptr.dtype.element_ty
    q_tile = q.to(dtype)

    total = pos + 1
    chunk = tl.cdiv(total, SPLITS * TILE) * TILE
    begin = s * chunk
    end = tl.minimum(begin + chunk, total)
    cached_end = tl.minimum(end, pos)
    table = table_ptr + b.to(tl.int64) * table_width
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
    stored = i < GROUP
    part = (b * HEADS + heads) * SPLITS + s
    tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=stored[:, None])
    tl.store(part_max_ptr + part, best, mask=stored)
    tl.store(part_sum_ptr + part, total_exp, mask=stored)


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


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a graph of their own: powers of two up to the first one holding `max_batch`."""
    buckets = [1]
    while buckets[-1] < max_batch:
        buckets.append(buckets[-1] * 2)
    return buckets


class PagedDecodeStep:
    """Decode steps of a whole model over `cache` for up to `max_batch` sequences, one CUDA graph per bucket.

    `__call__(tokens, steps)` runs one step (every step decodes one token; token ids on the CPU, or `FED`) and returns
    logits [B, V], a view of a buffer the next step overwrites; `picks(rows)` are the step's greedy tokens."""

    def __init__(self, model: Transformer, cache: PagedKVCache, context_length: int, max_batch: int) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the paged decode step cannot run this model: {reason}")
        args = model.args
        device = next(model.parameters()).device
        self.model, self.cache, self.device = model, cache, device
        self.dtype = next(model.parameters()).dtype
        self.heads, self.kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.hidden_size, self.intermediate = args.hidden_size, args.intermediate_size
        self.eps = args.rms_norm_eps
        self.group_pad = max(16, triton.next_power_of_2(self.heads // self.kv_heads))  # a matrix product's least rows
        self.pdl = _pdl_available(device)
        self.launch = {"launch_pdl": True} if self.pdl else {}
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.table_width = -(-context_length // cache.block_size)
        model.prepare_positions(context_length)
        self.cos, self.sin = model._cos, model._sin  # held: the graphs read these addresses
        width = 3 + self.table_width  # token, position, slot, then the block table
        # without a GPU (Triton's interpreter, in tests) the step runs eagerly, from the same buffers
        self.graphed = device.type == "cuda"
        self.host = torch.zeros(self.max_batch * width, dtype=torch.int32)
        if self.graphed:
            self.host = self.host.pin_memory()
        self.inputs = torch.zeros(self.max_batch * width, dtype=torch.int32, device=device)
        self.copied = torch.cuda.Event() if self.graphed else None
        self.picked = torch.zeros(self.max_batch, dtype=torch.long, device=device)  # the last step's greedy tokens
        # two host copies, a step's and its successor's: the host reads one step's picks after launching the next
        self._pick_copies = [Picks(self.max_batch, self.graphed) for _ in range(2)]
        self.last_picks: Picks | None = None
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        n = self.max_batch

        def buffer(*shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype or self.dtype, device=device)

        self.hidden = buffer(n, args.hidden_size)
        self.qkv = buffer(n, q_dim + 2 * kv_dim)
        self.attention = buffer(n, q_dim)
        self.gated = buffer(n, args.intermediate_size)
        self.logits = buffer(n, args.vocab_size)
        most_parts = n * self.heads * self._splits(1)
        self.part_acc = buffer(most_parts, self.head_dim, dtype=torch.float32)
        self.part_max = buffer(most_parts, dtype=torch.float32)
        self.part_sum = buffer(most_parts, dtype=torch.float32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _splits(self, batch: int) -> int:
        """Splits of each sequence's positions: enough programs to fill the GPU, a power of two from 1 to 64."""
        return min(64, triton.next_power_of_2(max(1, TARGET_PROGRAMS // (batch * self.kv_heads))))

    def _views(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens, positions, slots [batch] and tables [batch, width] of the device inputs."""
        n, w = self.max_batch, self.table_width
        return (self.inputs[:batch], self.inputs[n:n + batch], self.inputs[2 * n:2 * n + batch],
                self.inputs[3 * n:3 * n + batch * w].view(batch, w))

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def _run(self, batch: int) -> None:
        """The step of a `batch`-row bucket, from the device inputs to `self.logits[:batch]`."""
        model = self.model
        assert model.embed_tokens is not None and model.norm is not None and model.lm_head is not None
        tokens, positions, slots, tables = self._views(batch)
        hidden, qkv = self.hidden[:batch], self.qkv[:batch]
        attention, gated, logits = self.attention[:batch], self.gated[:batch], self.logits[:batch]
        tokens = torch.where(tokens == FED, self.picked[:batch], tokens)
        torch.index_select(model.embed_tokens.weight, 0, tokens, out=hidden)
        splits = self._splits(batch)
        for i, block in enumerate(cast("Iterable[Block]", model.layers)):
            attn, mlp = block.self_attn, block.mlp
            if batch == 1:
                project(hidden, attn.qkv_proj, qkv, self.eps, self.pdl, norm=block.input_layernorm.weight)
            else:
                normed = self._norm(hidden, block.input_layernorm.weight)
                if attn.qkv_proj.bias is not None:
                    torch.addmm(attn.qkv_proj.bias, normed, attn.qkv_proj.weight.t(), out=qkv)
                else:
                    torch.mm(normed, attn.qkv_proj.weight.t(), out=qkv)
            self._attend(i, attn, batch, splits, positions, slots, tables)
            if batch == 1:
                project(attention, attn.o_proj, hidden, self.eps, self.pdl, residual=True)
                project(hidden, mlp.gate_up_proj, gated, self.eps, self.pdl,
                        norm=block.post_attention_layernorm.weight, gated=True)
                project(gated, mlp.down_proj, hidden, self.eps, self.pdl, residual=True)
            else:
                hidden.addmm_(attention, attn.o_proj.weight.t())
                gate_up = torch.mm(self._norm(hidden, block.post_attention_layernorm.weight),
                                   mlp.gate_up_proj.weight.t())
                _silu_gate[(batch, triton.cdiv(self.intermediate, 1024))](gate_up, gated, self.intermediate,
                                                                          BLOCK=1024, num_warps=4)
                hidden.addmm_(gated, mlp.down_proj.weight.t())
        if batch == 1:
            project(hidden, model.lm_head, logits, self.eps, self.pdl, norm=model.norm.weight)
        else:
            torch.mm(self._norm(hidden, model.norm.weight), model.lm_head.weight.t(), out=logits)
        torch.argmax(logits, dim=-1, out=self.picked[:batch])

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        _rms_norm[(x.shape[0],)](x, weight, out, self.hidden_size, self.eps,
                                 BLOCK=triton.next_power_of_2(self.hidden_size), num_warps=8)
        return out

    def _attend(self, layer: int, attention: Attention, batch: int, splits: int, positions: torch.Tensor,
                slots: torch.Tensor, tables: torch.Tensor) -> None:
        qk_norm = attention.q_norm is not None
        q_norm = cast(RMSNorm, attention.q_norm).weight if qk_norm else self.cos  # k_norm exists with q_norm
        k_norm = cast(RMSNorm, attention.k_norm).weight if qk_norm else self.cos
        # PDL only where the neighbours are this module's kernels (a batch of one)
        pdl = self.pdl and batch == 1
        launch = self.launch if pdl else {}
        _paged_attention_split[(batch, self.kv_heads, splits)](
            self.qkv, self.cache.keys[layer], self.cache.values[layer], self.cos, self.sin, positions, slots, tables,
            q_norm, k_norm, self.part_acc, self.part_max, self.part_sum, self.table_width, self.eps,
            self.head_dim ** -0.5, HEADS=self.heads, KV_HEADS=self.kv_heads, D=self.head_dim,
            GROUP_PAD=self.group_pad, SPLITS=splits, BLOCK=self.cache.block_size, TILE=POSITIONS_PER_TILE,
            QK_NORM=qk_norm, PDL=pdl, PRECISION="ieee" if self.dtype == torch.float32 else "tf32", num_warps=4,
            **launch,
        )
        _attention_combine[(batch * self.heads,)](self.part_acc, self.part_max, self.part_sum, self.attention,
                                                  SPLITS=splits, D=self.head_dim, PDL=pdl, num_warps=4, **launch)

    def _stage(self, tokens: torch.Tensor, steps: Sequence[SequenceStep], bucket: int) -> None:
        """Write the step's inputs into the host buffer and copy them to the device."""
        if self.copied is not None:
            self.copied.synchronize()  # the previous copy has left the host buffer
        n, w = self.max_batch, self.table_width
        host = self.host.numpy()
        batch = len(steps)
        host[:batch] = tokens.tolist()
        host[batch:bucket] = 0
        host[n:n + batch] = [s.start for s in steps]
        host[n + batch:n + bucket] = 0
        host[2 * n:2 * n + batch] = [s.slot(s.start, self.cache.block_size) for s in steps]
        host[2 * n + batch:2 * n + bucket] = self.cache.scratch_slot
        tables = host[3 * n:3 * n + bucket * w].reshape(bucket, w)
        for row, step in enumerate(steps):
            tables[row, :len(step.blocks)] = step.blocks
        used = 3 * n + bucket * w
        self.inputs[:used].copy_(self.host[:used], non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def capture(self, batch: int) -> None:
        """Record the graph of `batch`'s bucket (warmed up first on a side stream, as CUDA graphs require)."""
        bucket = self.bucket(batch)
        if bucket in self.graphs:
            return
        n = self.max_batch
        self.inputs[n:2 * n].zero_()  # warm-up rows: position 0, written to the scratch slot only
        self.inputs[2 * n:3 * n].fill_(self.cache.scratch_slot)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._run(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values())).pool() if self.graphs else None
        with torch.cuda.graph(graph, pool=pool):
            self._run(bucket)
        self.graphs[bucket] = graph

    @torch.inference_mode()
    def warm(self) -> None:
        """Capture every bucket, largest first (its memory pool then serves the others)."""
        for bucket in reversed(self.buckets):
            self.capture(bucket)
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def replay_ms(self, batch: int, repeats: int = 20) -> float:
        """GPU time of one step of `batch`'s bucket, its graph replayed back to back over the inputs of the last
        step (a benchmark's: the host's part of a step is what the serving loop adds to this). The replays write
        the last step's slots again; call it only when no sequence is running."""
        graph = self.graphs[self.bucket(batch)]
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
        batch = len(steps)
        bucket = self.bucket(batch)
        if self.graphed:
            self.capture(bucket)  # before the inputs are staged: a capture's runs overwrite them
            self._stage(tokens, steps, bucket)
            self.graphs[bucket].replay()
        else:
            self._stage(tokens, steps, bucket)
            self._run(bucket)
        picks = self._pick_copies[self._pick_copies[0] is self.last_picks]
        picks.fetch(self.picked, batch)
        self.last_picks = picks
        return self.logits[:batch]


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

