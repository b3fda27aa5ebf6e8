"""Every field the official openai and ollama clients can send, sent through them: each is honoured, accepted as
documented, or refused with a 400 naming it; none is silently dropped. A field a newer client adds fails the first
test until it is decided here."""

from __future__ import annotations

import typing

import ollama
import openai
import pytest
from ollama import _types as ollama_types
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from ringlet.models.embedded import EMBEDDED_MODEL_ID
from tests.support.fake_node import FakeNode

OK, REFUSED = "ok", "400"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

# field -> (a value a client might send, what ringlet answers)
CHAT: dict[str, tuple[object, str]] = {
    "model": (EMBEDDED_MODEL_ID, OK), "messages": (QUESTION, OK), "stream": (False, OK),
    "frequency_penalty": (0.5, OK), "presence_penalty": (0.5, OK), "temperature": (0.5, OK), "top_p": (0.9, OK),
    "seed": (7, OK), "stop": (["\n\n"], OK), "n": (2, OK), "max_tokens": (3, OK), "max_completion_tokens": (3, OK),
    "stream_options": ({"include_usage": True}, OK),  # a whole answer always carries its usage
    "logit_bias": ({"17": 5.0}, OK), "response_format": ({"type": "json_object"}, OK),
    "tool_choice": ("none", OK), "parallel_tool_calls": (False, OK), "user": ("me", OK), "metadata": ({"a": "b"}, OK),
    "service_tier": ("auto", OK), "safety_identifier": ("x", OK), "prompt_cache_key": ("k", OK),
    "prompt_cache_retention": ("24h", OK), "prompt_cache_options": ({"mode": "x"}, OK), "modalities": (["text"], OK),
    "store": (True, REFUSED), "logprobs": (True, OK), "top_logprobs": (3, REFUSED),  # top_logprobs alone
    "tools": ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], REFUSED),
    "functions": ([{"name": "f", "parameters": {"type": "object"}}], REFUSED), "function_call": ({"name": "f"}, REFUSED),
    "audio": ({"voice": "alloy", "format": "wav"}, REFUSED), "prediction": ({"type": "content", "content": "x"}, REFUSED),
    "web_search_options": ({}, REFUSED), "reasoning_effort": ("low", REFUSED), "verbosity": ("low", REFUSED),
    "moderation": ({"mode": "x"}, REFUSED),
}
COMPLETION: dict[str, tuple[object, str]] = {
    "model": (EMBEDDED_MODEL_ID, OK), "prompt": ("The capital of France is", OK), "stream": (False, OK),
    "best_of": (1, OK), "echo": (True, OK), "frequency_penalty": (0.5, OK), "presence_penalty": (0.5, OK),
    "logit_bias": ({"17": -5.0}, OK), "max_tokens": (3, OK), "n": (2, OK), "seed": (1, OK), "stop": ("\n", OK),
    "temperature": (0.2, OK), "top_p": (0.5, OK), "user": ("me", OK),
    "stream_options": ({"include_usage": True}, OK), "logprobs": (2, REFUSED), "suffix": ("end", REFUSED),
}
OLLAMA_CHAT: dict[str, tuple[object, str]] = {
    "model": (EMBEDDED_MODEL_ID, OK), "messages": (QUESTION, OK), "stream": (False, OK), "format": ("json", OK),
    "options": ({"num_predict": 3}, OK), "keep_alive": ("5m", OK), "think": (True, REFUSED),
    "logprobs": (True, OK), "top_logprobs": (2, REFUSED),  # top_logprobs alone
    "tools": ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], REFUSED),
}
OLLAMA_GENERATE: dict[str, tuple[object, str]] = {
    "model": (EMBEDDED_MODEL_ID, OK), "prompt": ("Hello", OK), "stream": (False, OK), "format": ("json", OK),
    "options": ({"num_predict": 3}, OK), "keep_alive": (0, OK), "system": ("Be brief.", OK), "raw": (True, OK),
    "suffix": ("end", REFUSED), "template": ("{{ .Prompt }}", REFUSED), "context": ([1, 2], REFUSED),
    "images": (["aGk="], REFUSED), "think": (True, REFUSED), "logprobs": (True, OK), "top_logprobs": (2, REFUSED),
    "width": (64, REFUSED), "height": (64, REFUSED), "steps": (4, REFUSED),
}


def client_fields(params: type) -> set[str]:
    return set(typing.get_type_hints(params)) | {"stream"}


@pytest.mark.parametrize(("table", "fields"), [
    (CHAT, client_fields(chat_params.CompletionCreateParamsBase)),
    (COMPLETION, client_fields(completion_params.CompletionCreateParamsBase)),
    (OLLAMA_CHAT, set(ollama_types.ChatRequest.model_fields)),
    (OLLAMA_GENERATE, set(ollama_types.GenerateRequest.model_fields)),
], ids=["openai chat", "openai completions", "ollama chat", "ollama generate"])
def test_every_field_the_clients_send_is_decided(table, fields):
    assert fields == set(table), f"undecided: {sorted(fields - set(table))}; gone: {sorted(set(table) - fields)}"


def _base(table: dict[str, tuple[object, str]], *required: str) -> dict[str, object]:
    return {name: table[name][0] for name in required}


@pytest.mark.parametrize("field", sorted(CHAT))
def test_openai_chat_field(url: str, node: FakeNode, field: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    fields = _base(CHAT, "model", "messages") | {"max_tokens": 3, field: CHAT[field][0]}
    _expect(lambda: client.chat.completions.create(**fields), field, CHAT[field][1])  # type: ignore[call-overload]


@pytest.mark.parametrize("field", sorted(COMPLETION))
def test_openai_completions_field(url: str, node: FakeNode, field: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    fields = _base(COMPLETION, "model", "prompt") | {"max_tokens": 3, field: COMPLETION[field][0]}
    _expect(lambda: client.completions.create(**fields), field, COMPLETION[field][1])  # type: ignore[call-overload]


def _expect(call: typing.Callable[[], object], field: str, answer: str) -> None:
    if answer == OK:
        call()
        return
    with pytest.raises(openai.BadRequestError) as error:
        call()
    assert field in error.value.message and (error.value.param or "").split(".")[0] == field


@pytest.mark.parametrize("field", sorted(OLLAMA_CHAT))
def test_ollama_chat_field(url: str, node: FakeNode, field: str) -> None:
    client = ollama.Client(host=url, timeout=30)
    fields = _base(OLLAMA_CHAT, "model", "messages") | {field: OLLAMA_CHAT[field][0]}
    _expect_ollama(lambda: client.chat(**fields), field, OLLAMA_CHAT[field][1])  # type: ignore[arg-type]


@pytest.mark.parametrize("field", sorted(OLLAMA_GENERATE))
def test_ollama_generate_field(url: str, node: FakeNode, field: str) -> None:
    client = ollama.Client(host=url, timeout=30)
    fields = _base(OLLAMA_GENERATE, "model", "prompt") | {field: OLLAMA_GENERATE[field][0]}
    _expect_ollama(lambda: client.generate(**fields), field, OLLAMA_GENERATE[field][1])  # type: ignore[arg-type]


def _expect_ollama(call: typing.Callable[[], object], field: str, answer: str) -> None:
    if answer == OK:
        call()
        return
    with pytest.raises(ollama.ResponseError) as error:
        call()
    assert error.value.status_code == 400 and field in error.value.error
