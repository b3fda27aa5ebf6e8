"""Which blocks of the paged KV cache hold which sequence's keys and values: pure bookkeeping, no tensors.

The cache is `num_blocks` blocks of `block_size` positions. Each sequence has a block table (its blocks, in order)
and a length (how many of its positions hold computed keys and values). A full block is named by a hash of its
tokens and of everything before it, so a later sequence that starts with the same tokens (a shared system prompt,
a chat's earlier turns) takes those blocks as they are instead of computing them again. A block no sequence uses
keeps its contents until it is needed for something else, least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

BlockHash = int


@dataclass(eq=False)
class _Block:
    index: int
    users: int = 0
    hash: BlockHash | None = None  # set once the block is full and its contents are final
    tokens: tuple[int, ...] = ()


@dataclass
class _Table:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # positions with computed keys and values
    hashed: int = 0  # leading blocks whose hash is recorded


def chain_hash(previous: BlockHash | None, tokens: tuple[int, ...]) -> BlockHash:
    return hash((previous, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._empty: deque[int] = deque(range(num_blocks))  # unused blocks with nothing worth keeping
        self._cached: OrderedDict[int, None] = OrderedDict()  # unused named blocks, least recently used first
        self._by_hash: dict[BlockHash, int] = {}
        self._tables: dict[str, _Table] = {}

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def free_blocks(self) -> int:
        """Blocks no sequence uses (some hold a cached prefix, which is dropped when the block is needed)."""
        return len(self._empty) + len(self._cached)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def length(self, seq_id: str) -> int:
        return self._tables[seq_id].length

    def table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id].blocks

    # --- admitting a sequence

    def cached_prefix(self, tokens: list[int]) -> list[int]:
        """The cached blocks that hold the longest prefix of `tokens` in whole blocks, never all of them: the last
        token is always computed (its logits are needed)."""
        found: list[int] = []
        previous: BlockHash | None = None
        for begin in range(0, len(tokens) - 1 - (len(tokens) - 1) % self.block_size, self.block_size):
            chunk = tuple(tokens[begin:begin + self.block_size])
            previous = chain_hash(previous, chunk)
            index = self._by_hash.get(previous)
            if index is None or self._blocks[index].tokens != chunk:
                break
            found.append(index)
        return found

    def can_admit(self, tokens: list[int], reserve: int = 0) -> bool:
        """Whether `tokens` fit now (their cached prefix shared), with `reserve` blocks left for others."""
        cached = self.cached_prefix(tokens)
        needed = self.blocks_for(len(tokens)) - len(cached) + sum(1 for i in cached if self._blocks[i].users == 0)
        return needed + reserve <= self.free_blocks

    def admit(self, seq_id: str, tokens: list[int]) -> int:
        """Give the sequence its cached prefix; returns how many of its positions are computed already. Its other
        blocks come with `reserve` as its computation proceeds."""
        assert seq_id not in self._tables, f"sequence {seq_id} is admitted already"
        table = _Table()
        for index in self.cached_prefix(tokens):
            self._use(index)
            table.blocks.append(index)
        table.length = table.hashed = len(table.blocks)
        table.length *= self.block_size
        self._tables[seq_id] = table
        return table.length

    # --- growing

    def can_reserve(self, seq_id: str, positions: int) -> bool:
        table = self._tables[seq_id]
        return self.blocks_for(table.length + positions) - len(table.blocks) <= self.free_blocks

    def reserve(self, seq_id: str, positions: int) -> None:
        """Blocks for `positions` more positions after the sequence's length (check `can_reserve` first)."""
        table = self._tables[seq_id]
        while len(table.blocks) * self.block_size < table.length + positions:
            table.blocks.append(self._take_unused())

    def slots(self, seq_id: str, start: int, count: int) -> list[int]:
        """The cache slots (block index * block_size + offset) of positions [start, start + count)."""
        blocks, size = self._tables[seq_id].blocks, self.block_size
        return [blocks[p // size] * size + p % size for p in range(start, start + count)]

    def advance(self, seq_id: str, tokens: list[int]) -> None:
        """The sequence's keys and values now cover `tokens` (all its tokens so far, prompt first): its length
        becomes len(tokens), and each block that became full is named for the sequences that come later."""
        table = self._tables[seq_id]
        assert len(tokens) <= len(table.blocks) * self.block_size, "reserve before computing"
        table.length = len(tokens)
        previous = self._blocks[table.blocks[table.hashed - 1]].hash if table.hashed else None
        while (table.hashed + 1) * self.block_size <= table.length:
            block = self._blocks[table.blocks[table.hashed]]
            chunk = tuple(tokens[table.hashed * self.block_size:(table.hashed + 1) * self.block_size])
            previous = chain_hash(previous, chunk)
            if block.hash is None:
                block.hash, block.tokens = previous, chunk
                self._by_hash.setdefault(previous, block.index)
            table.hashed += 1

    def release(self, seq_id: str) -> None:
        """The sequence is done (or preempted): its blocks go back, named blocks keeping their contents."""
        for index in reversed(self._tables.pop(seq_id).blocks):
            block = self._blocks[index]
            block.users -= 1
            if block.users == 0 and block.hash is not None and self._by_hash.get(block.hash) == index:
                self._cached[index] = None  # the most recently used go last: dropped last
            elif block.users == 0:
                self._empty.append(index)

    def forget_contents(self) -> None:
        """The cache's contents are gone (its device failed): no block holds a prefix any more."""
        assert not self._tables, "release every sequence first"
        for block in self._blocks:
            block.hash, block.tokens = None, ()
        self._empty = deque(range(len(self._blocks)))
        self._cached.clear()
        self._by_hash.clear()

    # --- blocks

    def _use(self, index: int) -> None:
        block = self._blocks[index]
        if block.users == 0:
            del self._cached[index]  # only named blocks are found by a prefix
        block.users += 1

    def _take_unused(self) -> int:
        """A block for new contents: an empty one if there is one, else the least recently used cached one."""
        if self._empty:
            index = self._empty.popleft()
        elif self._cached:
            index, _ = self._cached.popitem(last=False)
            dropped = self._blocks[index].hash
            assert dropped is not None, "only named blocks are cached"
            del self._by_hash[dropped]
        else:
            raise MemoryError("the KV cache has no free block; check can_reserve first")
        block = self._blocks[index]
        block.hash, block.tokens, block.users = None, (), 1
        return index
