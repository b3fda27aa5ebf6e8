"""The packed step's attention forms agree with grouped-query attention under the group's own mask: the query heads
folded into the queries (decodes, several sequences), and a single prompt chunk's lower-right causal bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ringlet.models.llama import _folded_attention
from ringlet.models.paged_cache import SequenceStep, _group


def test_folded_query_heads_attend_as_grouped_query_attention() -> None:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 2, 16, generator=generator)  # 3 sequences, 8 query heads over 2 key heads, 2 queries
    k, v = (torch.randn(3, 2, 37, 16, generator=generator) for _ in range(2))
    mask = torch.rand(3, 1, 2, 37, generator=generator) > 0.3
    mask[..., 0] = True
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(_folded_attention(q, k, v, mask), want)


def test_a_single_prompt_chunk_is_lower_right_causal() -> None:
    chunk = _group([SequenceStep(start=20, count=6, blocks=[3, 1, 2])], list(range(6)), 6, 16, "cpu", pad_slot=99)
    decodes = _group([SequenceStep(20, 1, [3, 1]), SequenceStep(5, 1, [0])], [0, 1], 1, 16, "cpu", pad_slot=99)
    assert chunk.causal and not decodes.causal
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 8, 6, 16, generator=generator)
    k, v = (torch.randn(1, 2, 26, 16, generator=generator) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=chunk.mask, enable_gqa=True)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(6, 26), enable_gqa=True)
    torch.testing.assert_close(got, want)
