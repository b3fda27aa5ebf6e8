"""Tools in the prompt: the format each family's chat template teaches, a template that takes `tools` given them
(and calls with their arguments as objects), a template that does not given ringlet's own instructions and tagged
calls and results, and the grammars of a forced call, walked under random logits, giving calls that validate."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest

from ringlet.models.embedded import embedded_model_path
from ringlet.models.gguf_loader import GGUFModel
from ringlet.models.grammar import TokenMask, check
from ringlet.models.tokenizer import Tokenizer
from ringlet.models.tools import (
    named_call_constraint,
    required_call_constraint,
    takes_tools,
    template_inputs,
    tool_format,
)
from ringlet.shared.tasks import ChatMessage, FunctionSpec, ToolCall
from tests.support.grammar_walk import VOCAB, closing_tokens, walk

# the parts of real templates that decide: each family's own markers around its `tools`
QWEN = "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> <tool_call>{% endif %}"
LLAMA = "{% if tools %}Environment: ipython{% endif %}{{ '<|python_tag|>' }}"
MISTRAL = "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"

WEATHER = FunctionSpec(name="get_weather", description="The weather in a city", parameters={
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False})
SEARCH = FunctionSpec(name="search", parameters={
    "type": "object", "properties": {"query": {"type": "string", "maxLength": 30},
                                     "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["query"], "additionalProperties": False})
CONVERSATION = [
    ChatMessage(role="user", content="Weather in Paris?"),
    ChatMessage(role="assistant", content="", tool_calls=[ToolCall(id="c1", name="get_weather",
                                                                   arguments='{"city": "Paris", "unit": "celsius"}')]),
    ChatMessage(role="tool", content="18", tool_call_id="c1", name="get_weather"),
    ChatMessage(role="tool", content="sunny", tool_call_id="c1", name="get_weather"),
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return GGUFModel(embedded_model_path()).tokenizer()


@pytest.mark.parametrize(("template", "expected"), [
    (QWEN, "hermes"), (LLAMA, "llama3"), (MISTRAL, "mistral"), (CHATML, "hermes"), (None, "hermes")])
def test_the_format_follows_the_templates_markers(template: str | None, expected: str) -> None:
    assert tool_format(template) == expected
    assert takes_tools(template) is (template not in (CHATML, None))


def test_a_template_that_takes_tools_gets_them_and_calls_with_object_arguments() -> None:
    messages, extra = template_inputs(QWEN, CONVERSATION, [WEATHER])
    assert extra == {"tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER.parameters}}]}
    assert messages[1]["tool_calls"] == [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]
    assert messages[2] == {"role": "tool", "content": "18", "tool_call_id": "c1", "name": "get_weather"}


def test_a_template_without_tools_gets_instructions_tagged_calls_and_results(tokenizer: Tokenizer) -> None:
    assert not takes_tools(tokenizer.chat_template)
    messages, extra = template_inputs(tokenizer.chat_template, CONVERSATION, [WEATHER])
    assert extra == {}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    call = messages[2]["content"]
    assert call.startswith("<tool_call>\n") and call.endswith("\n</tool_call>")
    assert json.loads(call.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")) == {
        "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
    assert messages[3]["content"] == "<tool_response>\n18\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
    prompt = tokenizer.apply_chat_template(messages, **extra)
    assert prompt.startswith("<|im_start|>system\nYou can call functions")


def test_without_tools_the_conversation_renders_as_before(tokenizer: Tokenizer) -> None:
    plain = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]
    assert template_inputs(tokenizer.chat_template, plain, None) == (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], {})


@pytest.mark.parametrize("seed", range(6))
def test_walks_under_a_named_calls_grammar_give_valid_arguments(tokenizer: Tokenizer, seed: int) -> None:
    function = [WEATHER, SEARCH][seed % 2]
    constraint = named_call_constraint(function)
    check(constraint)
    text = walk(TokenMask(constraint, tokenizer, VOCAB), tokenizer, seed, bonus=closing_tokens(tokenizer))
    jsonschema_rs.validate(function.parameters, json.loads(text))


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_walks_under_the_required_grammar_give_calls_of_the_tools(tokenizer: Tokenizer, seed: int,
                                                                  parallel: bool) -> None:
    tools = [WEATHER, SEARCH]
    text = walk(TokenMask(required_call_constraint(tools, parallel), tokenizer, VOCAB), tokenizer, seed,
                bonus=closing_tokens(tokenizer))
    calls = json.loads(text)
    assert isinstance(calls, list) and len(calls) >= 1 and (parallel or len(calls) == 1)
    by_name = {t.name: t for t in tools}
    for call in calls:
        jsonschema_rs.validate(by_name[call["name"]].parameters, call["arguments"])


def test_a_forced_calls_objects_are_held_to_their_properties_unless_they_say_otherwise() -> None:
    open_ended = FunctionSpec(name="f", parameters={
        "type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}},
                                         "c": {"type": "object", "properties": {}, "additionalProperties": True},
                                         "d": {"enum": [{"properties": 1}]}}})
    schema = json.loads(named_call_constraint(open_ended).spec)
    assert schema["additionalProperties"] is False and schema["properties"]["a"]["additionalProperties"] is False
    assert schema["properties"]["c"]["additionalProperties"] is True
    assert schema["properties"]["d"] == {"enum": [{"properties": 1}]}, "values are left as they are"
    assert json.loads(named_call_constraint(FunctionSpec(name="g")).spec) == {"type": "object"}
