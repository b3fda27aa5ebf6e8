"""Tool calls through the official openai and ollama clients against the fake node: what a request with tools turns
into for the node (the tools, the grammar a forced call is held to, the conversation's calls and results), calls read
out of a scripted answer whole and streamed (which reassemble to the same calls, with no call text in the content),
the format the serving runner reported choosing the reader, and the requests refused with the field named."""

from __future__ import annotations

import json

import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.shared.state import RunnerReady
from ringlet.shared.tasks import ChatMessage, FunctionSpec, ToolCall, ToolFormat
from tests.support.fake_node import FakeNode

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER: ChatCompletionToolParam = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_PARAMETERS}}
TIME: ChatCompletionToolParam = {"type": "function", "function": {"name": "get_time"}}
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Paris and Rome?"}]
# a Qwen-style answer: words, then two calls split across tokens mid-marker and mid-JSON
HERMES_ANSWER = ("Let me look.", "\n<tool", '_call>\n{"name": "get_weather", "argu', 'ments": {"city": "Paris"}}\n',
                 "</tool_call>\n<tool_call>\n", '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
CALLS = [("get_weather", '{"city":"Paris"}'), ("get_weather", '{"city":"Rome"}')]


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def reassembled(chunks: list) -> tuple[str, list[tuple[str, str]], list[str]]:
    """A stream's content, its calls (name, arguments) put together from their deltas, and its ids."""
    content, calls, ids = "", {}, []
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or ():
                if delta.id is not None:
                    ids.append(delta.id)
                    calls[delta.index] = [delta.function.name, ""]
                calls[delta.index][1] += delta.function.arguments or ""
    return content, [tuple(calls[i]) for i in sorted(calls)], ids


def test_auto_calls_come_out_of_the_answer_whole_and_streamed(client: openai.OpenAI, node: FakeNode) -> None:
    node.script = lambda: HERMES_ANSWER
    reply = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, tools=[WEATHER, TIME])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look.\n"
    calls = choice.message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls] == CALLS
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") and c.type == "function" for c in calls)
    (task,) = node.submitted
    assert task.tools == [FunctionSpec(name="get_weather", description="The weather in a city",
                                       parameters=WEATHER_PARAMETERS), FunctionSpec(name="get_time")]
    assert task.sampling.constraint is None, "in auto mode the model chooses freely"

    chunks = list(client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, tools=[WEATHER, TIME],
                                                 stream=True))
    content, streamed, ids = reassembled(chunks)
    assert (content, streamed) == ("Let me look.\n", CALLS) and len(set(ids)) == 2
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert reply.system_fingerprint and chunks[0].system_fingerprint == reply.system_fingerprint


def test_an_answer_without_a_call_is_content_and_stops(client: openai.OpenAI, node: FakeNode) -> None:
    node.script = lambda: ("Use <b>tags</b> ", "and {braces}.")
    reply = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, tools=[WEATHER])
    assert reply.choices[0].message.content == "Use <b>tags</b> and {braces}."
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"


def test_a_call_cut_off_by_max_tokens_comes_back_as_text(client: openai.OpenAI, node: FakeNode) -> None:
    node.script = lambda: ("<tool_call>", '{"name": "get_weather", "arguments": {"ci')
    reply = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, tools=[WEATHER], max_tokens=2)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content == '<tool_call>{"name": "get_weather", "arguments": {"ci'


def test_the_runners_reported_format_chooses_the_reader(client: openai.OpenAI, node: FakeNode) -> None:
    def report(tool_format: ToolFormat) -> None:
        node.emit(RunnerReady(instance_id=instance_id, node_id=node.node_id, context_length=node.context_window,
                              tool_format=tool_format))

    instance_id = next(iter(node.state.instances))
    report("llama3")
    try:
        node.script = lambda: ('{"name": "get_weather", ', '"parameters": {"city": "Paris"}}')
        reply = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, tools=[WEATHER])
        calls = reply.choices[0].message.tool_calls or []
        assert [(c.function.name, c.function.arguments) for c in calls] == [CALLS[0]]
    finally:
        report("hermes")


def test_a_named_function_is_forced_by_its_schema_and_streams_its_arguments(client: openai.OpenAI,
                                                                            node: FakeNode) -> None:
    node.script = lambda: ('{"city"', ': "Paris"}')
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, tools=[WEATHER, TIME],
                                           tool_choice=named)  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []] == [
        ("get_weather", '{"city": "Paris"}')]
    constraint = node.submitted[0].sampling.constraint
    assert constraint is not None and constraint.kind == "json_schema"
    assert json.loads(constraint.spec) == {**WEATHER_PARAMETERS, "additionalProperties": False}

    chunks = list(client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, tools=[WEATHER, TIME],
                                                 tool_choice=named, stream=True))  # type: ignore[arg-type]
    content, calls, _ = reassembled(chunks)
    assert (content, calls) == ("", [("get_weather", '{"city": "Paris"}')])
    pieces = [d.function.arguments for c in chunks for ch in c.choices for d in ch.delta.tool_calls or ()]
    assert pieces == ['{"city"', ': "Paris"}'], "the arguments stream as they are generated"


@pytest.mark.parametrize("parallel", [True, False])
def test_required_asks_the_grammar_for_an_array_of_calls(client: openai.OpenAI, node: FakeNode,
                                                         parallel: bool) -> None:
    node.script = lambda: ('[{"name":"get_weather","arguments":{"city":"Paris"}}', "]")
    reply = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, tools=[WEATHER, TIME],
                                           tool_choice="required", parallel_tool_calls=parallel)
    calls = reply.choices[0].message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls] == [CALLS[0]]
    assert reply.choices[0].finish_reason == "tool_calls"
    constraint = node.submitted[0].sampling.constraint
    assert constraint is not None
    array = json.loads(constraint.spec)
    assert array["type"] == "array" and array["minItems"] == 1 and ("maxItems" in array) is not parallel
    assert [item["properties"]["name"]["const"] for item in array["items"]["anyOf"]] == ["get_weather", "get_time"]


def test_tool_choice_none_keeps_the_tools_from_the_model(client: openai.OpenAI, node: FakeNode) -> None:
    node.script = lambda: ("<tool_call>{}</tool_call>",)
    reply = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, tools=[WEATHER],
                                           tool_choice="none")
    assert reply.choices[0].message.content == "<tool_call>{}</tool_call>" and node.submitted[0].tools is None


def test_calls_and_results_of_the_conversation_reach_the_node(client: openai.OpenAI, node: FakeNode) -> None:
    messages: list[ChatCompletionMessageParam] = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=messages, tools=[WEATHER])
    assert node.submitted[0].messages == [
        ChatMessage(role="user", content="Weather in Paris and Rome?"),
        ChatMessage(role="assistant", content="", tool_calls=[ToolCall(id="call_1", name="get_weather",
                                                                       arguments='{"city":"Paris"}')]),
        ChatMessage(role="tool", content="18 C, sunny", tool_call_id="call_1"),
    ]


@pytest.mark.parametrize(("fields", "field", "problem"), [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among the tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "at most one"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "pattern"),
    ({"tools": [WEATHER], "messages": [{"role": "tool", "content": "18 C"}]}, "messages", "tool_call_id"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "(?<=x)y"}}}}}], "tool_choice": "required"}, "tool_choice", "invalid"),
], ids=["required without tools", "unknown name", "with response_format", "bad name", "tool without id",
        "schema that cannot compile"])
def test_bad_tool_requests_are_400s_naming_the_field(client: openai.OpenAI, fields: dict, field: str,
                                                     problem: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**{"model": EMBEDDED_MODEL_ID, "messages": QUESTION, **fields})
    assert field in error.value.message and problem in error.value.message


def test_ollama_chat_returns_calls_whole_and_streamed(url: str, node: FakeNode) -> None:
    node.script = lambda: HERMES_ANSWER
    client = ollama.Client(host=url, timeout=30)
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "content": "2 C", "tool_name": "get_weather"}]
    reply = client.chat(model=EMBEDDED_MODEL_ID, messages=messages, tools=[WEATHER], stream=False)
    assert reply.message.content == "Let me look.\n"
    assert [(c.function.name, dict(c.function.arguments)) for c in reply.message.tool_calls or []] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    task = node.submitted[0]
    assert task.tools is not None and task.tools[0].name == "get_weather"
    assert task.messages is not None and task.messages[1].tool_calls == [
        ToolCall(name="get_weather", arguments='{"city": "Oslo"}')]
    assert task.messages[2] == ChatMessage(role="tool", content="2 C", name="get_weather")

    lines = list(client.chat(model=EMBEDDED_MODEL_ID, messages=messages, tools=[WEATHER], stream=True))
    assert "".join(line.message.content or "" for line in lines) == "Let me look.\n"
    streamed = [(c.function.name, dict(c.function.arguments)) for line in lines for c in line.message.tool_calls or ()]
    assert streamed == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert lines[-1].done
