"""The paged KV cache of a stage, and the layout of one batched step over it.

Keys and values live in fixed-size blocks: a layer's cache is `num_blocks * block_size` slots of
[kv_heads, head_dim]. Which slots a sequence owns is bookkeeping outside the tensors (`worker/blocks.py`); a step
hands the model a `BatchLayout`: the packed tokens' positions and the slots their keys and values go to, and for
attention the groups of queries with the slots of their context. Sequences decoding one token form one group; a
prompt chunk is a group of its own (its queries see the context up to themselves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# a step's token id meaning "the previous step's greedy pick of this row", which an engine that picks on the device
# (the graphed CUDA step) keeps there: the host launches the next step before it has read the token
FED = -1


class CacheLost(RuntimeError):
    """An engine's KV cache lost its contents (its device failed and a fallback took over with an empty cache): the
    step did not run, and every sequence must be computed again from its tokens."""


@dataclass(frozen=True)
class SequenceStep:
    """What one sequence computes in a step: `count` tokens from position `start`, over its block table."""

    start: int
    count: int
    blocks: Sequence[int]
    wants_logits: bool = True  # the last token's logits (a prompt chunk before the last one needs none)

    def slot(self, position: int, block_size: int) -> int:
        """The cache slot of `position` in this sequence's blocks."""
        return self.blocks[position // block_size] * block_size + position % block_size


@dataclass(frozen=True)
class AttentionGroup:
    """Queries of `rows` ([G * Q] rows of the step, sequence-major) over their context `slots` [G, S] under `mask`
    [G, 1, Q, S] (False where a key is padding or lies after the query). `causal`: one sequence's chunk, its queries
    the last Q of its S positions, so the mask is the lower-right causal one (which flash kernels apply themselves)."""

    rows: torch.Tensor
    queries: int
    slots: torch.Tensor
    mask: torch.Tensor
    causal: bool = False


@dataclass(frozen=True)
class BatchLayout:
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T]: where each token's key and value are written
    groups: tuple[AttentionGroup, ...]
    logit_rows: torch.Tensor  # rows whose outputs the last stage turns into logits, one per sequence that wants them

    @property
    def decode_only(self) -> bool:
        """Every sequence computes one token, and every one wants its logits: the shape of most steps."""
        return (len(self.groups) == 1 and self.groups[0].queries == 1
                and self.logit_rows.shape[0] == self.positions.shape[0])

    @classmethod
    def for_decode(cls, positions: torch.Tensor, slots: torch.Tensor, context: torch.Tensor,
                   mask: torch.Tensor) -> BatchLayout:
        """A decode-only step from its tensors (how a compiled decode step gets its layout)."""
        rows = torch.arange(positions.shape[0], device=positions.device)
        return cls(positions, slots, (AttentionGroup(rows, 1, context, mask),), rows)

    @classmethod
    def build(cls, steps: Sequence[SequenceStep], block_size: int, device: torch.device | str,
              pad_slot: int) -> BatchLayout:
        """`pad_slot`: a slot that always holds zeros (`PagedKVCache.pad_slot`), read wherever a sequence's context
        is shorter than its group's."""
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        decodes: list[tuple[SequenceStep, int]] = []  # (step, its row)
        chunks: list[tuple[SequenceStep, int]] = []  # (step, its first row)
        for step in steps:
            (decodes if step.count == 1 else chunks).append((step, len(positions)))
            for position in range(step.start, step.start + step.count):
                positions.append(position)
                slots.append(step.slot(position, block_size))
            if step.wants_logits:
                logit_rows.append(len(positions) - 1)
        groups = []
        if decodes:
            groups.append(_group([s for s, _ in decodes], [row for _, row in decodes], 1, block_size, device,
                                 pad_slot))
        for step, row in chunks:
            groups.append(_group([step], list(range(row, row + step.count)), step.count, block_size, device,
                                 pad_slot))

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(tensor(positions), tensor(slots), tuple(groups), tensor(logit_rows))


def _group(steps: Sequence[SequenceStep], rows: list[int], queries: int, block_size: int,
           device: torch.device | str, pad_slot: int) -> AttentionGroup:
    """Sequences that each compute `queries` tokens; each sees its positions up to the query's own."""
    context = max(s.start + s.count for s in steps)
    width = -(-context // block_size)
    tables = torch.zeros(len(steps), width, dtype=torch.long)
    for i, step in enumerate(steps):
        used = -(-(step.start + step.count) // block_size)
        tables[i, :used] = torch.tensor(step.blocks[:used], dtype=torch.long)
    position = torch.arange(context)
    slots = tables[:, position // block_size] * block_size + position % block_size  # [G, S]
    # past a sequence's own context: the zero slot (unwritten slots may hold NaN bits, which a mask cannot undo)
    ends = torch.tensor([s.start + s.count for s in steps])
    slots = torch.where(position[None, :] < ends[:, None], slots, pad_slot)
    last = torch.tensor([[s.start + q for q in range(queries)] for s in steps])  # [G, Q] each query's position
    mask = position[None, None, :] <= last[:, :, None]  # [G, Q, S]
    return AttentionGroup(torch.tensor(rows, dtype=torch.long, device=device), queries, slots.to(device),
                          mask[:, None].to(device), causal=len(steps) == 1 and queries > 1)


class PagedKVCache:
    """Keys and values of a stage's layers in slots [num_blocks * block_size, kv_heads, head_dim] per layer, one more
    slot of zeros (`pad_slot`) for the padding of attention groups, and a scratch slot that padding rows of a
    fixed-size step write to (`scratch_slot`; never read)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.pad_slot = num_blocks * block_size
        self.scratch_slot = self.pad_slot + 1
        shape = (self.pad_slot + 2, kv_heads, head_dim)
        # written through at once (on a CPU, untouched pages would take memory only as sequences first reach them:
        # a node's memory would grow under load for minutes, and a machine short of it would fail mid-answer
        # rather than at load); the pad slot must be zeros, the rest is read only once its sequence wrote it
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, kv_heads, head_dim] of the step's tokens, into their slots."""
        self.keys[layer].index_copy_(0, slots, k)
        self.values[layer].index_copy_(0, slots, v)

    def context(self, layer: int, group: AttentionGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's keys and values, [G, kv_heads, S, head_dim] (padding where the mask is False)."""
        k = self.keys[layer][group.slots]  # [G, S, kv_heads, head_dim]
        v = self.values[layer][group.slots]
        return k.transpose(1, 2), v.transpose(1, 2)
