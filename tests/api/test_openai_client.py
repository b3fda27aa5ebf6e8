"""The official `openai` client against a live node serving the embedded model."""

from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support.processes import LiveNode

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_node: LiveNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_node.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_list_puts_the_served_model_first(client: openai.OpenAI, model_id: str) -> None:
    models = client.models.list().data
    assert models[0].id == model_id
    assert model_id == "SmolLM2-135M-Instruct"
    assert len({m.id for m in models}) == len(models) > 1, "the catalog is listed too"


def test_chat_completion_answers(client: openai.OpenAI, model_id: str) -> None:
    reply = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.created > 0
    assert reply.model == model_id
    choice = reply.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_completion_streams_with_a_usage_chunk(client: openai.OpenAI, model_id: str) -> None:
    stream = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens >= 1 and all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_streaming_without_include_usage_has_no_usage_chunk(client: openai.OpenAI, model_id: str) -> None:
    chunks = list(client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=3, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_max_tokens_and_stop_are_honoured(client: openai.OpenAI, model_id: str) -> None:
    reply = client.chat.completions.create(model=model_id, messages=QUESTION, max_completion_tokens=2, temperature=0)
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    assert reply.choices[0].finish_reason == "length"
    stopped = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=12, temperature=0,
                                             stop=["Paris"])
    assert "Paris" not in (stopped.choices[0].message.content or "")
    assert stopped.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client: openai.OpenAI, model_id: str) -> None:
    def sample() -> str:
        reply = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=8, temperature=1.0,
                                               top_p=0.9, seed=1234, presence_penalty=0.5, frequency_penalty=0.5)
        return reply.choices[0].message.content or ""

    assert sample() == sample()


def test_completions_continue_a_raw_prompt(client: openai.OpenAI, model_id: str) -> None:
    reply = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text.strip()
    assert reply.usage is not None and reply.usage.completion_tokens <= 4
    echoed = client.completions.create(model=model_id, prompt="One, two,", max_tokens=2, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("One, two,")
    streamed = list(client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=4,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_unknown_model_is_not_found_and_lists_the_models(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=2)
    assert error.value.code == "model_not_found"
    assert "no-such-model" in error.value.message and model_id in error.value.message


def test_invalid_parameters_are_bad_requests_naming_the_parameter(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_id, messages=QUESTION, temperature=3.5)
    assert error.value.param == "temperature" and "temperature" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_id, messages=QUESTION, n=2)
    assert error.value.param == "n"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_id, messages=[])
    assert error.value.param == "messages"


def test_prompt_over_the_context_window_is_a_bad_request(client: openai.OpenAI, model_id: str) -> None:
    long_prompt = "hello " * 9000  # the embedded model serves 8192 tokens
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": long_prompt}],
                                       max_tokens=2)
    assert error.value.code == "context_length_exceeded" and "context window" in error.value.message


def test_model_without_instance_is_unavailable_saying_how_to_create_one(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as error:  # the client's class for every 5xx
        client.chat.completions.create(model="Qwen/Qwen3-0.6B", messages=QUESTION, max_tokens=2)
    assert error.value.status_code == 503
    assert "POST /instance" in error.value.message and "ringlet node --model" in error.value.message
