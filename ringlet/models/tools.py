"""Tools in the prompt: how a model is told of the functions it may call, how earlier calls and their results are
written into the conversation, which format of call the model emits (`tool_parsing.py` reads it back), and the
grammar that makes a model call a function when the request demands one.

A chat template that takes `tools` (Qwen 2.5/3, Llama 3.1+, Mistral v3+, Hermes) renders all of it itself, from the
OpenAI-shaped values transformers passes. A template that does not (SmolLM2, Llama 2, plain ChatML) gets ringlet's
own Hermes-style instructions in the system message and `<tool_call>` / `<tool_response>` text, so every model
hears of its tools and can be read back."""

from __future__ import annotations

import json
import re
from typing import Any

from ringlet.shared.tasks import ChatMessage, Constraint, FunctionSpec, ToolCall, ToolFormat

_TAKES_TOOLS = re.compile(r"\btools\b")


def takes_tools(chat_template: str | None) -> bool:
    """Whether the template renders the `tools` variable itself."""
    return bool(chat_template and _TAKES_TOOLS.search(chat_template))


def tool_format(chat_template: str | None) -> ToolFormat:
    """The format the model writes its calls in, from the markers its template teaches it."""
    if not takes_tools(chat_template):
        return "hermes"  # ringlet's own instructions ask for <tool_call>
    assert chat_template is not None
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_tag|>" in chat_template or "ipython" in chat_template:
        return "llama3"
    return "hermes"


def _arguments(call: ToolCall) -> object:
    """A call's arguments as templates take them: the object (transformers' convention), or the text as sent when
    it is not JSON."""
    try:
        return json.loads(call.arguments)
    except json.JSONDecodeError:
        return call.arguments


def _call_text(call: ToolCall) -> str:
    return "<tool_call>\n" + json.dumps({"name": call.name, "arguments": _arguments(call)}, ensure_ascii=False) + \
        "\n</tool_call>"


def _instructions(tools: list[FunctionSpec]) -> str:
    listed = "\n".join(json.dumps(t.template_form(), ensure_ascii=False) for t in tools)
    return ("You can call functions to help answer. These are the functions, one JSON description per line:\n"
            f"<tools>\n{listed}\n</tools>\n"
            "To call one, answer with a JSON object naming the function and its arguments inside tags, exactly:\n"
            '<tool_call>\n{"name": "the_function", "arguments": {"the_argument": "its value"}}\n</tool_call>\n'
            "The result comes back in <tool_response> tags.")


def _native(message: ChatMessage) -> dict[str, Any]:
    rendered: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        rendered["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.name, "arguments": _arguments(c)}}
                                  for c in message.tool_calls]
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        rendered["name"] = message.name
    return rendered


def _written_out(messages: list[ChatMessage], tools: list[FunctionSpec] | None) -> list[dict[str, Any]]:
    """The conversation for a template that knows nothing of tools: calls and results as tagged text, consecutive
    results in one user message (templates that insist on alternating roles accept that)."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "tool":
            result = f"<tool_response>\n{message.content}\n</tool_response>"
            if rendered and rendered[-1].get("tool_results"):
                rendered[-1]["content"] += "\n" + result
            else:
                rendered.append({"role": "user", "content": result, "tool_results": True})
            continue
        content = message.content
        if message.tool_calls:
            content = "\n".join(([content] if content else []) + [_call_text(c) for c in message.tool_calls])
        rendered.append({"role": message.role, "content": content})
    if tools:
        told = _instructions(tools)
        if rendered and rendered[0]["role"] == "system":
            rendered[0]["content"] = f"{rendered[0]['content']}\n\n{told}"
        else:
            rendered.insert(0, {"role": "system", "content": told})
    for written in rendered:
        written.pop("tool_results", None)
    return rendered


def template_inputs(chat_template: str | None, messages: list[ChatMessage], tools: list[FunctionSpec] | None
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and extra variables (`tools`) to render `messages` with through this chat template."""
    if not takes_tools(chat_template):
        return _written_out(messages, tools), {}
    extra = {"tools": [t.template_form() for t in tools]} if tools else {}
    return [_native(m) for m in messages], extra


_VALUES = frozenset({"enum", "const", "default", "examples"})  # keywords whose values are data, not schemas


def _closed(schema: object) -> object:
    """The schema with every object that lists its properties held to them (as OpenAI's strict mode asks), unless it
    says otherwise: a forced call otherwise lets a small model go on writing properties until max_tokens."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: value if key in _VALUES else _closed(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def _object_schema(parameters: dict[str, Any]) -> Any:
    return _closed(parameters) if parameters else {"type": "object"}


def named_call_constraint(function: FunctionSpec) -> Constraint:
    """The answer is the named function's arguments object, valid against its parameters schema."""
    return Constraint(kind="json_schema", spec=json.dumps(_object_schema(function.parameters)))


def required_call_constraint(tools: list[FunctionSpec], parallel: bool) -> Constraint:
    """The answer is a JSON array of calls (`{"name", "arguments"}`, each valid against its function's schema): at
    least one, and exactly one when `parallel` is false."""
    calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": _object_schema(t.parameters)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    array: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                             "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    return Constraint(kind="json_schema", spec=json.dumps(array))
