"""Mixture-of-experts decoders (Qwen3-MoE, Mixtral): the Llama block whose MLP, in its sparse layers, routes each token
to `num_experts_per_tok` of `num_experts` experts.

The router's softmax over all experts picks the top k; with `norm_topk_prob` (always for Mixtral, where this equals a
softmax over the chosen logits) their weights are renormalised to sum to one. Token-expert pairs are sorted by expert,
so each expert's rows run together (`experts.py`). A stage holds its own layers' experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ringlet.models.config import ModelArgs
from ringlet.models.experts import Experts
from ringlet.models.llama import Block, Transformer
from ringlet.models.registry import register


class SparseMoE(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = args.num_experts_per_tok, args.norm_topk_prob
        # not a linear, so never quantised: its logits choose the experts
        self.router = nn.Parameter(torch.randn(args.num_experts, args.hidden_size) * 0.02)
        self.experts = Experts(args.num_experts, args.hidden_size, args.moe_intermediate_size)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [T, H] -> each token's experts [T, k] and their weights [T, k] (in the tokens' dtype)."""
        probs = F.linear(tokens, self.router).float().softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return chosen, weights.to(tokens.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        chosen, weights = self.route(tokens)
        return run_routed(tokens, chosen, weights, self.experts, self.router.shape[0]).view(x.shape)


def run_routed(tokens: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, experts: nn.Module,
               num_experts: int) -> torch.Tensor:
    """Each token's [T, H] weighted sum of its chosen experts' outputs (chosen, weights [T, k]): the token-expert pairs
    sorted by expert, so that `experts(rows, counts)` runs each expert's rows together."""
    flat = chosen.flatten()
    order = flat.argsort(stable=True)
    source = order // chosen.shape[1]  # the token of each sorted pair
    counts = torch.bincount(flat, minlength=num_experts)
    out = experts(tokens[source], counts) * weights.flatten()[order, None]
    return torch.zeros_like(tokens).index_add_(0, source, out)


def routes_in_grouped_products(model: nn.Module) -> bool:
    """Whether every mixture-of-experts layer of `model` is a `SparseMoE` whose experts run as grouped products on a
    CPU in a compiled step: shapes that never depend on the routing (per-expert products ask the host for each
    expert's row count). The compiler takes grouped products in bf16 only (torch 2.13), where eager PyTorch also runs
    them in fp32."""
    layers = [m for m in model.modules() if hasattr(m, "experts")]  # every mixture-of-experts layer, of any kind
    return hasattr(torch, "_grouped_mm") and all(
        isinstance(m, SparseMoE) and type(m.experts) is Experts and m.experts._rows_aligned()
        and m.experts.down_proj.dtype == torch.bfloat16 for m in layers)


class MoETransformer(Transformer):
    """Layers [start, end) of a mixture-of-experts model: the Llama stage with a `SparseMoE` MLP in sparse layers.
    `experts_prefix` names a sparse layer's MLP in the checkpoint, `expert_parts` its experts' gate, up and down."""

    def __init__(self, args: ModelArgs, start: int, end: int, experts_prefix: str,
                 expert_parts: tuple[str, str, str]) -> None:
        super().__init__(args, start, end)
        self.experts_prefix, self.expert_parts = experts_prefix, expert_parts
        for index, block in zip(range(start, end), cast("Iterable[Block]", self.layers)):
            if args.is_moe_layer(index):
                block.register_module("mlp", SparseMoE(args))  # in place of the dense MLP

    def mlp_weights(self, take: Callable[[str], torch.Tensor], fused: Callable[..., torch.Tensor], prefix: str,
                    layer: int) -> dict[str, torch.Tensor]:
        if not self.args.is_moe_layer(layer):
            return super().mlp_weights(take, fused, prefix, layer)
        mlp = prefix + self.experts_prefix
        gate, up, down = self.expert_parts
        experts, hidden, width = self.args.num_experts, self.args.hidden_size, self.args.moe_intermediate_size
        # a checkpoint names each expert's linears; transformers holds them stacked ([E, 2I, H] and [E, H, I]), as a
        # checkpoint may store them: either way, the rows of expert e follow those of e - 1
        gate_up = fused(mlp + "experts.gate_up_proj",
                        *(f"{mlp}experts.{e}.{part}.weight" for e in range(experts) for part in (gate, up)))
        downs = fused(mlp + "experts.down_proj", *(f"{mlp}experts.{e}.{down}.weight" for e in range(experts)))
        return {"mlp.router": take(mlp + "gate.weight"),
                "mlp.experts.gate_up_proj": gate_up.view(experts, 2 * width, hidden),
                "mlp.experts.down_proj": downs.view(experts, hidden, width)}


@register("qwen3_moe")
def build_qwen3_moe(args: ModelArgs, start: int, end: int) -> MoETransformer:
    assert args.qk_norm, "qwen3_moe normalises q and k per head"
    return MoETransformer(args, start, end, "mlp.", ("gate_proj", "up_proj", "down_proj"))


@register("mixtral")
def build_mixtral(args: ModelArgs, start: int, end: int) -> MoETransformer:
    return MoETransformer(args, start, end, "block_sparse_moe.", ("w1", "w3", "w2"))
