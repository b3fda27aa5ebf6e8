"""Llama-family decoder (Llama 3.x, SmolLM2, Mistral, Qwen2, Qwen3) in plain torch.

A model is built for a layer range [start, end): the first stage owns the embedding, the last the
final norm and lm_head, a middle stage only its layers. Stages take and return hidden states, so
they chain. q/k/v and gate/up are fused into one matmul each at load time (fewer kernels per token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ringlet.models.cache import StaticKVCache
from ringlet.models.config import ModelArgs
from ringlet.models.kernels import cpu_vnni
from ringlet.models.paged_cache import BatchLayout, PagedKVCache
from ringlet.models.quant import Int4Embedding, Int8Embedding, int8_linear
from ringlet.models.quant_format import Int8Rows, read_rows_int4, read_rows_int8
from ringlet.models.registry import register
from ringlet.models.rope import rope_frequencies, rope_tables
from ringlet.models.weights import RowReader, row_reader
from ringlet.shared.errors import ModelLoadError


def _causal_bias(queries: int, keys: int) -> torch.Tensor:
    """The causal mask of `queries` rows at the end of `keys` positions, as a bias SDPA's flash kernels apply
    themselves. Imported here: torch.nn.attention.bias imports torch._dynamo, a second or more (time `import
    torch.nn.attention.bias` after `import torch`) that a process reading a model's configuration never needs."""
    from torch.nn.attention.bias import causal_lower_right

    return cast(torch.Tensor, causal_lower_right(queries, keys))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel; it accumulates in fp32 for bf16/fp16 inputs
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half convention (Hugging Face weight layout). x: [B, H, L, D]; cos/sin: [L, R], R the rotary dims: D, or
    fewer with a partial rotary embedding (Phi-4-mini), which turns the leading R of each head and keeps the rest."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """One query position over `kv_len` cached ones, as two matmuls around a masked softmax.

    Each group of query heads sharing a key/value head becomes the rows of one small matmul, so keys and
    values are read once and never repeated. Under torch.compile the mask, scale and softmax fuse into one
    kernel; on an H200 this step ran 9% faster than SDPA's fused kernel (scripts/tune_decode_gpu.py). Not on CPUs:
    there the compiled step ran these small matmuls as two ~110 us bmm calls a layer, SDPA's one kernel far less.
    """
    b, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    scores = (q.view(b, kv_heads, heads // kv_heads, dim) @ k.transpose(-1, -2)).float() * (
        dim**-0.5 if scale is None else scale)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
    return (weights @ v).view(b, heads, 1, dim)


class Attention(nn.Module):
    # whether the paths run SDPA's kernels (and the CUDA decode step's): an attention they cannot run (gpt_oss's sinks)
    # sets it False and overrides `attend`, which every path then calls with its final mask
    fused_kernels = True

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, q_dim + 2 * kv_dim, bias=args.attention_bias)
        self.o_proj = nn.Linear(q_dim, args.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.scale = args.query_pre_attn_scalar**-0.5 if args.query_pre_attn_scalar else None  # None: head_dim's
        # a sliding window (set by the stage, per layer): the query at position p attends the keys in (p - window, p]
        self.window: int | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        cache: StaticKVCache, layer: int, start: int | torch.Tensor, mask: torch.Tensor | None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        b, length, _ = x.shape
        heads = self.qkv_proj(x).view(b, length, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qk, v = heads.split((self.n_heads + self.n_kv_heads, self.n_kv_heads), dim=2)
        if self.q_norm is not None:
            assert self.k_norm is not None  # both built when args.qk_norm
            q, k = qk.split((self.n_heads, self.n_kv_heads), dim=2)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2)
        qk = apply_rope(qk.transpose(1, 2), cos, sin)  # q and k rotated together: half the kernels
        q, k = qk.split((self.n_heads, self.n_kv_heads), dim=1)
        v = v.transpose(1, 2)
        k, v = cache.update_and_fetch(layer, start, k, v, kv_len)
        if self.window is not None:  # a mask of its own: the causal one, cut to the window
            mask = self.visible(start, length, k.shape[2], q.device)
        if not self.fused_kernels:
            out = self.attend(q, k, v, mask)
        elif isinstance(start, torch.Tensor) and q.is_cuda:  # the static decode step (compiled, CUDA-graphed)
            assert mask is not None  # Transformer.forward masks every tensor-position step
            out = decode_attention(q, k, v, mask, self.scale)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and length > 1, scale=self.scale, enable_gqa=True
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))

    def forward_packed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: PagedKVCache, layer: int,
                       layout: BatchLayout) -> torch.Tensor:
        """x: [T, H], the step's tokens of every sequence packed; cos/sin: [T, D] at each token's position."""
        tokens = x.shape[0]
        heads = self.qkv_proj(x).view(tokens, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qk, v = heads.split((self.n_heads + self.n_kv_heads, self.n_kv_heads), dim=1)
        if self.q_norm is not None:
            assert self.k_norm is not None  # both built when args.qk_norm
            q, k = qk.split((self.n_heads, self.n_kv_heads), dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        qk = apply_rope(qk, cos[:, None], sin[:, None])
        q, k = qk.split((self.n_heads, self.n_kv_heads), dim=1)
        cache.write(layer, layout.slots, k, v)
        out = q.new_empty(tokens, self.n_heads, self.head_dim)
        for group in layout.groups:
            context = group.slots.shape[1]
            mask, causal = group.mask, group.causal and self.window is None
            if self.window is not None:  # the keys are the group's positions 0..S-1, each query row at its own
                at = layout.positions[group.rows].view(-1, 1, group.queries, 1)
                mask = mask & self.in_window(torch.arange(context, device=at.device), at)
            if group.queries == 1 and self.fused_kernels and cpu_vnni.takes_attention(q, cache.keys[layer]):
                # decode rows on a CPU: the keys and values read where they lie, no gathered copy
                out[group.rows] = torch.ops.ringlet_cpu.decode_attention(
                    q[group.rows], cache.keys[layer], cache.values[layer], group.slots, mask.reshape(-1, context),
                    self.head_dim**-0.5 if self.scale is None else self.scale)
                continue
            keys, values = cache.context(layer, group)
            queries = q[group.rows].view(-1, group.queries, self.n_heads, self.head_dim).transpose(1, 2)
            if not self.fused_kernels:
                attended = self.attend(queries, keys, values, None if causal else mask)
            elif causal:  # a prompt chunk: the causal mask as a bias that the flash kernels apply themselves
                attended = F.scaled_dot_product_attention(
                    queries, keys, values, attn_mask=_causal_bias(group.queries, keys.shape[2]),
                    scale=self.scale, enable_gqa=True)
            else:
                attended = _folded_attention(queries, keys, values, mask, self.scale)
            out[group.rows] = attended.transpose(1, 2).reshape(-1, self.n_heads, self.head_dim)
        return self.o_proj(out.view(tokens, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q [B, H, Q, D] over k, v [B, KV, S, D], the queries at the last Q of the S positions, under
        `mask` (True where a query sees a key; broadcastable to [B, 1, Q, S]), causal where None."""
        if mask is None:
            mask = causal_mask(q.shape[2], k.shape[2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)

    def visible(self, start: int | torch.Tensor, length: int, context: int, device: torch.device) -> torch.Tensor:
        """[length, context]: whether the query at position start + i sees the key at position j (j no later than the
        query, and within the window). `start` may be a decode step's 1-element position tensor."""
        keys = torch.arange(context, device=device)
        queries = (start + torch.arange(length, device=device))[:, None]
        return (keys <= queries) & self.in_window(keys, queries)

    def in_window(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Whether keys at positions `keys` lie within the window of queries at positions `queries` (broadcast)."""
        if self.window is None:
            return torch.ones((), dtype=torch.bool, device=keys.device)
        return keys > queries - self.window


def causal_mask(queries: int, context: int, device: torch.device) -> torch.Tensor:
    """[Q, S]: True where a query, at the last `queries` of `context` positions, sees a key."""
    keys = torch.arange(context, device=device)
    return keys[None, :] <= keys[context - queries:, None]


def _folded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float | None = None) -> torch.Tensor:
    """Attention of q [G, H, Q, D] over k, v [G, KV, S, D] under mask [G, 1, Q, S], the H / KV query heads of each
    key head folded into its queries: one attention per key head, which the kernels that take a mask run as it is
    (grouped-query attention with a mask runs in the math kernel, which first copies every key and value per query
    head)."""
    groups, heads, queries, dim = q.shape
    kv_heads, context = k.shape[1], k.shape[2]
    share = heads // kv_heads
    folded_mask = mask[:, :, None].expand(groups, 1, share, queries, context).reshape(groups, 1, share * queries,
                                                                                        context)
    attended = F.scaled_dot_product_attention(q.reshape(groups, kv_heads, share * queries, dim), k, v,
                                              attn_mask=folded_mask, scale=scale)
    return attended.reshape(groups, heads, queries, dim)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, cache, layer, start, mask, kv_len=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start, mask, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_packed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: PagedKVCache, layer: int,
                       layout: BatchLayout) -> torch.Tensor:
        x = x + self.self_attn.forward_packed(self.input_layernorm(x), cos, sin, cache, layer, layout)
        return x + self.mlp(self.post_attention_layernorm(x))


def _embedding(rows: int, width: int) -> nn.Embedding:
    """nn.Embedding's own, with its random init (normal) skipped on the meta device, where the file's weights replace
    it: there that init goes through torch._refs, which imports torch._dynamo."""
    weight = torch.empty(rows, width)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(rows, width, _weight=weight)


class Transformer(nn.Module):
    """Layers [start, end) of a Llama-family model."""

    def __init__(self, args: ModelArgs, start: int = 0, end: int | None = None) -> None:
        super().__init__()
        end = args.num_hidden_layers if end is None else end
        if not 0 <= start < end <= args.num_hidden_layers:
            raise ModelLoadError(f"layer range [{start}, {end}) is not within the model's {args.num_hidden_layers} layers")
        self.args, self.start, self.end = args, start, end
        self.is_first, self.is_last = start == 0, end == args.num_hidden_layers
        self.embed_tokens: nn.Module | None = (_embedding(args.vocab_size, args.hidden_size) if self.is_first
                                               else None)  # an Int8Embedding in a quantised stage
        self.layers = nn.ModuleList(Block(args) for _ in range(start, end))
        self.kv_heads = args.num_key_value_heads  # what its caches hold: a share under tensor parallelism
        self.set_windows()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps) if self.is_last else None
        self.lm_head: nn.Module | None = (nn.Linear(args.hidden_size, args.vocab_size, bias=False) if self.is_last
                                          else None)  # an int8 linear in a quantised stage
        # the positions it serves (longrope picks its factors by it: `prepare_positions`); cos/sin tables are built
        # on first use, on the weights' device
        self.context_length = args.context_length
        rope_frequencies(args, self.context_length)  # an unsupported or incomplete rope_scaling fails here, not later
        self._rope_len = 0

    def set_windows(self) -> None:
        """Give each layer's attention its sliding window, where the model's config gives it one."""
        for index, block in zip(range(self.start, self.end), cast("Iterable[Block]", self.layers)):
            block.self_attn.window = self.args.attention_window(index)

    @property
    def num_local_layers(self) -> int:
        return self.end - self.start

    def make_paged_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        p = next(self.parameters())
        return PagedKVCache(self.num_local_layers, num_blocks, block_size, self.kv_heads,
                            self.args.head_dim, p.dtype, p.device)

    def make_cache(self, batch_size: int, max_seq_len: int) -> StaticKVCache:
        p = next(self.parameters())
        return StaticKVCache(self.num_local_layers, batch_size, self.kv_heads,
                             self.args.head_dim, max_seq_len, p.dtype, p.device)

    def _rope(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self._rope_len:  # tables grow in powers of two, built once
            n = max(1024, 1 << (start + length - 1).bit_length())
            device = next(self.parameters()).device
            self._cos, self._sin = self.rope_tables(n, dtype, device)
            self._rope_len = n
        return self._cos[start:start + length], self._sin[start:start + length]

    def rope_tables(self, positions: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [positions, rotary dims] that the layers read (`rope.rope_tables`)."""
        return rope_tables(self.args, self.context_length, positions, dtype, device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids -> the first layer's input on the first stage; elsewhere x is that already (hidden states)."""
        return self.embed_tokens(x) if self.embed_tokens is not None else x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm's output -> logits (on the last stage)."""
        assert self.lm_head is not None  # built with the norm, on the last stage
        return self.lm_head(h)

    def forward(
        self, x: torch.Tensor, cache: StaticKVCache, start: int | torch.Tensor,
        last_logits_only: bool = False, kv_len: int | None = None, head: bool = True,
    ) -> torch.Tensor:
        """x: token ids [B, L] on the first stage, hidden states [B, L, H] elsewhere.

        Returns hidden states, or logits [B, L, V] on the last stage ([B, 1, V] with last_logits_only; without
        `head`, the final norm's output [B, L, H], what an embedding model pools).
        `start` is the position of x[:, 0]. As a 1-element tensor (one decode token, `kv_len` cached
        positions attended under a mask) every shape is static, for CUDA graphs and torch.compile.
        """
        h = self.embed(x)
        length = h.shape[1]
        mask = None
        if isinstance(start, torch.Tensor):
            assert length == 1 and kv_len is not None, "a tensor position is for one-token decode steps"
            self._rope(0, kv_len, h.dtype)
            cos, sin = self._cos[start], self._sin[start]
            mask = torch.arange(kv_len, device=h.device)[None, :] <= start
        else:
            cos, sin = self._rope(start, length, h.dtype)
            if length > 1 and start > 0:  # a later prefill chunk: causal over the cached prefix too
                pos = torch.arange(start + length, device=h.device)
                mask = pos[None, :] <= (pos[start:, None])
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache, i, start, mask, kv_len)
        if self.norm is None:
            return h
        if not head:
            return self.norm(h)
        if last_logits_only:
            h = h[:, -1:]
        return self.logits(self.norm(h))

    def prepare_positions(self, count: int) -> None:
        """Serve positions 0..count-1 (the context window; longrope picks its factors by it) and build their rotary
        tables (forward_batch reads them without checking, so that a compiled step has no data-dependent branch)."""
        if count != self.context_length:
            self.context_length, self._rope_len = count, 0
        p = next(self.parameters())
        self._rope(0, count, p.dtype if p.is_floating_point() else torch.float32)

    def forward_batch(self, x: torch.Tensor, cache: PagedKVCache, layout: BatchLayout) -> torch.Tensor:
        """One step of many sequences, their tokens packed: x is token ids [T] on the first stage, hidden states
        [T, H] elsewhere. Returns hidden states [T, H], or on the last stage the logits [R, V] of
        `layout.logit_rows`. Every position must be below `prepare_positions`'s count."""
        h = self.embed(x)
        cos, sin = self._cos[layout.positions].to(h.dtype), self._sin[layout.positions].to(h.dtype)
        for i, layer in enumerate(cast("Iterable[Block]", self.layers)):
            h = layer.forward_packed(h, cos, sin, cache, i, layout)
        if self.norm is None:
            return h
        rows = h[layout.logit_rows]
        if rows.shape[0] == 0:  # a prompt chunk that wants no logits; IPEX's weight-only int8 linear faults (SIGFPE)
            return rows.new_empty(0, self.args.vocab_size)  # on zero rows on an AMX Xeon
        return self.logits(self.norm(rows))

    def load_weights(self, weights: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None,
                     finish_layer: Callable[[nn.Module, int], None] | None = None, int8_ends: bool = False,
                     int4_embedding: bool = False) -> None:
        """Load Hugging Face-named tensors (global layer indices) of this stage; fuses qkv and gate/up.

        One layer at a time: its tensors are looked up (a `LazyWeights` reads them then), converted, fused and
        assigned, then `finish_layer(layer, global index)` runs (quantising it, say) before the next layer is read,
        so a load holds one layer beyond what the finished layers keep. A weight given as a meta tensor is assigned
        as it is: `finish_layer` replaces its linear without reading it (from a file's 4-bit groups). With `int8_ends`, the embedding and the
        lm_head are rounded to int8 rows as they are read, a slice of rows at a time (one tensor when tied); with
        `int4_embedding` as well, an embedding that is not also this stage's lm_head is rounded to 4-bit groups."""

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise ModelLoadError(f"weights are missing tensor {name!r}")
            tensor = weights[name]
            if tensor.is_meta:  # see `finish_layer`
                return tensor
            # integer tensors are packed codes (gpt_oss's MXFP4 experts), kept as stored
            return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)

        def fused(whole: str, *names: str) -> torch.Tensor:
            """The checkpoint's own fused tensor `whole` where it has one (Phi-3 stores qkv_proj and gate_up_proj in
            the layout of ours: q, k, v rows; gate rows, then up), else its parts `names` stacked."""
            if whole in weights:
                return take(whole)
            return torch.cat([take(name) for name in names]) if len(names) > 1 else take(names[0])

        for i, layer in enumerate(cast("Iterable[Block]", self.layers)):
            src = f"model.layers.{self.start + i}."
            attn = src + "self_attn."
            own = {
                "self_attn.qkv_proj.weight": fused(attn + "qkv_proj.weight",
                                                   *(attn + f"{p}_proj.weight" for p in "qkv")),
                "self_attn.o_proj.weight": take(attn + "o_proj.weight"),
                **self.mlp_weights(take, fused, src, self.start + i),
                "input_layernorm.weight": take(src + "input_layernorm.weight"),
                "post_attention_layernorm.weight": take(src + "post_attention_layernorm.weight"),
            }
            if self.args.attention_bias:
                own["self_attn.qkv_proj.bias"] = fused(attn + "qkv_proj.bias",
                                                       *(attn + f"{p}_proj.bias" for p in "qkv"))
            if self.args.qk_norm:
                own["self_attn.q_norm.weight"] = take(attn + "q_norm.weight")
                own["self_attn.k_norm.weight"] = take(attn + "k_norm.weight")
            layer.load_state_dict(own, strict=True, assign=True)
            del own
            if finish_layer is not None:
                finish_layer(layer, self.start + i)
        def int8_rows(name: str) -> Int8Rows:
            rows = rows_of(name)
            return read_rows_int8(rows.rows, rows.read, rows.columns, device or "cpu")

        def rows_of(name: str) -> RowReader:
            if name not in weights:
                raise ModelLoadError(f"weights are missing tensor {name!r}")
            return row_reader(weights, name)

        tied = self.args.tie_word_embeddings and "lm_head.weight" not in weights
        if self.embed_tokens is not None:
            if int8_ends and int4_embedding and not (tied and self.lm_head is not None):
                rows = rows_of("model.embed_tokens.weight")
                self.embed_tokens = Int4Embedding(read_rows_int4(rows.rows, rows.read, rows.columns, device or "cpu"),
                                                  dtype)
            elif int8_ends:
                self.embed_tokens = Int8Embedding(int8_rows("model.embed_tokens.weight"), dtype)
            else:
                self.embed_tokens.load_state_dict({"weight": take("model.embed_tokens.weight")}, assign=True)
        if self.norm is not None and self.lm_head is not None:
            self.norm.load_state_dict({"weight": take("model.norm.weight")}, assign=True)
            head = "model.embed_tokens.weight" if tied else "lm_head.weight"
            if tied and self.embed_tokens is not None:  # a whole model: one tensor, as in the checkpoint
                if isinstance(self.embed_tokens, Int8Embedding):
                    self.lm_head = self.embed_tokens.head(dtype)
                else:
                    cast(nn.Linear, self.lm_head).weight = cast(nn.Embedding, self.embed_tokens).weight
            elif int8_ends:
                self.lm_head = int8_linear(int8_rows(head), None, dtype)
            else:
                self.lm_head.load_state_dict({"weight": take(head)}, assign=True)
        self._rope_len = 0

    def mlp_weights(self, take: Callable[[str], torch.Tensor], fused: Callable[..., torch.Tensor], prefix: str,
                    layer: int) -> dict[str, torch.Tensor]:
        """Layer `layer`'s MLP tensors under the block's names, from the checkpoint's under `prefix` (`take` reads one,
        `fused` a fused one or its parts stacked, as `load_weights` defines them)."""
        return {"mlp.gate_up_proj.weight": fused(prefix + "mlp.gate_up_proj.weight", prefix + "mlp.gate_proj.weight",
                                                 prefix + "mlp.up_proj.weight"),
                "mlp.down_proj.weight": take(prefix + "mlp.down_proj.weight")}


@register("llama")
def build_llama(args: ModelArgs, start: int, end: int) -> Transformer:
    return Transformer(args, start, end)
