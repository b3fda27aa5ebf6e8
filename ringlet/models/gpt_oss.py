"""GPT-OSS (gpt_oss): the Llama stage with attention sinks and a mixture of experts in every layer.

- Attention has biases on q/k/v and o, and a learned logit per head (its sink) that joins every softmax's denominator
  without a value: a head may attend to nothing. Layers alternate sliding-window and full attention (`layer_types`).
- The router (with a bias) picks each token's top k experts by logit; their weights are a softmax over those k.
- An expert is a gated MLP with biases: gate and up interleaved in one projection (gate of unit j at row 2j, its up at
  2j + 1), gate clamped above and up on both sides at `swiglu_limit`, then (up + 1) * gate * sigmoid(alpha * gate).
- Published checkpoints store the experts in MXFP4 (quantization_config quant_method "mxfp4"): e2m1 codes, two a byte,
  and an e8m0 scale (a power of two) per 32 weights: 4.25 bits a weight. They stay packed in memory, and each expert
  that has rows is dequantised when it runs. Checkpoints in bf16 or fp32 load as float experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ringlet.models.config import ModelArgs
from ringlet.models.llama import Attention, Block, Transformer, causal_mask
from ringlet.models.moe import run_routed
from ringlet.models.registry import register
from ringlet.shared.errors import ModelLoadError

# the sixteen e2m1 values by code: sign bit, two exponent bits, one mantissa bit
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32  # weights sharing one scale
E8M0_BIAS = 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 blocks [..., G, 16] (two codes a byte, the low nibble first) and uint8 scales [..., G] (2 ** (s - 127))
    -> weights [..., G * 32] in `dtype`."""
    table = torch.tensor(E2M1_VALUES, dtype=dtype, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).long()
    exponents = scales.to(torch.int32)[..., None] - E8M0_BIAS
    return torch.ldexp(table[codes], exponents).to(dtype).flatten(-2)


class SinkAttention(Attention):
    """Llama's attention with an output bias and a sink logit per head; every path attends through `attend`."""

    fused_kernels = False
    scores_per_chunk = 1 << 24  # the fp32 scores (64 MiB) a long prompt's queries are attended in chunks of

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=True)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The softmax over each query's visible keys and its head's sink, in fp32; the sink has no value. The scores
        are explicit, so a long prompt's queries go a chunk at a time."""
        b, heads, queries, context = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        if mask is None:
            mask = causal_mask(queries, context, q.device)
        step = max(1, self.scores_per_chunk // (b * heads * context))
        if queries <= step:
            return self._attend(q, k, v, mask)
        parts = []
        for first in range(0, queries, step):
            rows = mask if mask.shape[-2] == 1 else mask[..., first:first + step, :]
            parts.append(self._attend(q[:, :, first:first + step], k, v, rows))
        return torch.cat(parts, dim=2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`attend` of queries whose scores fit; the query heads sharing a key head are the rows of one matmul, so
        keys and values are never repeated."""
        b, heads, queries, dim = q.shape
        kv_heads, context = k.shape[1], k.shape[2]
        share = heads // kv_heads
        if mask.dim() == 4:  # [B, 1, Q, S]: one mask for every head
            mask = mask[:, :, None]
        scale = self.scale if self.scale is not None else dim**-0.5
        scores = (q.reshape(b, kv_heads, share * queries, dim) @ k.transpose(-1, -2)).view(
            b, kv_heads, share, queries, context).float() * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        sinks = self.sinks.float().view(1, kv_heads, share, 1, 1).expand(b, kv_heads, share, queries, 1)
        weights = torch.cat((scores, sinks), dim=-1).softmax(dim=-1)[..., :context]
        out = weights.to(v.dtype).view(b, kv_heads, share * queries, context) @ v
        return out.view(b, heads, queries, dim)


def clamped_swiglu(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gate_up [..., 2I], gate and up interleaved -> [..., I]."""
    gate, up = gate_up[..., ::2].clamp(max=limit), gate_up[..., 1::2].clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


class _GatedExperts(nn.Module):
    """What float and MXFP4 experts share: their biases, the activation, and a grouped run over sorted rows."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.num_experts, self.width = args.num_experts, args.moe_intermediate_size
        self.limit, self.alpha = args.swiglu_limit, args.swiglu_alpha
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(self.num_experts, 2 * self.width))
        self.down_proj_bias = nn.Parameter(torch.zeros(self.num_experts, args.hidden_size))

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert `expert`'s gate_up [2I, H] and down [H, I] weights in `dtype`."""
        raise NotImplementedError(f"{type(self).__name__} holds no weights of its own")

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, H] sorted by expert, `counts` [E] rows for each; returns each row's expert output [N, H]. One pair
        of matmuls per expert that has rows."""
        out = torch.empty_like(rows)
        first = 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                gate_up, down = self.expert_weights(expert, rows.dtype)
                inner = F.linear(rows[first:first + count], gate_up, self.gate_up_proj_bias[expert])
                out[first:first + count] = F.linear(clamped_swiglu(inner, self.limit, self.alpha), down,
                                                    self.down_proj_bias[expert])
                first += count
        return out


class GptOssExperts(_GatedExperts):
    """Float experts: gate_up [E, 2I, H] (rows interleaved) and down [E, H, I], as ringlet's `Experts` stacks them."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        h = args.hidden_size
        # random as transformers initialises them (a stage built without weights); a load assigns the checkpoint's
        self.gate_up_proj = nn.Parameter(torch.randn(self.num_experts, 2 * self.width, h) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(self.num_experts, h, self.width) * 0.02)

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up_proj[expert], self.down_proj[expert]

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if not (rows.is_cpu and hasattr(torch, "_grouped_mm") and self._rows_aligned()):
            return super().forward(rows, counts)
        ends = counts.cumsum(0).to(torch.int32)
        experts = torch.repeat_interleave(torch.arange(self.num_experts, device=rows.device), counts,
                                          output_size=rows.shape[0])
        inner = torch._grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs=ends) + self.gate_up_proj_bias[experts]
        gated = clamped_swiglu(inner, self.limit, self.alpha).contiguous()
        return torch._grouped_mm(gated, self.down_proj.transpose(1, 2), offs=ends) + self.down_proj_bias[experts]

    def _rows_aligned(self) -> bool:
        """Whether the rows of the weights and activations start every 16 bytes, as `torch._grouped_mm` needs."""
        return all(size * self.down_proj.element_size() % 16 == 0 for size in self.down_proj.shape[1:])


class Mxfp4Experts(_GatedExperts):
    """Experts as an MXFP4 checkpoint stores them: uint8 blocks [E, out, in / 32, 16] and scales [E, out, in / 32] of
    gate_up ([2I, H] an expert) and down ([H, I])."""

    # buffers, registered in __init__
    gate_up_proj_blocks: torch.Tensor
    gate_up_proj_scales: torch.Tensor
    down_proj_blocks: torch.Tensor
    down_proj_scales: torch.Tensor

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        h = args.hidden_size
        if h % MXFP4_BLOCK or self.width % MXFP4_BLOCK:
            raise ModelLoadError(f"MXFP4 experts need hidden_size ({h}) and intermediate_size ({self.width}) to be "
                                 f"multiples of {MXFP4_BLOCK}")
        for name, rows, columns in (("gate_up_proj", 2 * self.width, h), ("down_proj", h, self.width)):
            groups = columns // MXFP4_BLOCK
            # random codes at about transformers' initial scale (2 ** -8 * 6 at most) for a stage built without
            # weights; a load assigns the checkpoint's
            self.register_buffer(f"{name}_blocks", torch.randint(0, 256, (self.num_experts, rows, groups,
                                                                          MXFP4_BLOCK // 2), dtype=torch.uint8))
            self.register_buffer(f"{name}_scales", torch.full((self.num_experts, rows, groups), E8M0_BIAS - 8,
                                                              dtype=torch.uint8))

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize_mxfp4(self.gate_up_proj_blocks[expert], self.gate_up_proj_scales[expert], dtype),
                dequantize_mxfp4(self.down_proj_blocks[expert], self.down_proj_scales[expert], dtype))


class GptOssMoE(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        # not a linear, so never quantised: its logits choose the experts
        self.router = nn.Parameter(torch.randn(args.num_experts, args.hidden_size) * 0.02)
        self.router_bias = nn.Parameter(torch.zeros(args.num_experts))
        self.experts: _GatedExperts = Mxfp4Experts(args) if args.mxfp4_experts else GptOssExperts(args)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [T, H] -> each token's experts [T, k] (the top k logits) and their weights [T, k] (a softmax over
        those logits, in the tokens' dtype)."""
        logits, chosen = F.linear(tokens, self.router, self.router_bias).topk(self.top_k, dim=-1)
        return chosen, logits.float().softmax(dim=-1).to(tokens.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        chosen, weights = self.route(tokens)
        return run_routed(tokens, chosen, weights, self.experts, self.router.shape[0]).view(x.shape)


class GptOssTransformer(Transformer):
    """Layers [start, end) of a GPT-OSS model."""

    def __init__(self, args: ModelArgs, start: int = 0, end: int | None = None) -> None:
        super().__init__(args, start, end)
        for block in cast("Iterable[Block]", self.layers):
            block.register_module("self_attn", SinkAttention(args))
            block.register_module("mlp", GptOssMoE(args))
        self.set_windows()  # of the attention just put in place

    def mlp_weights(self, take: Callable[[str], torch.Tensor], fused: Callable[..., torch.Tensor], prefix: str,
                    layer: int) -> dict[str, torch.Tensor]:
        """The layer's MoE tensors, and the attention's own beyond Llama's (its output bias and sinks)."""
        mlp, attention = prefix + "mlp.", prefix + "self_attn."
        own = {"self_attn.o_proj.bias": take(attention + "o_proj.bias"), "self_attn.sinks": take(attention + "sinks"),
               "mlp.router": take(mlp + "router.weight"), "mlp.router_bias": take(mlp + "router.bias")}
        for part in ("gate_up_proj", "down_proj"):
            own[f"mlp.experts.{part}_bias"] = take(f"{mlp}experts.{part}_bias")
            if self.args.mxfp4_experts:
                for packed in ("blocks", "scales"):
                    own[f"mlp.experts.{part}_{packed}"] = take(f"{mlp}experts.{part}_{packed}")
            else:  # transformers stores them [E, in, out]
                own[f"mlp.experts.{part}"] = take(f"{mlp}experts.{part}").transpose(1, 2).contiguous()
        return own


@register("gpt_oss")
def build_gpt_oss(args: ModelArgs, start: int, end: int) -> GptOssTransformer:
    return GptOssTransformer(args, start, end)
