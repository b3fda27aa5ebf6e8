"""Tensor parallelism inside a stage: its attention heads, MLP columns and vocabulary split over a process group.

Each rank of the group holds a share (Megatron-LM's layout, as vLLM runs it):
- attention: the q heads of its share and their kv heads (column-parallel qkv_proj), o_proj's matching columns
  (row-parallel), one all-reduce of the output; its KV cache holds those kv heads only. A model with fewer kv heads
  than ranks repeats each kv head on the ranks whose q heads share it;
- the MLP: gate and up rows of its share of the intermediate columns, down_proj's matching columns, one all-reduce;
- the embedding: rows of its share of the vocabulary (a masked lookup, then an all-reduce), and the lm_head the
  same rows (the logits of each share all-gathered). Shares are `ceil(vocab / ranks)` rows, the last padded.

A stage loads sharded (`load_sharded_stage`): each layer is cut to its share as soon as it is read
(`Transformer.load_weights`' `finish_layer`), and of the embedding and lm_head only the share's rows are read, so a
rank never holds more than one whole layer. q/k/v biases are split with their rows; norms are whole on every rank.
Pipeline stages combine with it: each stage has a group of its own, and its ranks hold the same hidden states.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ringlet.models.config import ModelArgs, shard_misfit
from ringlet.models.llama import MLP, Attention, Block, Transformer
from ringlet.models.registry import build_stage
from ringlet.models.weights import row_reader
from ringlet.shared.errors import ModelLoadError

# all_gather_into_tensor's name from torch 2.13 on, where the old name warns that it is deprecated
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_ENDS = ("model.embed_tokens.weight", "lm_head.weight")


def ends_deferred(weights: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """`weights` for `build_stage` with the embedding and lm_head left unread: `shard_ends` reads this rank's rows."""
    return _EndsDeferred(weights)


def check_shardable(args: ModelArgs, ranks: int) -> None:
    """Raise ModelLoadError unless `ranks` can split this model's attention heads and MLP columns."""
    misfit = shard_misfit(args.model_type, args.num_attention_heads, args.num_key_value_heads, ranks,
                          args.intermediate_size)
    if misfit is not None:
        raise ModelLoadError(misfit)


class RowParallelLinear(nn.Module):
    """A linear layer over this rank's share of the input features; the ranks' partial outputs are summed."""

    def __init__(self, linear: nn.Module, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.linear, self.group = linear, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelEmbedding(nn.Module):
    """Rows [first, first + rows) of the embedding; a token outside them contributes zeros, and the ranks' lookups
    are summed."""

    def __init__(self, weight: torch.Tensor, first: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.first, self.group = first, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.masked_fill(~mine, 0), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelHead(nn.Module):
    """The lm_head rows of this rank's share of the vocabulary; every rank gets the whole logits."""

    def __init__(self, weight: torch.Tensor | nn.Parameter, vocab_size: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.vocab_size, self.group, self.ranks = vocab_size, group, dist.get_world_size(group)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = F.linear(h, self.weight)
        shares = local.new_empty(self.ranks * local.shape[0], *local.shape[1:])
        _all_gather_single(shares, local, group=self.group)  # one collective, the shares stacked on dim 0
        return shares.view(self.ranks, *local.shape).movedim(0, -2).flatten(-2)[..., :self.vocab_size]


def local_linear(linear: nn.Module) -> nn.Linear:
    """The linear layer of this rank's share (a row-parallel one's own), or `linear` itself."""
    return cast(nn.Linear, linear.linear if isinstance(linear, RowParallelLinear) else linear)


def is_sharded(model: nn.Module) -> bool:
    """`model` is one rank's share of a tensor-parallel stage."""
    return any(isinstance(m, RowParallelLinear | VocabParallelEmbedding | VocabParallelHead) for m in model.modules())


def _kv_share(kv_heads: int, rank: int, ranks: int) -> tuple[int, int]:
    """(first kv head, count) of a rank: its share, or the one head its q heads share when heads repeat."""
    if kv_heads % ranks == 0:
        count = kv_heads // ranks
        return rank * count, count
    return rank // (ranks // kv_heads), 1


def shard_layer(layer: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Cut a loaded Llama block to this rank's share, in place (the whole tensors are freed)."""
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    if not isinstance(layer, Block) or type(layer.mlp) is not MLP:
        raise ModelLoadError(f"a {type(layer).__name__} layer cannot be split by tensor parallelism; only dense "
                             f"Llama blocks can")
    attention, mlp = layer.self_attn, layer.mlp
    if isinstance(attention.o_proj, RowParallelLinear):
        raise ModelLoadError("this layer is split by tensor parallelism already")
    for name, linear in (("qkv_proj", attention.qkv_proj), ("o_proj", attention.o_proj),
                         ("gate_up_proj", mlp.gate_up_proj), ("down_proj", mlp.down_proj)):
        if type(linear) is not nn.Linear or linear.weight.is_meta:
            raise ModelLoadError(f"tensor parallelism splits float (bf16, fp16, fp32) weights only; {name} is a "
                                 f"{type(linear).__name__}")
    _shard_attention(attention, rank, ranks)
    _shard_mlp(mlp, rank, ranks)
    attention.register_module("o_proj", RowParallelLinear(attention.o_proj, group))
    mlp.register_module("down_proj", RowParallelLinear(mlp.down_proj, group))


def _shard_attention(attention: Attention, rank: int, ranks: int) -> None:
    heads, kv_heads, dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
    share = heads // ranks
    first_kv, kv_count = _kv_share(kv_heads, rank, ranks)
    q_rows = torch.arange(rank * share * dim, (rank + 1) * share * dim)
    kv_rows = torch.arange(first_kv * dim, (first_kv + kv_count) * dim)
    rows = torch.cat((q_rows, heads * dim + kv_rows, (heads + kv_heads) * dim + kv_rows))
    attention.qkv_proj = _rows_of(attention.qkv_proj, rows)
    attention.o_proj = _columns_of(attention.o_proj, q_rows)
    attention.n_heads, attention.n_kv_heads = share, kv_count


def _shard_mlp(mlp: MLP, rank: int, ranks: int) -> None:
    width = mlp.down_proj.in_features
    share = width // ranks
    columns = torch.arange(rank * share, (rank + 1) * share)
    mlp.gate_up_proj = _rows_of(mlp.gate_up_proj, torch.cat((columns, width + columns)))
    mlp.down_proj = _columns_of(mlp.down_proj, columns)


def _rows_of(linear: nn.Module, rows: torch.Tensor) -> nn.Linear:
    linear = cast(nn.Linear, linear)
    weight = linear.weight.detach()
    rows = rows.to(weight.device)
    out = nn.Linear(linear.in_features, rows.numel(), bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(weight.index_select(0, rows), requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().index_select(0, rows), requires_grad=False)
    return out


def _columns_of(linear: nn.Module, columns: torch.Tensor) -> nn.Linear:
    linear = cast(nn.Linear, linear)
    assert linear.bias is None, "a row-parallel linear would add its bias once a rank"
    weight = linear.weight.detach()
    out = nn.Linear(columns.numel(), linear.out_features, bias=False, device="meta")
    out.weight = nn.Parameter(weight.index_select(1, columns.to(weight.device)), requires_grad=False)
    return out


class _EndsDeferred(Mapping[str, torch.Tensor]):
    """`weights` with the embedding and lm_head given as meta tensors of their shape: `load_weights` assigns them
    without reading, and `shard_ends` reads only this rank's rows."""

    def __init__(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.weights = weights

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in _ENDS:
            rows = row_reader(self.weights, name)
            return torch.empty(rows.rows, rows.columns, device="meta")
        return self.weights[name]

    def __contains__(self, name: object) -> bool:
        return name in self.weights

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


def vocab_share(vocab_size: int, rank: int, ranks: int) -> tuple[int, int]:
    """(first row, rows) of a rank's share of the vocabulary, before padding to `ceil(vocab / ranks)` rows."""
    size = -(-vocab_size // ranks)
    first = min(rank * size, vocab_size)
    return first, min(size, vocab_size - first)


def shard_ends(model: Transformer, group: dist.ProcessGroup | None, weights: Mapping[str, torch.Tensor] | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
    """Replace the stage's embedding and lm_head by this rank's vocabulary rows, read from `weights` (or cut from the
    loaded ones where `weights` is None), and size its caches for its kv heads."""
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    vocab = model.args.vocab_size
    first, count = vocab_share(vocab, rank, ranks)
    padded = -(-vocab // ranks)

    def rows(name: str, loaded: nn.Module) -> torch.Tensor:
        if type(loaded) not in (nn.Embedding, nn.Linear):
            raise ModelLoadError(f"tensor parallelism splits a float embedding and lm_head, not a "
                                 f"{type(loaded).__name__}; load without int8 ends")
        if weights is not None:
            share = row_reader(weights, name).read(first, first + count).to(device=device, dtype=dtype)
        else:
            share = cast(torch.Tensor, loaded.weight).detach()[first:first + count]
        return F.pad(share, (0, 0, 0, padded - count)).contiguous()

    if weights is None:
        tied = model.lm_head is not None and model.embed_tokens is not None and (
            getattr(model.lm_head, "weight", None) is getattr(model.embed_tokens, "weight", None))
    else:  # as `load_weights` decides it
        tied = model.args.tie_word_embeddings and "lm_head.weight" not in weights
    embedding: VocabParallelEmbedding | None = None
    if model.embed_tokens is not None:
        embedding = VocabParallelEmbedding(rows("model.embed_tokens.weight", model.embed_tokens), first, group)
        model.embed_tokens = embedding
    if model.lm_head is not None:
        if tied and embedding is not None:  # one tensor for both, as the checkpoint has it
            model.lm_head = VocabParallelHead(embedding.weight, vocab, group)
        else:
            head = "model.embed_tokens.weight" if tied else "lm_head.weight"
            model.lm_head = VocabParallelHead(rows(head, model.lm_head), vocab, group)
    _, model.kv_heads = _kv_share(model.args.num_key_value_heads, rank, ranks)


def load_sharded_stage(args: ModelArgs, start: int, end: int, weights: Mapping[str, torch.Tensor],
                       group: dist.ProcessGroup | None, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> Transformer:
    """Layers [start, end) of the model, this rank's share of them (see the module's docstring); every rank of
    `group` calls it."""
    check_shardable(args, dist.get_world_size(group))
    model = build_stage(args, start, end, weights=ends_deferred(weights), dtype=dtype, device=device,
                        finish_layer=lambda layer, index: shard_layer(layer, group))
    model = cast(Transformer, model)
    shard_ends(model, group, weights, dtype, device)
    return model


def shard_stage(model: Transformer, group: dist.ProcessGroup | None) -> Transformer:
    """Cut a stage loaded whole to this rank's share, in place (`load_sharded_stage` never holds it whole)."""
    check_shardable(model.args, dist.get_world_size(group))
    for layer in model.layers:
        shard_layer(layer, group)
    shard_ends(model, group)
    return model
