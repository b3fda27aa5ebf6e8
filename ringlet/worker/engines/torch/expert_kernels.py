"""A mixture-of-experts layer inside the CUDA decode step: routing and the chosen experts' products as Triton kernels
with fixed shapes, so a step of a few sequences is captured in a CUDA graph with the rest of the model.

Eager PyTorch sorts the token-expert pairs by expert and asks the host how many rows each expert got (`experts.py`):
a device-to-host copy every layer, which a graph cannot hold. Here every pair (a row and one of its `top_k` experts)
is a program that reads its expert's index from the device and that expert's weights from the stacked tensor, so the
shapes never depend on the routing:
  - `_route`: the router's softmax over all experts, the top k, their weights renormalised where the model says;
  - `_expert_gate_up`: program (n, p) computes SiLU(gate) * up of pair p's expert on rows n of its output;
  - `_expert_down`: program (n, r) sums, over row r's k experts, each one's down projection weighted by its routing
    weight, and adds the sum to the residual stream.
Int4 experts (`CudaInt4Experts`: each expert's codes, scales and offsets stacked) have kernels of their own that
unpack each word's codes as they read them (`_int4_step`). A pair reads its expert's weights whatever the other pairs
chose: at a batch of one every weight read is one the step needs (k experts of each layer); at larger batches pairs
sharing an expert read it again, mostly from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ringlet.models.moe import SparseMoE
from ringlet.models.quant_cuda import CudaInt4Experts


@triton.jit
def _route(logits_ptr, ids_ptr, weights_ptr, E, TOP_K: tl.constexpr, E_PAD: tl.constexpr, RENORM: tl.constexpr):
    """Program r: row r's experts (the top k of the softmax over its E router logits) and their weights, as
    `SparseMoE.route` chooses them (ties to the lower index)."""
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E_PAD)
    ok = e < E
    logit = tl.load(logits_ptr + row * E + e, mask=ok, other=float("-inf")).to(tl.float32)
    prob = tl.exp(logit - tl.max(logit, axis=0))
    prob = prob / tl.sum(prob, axis=0)
    left = tl.where(ok, prob, -1.0)
    place = tl.full([E_PAD], TOP_K, tl.int32)  # each expert's place among the chosen (TOP_K: not chosen)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(left, axis=0)
        tl.store(ids_ptr + row * TOP_K + j, best.to(tl.int32))
        place = tl.where(e == best, j, place)
        left = tl.where(e == best, -1.0, left)
    total = 1.0
    if RENORM:
        total = tl.sum(tl.where(place < TOP_K, prob, 0.0), axis=0)
    for j in tl.static_range(TOP_K):
        tl.store(weights_ptr + row * TOP_K + j, tl.sum(tl.where(place == j, prob, 0.0), axis=0) / total)


@triton.jit
def _expert_gate_up(x_ptr, w_ptr, ids_ptr, out_ptr, N, K, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """Program (n, p): out[p, rows n] = SiLU(gate) * up for pair p = (row p // TOP_K, its expert ids[p]); w is
    [E, 2N, K], each expert's gate rows, then its up rows. Rounded where eager rounds (the products, SiLU, the
    result)."""
    dtype = out_ptr.dtype.element_ty
    pair = tl.program_id(1).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    gate_rows = w_ptr + expert * 2 * N * K + rows.to(tl.int64)[:, None] * K
    up_rows = gate_rows + N * K
    x_row = x_ptr + (pair // TOP_K) * K
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + cols
        k_ok = kk < K
        tile = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_row + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        acc_gate += tl.load(gate_rows + kk[None, :], mask=tile, other=0.0).to(tl.float32) * x
        acc_up += tl.load(up_rows + kk[None, :], mask=tile, other=0.0).to(tl.float32) * x
    gate = tl.sum(acc_gate, axis=1).to(dtype).to(tl.float32)
    up = tl.sum(acc_up, axis=1).to(dtype).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    tl.store(out_ptr + pair * N + rows, (silu * up).to(dtype), mask=row_ok)


@triton.jit
def _expert_down(x_ptr, w_ptr, ids_ptr, weights_ptr, out_ptr, N, K, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Program (n, r): out[r, rows n] += sum over j < TOP_K of weights[p] * (W[ids[p]] @ x[p]), p = r * TOP_K + j;
    w is [E, N, K], x [pairs, K], out the residual stream [rows, N]. Each expert's product is rounded to the model's
    dtype before it is weighted, as eager rounds it."""
    dtype = out_ptr.dtype.element_ty
    row = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = row * TOP_K + j
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        w_rows = w_ptr + expert * N * K + rows.to(tl.int64)[:, None] * K
        x_row = x_ptr + pair * K
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + cols
            k_ok = kk < K
            x = tl.load(x_row + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            acc += tl.load(w_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32) * x
        product = tl.sum(acc, axis=1).to(dtype).to(tl.float32)
        total += product * tl.load(weights_ptr + pair)
    residual = tl.load(out_ptr + row * N + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + rows, (residual + total).to(dtype), mask=row_ok)


@triton.jit
def _int4_step(x_row, k0, words_ptr, scale_ptr, offset_ptr, rows, row_ok, K, GROUP: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K / 8]: x_row's columns k0 ... k0 + BLOCK_K times int4 weight rows `rows` (int64 rows of
    int32 words [*, K / 8], element 8w + i in nibble i of word w; fp16 scale and offset [*, K / GROUP]), a sum per
    word. No reshapes and no integer-to-float conversions: nibble i of every word is moved to bits 16-19 of the fp32
    128.0, which makes the number 128 + code exactly, and x's elements 8w + i are loaded as their own vector; each
    word's sum then takes 128 * sum(x) back out with its group's scale and offset."""
    W: tl.constexpr = BLOCK_K // 8
    w = k0 // 8 + tl.arange(0, W)
    words = tl.load(words_ptr + rows[:, None] * (K // 8) + w[None, :], mask=row_ok[:, None], other=0)
    dots = tl.zeros([BLOCK_N, W], dtype=tl.float32)
    x_sums = tl.zeros([W], dtype=tl.float32)
    for i in tl.static_range(8):
        x = tl.load(x_row + w * 8 + i).to(tl.float32)
        x_sums += x
        if i <= 4:
            bits = (words << (16 - 4 * i)) & 0xF0000
        else:
            bits = (words >> (4 * i - 16)) & 0xF0000
        dots += (bits | 0x43000000).to(tl.float32, bitcast=True) * x[None, :]
    at = rows[:, None] * (K // GROUP) + (w // (GROUP // 8))[None, :]
    scale = tl.load(scale_ptr + at, mask=row_ok[:, None], other=0.0).to(tl.float32)
    offset = tl.load(offset_ptr + at, mask=row_ok[:, None], other=0.0).to(tl.float32)
    return scale * dots + (offset - 128.0 * scale) * x_sums[None, :]


@triton.jit
def _int4_expert_gate_up(x_ptr, words_ptr, scale_ptr, offset_ptr, ids_ptr, out_ptr, N, K, TOP_K: tl.constexpr,
                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`_expert_gate_up` of int4 experts (`CudaInt4Experts`: words [E, 2N, K / 8], scale and offset
    [E, 2N, K / GROUP]); K a multiple of BLOCK_K, BLOCK_K of GROUP."""
    dtype = out_ptr.dtype.element_ty
    pair = tl.program_id(1).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    gate_rows = expert * 2 * N + rows
    x_row = x_ptr + (pair // TOP_K) * K
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc_gate += _int4_step(x_row, k0, words_ptr, scale_ptr, offset_ptr, gate_rows, row_ok, K, GROUP, BLOCK_N,
                               BLOCK_K)
        acc_up += _int4_step(x_row, k0, words_ptr, scale_ptr, offset_ptr, gate_rows + N, row_ok, K, GROUP, BLOCK_N,
                             BLOCK_K)
    gate = tl.sum(acc_gate, axis=1).to(dtype).to(tl.float32)
    up = tl.sum(acc_up, axis=1).to(dtype).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    tl.store(out_ptr + pair * N + rows, (silu * up).to(dtype), mask=row_ok)


@triton.jit
def _int4_expert_down(x_ptr, words_ptr, scale_ptr, offset_ptr, ids_ptr, weights_ptr, out_ptr, N, K,
                      TOP_K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`_expert_down` of int4 experts (words [E, N, K / 8], scale and offset [E, N, K / GROUP])."""
    dtype = out_ptr.dtype.element_ty
    row = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = row * TOP_K + j
        expert_rows = tl.load(ids_ptr + pair).to(tl.int64) * N + rows
        acc = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            acc += _int4_step(x_ptr + pair * K, k0, words_ptr, scale_ptr, offset_ptr, expert_rows, row_ok, K, GROUP,
                              BLOCK_N, BLOCK_K)
        product = tl.sum(acc, axis=1).to(dtype).to(tl.float32)
        total += product * tl.load(weights_ptr + pair)
    residual = tl.load(out_ptr + row * N + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + rows, (residual + total).to(dtype), mask=row_ok)


# tile sizes (python scripts/bench_moe_decode.py --sweep measures others)
GATE_UP_TILE = {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4}
DOWN_TILE = {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4}
# int4 experts (python scripts/bench_moe_decode.py --precision int4 --sweep); a BLOCK_K that does not divide K is
# halved until it does
INT4_GATE_UP_TILE = {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 2}
INT4_DOWN_TILE = {"BLOCK_N": 4, "BLOCK_K": 256, "num_warps": 2}


class ExpertBuffers:
    """The device buffers of a MoE layer's decode work for up to `rows` rows: router logits, each pair's expert and
    weight, each pair's gated activations. One set serves every layer (the layers run one after another)."""

    def __init__(self, moe: SparseMoE, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        experts, top_k = moe.router.shape[0], moe.top_k
        width = moe.experts.intermediate_size
        self.logits = torch.zeros(rows, experts, dtype=dtype, device=device)
        self.ids = torch.zeros(rows * top_k, dtype=torch.int32, device=device)
        self.weights = torch.zeros(rows * top_k, dtype=torch.float32, device=device)
        self.gated = torch.zeros(rows * top_k, width, dtype=dtype, device=device)


def moe_decode(moe: SparseMoE, normed: torch.Tensor, hidden: torch.Tensor, buffers: ExpertBuffers,
               gate_up_tile: dict[str, int] | None = None, down_tile: dict[str, int] | None = None) -> None:
    """hidden[r] += the MoE layer's output for normed[r] (the post-attention RMSNorm of hidden[r]), every row; float
    experts (`Experts`) or int4 ones (`CudaInt4Experts`)."""
    rows, hidden_size = normed.shape
    top_k, experts = moe.top_k, moe.router.shape[0]
    pairs = rows * top_k
    width = moe.experts.intermediate_size
    logits, ids, weights, gated = (buffers.logits[:rows], buffers.ids[:pairs], buffers.weights[:pairs],
                                   buffers.gated[:pairs])
    torch.mm(normed, moe.router.t(), out=logits)
    _route[(rows,)](logits, ids, weights, experts, TOP_K=top_k, E_PAD=triton.next_power_of_2(experts),
                    RENORM=moe.norm_topk_prob, num_warps=1)
    if isinstance(moe.experts, CudaInt4Experts):
        _int4_experts(moe.experts, normed, hidden, ids, weights, gated, top_k, gate_up_tile, down_tile)
        return
    tile = gate_up_tile or GATE_UP_TILE
    _expert_gate_up[(triton.cdiv(width, tile["BLOCK_N"]), pairs)](normed, moe.experts.gate_up_proj, ids, gated,
                                                                   width, hidden_size, TOP_K=top_k, **tile)
    tile = down_tile or DOWN_TILE
    _expert_down[(triton.cdiv(hidden_size, tile["BLOCK_N"]), rows)](gated, moe.experts.down_proj, ids, weights,
                                                                     hidden, hidden_size, width, TOP_K=top_k, **tile)


def _int4_experts(experts: CudaInt4Experts, normed: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor, gated: torch.Tensor, top_k: int, gate_up_tile: dict[str, int] | None,
                  down_tile: dict[str, int] | None) -> None:
    """`moe_decode`'s expert products for int4 experts: gated = SiLU(gate) * up per pair, then hidden += the
    weighted sum of each row's experts' down projections."""
    rows, hidden_size = normed.shape
    width, group = experts.intermediate_size, experts.group_size

    def fit(tile: dict[str, int], k: int) -> dict[str, int]:
        block_k = tile["BLOCK_K"]
        while block_k > group and (k % block_k or block_k % group):
            block_k //= 2
        if k % block_k or block_k % group:
            raise ValueError(f"int4 experts of {k} inputs in groups of {group}: no BLOCK_K divides both")
        return tile | {"BLOCK_K": block_k}

    tile = fit(gate_up_tile or INT4_GATE_UP_TILE, hidden_size)
    _int4_expert_gate_up[(triton.cdiv(width, tile["BLOCK_N"]), rows * top_k)](
        normed, experts.gate_up_packed.view(torch.int32), experts.gate_up_scale, experts.gate_up_offset, ids, gated,
        width, hidden_size, TOP_K=top_k, GROUP=group, **tile)
    tile = fit(down_tile or INT4_DOWN_TILE, width)
    _int4_expert_down[(triton.cdiv(hidden_size, tile["BLOCK_N"]), rows)](
        gated, experts.down_packed.view(torch.int32), experts.down_scale, experts.down_offset, ids, weights, hidden,
        hidden_size, width, TOP_K=top_k, GROUP=group, **tile)
