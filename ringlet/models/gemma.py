"""Gemma 2 (`gemma2`) and Gemma 3's text model (`gemma3_text`): the Llama stage with Gemma's layer.

- embeddings scaled by sqrt(hidden_size), that factor rounded to the model's dtype first, as transformers rounds it;
- RMSNorms that scale by (1 + weight), in fp32; four a layer: around the attention and around the MLP, each
  branch's output normalised before the residual add;
- a GeGLU MLP (GELU's tanh approximation gates the up projection);
- attention scaled by query_pre_attn_scalar ** -0.5, over a sliding window in the layers `layer_types` names so
  (`Attention.window`); Gemma 2 soft-caps attention and output logits (cap * tanh(x / cap)), which runs the
  attention as plain matmuls (`capped_attention`); Gemma 3 normalises each head of q and k (a Gemma norm too);
- Gemma 3's sliding layers turn q and k by a rotary base of their own (rope_local_base_freq), and only its full
  layers scale their rotary embedding (`rope_scaling`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ringlet.models.cache import StaticKVCache
from ringlet.models.config import ModelArgs
from ringlet.models.llama import MLP, Attention, RMSNorm, Transformer, causal_mask
from ringlet.models.paged_cache import BatchLayout, PagedKVCache
from ringlet.models.registry import register
from ringlet.models.rope import rope_frequencies, rope_tables


class GemmaRMSNorm(RMSNorm):
    """RMSNorm scaled by (1 + weight), computed in fp32: Gemma's checkpoints store each norm's scale less one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class GeGLU(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None,
                     cap: float) -> torch.Tensor:
    """q [B, H, Q, D] over k, v [B, KV, S, D] where `mask` (broadcast to [B, H, Q, S]) is True, the logits soft-capped
    to cap * tanh(logits / cap) first, which no fused kernel does: two matmuls around a masked softmax in fp32, the
    query heads of each key head folded into its rows (keys and values are not repeated per query head)."""
    b, heads, queries, dim = q.shape
    kv_heads, context = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    scores = (q.reshape(b, kv_heads, -1, dim) @ k.transpose(-1, -2)).float() * scale
    scores = (torch.tanh(scores / cap) * cap).view(b, heads, queries, context)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
    return (weights.view(b, kv_heads, -1, context) @ v).view(b, heads, queries, dim)


class GemmaAttention(Attention):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        if args.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, args.rms_norm_eps)
        self.softcap = args.attn_logit_softcapping
        self.fused_kernels = self.softcap is None  # soft-capped logits: every path calls `attend`

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.softcap is None:
            return super().attend(q, k, v, mask)
        if mask is None:
            mask = causal_mask(q.shape[2], k.shape[2], q.device)
        return capped_attention(q, k, v, mask, self.scale, self.softcap)


class GemmaBlock(nn.Module):
    """Gemma's decoder layer: the attention and the MLP each between a norm of its input and one of its output."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = GemmaAttention(args)
        self.post_attention_layernorm = GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = GeGLU(args)
        self.post_feedforward_layernorm = GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rope_columns = slice(None)  # the columns of the stage's cos/sin tables that this layer reads

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: StaticKVCache, layer: int,
                start: int | torch.Tensor, mask: torch.Tensor | None, kv_len: int | None = None) -> torch.Tensor:
        cos, sin = cos[..., self.rope_columns], sin[..., self.rope_columns]
        attended = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start, mask, kv_len)
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def forward_packed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: PagedKVCache, layer: int,
                       layout: BatchLayout) -> torch.Tensor:
        cos, sin = cos[..., self.rope_columns], sin[..., self.rope_columns]
        attended = self.self_attn.forward_packed(self.input_layernorm(x), cos, sin, cache, layer, layout)
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaTransformer(Transformer):
    """Layers [start, end) of a Gemma 2 or Gemma 3 text model. Where the sliding layers have a rotary embedding of
    their own (Gemma 3), the stage's cos/sin tables hold the full layers' columns, then the sliding layers'; each layer
    reads its own (`GemmaBlock.rope_columns`)."""

    def __init__(self, args: ModelArgs, start: int, end: int) -> None:
        super().__init__(args, start, end)
        self.layers = nn.ModuleList(GemmaBlock(args) for _ in range(start, end))
        self.set_windows()
        self.norm = GemmaRMSNorm(args.hidden_size, args.rms_norm_eps) if self.is_last else None
        self.sliding_rope: ModelArgs | None = None
        if args.sliding_rope_theta is not None:
            self.sliding_rope = dataclasses.replace(args, rope_theta=args.sliding_rope_theta,
                                                    rope_scaling=args.sliding_rope_scaling)
            rope_frequencies(self.sliding_rope, self.context_length)  # an unsupported scaling fails here, not later
            rotary = args.rotary_dim
            for index, block in zip(range(start, end), cast("Iterable[GemmaBlock]", self.layers)):
                sliding = args.layer_types[index] == "sliding_attention"
                block.rope_columns = slice(rotary, None) if sliding else slice(0, rotary)

    def rope_tables(self, positions: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = super().rope_tables(positions, dtype, device)
        if self.sliding_rope is None:
            return cos, sin
        local_cos, local_sin = rope_tables(self.sliding_rope, self.context_length, positions, dtype, device)
        return torch.cat((cos, local_cos), dim=-1), torch.cat((sin, local_sin), dim=-1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is None:
            return x
        h = self.embed_tokens(x)
        # sqrt(hidden_size) rounded to the embeddings' dtype (through fp32), as transformers multiplies by it
        return h * torch.tensor(self.args.hidden_size**0.5).to(h.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = super().logits(h)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def mlp_weights(self, take: Callable[[str], torch.Tensor], fused: Callable[..., torch.Tensor], prefix: str,
                    layer: int) -> dict[str, torch.Tensor]:
        """The MLP's tensors and the two norms around it."""
        return {**super().mlp_weights(take, fused, prefix, layer),
                "pre_feedforward_layernorm.weight": take(prefix + "pre_feedforward_layernorm.weight"),
                "post_feedforward_layernorm.weight": take(prefix + "post_feedforward_layernorm.weight")}


@register("gemma2")
def build_gemma2(args: ModelArgs, start: int, end: int) -> GemmaTransformer:
    return GemmaTransformer(args, start, end)


@register("gemma3_text")
def build_gemma3_text(args: ModelArgs, start: int, end: int) -> GemmaTransformer:
    assert args.qk_norm, "gemma3_text normalises q and k per head"
    return GemmaTransformer(args, start, end)
