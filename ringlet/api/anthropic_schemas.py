"""Anthropic's Messages API shapes (`POST /v1/messages`, `/v1/messages/count_tokens`) and their mapping to a
`TextGenerationTask`. As with the other APIs, a field the schema does not declare is a 400 naming it; fields about
Anthropic's own service (caching hints, workspace, geography) are accepted and have nothing to do here."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ringlet.api.tool_calls import ToolMode, forced_call
from ringlet.shared.tasks import (
    MAX_TOOLS,
    ChatMessage,
    Constraint,
    FunctionSpec,
    SamplingParams,
    StopString,
    TextGenerationTask,
    ToolCall,
    ToolName,
)

_IGNORED = "accepted; prompt caching is automatic here"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: dict[str, object] | None = Field(None, description=_IGNORED)
    citations: list[dict[str, object]] | None = Field(None, max_length=0, description="not supported")


class ToolUseBlock(_Strict):
    """A call from an earlier answer, sent back with the conversation."""

    type: Literal["tool_use"]
    id: str = Field(max_length=200)
    name: ToolName
    input: dict[str, object]
    cache_control: dict[str, object] | None = Field(None, description=_IGNORED)


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(max_length=200)
    content: str | list[TextBlock] = ""
    is_error: bool | None = Field(None, description="said to the model in the result's text")
    cache_control: dict[str, object] | None = Field(None, description=_IGNORED)

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(_Strict):
    """An earlier answer's thinking, sent back with the conversation: accepted, and left out of the prompt (as
    thinking models' templates drop it)."""

    type: Literal["thinking"]
    thinking: str
    signature: str = Field(description="as the answer gave it (not checked)")
    cache_control: dict[str, object] | None = Field(None, description=_IGNORED)


class RedactedThinkingBlock(_Strict):
    """Anthropic's encrypted thinking: accepted, and left out of the prompt."""

    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                  Field(discriminator="type")]


class MessageIn(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @model_validator(mode="after")
    def _blocks_of_the_role(self) -> MessageIn:
        blocks = [] if isinstance(self.content, str) else self.content
        if self.role == "user" and any(isinstance(b, ToolUseBlock) for b in blocks):
            raise ValueError("tool_use blocks belong to assistant messages")
        if self.role == "assistant" and any(isinstance(b, ToolResultBlock) for b in blocks):
            raise ValueError("tool_result blocks belong to user messages")
        if self.role == "user" and any(isinstance(b, ThinkingBlock | RedactedThinkingBlock) for b in blocks):
            raise ValueError("thinking blocks belong to assistant messages")
        return self

    def to_messages(self) -> list[ChatMessage]:
        """Chat messages: a user turn's tool results come first, as tool messages, then its text."""
        if isinstance(self.content, str):
            return [ChatMessage(role=self.role, content=self.content)]
        text = "".join(b.text for b in self.content if isinstance(b, TextBlock))
        if self.role == "assistant":
            calls = [ToolCall(id=b.id, name=b.name, arguments=json.dumps(b.input, ensure_ascii=False))
                     for b in self.content if isinstance(b, ToolUseBlock)]
            return [ChatMessage(role="assistant", content=text, tool_calls=calls or None)]
        results = [ChatMessage(role="tool", content=b.text(), tool_call_id=b.tool_use_id)
                   for b in self.content if isinstance(b, ToolResultBlock)]
        return results + ([ChatMessage(role="user", content=text)] if text or not results else [])


class ToolIn(_Strict):
    name: ToolName
    description: str | None = Field(None, max_length=10_000)
    input_schema: dict[str, object] = Field(description="a JSON schema of the input object")
    type: Literal["custom"] | None = Field(None, description="custom tools only: Anthropic's server tools run there")
    cache_control: dict[str, object] | None = Field(None, description=_IGNORED)
    strict: bool | None = Field(None, description="accepted; a forced call (any, tool) is held to the schema")

    def spec(self) -> FunctionSpec:
        return FunctionSpec(name=self.name, description=self.description or "", parameters=self.input_schema)


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: ToolName | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name_with_tool(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("name is given with type tool, and only then")
        return self


_DISPLAY = "summarized (the default): the thinking comes whole; omitted: its blocks come empty"


class ThinkingEnabled(_Strict):
    """A model that thinks does, and its thinking comes as `thinking` blocks before the answer."""

    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1024, description="at least 1024 and under max_tokens, as Anthropic asks; max_tokens "
                                                    "caps thinking and answer together")
    display: Literal["summarized", "omitted"] | None = Field(None, description=_DISPLAY)


class ThinkingAdaptive(_Strict):
    """As enabled: the model thinks as long as it thinks."""

    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = Field(None, description=_DISPLAY)


class ThinkingDisabled(_Strict):
    type: Literal["disabled"] = Field(description="the model answers without thinking, where its chat template has "
                                                  "the switch (Qwen3); any thinking it writes anyway is left out")


Thinking = Annotated[ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled, Field(discriminator="type")]


class JsonOutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, object] = Field(alias="schema")


class OutputConfig(_Strict):
    format: JsonOutputFormat | None = Field(None, description="the answer is JSON valid against the schema")
    effort: None = Field(None, description="not supported: only null is accepted")


class _Conversation(_Strict):
    """What both endpoints read: the model, the conversation, its tools and what the answer must be."""

    model: str = Field(min_length=1)
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolIn] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = Field(None, description="left out: disabled, as Anthropic's default")
    output_config: OutputConfig | None = None
    cache_control: dict[str, object] | None = Field(None, description=_IGNORED)

    @model_validator(mode="after")
    def _choice_among_tools(self) -> _Conversation:
        choice = self.tool_choice
        if choice is not None and choice.type in ("any", "tool") and not self.tools:
            raise ValueError(f"tool_choice {choice.type} needs tools")
        if choice is not None and choice.name is not None and choice.name not in {t.name for t in self.tools or ()}:
            raise ValueError(f"tool_choice names {choice.name!r}, which is not among the tools")
        if self.tool_mode() in ("required", "named") and self.output_config and self.output_config.format:
            raise ValueError("give at most one of tool_choice (any or tool) and output_config.format")
        return self

    def thinks(self) -> bool:
        """Whether the model is to think, its thinking coming as blocks (left out: it is not)."""
        return isinstance(self.thinking, ThinkingEnabled | ThinkingAdaptive)

    def shows_thinking(self) -> bool:
        """Whether the thinking blocks carry the thinking text (display omitted: empty blocks)."""
        return self.thinks() and getattr(self.thinking, "display", None) != "omitted"

    def tool_mode(self) -> ToolMode:
        if not self.tools or (self.tool_choice is not None and self.tool_choice.type == "none"):
            return "none"
        kind = self.tool_choice.type if self.tool_choice is not None else "auto"
        return {"auto": "auto", "any": "required", "tool": "named"}[kind]  # type: ignore[return-value]

    def named_tool(self) -> str | None:
        return self.tool_choice.name if self.tool_choice is not None else None

    def tool_specs(self) -> list[FunctionSpec]:
        return [t.spec() for t in self.tools or ()]

    def constraint(self) -> tuple[str, Constraint] | None:
        """(the field it comes from, what the answer must be), if anything."""
        parallel = not (self.tool_choice is not None and self.tool_choice.disable_parallel_tool_use)
        forced = forced_call(self.tool_mode(), self.tool_specs(), self.named_tool(), parallel)
        if forced is not None:
            return "tool_choice", forced
        if self.output_config is not None and self.output_config.format is not None:
            return "output_config", Constraint(kind="json_schema", spec=json.dumps(self.output_config.format.schema_))
        return None

    def chat_messages(self) -> list[ChatMessage]:
        system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system or ())
        head = [ChatMessage(role="system", content=system)] if system else []
        return head + [m for message in self.messages for m in message.to_messages()]

    def to_task(self) -> TextGenerationTask:
        """The task that renders the conversation and computes one token (count_tokens)."""
        return self._task(max_tokens=1, stop=[], sampling=SamplingParams(temperature=0))

    def _task(self, max_tokens: int, stop: list[str], sampling: SamplingParams) -> TextGenerationTask:
        constrained = self.constraint()
        return TextGenerationTask(
            model=self.model, messages=self.chat_messages(), max_tokens=max_tokens, stop=stop,
            tools=self.tool_specs() if self.tool_mode() != "none" else None, thinking=self.thinks(),
            sampling=sampling.model_copy(update={"constraint": constrained[1] if constrained else None}))


class MessagesRequest(_Conversation):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[StopString] | None = Field(None, max_length=16)
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0, description="default 1")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    metadata: dict[str, object] | None = Field(None, description="accepted and ignored")
    service_tier: str | None = Field(None, description="accepted and ignored")
    container: None = Field(None, description="not supported: only null is accepted")
    diagnostics: dict[str, object] | None = Field(None, description="accepted and ignored")
    inference_geo: str | None = Field(None, description="accepted and ignored")
    speed: Literal["standard"] | None = Field(None, description="standard only")
    user_profile_id: str | None = Field(None, description="accepted and ignored")
    workspace_id: str | None = Field(None, description="accepted and ignored")

    @model_validator(mode="after")
    def _budget_under_max_tokens(self) -> MessagesRequest:
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= self.max_tokens:
            raise ValueError("thinking.budget_tokens must be less than max_tokens")
        return self

    def to_task(self) -> TextGenerationTask:
        return self._task(self.max_tokens, list(self.stop_sequences or []), SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature, top_p=self.top_p or 1.0,
            top_k=self.top_k or 0))


class CountTokensRequest(_Conversation):
    """`/v1/messages/count_tokens`: the conversation alone (its `to_task` computes one token)."""


# --- responses

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal"]


class TextOut(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingOut(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = Field(description="a digest of the thinking, for clients that keep it with the block")

    @classmethod
    def of(cls, thinking: str, shown: bool) -> ThinkingOut:
        return cls(thinking=thinking if shown else "", signature=signature(thinking))


def signature(thinking: str) -> str:
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


class ToolUseOut(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, object]


class UsageOut(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class MessageOut(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ThinkingOut | TextOut | ToolUseOut]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: UsageOut


class CountTokensOut(BaseModel):
    input_tokens: int
