"""OpenAI's Responses API request (`POST /v1/responses`), stateless: each request carries its whole conversation, as
input items (messages, the model's function calls, their outputs). A field the schema does not declare, or one
asking for state or hosted tools ringlet does not have, is a 400 naming it."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ringlet.api.openai_schemas import ReasoningEffort, thinking_of
from ringlet.api.tool_calls import ToolMode, forced_call
from ringlet.shared.tasks import (
    MAX_TOOLS,
    ChatMessage,
    Constraint,
    FunctionSpec,
    SamplingParams,
    TextGenerationTask,
    ToolCall,
    ToolName,
)

_NOT_SUPPORTED = "not supported: only null is accepted"
_IGNORED = "accepted and ignored"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[dict[str, object]] | None = Field(None, max_length=0, description="none are produced")
    logprobs: list[dict[str, object]] | None = Field(None, description="accepted and ignored (an earlier answer's)")


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Strict):
    """A call from an earlier answer, sent back with the conversation."""

    type: Literal["function_call"]
    call_id: str = Field(max_length=200)
    name: ToolName
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(max_length=200)
    output: str | list[TextPart]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class ReasoningPart(_Strict):
    type: Literal["summary_text", "reasoning_text"]
    text: str


class ReasoningItem(_Strict):
    """An earlier answer's thinking, sent back with the conversation: accepted, and left out of the prompt (as
    thinking models' templates drop it)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningPart] = Field(default_factory=list)
    content: list[ReasoningPart] | None = None
    encrypted_content: str | None = None
    status: str | None = None


Item = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem,
                 Field(union_mode="left_to_right")]


class ReasoningConfig(_Strict):
    effort: ReasoningEffort | None = Field(None, description="none: answer without thinking (where the chat template "
                                                             "has the switch); the other levels turn thinking on")
    summary: Literal["auto", "concise", "detailed"] | None = Field(
        None, description="accepted: the thinking comes whole as the reasoning item's content; no summary is written")
    generate_summary: Literal["auto", "concise", "detailed"] | None = Field(None, description="the older name of "
                                                                                               "summary")
    context: Literal["auto", "current_turn"] | None = Field(None, description="earlier turns' thinking is left out "
                                                                              "of the prompt")


class FunctionTool(_Strict):
    type: Literal["function"] = Field(description="function tools only: the hosted tools run on OpenAI's side")
    name: ToolName
    description: str | None = Field(None, max_length=10_000)
    parameters: dict[str, object] | None = None
    strict: bool | None = Field(None, description="accepted; a forced call is held to the schema either way")

    def spec(self) -> FunctionSpec:
        return FunctionSpec(name=self.name, description=self.description or "", parameters=self.parameters or {})


class NamedFunction(_Strict):
    type: Literal["function"]
    name: ToolName


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, object] | None = Field(None, alias="schema")
    strict: bool | None = Field(None, description="accepted; the schema is enforced either way")

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> TextFormat:
        if (self.type == "json_schema") != (self.schema_ is not None):
            raise ValueError("schema is given with type json_schema, and only then")
        return self


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: None = Field(None, description=_NOT_SUPPORTED)


class ResponsesRequest(_Strict):
    model: str = Field(min_length=1)
    input: Annotated[str, Field(min_length=1)] | Annotated[list[Item], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    store: Literal[False] | None = Field(None, description="nothing is stored: each request carries its conversation")
    metadata: dict[str, str] | None = Field(None, description=_IGNORED)
    user: str | None = Field(None, description=_IGNORED)
    safety_identifier: str | None = Field(None, description=_IGNORED)
    service_tier: str | None = Field(None, description=_IGNORED)
    prompt_cache_key: str | None = Field(None, description=_IGNORED)
    prompt_cache_retention: str | None = Field(None, description=_IGNORED)
    prompt_cache_options: dict[str, object] | None = Field(None, description=_IGNORED)
    stream_options: dict[str, object] | None = Field(None, description=_IGNORED)
    truncation: Literal["disabled"] | None = Field(None, description="a prompt over the context window is a 400")
    include: list[str] | None = Field(None, max_length=0, description="nothing extra to include")
    previous_response_id: None = Field(None, description="not supported: stateless, send the whole conversation")
    conversation: None = Field(None, description="not supported: stateless, send the whole conversation")
    background: Literal[False] | None = Field(None, description="not supported")
    background_options: None = Field(None, description=_NOT_SUPPORTED)
    reasoning: ReasoningConfig | None = Field(None, description="a model that thinks sends its thinking as a "
                                                                "reasoning item before its answer")
    max_tool_calls: None = Field(None, description=_NOT_SUPPORTED)
    top_logprobs: None = Field(None, description=_NOT_SUPPORTED)
    prompt: None = Field(None, description=_NOT_SUPPORTED)
    context_management: None = Field(None, description=_NOT_SUPPORTED)
    moderation: None = Field(None, description=_NOT_SUPPORTED)
    image: None = Field(None, description=_NOT_SUPPORTED)
    access_programs: None = Field(None, description=_NOT_SUPPORTED)

    @model_validator(mode="after")
    def _tools_and_formats(self) -> ResponsesRequest:
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice required or a named function needs tools")
        named = self.named_function()
        if named is not None and named not in {t.name for t in self.tools or ()}:
            raise ValueError(f"tool_choice names {named!r}, which is not among the tools")
        if self.tool_mode() in ("required", "named") and self._format_constraint() is not None:
            raise ValueError("give at most one of tool_choice (required or a named function) and text.format")
        return self

    def tool_mode(self) -> ToolMode:
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedFunction):
            return "named"
        return self.tool_choice or "auto"

    def named_function(self) -> str | None:
        return self.tool_choice.name if isinstance(self.tool_choice, NamedFunction) else None

    def tool_specs(self) -> list[FunctionSpec]:
        return [t.spec() for t in self.tools or ()]

    def _format_constraint(self) -> Constraint | None:
        text_format = self.text.format if self.text is not None else None
        if text_format is None or text_format.type == "text":
            return None
        if text_format.type == "json_object" or not text_format.schema_:
            return Constraint(kind="json_object")
        return Constraint(kind="json_schema", spec=json.dumps(text_format.schema_))

    def constraint(self) -> tuple[str, Constraint] | None:
        """(the field it comes from, what the answer must be), if anything."""
        forced = forced_call(self.tool_mode(), self.tool_specs(), self.named_function(),
                             self.parallel_tool_calls is not False)
        if forced is not None:
            return "tool_choice", forced
        formatted = self._format_constraint()
        return ("text", formatted) if formatted is not None else None

    def chat_messages(self) -> list[ChatMessage]:
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        if isinstance(self.input, str):
            return [*messages, ChatMessage(role="user", content=self.input)]
        for item in self.input:
            if isinstance(item, MessageItem):
                role = "system" if item.role == "developer" else item.role
                messages.append(ChatMessage(role=role, content=item.text()))
            elif isinstance(item, FunctionCallOutputItem):
                messages.append(ChatMessage(role="tool", content=item.text(), tool_call_id=item.call_id))
            elif isinstance(item, ReasoningItem):
                continue
            else:  # the model's calls of one turn go back as one assistant message
                call = ToolCall(id=item.call_id, name=item.name, arguments=item.arguments)
                previous = messages[-1] if messages else None
                if previous is not None and previous.role == "assistant" and previous.tool_calls:
                    messages[-1] = previous.model_copy(update={"tool_calls": [*previous.tool_calls, call]})
                else:
                    messages.append(ChatMessage(role="assistant", content="", tool_calls=[call]))
        return messages

    def to_task(self) -> TextGenerationTask:
        constrained = self.constraint()
        greedy = self.top_p == 0.0
        return TextGenerationTask(
            model=self.model, messages=self.chat_messages(), max_tokens=self.max_output_tokens,
            tools=self.tool_specs() if self.tool_mode() != "none" else None,
            thinking=thinking_of(self.reasoning.effort) if self.reasoning is not None else None,
            sampling=SamplingParams(
                temperature=0.0 if greedy else (1.0 if self.temperature is None else self.temperature),
                top_p=1.0 if greedy or self.top_p is None else self.top_p,
                constraint=constrained[1] if constrained else None))
