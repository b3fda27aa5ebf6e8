"""Every field the official openai, ollama and anthropic clients can send, sent through them: each is honoured, accepted as
documented, or refused with a 400 naming it; none is silently dropped. A field a newer client adds fails the first
test until it is decided here."""

from __future__ import annotations

import typing

import anthropic
import ollama
import openai
import pytest
from anthropic.types import message_create_params as anthropic_params
from ollama import _types as ollama_types
from openai.types import completion_create_params as completion_params
from openai.types import embedding_create_params as embedding_params
from openai.types.chat import completion_create_params as chat_params
from openai.types.responses import response_create_params as responses_params

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
    "tool_choice": ("auto", OK), "parallel_tool_calls": (False, OK), "user": ("me", OK), "metadata": ({"a": "b"}, OK),
    "service_tier": ("auto", OK), "safety_identifier": ("x", OK), "prompt_cache_key": ("k", OK),
    "prompt_cache_retention": ("24h", OK), "prompt_cache_options": ({"mode": "x"}, OK), "modalities": (["text"], OK),
    "store": (True, REFUSED), "logprobs": (True, OK), "top_logprobs": (3, REFUSED),  # top_logprobs alone
    "tools": ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], OK),
    "functions": ([{"name": "f", "parameters": {"type": "object"}}], REFUSED), "function_call": ({"name": "f"}, REFUSED),
    "audio": ({"voice": "alloy", "format": "wav"}, REFUSED), "prediction": ({"type": "content", "content": "x"}, REFUSED),
    "web_search_options": ({}, REFUSED), "reasoning_effort": ("low", OK), "verbosity": ("low", REFUSED),
    "moderation": ({"mode": "x"}, REFUSED),
}
COMPLETION: dict[str, tuple[object, str]] = {
    "model": (EMBEDDED_MODEL_ID, OK), "prompt": ("The capital of France is", OK), "stream": (False, OK),
    "best_of": (1, OK), "echo": (True, OK), "frequency_penalty": (0.5, OK), "presence_penalty": (0.5, OK),
    "logit_bias": ({"17": -5.0}, OK), "max_tokens": (3, OK), "n": (2, OK), "seed": (1, OK), "stop": ("\n", OK),
    "temperature": (0.2, OK), "top_p": (0.5, OK), "user": ("me", OK),
    "stream_options": ({"include_usage": True}, OK), "logprobs": (2, OK), "suffix": ("end", REFUSED),
}
OLLAMA_CHAT: dict[str, tuple[object, str]] = {
    "model": (EMBEDDED_MODEL_ID, OK), "messages": (QUESTION, OK), "stream": (False, OK), "format": ("json", OK),
    "options": ({"num_predict": 3}, OK), "keep_alive": ("5m", OK), "think": (False, OK),
    "logprobs": (True, OK), "top_logprobs": (2, REFUSED),  # top_logprobs alone
    "tools": ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], OK),
}
OLLAMA_GENERATE: dict[str, tuple[object, str]] = {
    "model": (EMBEDDED_MODEL_ID, OK), "prompt": ("Hello", OK), "stream": (False, OK), "format": ("json", OK),
    "options": ({"num_predict": 3}, OK), "keep_alive": (0, OK), "system": ("Be brief.", OK), "raw": (True, OK),
    "suffix": ("end", REFUSED), "template": ("{{ .Prompt }}", REFUSED), "context": ([1, 2], REFUSED),
    "images": (["aGk="], REFUSED), "think": (False, OK), "logprobs": (True, OK), "top_logprobs": (2, REFUSED),
    "width": (64, REFUSED), "height": (64, REFUSED), "steps": (4, REFUSED),
}

RESPONSES: dict[str, tuple[object, str]] = {
    "model": (EMBEDDED_MODEL_ID, OK), "input": ("Hi", OK), "stream": (False, OK), "instructions": ("Be brief.", OK),
    "max_output_tokens": (3, OK), "metadata": ({"a": "b"}, OK), "parallel_tool_calls": (False, OK),
    "prompt_cache_key": ("k", OK), "prompt_cache_options": ({}, OK), "prompt_cache_retention": ("24h", OK),
    "safety_identifier": ("x", OK), "service_tier": ("auto", OK), "store": (False, OK),
    "stream_options": ({"include_obfuscation": False}, OK), "temperature": (0.5, OK), "top_p": (0.9, OK),
    "text": ({"format": {"type": "json_object"}}, OK), "tool_choice": ("auto", OK), "truncation": ("disabled", OK),
    "tools": ([{"type": "function", "name": "f", "parameters": {"type": "object"}}], OK), "user": ("me", OK),
    "access_programs": ({}, REFUSED), "background": (True, REFUSED), "background_options": ({}, REFUSED),
    "context_management": ([{"type": "compaction"}], REFUSED), "conversation": ("conv_1", REFUSED),
    "image": ({}, REFUSED), "include": (["message.output_text.logprobs"], REFUSED), "max_tool_calls": (2, REFUSED),
    "moderation": ({}, REFUSED), "previous_response_id": ("resp_1", REFUSED), "prompt": ({"id": "p"}, REFUSED),
    "reasoning": ({"effort": "low", "summary": "auto"}, OK), "top_logprobs": (2, REFUSED),
}
ANTHROPIC: dict[str, tuple[object, str]] = {
    "model": (EMBEDDED_MODEL_ID, OK), "messages": (QUESTION, OK), "max_tokens": (3, OK), "stream": (False, OK),
    "system": ("Be brief.", OK), "stop_sequences": (["\n\n"], OK), "metadata": ({"user_id": "u"}, OK),
    "tools": ([{"name": "f", "input_schema": {"type": "object"}}], OK), "tool_choice": ({"type": "auto"}, OK),
    "output_config": ({"format": {"type": "json_schema", "schema": {"type": "object"}}}, OK),
    "thinking": ({"type": "adaptive"}, OK), "service_tier": ("auto", OK),
    "cache_control": ({"type": "ephemeral"}, OK), "container": ("c-1", REFUSED), "diagnostics": ({}, OK),
    "inference_geo": ("us", OK), "speed": ("fast", REFUSED), "user_profile_id": ("p", OK), "workspace_id": ("w", OK),
}
EMBEDDINGS: dict[str, tuple[object, str]] = {
    "model": (EMBEDDED_MODEL_ID, OK), "input": (["Hello", "world"], OK), "dimensions": (4, OK),
    "encoding_format": ("float", OK), "user": ("me", OK),
}
OLLAMA_EMBED: dict[str, tuple[object, str]] = {
    "model": (EMBEDDED_MODEL_ID, OK), "input": (["Hello", "world"], OK), "truncate": (False, OK),
    "options": ({"num_ctx": 64}, OK), "keep_alive": ("5m", OK), "dimensions": (4, OK),
}
OLLAMA_EMBEDDINGS: dict[str, tuple[object, str]] = {
    "model": (EMBEDDED_MODEL_ID, OK), "prompt": ("Hello", OK), "options": ({"num_ctx": 64}, OK), "keep_alive": (0, OK),
}


def client_fields(params: type) -> set[str]:
    return set(typing.get_type_hints(params)) | {"stream"}


@pytest.mark.parametrize(("table", "fields"), [
    (CHAT, client_fields(chat_params.CompletionCreateParamsBase)),
    (COMPLETION, client_fields(completion_params.CompletionCreateParamsBase)),
    (OLLAMA_CHAT, set(ollama_types.ChatRequest.model_fields)),
    (OLLAMA_GENERATE, set(ollama_types.GenerateRequest.model_fields)),
    (ANTHROPIC, client_fields(anthropic_params.MessageCreateParamsBase)),
    (RESPONSES, client_fields(responses_params.ResponseCreateParamsBase)),
    (EMBEDDINGS, set(typing.get_type_hints(embedding_params.EmbeddingCreateParams))),
    (OLLAMA_EMBED, set(ollama_types.EmbedRequest.model_fields)),
    (OLLAMA_EMBEDDINGS, set(ollama_types.EmbeddingsRequest.model_fields)),
], ids=["openai chat", "openai completions", "ollama chat", "ollama generate", "anthropic messages",
        "openai responses", "openai embeddings", "ollama embed", "ollama embeddings"])
def test_every_field_the_clients_send_is_decided(table, fields):
    assert fields == set(table), f"undecided: {sorted(fields - set(table))}; gone: {sorted(set(table) - fields)}"


# endpoint -> its table, the fields every request needs, what each request adds, and how to send it
ENDPOINTS = {
    "openai chat": (CHAT, ("model", "messages"), {"max_tokens": 3},
                    lambda url: _openai(url).chat.completions.create),
    "openai completions": (COMPLETION, ("model", "prompt"), {"max_tokens": 3},
                           lambda url: _openai(url).completions.create),
    "ollama chat": (OLLAMA_CHAT, ("model", "messages"), {}, lambda url: ollama.Client(host=url, timeout=30).chat),
    "ollama generate": (OLLAMA_GENERATE, ("model", "prompt"), {},
                        lambda url: ollama.Client(host=url, timeout=30).generate),
    "openai responses": (RESPONSES, ("model", "input"), {"max_output_tokens": 3},
                         lambda url: _openai(url).responses.create),
    "anthropic messages": (ANTHROPIC, ("model", "messages", "max_tokens"), {},
                           lambda url: anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0,
                                                           timeout=30).messages.create),
    "openai embeddings": (EMBEDDINGS, ("model", "input"), {}, lambda url: _openai(url).embeddings.create),
    "ollama embed": (OLLAMA_EMBED, ("model", "input"), {}, lambda url: ollama.Client(host=url, timeout=30).embed),
    "ollama embeddings": (OLLAMA_EMBEDDINGS, ("model", "prompt"), {},
                          lambda url: ollama.Client(host=url, timeout=30).embeddings),
}


def _openai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.mark.parametrize(("endpoint", "field"), [(e, f) for e, (table, *_) in ENDPOINTS.items() for f in sorted(table)])
def test_each_field_is_honoured_or_refused_by_name(url: str, node: FakeNode, endpoint: str, field: str) -> None:
    table, required, extra, sender = ENDPOINTS[endpoint]
    value, answer = table[field]
    send = sender(url)
    fields = {name: table[name][0] for name in required} | extra | {field: value}
    if answer == OK:
        send(**fields)
        return
    if endpoint.startswith("openai"):
        with pytest.raises(openai.BadRequestError) as error:
            send(**fields)
        assert field in error.value.message and (error.value.param or "").split(".")[0] == field
    elif endpoint.startswith("anthropic"):
        with pytest.raises(anthropic.BadRequestError) as refusal:
            send(**fields)
        assert field in refusal.value.message
    else:
        with pytest.raises(ollama.ResponseError) as refused:
            send(**fields)
        assert refused.value.status_code == 400 and field in refused.value.error
