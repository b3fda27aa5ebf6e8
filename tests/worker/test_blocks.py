"""The paged KV cache's bookkeeping: block tables, slots, prefix reuse, and eviction, without tensors."""

from __future__ import annotations

import pytest

from ringlet.worker.blocks import BlockManager


def compute_all(blocks: BlockManager, seq_id: str, tokens: list[int]) -> None:
    """Admit a sequence and compute every one of its tokens into the cache."""
    blocks.admit(seq_id, tokens)
    blocks.reserve(seq_id, len(tokens))
    blocks.advance(seq_id, tokens)


def test_a_sequence_gets_blocks_as_it_grows_and_gives_them_back() -> None:
    blocks = BlockManager(num_blocks=4, block_size=4)
    assert blocks.admit("a", [1, 2, 3, 4, 5, 6]) == 0
    assert blocks.can_reserve("a", 6)
    blocks.reserve("a", 6)
    assert len(blocks.table("a")) == 2 and blocks.free_blocks == 2
    assert blocks.slots("a", 3, 3) == [blocks.table("a")[0] * 4 + 3, blocks.table("a")[1] * 4, blocks.table("a")[1] * 4 + 1]
    blocks.advance("a", [1, 2, 3, 4, 5, 6])
    assert blocks.length("a") == 6
    assert not blocks.can_reserve("a", 11) and blocks.can_reserve("a", 10)
    blocks.release("a")
    assert blocks.free_blocks == 4 and "a" not in blocks


def test_a_shared_prefix_is_computed_once() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    system = list(range(100, 108))  # two whole blocks
    first = [*system, 1, 2, 3]
    compute_all(blocks, "first", first)
    second = [*system, 7, 8]
    assert blocks.admit("second", second) == 8, "both blocks of the shared prefix are reused"
    assert blocks.table("second") == blocks.table("first")[:2]
    blocks.reserve("second", 2)
    assert blocks.table("second")[2] != blocks.table("first")[2]
    other = [*system[:4], 0, 0, 0, 0, 9]
    assert blocks.admit("other", other) == 4, "a prefix is reused up to the first block that differs"


def test_the_last_token_is_always_computed() -> None:
    blocks = BlockManager(num_blocks=4, block_size=4)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    compute_all(blocks, "a", tokens)
    blocks.release("a")
    assert blocks.admit("again", tokens) == 4, "the second block holds the last token: it is computed again"


def test_released_prefixes_stay_cached_until_their_blocks_are_needed() -> None:
    blocks = BlockManager(num_blocks=3, block_size=2)
    a = [1, 2, 3, 4, 5]
    compute_all(blocks, "a", a)
    blocks.release("a")
    assert blocks.free_blocks == 3
    assert blocks.admit("b", [1, 2, 3, 4, 9]) == 4
    blocks.release("b")
    # a new sequence needs every block: the cached ones are taken, least recently used first
    blocks.admit("c", [7, 7, 7, 7, 7, 7])
    blocks.reserve("c", 6)
    assert blocks.free_blocks == 0
    blocks.release("c")
    assert blocks.admit("d", [1, 2, 3, 4, 5]) == 0, "the evicted prefix is gone"


def test_admission_counts_the_blocks_a_prefix_saves() -> None:
    blocks = BlockManager(num_blocks=4, block_size=2)
    a = [1, 2, 3, 4, 5]
    compute_all(blocks, "a", a)
    assert blocks.free_blocks == 1
    assert blocks.can_admit([1, 2, 3, 4, 6]), "two of its three blocks are a's"
    assert not blocks.can_admit([7, 7, 7, 7, 7]), "three new blocks, one free"
    assert not blocks.can_admit([1, 2, 3, 4, 6], reserve=1), "the last free block is kept for others"
    blocks.admit("b", [7, 7, 7])
    blocks.reserve("b", 2)
    with pytest.raises(MemoryError):
        blocks.reserve("b", 3)
