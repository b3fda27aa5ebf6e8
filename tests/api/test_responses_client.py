"""OpenAI's Responses API through the official client's `responses` interface against the fake node: the task a
request becomes (instructions, input items with earlier calls and their outputs, tools, text formats), output items
whole and streamed (typed events that the client's stream helper assembles into the same response), function calls,
an answer cut off by max_output_tokens, and the stateful or hosted features refused by name."""

from __future__ import annotations

import json

import openai
import pytest

from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.shared.tasks import ChatMessage, SamplingParams, ToolCall
from tests.support.fake_node import REPLY, FakeNode, prompt_tokens

ANSWER = "".join(REPLY)
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALLS_ANSWER = ("Let me look.", "\n<tool_call>\n", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
                "\n</tool_call>")


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_a_response_has_the_output_text_and_usage(client: openai.OpenAI, node: FakeNode) -> None:
    reply = client.responses.create(model=EMBEDDED_MODEL_ID, input="What is the capital of France?",
                                    instructions="Be brief.")
    assert reply.output_text == ANSWER and reply.status == "completed" and reply.id.startswith("resp_")
    (task,) = node.submitted
    assert task.messages == [ChatMessage(role="system", content="Be brief."),
                             ChatMessage(role="user", content="What is the capital of France?")]
    assert task.sampling == SamplingParams()
    assert reply.usage is not None
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (prompt_tokens(task), len(REPLY) + 1)


def test_a_streamed_response_assembles_to_the_same_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model=EMBEDDED_MODEL_ID, input="What is the capital of France?") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == ANSWER and final.status == "completed"
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == len(REPLY)


def test_function_calls_whole_and_streamed(client: openai.OpenAI, node: FakeNode) -> None:
    node.script = lambda: CALLS_ANSWER
    reply = client.responses.create(model=EMBEDDED_MODEL_ID, input="Weather in Paris?",
                                    tools=[WEATHER])  # type: ignore[list-item]
    message, call = reply.output
    assert message.type == "message" and reply.output_text == "Let me look.\n"
    assert call.type == "function_call" and (call.name, json.loads(call.arguments)) == ("get_weather",
                                                                                       {"city": "Paris"})
    with client.responses.stream(model=EMBEDDED_MODEL_ID, input="Weather in Paris?",
                                 tools=[WEATHER]) as stream:  # type: ignore[list-item]
        final = stream.get_final_response()
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert final.output[1].arguments == call.arguments  # type: ignore[union-attr]


def test_a_named_function_streams_its_arguments(client: openai.OpenAI, node: FakeNode) -> None:
    node.script = lambda: ('{"city"', ': "Rome"}')
    with client.responses.stream(model=EMBEDDED_MODEL_ID, input="Weather in Rome?", tools=[WEATHER],  # type: ignore[list-item]
                                 tool_choice={"type": "function", "name": "get_weather"}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    assert deltas == ['{"city"', ': "Rome"}']
    (call,) = final.output
    assert call.type == "function_call" and call.arguments == '{"city": "Rome"}'
    constraint = node.submitted[-1].sampling.constraint
    assert constraint is not None and json.loads(constraint.spec)["required"] == ["city"]


def test_earlier_calls_and_their_outputs_go_back_into_the_conversation(client: openai.OpenAI,
                                                                      node: FakeNode) -> None:
    client.responses.create(model=EMBEDDED_MODEL_ID, tools=[WEATHER], input=[  # type: ignore[list-item]
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "18 C"}])
    assert node.submitted[-1].messages == [
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(role="assistant", content="", tool_calls=[ToolCall(id="call_1", name="get_weather",
                                                                       arguments='{"city":"Paris"}')]),
        ChatMessage(role="tool", content="18 C", tool_call_id="call_1")]


def test_max_output_tokens_leaves_the_response_incomplete(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=EMBEDDED_MODEL_ID, input="Hi", max_output_tokens=2)
    assert reply.status == "incomplete" and reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "max_output_tokens"


def test_a_json_schema_format_is_the_answers_grammar(client: openai.OpenAI, node: FakeNode) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    client.responses.create(model=EMBEDDED_MODEL_ID, input="Capital?",
                            text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
    constraint = node.submitted[-1].sampling.constraint
    assert constraint is not None and json.loads(constraint.spec) == schema


@pytest.mark.parametrize(("fields", "field"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"reasoning": {"context": "all_turns"}}, "reasoning"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_state_and_hosted_features_are_400s_naming_the_field(client: openai.OpenAI, fields: dict,
                                                              field: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(**{"model": EMBEDDED_MODEL_ID, "input": "Hi", **fields})
    assert field in error.value.message
