"""Constrained decoding: a request's output held to a JSON schema, any JSON object, a regular expression or one of a
list of strings, through llguidance (the grammar engine llama.cpp and vLLM use). `check` validates a constraint where
a request arrives (an API answers a bad one with a 400); `TokenMask` is one sequence's matcher: the sampler masks the
logits with it before each draw, then it consumes the token drawn. Once the grammar is complete, only the model's
end-of-sequence tokens are allowed, so the answer ends there."""

from __future__ import annotations

import functools
import json
import logging
import re
from types import ModuleType

import llguidance
import numpy as np
import torch

from ringlet.models.tokenizer import Tokenizer
from ringlet.shared.tasks import Constraint

log = logging.getLogger(__name__)

# JSON without free whitespace between its tokens: small models otherwise spend their tokens on blank lines
_COMPACT = {"whitespace_flexible": False}


class ConstraintError(ValueError):
    """A constraint that cannot be compiled: a schema that is not JSON or uses what the engine lacks, a bad regex."""


def grammar(constraint: Constraint) -> str:
    """llguidance's grammar for the constraint."""
    if constraint.kind in ("json_object", "json_schema"):
        schema: object = {"type": "object"}
        if constraint.kind == "json_schema":
            try:
                schema = json.loads(constraint.spec)
            except json.JSONDecodeError as error:
                raise ConstraintError(f"the JSON schema is not JSON: {error}") from None
            if not isinstance(schema, dict):
                raise ConstraintError("a JSON schema must be an object")
        assert isinstance(schema, dict)
        options = schema.get("x-guidance")
        schema = {**schema, "x-guidance": {**_COMPACT, **(options if isinstance(options, dict) else {})}}
        return str(llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema)))
    if constraint.kind == "regex":
        return str(llguidance.LLMatcher.grammar_from_regex(constraint.spec))
    choices = json.loads(constraint.spec)
    if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
        raise ConstraintError("a choice list must be a non-empty list of non-empty strings")
    # a Lark rule of string literals, each quoted as JSON quotes it
    return str(llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices)))


@functools.lru_cache(maxsize=64)
def _checked(constraint: Constraint) -> str:
    compiled = grammar(constraint)
    problem = llguidance.LLMatcher.validate_grammar(compiled)
    if problem:
        raise ConstraintError(_one_line(str(problem)))
    return compiled


def check(constraint: Constraint) -> None:
    """Raises ConstraintError, with the problem, for a constraint that cannot be compiled."""
    _checked(constraint)


def _one_line(text: str, most: int = 300) -> str:
    flat = re.sub(r"\s+", " ", text).strip() or "invalid grammar"
    return flat if len(flat) <= most else flat[:most - 3] + "..."


@functools.lru_cache(maxsize=8)
def _tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the model's vocabulary (built once per tokenizer: a few tenths of a second); `vocab_size`
    is the logits' width, which may exceed the tokenizer's."""
    return llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                  eos_token=list(tokenizer.eos_token_ids) or None)


@functools.cache
def _bitmasks() -> ModuleType:
    """llguidance's torch helpers, imported where a sequence is first masked: the module compiles a kernel with
    torch.compile as it loads, which imports dynamo (seconds) into processes that only check constraints."""
    import llguidance.torch as helpers

    return helpers


class TokenMask:
    """One sequence's grammar state: which tokens may come next. A grammar that fails while the answer is generated
    (a pattern that outgrows llguidance's limits on this vocabulary) never raises into the engine's step, where it
    would end the other sequences too: it records `failure` and allows only the end of the sequence from then on."""

    def __init__(self, constraint: Constraint, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.matcher = llguidance.LLMatcher(_tokenizer(tokenizer, vocab_size), _checked(constraint))
        if self.matcher.is_error():
            raise ConstraintError(_one_line(self.matcher.get_error()))
        self.bits = _bitmasks().allocate_token_bitmask(1, vocab_size)
        self.ends = [t for t in tokenizer.eos_token_ids if t < vocab_size]
        self.failure: str | None = None

    def next_bits(self) -> np.ndarray:
        """The tokens allowed next: bit i % 32 of int32 word i // 32 for token i, as a view this mask reuses."""
        if self.failure is None:
            _bitmasks().fill_next_token_bitmask(self.matcher, self.bits, 0)
            if self.matcher.is_error():
                self._fail(self.matcher.get_error())
        if self.failure is not None:
            self.bits.zero_()
            for token in self.ends:
                self.bits[0, token // 32] |= 1 << (token % 32)
        return self.bits[0].numpy()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [1, V] (float32, any device) with every token the grammar refuses at -inf, in place."""
        self.next_bits()
        _bitmasks().apply_token_bitmask_inplace(logits, self.bits.to(logits.device, non_blocking=True))
        return logits

    def advance(self, token: int) -> None:
        """The grammar takes the token drawn."""
        if self.failure is None and not self.matcher.consume_token(token):
            self._fail(self.matcher.get_error() or f"token {token} refused")

    def _fail(self, reason: str) -> None:
        self.failure = f"the output's grammar failed: {_one_line(reason)}"
        log.warning("%s; the answer ends here", self.failure)
