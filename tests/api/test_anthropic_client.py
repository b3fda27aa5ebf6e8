"""Anthropic's Messages API through the official `anthropic` client against the fake node: what a request turns into
for the node (system prompt, turns, tool results, stop sequences, sampling, tools and the grammar of a forced call),
answers whole and streamed (text and tool_use blocks, stop reasons, usage), count_tokens, and errors in Anthropic's
shape naming the field."""

from __future__ import annotations

import json

import anthropic
import pytest

from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.shared.tasks import ChatMessage, SamplingParams, ToolCall
from tests.support.fake_node import REPLY, FakeNode, prompt_tokens

ANSWER = "".join(REPLY)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALLS_ANSWER = ("Let me look.", "\n<tool_call>\n", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
                "\n</tool_call>")


@pytest.fixture
def client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=30)


def test_a_message_is_answered_with_a_text_block_and_usage(client: anthropic.Anthropic, node: FakeNode) -> None:
    reply = client.messages.create(model=EMBEDDED_MODEL_ID, max_tokens=40, system="Be brief.", messages=QUESTION)
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert [(b.type, b.text) for b in reply.content] == [("text", ANSWER)]  # type: ignore[union-attr]
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    (task,) = node.submitted
    assert task.messages == [ChatMessage(role="system", content="Be brief."),
                             ChatMessage(role="user", content="What is the capital of France?")]
    assert task.max_tokens == 40 and task.sampling == SamplingParams(temperature=1.0), "Anthropic's default"
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (prompt_tokens(task), len(REPLY) + 1)


def test_a_stop_sequence_and_max_tokens_are_the_stop_reason(client: anthropic.Anthropic) -> None:
    stopped = client.messages.create(model=EMBEDDED_MODEL_ID, max_tokens=40, messages=QUESTION,
                                     stop_sequences=[" Paris"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == " Paris"
    assert stopped.content[0].text == "The capital of France is"  # type: ignore[union-attr]
    cut = client.messages.create(model=EMBEDDED_MODEL_ID, max_tokens=2, messages=QUESTION)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2


def test_a_streamed_message_gives_the_same_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=EMBEDDED_MODEL_ID, max_tokens=40, messages=QUESTION) as stream:
        assert "".join(stream.text_stream) == ANSWER
        final = stream.get_final_message()
    assert [b.text for b in final.content] == [ANSWER]  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == len(REPLY) + 1
    events = [e.type for e in client.messages.create(model=EMBEDDED_MODEL_ID, max_tokens=40, messages=QUESTION,
                                                     stream=True)]
    assert events[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_tool_use_blocks_whole_and_streamed(client: anthropic.Anthropic, node: FakeNode) -> None:
    node.script = lambda: CALLS_ANSWER
    reply = client.messages.create(model=EMBEDDED_MODEL_ID, max_tokens=80, messages=QUESTION,
                                   tools=[WEATHER])  # type: ignore[list-item]
    assert reply.stop_reason == "tool_use"
    text, use = reply.content
    assert text.type == "text" and text.text == "Let me look.\n"  # type: ignore[union-attr]
    assert use.type == "tool_use" and (use.name, use.input) == ("get_weather", {"city": "Paris"})
    with client.messages.stream(model=EMBEDDED_MODEL_ID, max_tokens=80, messages=QUESTION,
                                tools=[WEATHER]) as stream:  # type: ignore[list-item]
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use"] and final.stop_reason == "tool_use"
    assert final.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]


def test_a_named_tool_is_forced_by_its_schema(client: anthropic.Anthropic, node: FakeNode) -> None:
    node.script = lambda: ('{"city"', ': "Rome"}')
    reply = client.messages.create(model=EMBEDDED_MODEL_ID, max_tokens=80, messages=QUESTION, tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "get_weather"})  # type: ignore[list-item]
    (use,) = reply.content
    assert use.type == "tool_use" and use.input == {"city": "Rome"} and reply.stop_reason == "tool_use"
    constraint = node.submitted[-1].sampling.constraint
    assert constraint is not None and json.loads(constraint.spec)["required"] == ["city"]


def test_tool_results_go_back_as_tool_messages(client: anthropic.Anthropic, node: FakeNode) -> None:
    client.messages.create(model=EMBEDDED_MODEL_ID, max_tokens=20, tools=[WEATHER], messages=[  # type: ignore[list-item]
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"},
                                     {"type": "text", "text": "And tomorrow?"}]}])
    assert node.submitted[-1].messages == [
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(role="assistant", content="", tool_calls=[ToolCall(id="toolu_1", name="get_weather",
                                                                       arguments='{"city": "Paris"}')]),
        ChatMessage(role="tool", content="18 C", tool_call_id="toolu_1"),
        ChatMessage(role="user", content="And tomorrow?"),
    ]


def test_count_tokens_counts_the_rendered_prompt(client: anthropic.Anthropic, node: FakeNode) -> None:
    counted = client.messages.count_tokens(model=EMBEDDED_MODEL_ID, messages=QUESTION)  # type: ignore[arg-type]
    assert counted.input_tokens == prompt_tokens(node.submitted[-1])


@pytest.mark.parametrize(("fields", "problem"), [
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "budget_tokens must be less than max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages"),
    ({"tool_choice": {"type": "any"}}, "needs tools"),
    ({"extra_body": {"surprise": 1}}, "surprise"),
])
def test_what_is_not_supported_is_a_400_naming_it(client: anthropic.Anthropic, fields: dict, problem: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as error:
        client.messages.create(**{"model": EMBEDDED_MODEL_ID, "max_tokens": 8, "messages": QUESTION, **fields})
    body = error.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert problem in body["error"]["message"]


def test_an_unknown_model_is_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="no/such-model", max_tokens=8, messages=QUESTION)  # type: ignore[arg-type]
