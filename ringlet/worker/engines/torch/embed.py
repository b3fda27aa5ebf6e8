"""Embeddings on a torch stage that holds a whole embedding model: each input's final hidden states (after the final
norm, before the lm_head), pooled as the model's files say (`models/pooling.py`), normalised when they say so.

Inputs of similar length go through one forward together, padded on the right to the longest, as many as fit the
engine's step (`EngineConfig.max_step_tokens` padded tokens, so a forward takes about as long as a generation's step):
attention is causal, so no real token attends to the padding after it, and the padding's own outputs are never
pooled. Such a forward keeps no KV cache (`PassThroughCache`), so embeddings never take room from the generations'
cache. An input longer than a step goes alone, a step's worth of tokens at a time over a cache of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ringlet.models.config import ModelArgs
from ringlet.models.llama import Transformer
from ringlet.models.pooling import Pooling
from ringlet.models.tokenizer import Tokenizer
from ringlet.shared.errors import ContextWindowError
from ringlet.shared.tasks import EmbeddingInput, EmbeddingTask, GenerationChunk, Usage

VECTORS_PER_CHUNK = 64  # embeddings per chunk on the wire: a chunk is one line between processes


class PassThroughCache:
    """The cache contract of `Transformer.forward` for whole sequences: attention sees the keys and values of the
    call itself, and nothing is kept."""

    def update_and_fetch(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        assert start == 0, "an embedding forward runs whole sequences"
        return k, v


def not_an_embedding_model(model: str) -> ValueError:
    return ValueError(f"model {model!r} is not an embedding model: its files name no pooling (a sentence-transformers "
                      "modules.json with a Pooling module, or a GGUF file's pooling_type); embeddings need a model "
                      "made for them, such as Qwen/Qwen3-Embedding-0.6B")


def input_ids(tokenizer: Tokenizer, inputs: Sequence[EmbeddingInput], vocab_size: int, context_length: int,
              truncate: bool) -> list[list[int]]:
    """Each input's token ids (text tokenised with the model's special tokens, as sentence-transformers does); one
    longer than the context is cut to it, or refused without `truncate`."""
    ids = []
    for index, item in enumerate(inputs):
        tokens = tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not tokens:
            raise ValueError(f"input {index} has no tokens (empty, or only characters the tokenizer drops); "
                             "send some text")
        if (top := max(tokens)) >= vocab_size:
            raise ValueError(f"input {index} has token id {top}, beyond the model's vocabulary of {vocab_size}")
        if len(tokens) > context_length:
            if not truncate:
                raise ContextWindowError(f"input {index} has {len(tokens)} tokens but the context window is "
                                         f"{context_length}; shorten it, or let it be truncated")
            tokens = tokens[:context_length]
        ids.append(tokens)
    return ids


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """hidden [B, L, H] of right-padded sequences of `lengths` [B] -> [B, H] in fp32."""
    hidden = hidden.float()
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling.mode == "lasttoken":
        return hidden[rows, lengths - 1]
    if pooling.mode == "cls":
        return hidden[:, 0]
    real = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
    return (hidden * real[..., None]).sum(dim=1) / lengths[:, None].to(hidden.dtype)


def _groups(ids: list[list[int]], step_tokens: int) -> list[list[int]]:
    """Indices of the inputs, shortest first, in groups whose padded size (count x longest) fits `step_tokens`
    (a longer input alone)."""
    groups: list[list[int]] = []
    for index in sorted(range(len(ids)), key=lambda i: len(ids[i])):
        if groups and (len(groups[-1]) + 1) * len(ids[index]) <= step_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _hidden(model: Transformer, batch: torch.Tensor, step_tokens: int,
            after_forward: Callable[[], None]) -> torch.Tensor:
    """The final hidden states [B, L, H] of right-padded token ids [B, L]: one forward, or for one input longer than
    a step, a step's worth of positions at a time over a cache of its own."""
    length = batch.shape[1]
    if batch.numel() <= step_tokens:
        hidden = model(batch, PassThroughCache(), 0, head=False)
        after_forward()
        return hidden
    assert batch.shape[0] == 1, "inputs longer than a step go alone"
    cache = model.make_cache(1, length)
    parts = []
    for start in range(0, length, step_tokens):
        parts.append(model(batch[:, start:start + step_tokens], cache, start, head=False))
        after_forward()
    return torch.cat(parts, dim=1)


# the pooled vectors [B, H] (fp32, on the host) of right-padded token ids [B, L] of `lengths` [B]
PooledForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.inference_mode()
def embed(model: Transformer, tokenizer: Tokenizer, pooling: Pooling | None, task: EmbeddingTask,
          context_length: int, step_tokens: int, after_forward: Callable[[], None] = lambda: None
          ) -> list[GenerationChunk]:
    """The task's embeddings by a whole model, in input order, as chunks of at most VECTORS_PER_CHUNK vectors; the
    last carries the usage. `after_forward()` runs after each forward (the runner tells the node there that it is
    alive). Raises ValueError (ContextWindowError) for a request the model cannot answer."""
    assert model.is_first and model.is_last, "a whole model embeds"
    device = next(model.parameters()).device

    def pooled(batch: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        assert pooling is not None  # embed_inputs checks it first
        hidden = _hidden(model, batch.to(device), step_tokens, after_forward)
        return pool(hidden, lengths.to(device), pooling).cpu()

    return embed_inputs(pooled, tokenizer, pooling, task, model.args, context_length, step_tokens)


def embed_inputs(pooled: PooledForward, tokenizer: Tokenizer, pooling: Pooling | None, task: EmbeddingTask,
                 args: ModelArgs, context_length: int, step_tokens: int) -> list[GenerationChunk]:
    """The task's inputs tokenised and grouped, each group's vectors from `pooled` (a whole model's forward, or a
    ring's), cut to `dimensions` and normalised where the model says so."""
    if pooling is None:
        raise not_an_embedding_model(task.model)
    if task.dimensions is not None and task.dimensions > args.hidden_size:
        raise ValueError(f"dimensions {task.dimensions} is more than the model's {args.hidden_size}")
    ids = input_ids(tokenizer, task.inputs, args.vocab_size, context_length, task.truncate)
    vectors = torch.empty(len(ids), args.hidden_size, dtype=torch.float32)
    for group in _groups(ids, step_tokens):
        batch = torch.zeros(len(group), max(len(ids[i]) for i in group), dtype=torch.long)
        for row, index in enumerate(group):
            batch[row, :len(ids[index])] = torch.tensor(ids[index])
        vectors[group] = pooled(batch, torch.tensor([len(ids[i]) for i in group]))
    if task.dimensions is not None:
        vectors = vectors[:, :task.dimensions]
    if pooling.normalize:
        vectors = F.normalize(vectors, p=2, dim=-1)
    return embedding_chunks(task.task_id, vectors.tolist(), sum(map(len, ids)))


def embedding_chunks(task_id: str, vectors: list[list[float]], prompt_tokens: int) -> list[GenerationChunk]:
    """Vectors in input order, VECTORS_PER_CHUNK to a chunk; the last chunk ends the task with the usage."""
    pieces = [vectors[i:i + VECTORS_PER_CHUNK] for i in range(0, len(vectors), VECTORS_PER_CHUNK)]
    return [GenerationChunk(task_id=task_id, embeddings=piece, last=i == len(pieces) - 1,
                            finish_reason="stop" if i == len(pieces) - 1 else None,
                            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=0)
                            if i == len(pieces) - 1 else None)
            for i, piece in enumerate(pieces)]
