"""Walks under a grammar's token mask: the best of random logits (with a bonus for closing tokens) drawn until the
grammar allows only the end of the sequence; tests that a grammar holds whatever the model would say."""

from __future__ import annotations

import torch

from ringlet.models.grammar import TokenMask
from ringlet.models.tokenizer import Tokenizer

VOCAB = 49152  # the embedded model's logits


def closing_tokens(tokenizer: Tokenizer) -> torch.Tensor:
    """A bonus [V] for the tokens that end a string, an array or an object, and for the end of the sequence."""
    bonus = torch.zeros(VOCAB)
    for token in range(tokenizer.vocab_size):
        if any(c in tokenizer.decode([token]) for c in '"]}'):
            bonus[token] = 4.0
    bonus[tokenizer.eos_token_ids] = 8.0
    return bonus


def walk(mask: TokenMask, tokenizer: Tokenizer, seed: int, most: int = 400, bonus: torch.Tensor | None = None) -> str:
    """Draws the best of random logits (plus `bonus`) under the mask until the grammar allows only the end of the
    sequence."""
    g = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    for _ in range(most):
        logits = mask.apply(torch.randn(1, VOCAB, generator=g) + (0 if bonus is None else bonus))
        token = int(logits.argmax())
        if token in tokenizer.eos_token_ids:
            return tokenizer.decode(tokens)
        assert logits[0, token] > float("-inf")
        mask.advance(token)  # raises if the grammar refuses it
        tokens.append(token)
    raise AssertionError(f"no end after {most} tokens: {tokenizer.decode(tokens)!r}")
