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
A pair reads its expert's weights whatever the other pairs chose: at a batch of one every weight read is one the step
needs (k experts of each layer); at larger batches pairs sharing an expert read it again, mostly from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ringlet.models.moe import SparseMoE


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


# tile sizes (python scripts/bench_moe_decode.py --sweep measures others)
GATE_UP_TILE = {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4}
DOWN_TILE = {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4}


class ExpertBuffers:
    """The device buffers of a MoE layer's decode work for up to `rows` rows: router logits, each pair's expert and
    weight, each pair's gated activations. One set serves every layer (the layers run one after another)."""

    def __init__(self, moe: SparseMoE, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        experts, top_k = moe.router.shape[0], moe.top_k
        width = moe.experts.down_proj.shape[-1]
        self.logits = torch.zeros(rows, experts, dtype=dtype, device=device)
        self.ids = torch.zeros(rows * top_k, dtype=torch.int32, device=device)
        self.weights = torch.zeros(rows * top_k, dtype=torch.float32, device=device)
        self.gated = torch.zeros(rows * top_k, width, dtype=dtype, device=device)


def moe_decode(moe: SparseMoE, normed: torch.Tensor, hidden: torch.Tensor, buffers: ExpertBuffers,
               gate_up_tile: dict[str, int] | None = None, down_tile: dict[str, int] | None = None) -> None:
    """hidden[r] += the MoE layer's output for normed[r] (the post-attention RMSNorm of hidden[r]), every row."""
    rows, hidden_size = normed.shape
    top_k, experts = moe.top_k, moe.router.shape[0]
    pairs = rows * top_k
    gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj
    width = down.shape[-1]
    logits, ids, weights, gated = (buffers.logits[:rows], buffers.ids[:pairs], buffers.weights[:pairs],
                                   buffers.gated[:pairs])
    torch.mm(normed, moe.router.t(), out=logits)
    _route[(rows,)](logits, ids, weights, experts, TOP_K=top_k, E_PAD=triton.next_power_of_2(experts),
                    RENORM=moe.norm_topk_prob, num_warps=1)
    tile = gate_up_tile or GATE_UP_TILE
    _expert_gate_up[(triton.cdiv(width, tile["BLOCK_N"]), pairs)](normed, gate_up, ids, gated, width, hidden_size,
                                                                   TOP_K=top_k, **tile)
    tile = down_tile or DOWN_TILE
    _expert_down[(triton.cdiv(hidden_size, tile["BLOCK_N"]), rows)](gated, down, ids, weights, hidden, hidden_size,
                                                                     width, TOP_K=top_k, **tile)
