"""Constrained decoding (`models/grammar.py`) with the embedded model's tokenizer: a constraint that cannot be
compiled is refused with its problem; random walks under the mask (random logits, the mask applied, the best token
drawn) always end in text that parses and validates, for random JSON schemas, regular expressions and choice lists;
the sampler applies the mask on every path."""

from __future__ import annotations

import json
import re

import jsonschema_rs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringlet.models.embedded import embedded_model_path
from ringlet.models.gguf_loader import GGUFModel
from ringlet.models.grammar import ConstraintError, TokenMask, check
from ringlet.models.sampling import RequestSampler
from ringlet.models.tokenizer import Tokenizer
from ringlet.shared.tasks import Constraint, SamplingParams
from tests.support.grammar_walk import VOCAB, closing_tokens, walk


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return GGUFModel(embedded_model_path()).tokenizer()


@pytest.mark.parametrize(("constraint", "problem"), [
    (Constraint(kind="json_schema", spec="{not json"), "not JSON"),
    (Constraint(kind="json_schema", spec="[1, 2]"), "must be an object"),
    (Constraint(kind="json_schema", spec='{"type": "sandwich"}'), "sandwich"),
    (Constraint(kind="regex", spec="[a-"), "regex"),
    (Constraint(kind="choice", spec="[]"), "non-empty list"),
])
def test_a_constraint_that_cannot_compile_is_refused_with_its_problem(constraint, problem):
    with pytest.raises(ConstraintError, match=re.escape(problem)):
        check(constraint)


_leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda most: {"type": "string", "maxLength": most}, st.integers(0, 6)),
    st.builds(lambda low, span: {"type": "integer", "minimum": low, "maximum": low + span},
              st.integers(-50, 50), st.integers(0, 100)),
    st.lists(st.text("abcxyz -", min_size=1, max_size=5), min_size=1, max_size=4, unique=True).map(
        lambda values: {"enum": values}),
)
_schema = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.builds(lambda items, most: {"type": "array", "items": items, "maxItems": most}, inner, st.integers(0, 3)),
        st.dictionaries(st.sampled_from(["a", "b", "name", "x y", "é"]), inner, min_size=1, max_size=3).flatmap(
            lambda props: st.builds(
                lambda required: {"type": "object", "properties": props, "required": sorted(required),
                                  "additionalProperties": False},
                st.sets(st.sampled_from(sorted(props)))))),
    max_leaves=6,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_schema, seed=st.integers(0, 2**31))
def test_walks_under_a_random_schemas_mask_give_valid_json(tokenizer, schema, seed):
    mask = TokenMask(Constraint(kind="json_schema", spec=json.dumps(schema)), tokenizer, VOCAB)
    text = walk(mask, tokenizer, seed)
    jsonschema_rs.validate(schema, json.loads(text))


@pytest.mark.parametrize("seed", range(3))
def test_json_object_regex_and_choice_walks_match(tokenizer, seed):
    # free strings and objects: the walk leans towards closing them, or it would wander for ever
    text = walk(TokenMask(Constraint(kind="json_object"), tokenizer, VOCAB), tokenizer, seed, most=2000,
                bonus=closing_tokens(tokenizer))
    assert isinstance(json.loads(text), dict)
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    assert re.fullmatch(pattern, walk(TokenMask(Constraint(kind="regex", spec=pattern), tokenizer, VOCAB),
                                      tokenizer, seed))
    choices = ["Paris", "Lyon", "Saint-Étienne", "New \"York\""]
    mask = TokenMask(Constraint(kind="choice", spec=json.dumps(choices)), tokenizer, VOCAB)
    assert walk(mask, tokenizer, seed) in choices


@pytest.mark.parametrize("sampling", [
    SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.9, seed=3),
    SamplingParams(temperature=0.7, repetition_penalty=1.3),
])
def test_the_request_sampler_draws_only_what_the_grammar_allows(tokenizer, sampling):
    constraint = Constraint(kind="json_schema", spec=json.dumps(
        {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}))
    sampler = RequestSampler(sampling.model_copy(update={"constraint": constraint}), [1, 2, 3], VOCAB,
                             tokenizer=tokenizer)
    assert not sampler.plain_greedy and RequestSampler(sampling, [1], VOCAB).plain_greedy == sampling.greedy
    g = torch.Generator().manual_seed(0)
    tokens: list[int] = []
    while (token := int(sampler(torch.randn(1, VOCAB, generator=g)).item())) not in tokenizer.eos_token_ids:
        tokens.append(token)
        assert len(tokens) < 50
    assert json.loads(tokenizer.decode(tokens)) in ({"ok": True}, {"ok": False})


def test_a_constrained_request_needs_the_tokenizer_where_it_samples():
    with pytest.raises(ValueError, match="tokenizer"):
        RequestSampler(SamplingParams(constraint=Constraint(kind="json_object")), [1], VOCAB)


def test_a_grammar_that_fails_while_generating_ends_the_answer_without_raising(tokenizer):
    # compiles, but outgrows llguidance's lexer limits on this vocabulary at the first tokens
    sampler = RequestSampler(SamplingParams(temperature=0, constraint=Constraint(kind="regex", spec="(a{1000}){1000}")),
                             [1], VOCAB, tokenizer=tokenizer)
    tokens = [int(sampler(torch.randn(1, VOCAB)).item()) for _ in range(4)]
    assert tokens[-1] in tokenizer.eos_token_ids and sampler.failure is not None
    assert sampler.failure.startswith("the output's grammar failed: ")
