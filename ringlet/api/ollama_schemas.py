"""Ollama's request and response shapes (/api/chat, /api/generate, /api/tags, /api/version).

Ollama clients send many runtime options (num_ctx, num_gpu, mirostat, ...); the ones that change the
answer are honoured, the ones about Ollama's own runtime are accepted and ignored, as Ollama itself does
for options a model does not use."""

from __future__ import annotations

import json
import math
import re
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from ringlet.api.openai_schemas import LogprobFields, ToolIn
from ringlet.shared.tasks import (
    MAX_TOOLS,
    ChatMessage,
    Constraint,
    SamplingParams,
    StopString,
    TokenLogprob,
    ToolCall,
    ToolName,
)

_UNITS_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^(-?)((?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def duration_s(value: float | str) -> float:
    """Seconds of an Ollama duration: a number of seconds, or Go's duration text ("5m", "1h30m", "-1s")."""
    text = str(value).strip()
    found = _DURATION.match(text)
    if found is None:
        try:
            seconds = float(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a duration: give seconds or text like 5m, 1h30m, 0") from None
        if math.isnan(seconds):
            raise ValueError("keep_alive is not a number")
        return seconds
    seconds = sum(float(number) * _UNITS_S[unit] for number, unit in _DURATION_PART.findall(text))
    return -seconds if found.group(1) else seconds


# Ollama's default num_predict is -1 (until the model stops); -2 means "fill the context"
_UNLIMITED = (-1, -2)
DEFAULT_REPEAT_LAST_N = 64  # Ollama's: the penalties look at the last 64 tokens


class Options(BaseModel):
    model_config = ConfigDict(extra="ignore")

    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    num_predict: int | None = Field(None, ge=-2, description="tokens to generate; -1 or -2: until the model stops")
    stop: list[StopString] | None = Field(None, max_length=16)
    seed: int | None = Field(None, ge=0, lt=2**63)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    num_ctx: int | None = Field(None, ge=1, description="the request's context window: prompt and answer within it; "
                                                         "more than the instance holds is a 400 (create one with "
                                                         "max_context)")
    repeat_last_n: int | None = Field(None, ge=-1, description="the penalties look at the last this many tokens of "
                                                               "prompt and answer (default 64); 0: no penalties; -1: "
                                                               "all of them")

    def sampling(self) -> SamplingParams:
        greedy = self.top_p == 0.0
        window = DEFAULT_REPEAT_LAST_N if self.repeat_last_n is None else self.repeat_last_n
        penalised = window != 0 and bool(self.repeat_penalty not in (None, 1.0) or self.presence_penalty
                                         or self.frequency_penalty)
        return SamplingParams(
            # Ollama's default temperature is 0.8
            temperature=0.0 if greedy else (0.8 if self.temperature is None else self.temperature),
            top_p=1.0 if greedy or self.top_p is None else self.top_p,
            top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            repetition_penalty=(self.repeat_penalty or 1.0) if penalised else 1.0,
            presence_penalty=(self.presence_penalty or 0.0) if penalised else 0.0,
            frequency_penalty=(self.frequency_penalty or 0.0) if penalised else 0.0,
            penalty_window=window if penalised and window > 0 else None, seed=self.seed,
        )

    def max_tokens(self) -> int | None:
        if self.num_predict is None or self.num_predict in _UNLIMITED:
            return None
        return self.num_predict if self.num_predict > 0 else None

    def stop_list(self) -> list[str]:
        return [s for s in self.stop or [] if s]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ToolName
    arguments: dict[str, object] = Field(default_factory=dict)
    index: int | None = Field(None, description="accepted and ignored")


class OllamaToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    function: FunctionCall

    @classmethod
    def of(cls, call: ToolCall) -> OllamaToolCall:
        arguments = json.loads(call.arguments)
        return cls(function=FunctionCall(name=call.name, arguments=arguments if isinstance(arguments, dict) else {}))


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = Field(None, max_length=0, description="not supported")
    thinking: str | None = Field(None, description="an earlier answer's thinking: accepted, and left out of the prompt "
                                                   "(as thinking models' templates drop it)")
    tool_name: str | None = Field(None, max_length=200, description="a tool message: the function that answered")
    tool_calls: list[OllamaToolCall] | None = Field(None, max_length=MAX_TOOLS, description="an assistant's calls")

    def to_message(self) -> ChatMessage:
        calls = [ToolCall(name=c.function.name, arguments=json.dumps(c.function.arguments, ensure_ascii=False))
                 for c in self.tool_calls] if self.tool_calls else None
        return ChatMessage(role=self.role, content=self.content, tool_calls=calls,
                           name=self.tool_name if self.role == "tool" else None)


class KeepAliveField(BaseModel):
    """Ollama's keep_alive, which every request that loads a model takes."""

    keep_alive: float | str | None = Field(None, description='how long the instance stays loaded once idle: seconds, '
                                                            'or a duration ("5m", "1h30m"); 0 unloads it after this '
                                                            "request, a negative value keeps it until deleted")

    @field_validator("keep_alive")
    @classmethod
    def _a_duration(cls, value: float | str | None) -> float | str | None:
        if value is not None:
            duration_s(value)
        return value

    def keep_alive_s(self) -> float | None:
        """keep_alive in seconds (negative: for ever), None when not given."""
        return None if self.keep_alive is None else duration_s(self.keep_alive)


class _GenerateFields(LogprobFields, KeepAliveField):
    """Fields /api/chat and /api/generate share; one the model does not declare is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    stream: bool = True
    options: Options | None = None
    format: Literal["", "json"] | dict[str, object] | None = Field(
        None, description='"json": any JSON object; a JSON schema: JSON that validates against it')
    think: bool | Literal["low", "medium", "high"] | None = Field(
        None, description="a model that thinks: true (or a level) thinks first and sends the thinking apart from the "
                          "answer, false answers without thinking where the template has the switch; left out: the "
                          "model's default, thinking apart")

    def thinking(self) -> bool | None:
        """The chat template's thinking switch: a level turns thinking on (its length is the model's affair)."""
        return None if self.think is None else self.think is not False

    @property
    def opts(self) -> Options:
        return self.options or Options()

    def constraint(self) -> Constraint | None:
        """What the answer must be, from `format`, if anything."""
        if self.format == "json" or self.format == {}:
            return Constraint(kind="json_object")
        if isinstance(self.format, dict):
            return Constraint(kind="json_schema", spec=json.dumps(self.format))
        return None


class ChatRequest(_GenerateFields):
    messages: list[OllamaMessage] = Field(min_length=1)
    tools: list[ToolIn] | None = Field(None, max_length=MAX_TOOLS, description="functions the model may call (it "
                                                                             "chooses, as with Ollama)")


class GenerateRequest(_GenerateFields):
    prompt: str = Field("", description="empty: only check that the model is served (Ollama loads it)")
    system: str | None = None
    raw: bool = Field(False, description="true: the prompt as is, without the chat template")
    images: list[str] | None = Field(None, max_length=0, description="not supported")
    suffix: Literal[""] | None = Field(None, description="not supported")
    template: Literal[""] | None = Field(None, description="not supported: the model's own chat template is used")
    context: list[int] | None = Field(None, max_length=0, description="not supported (deprecated by Ollama)")
    width: None = Field(None, description="image generation is not supported")
    height: None = Field(None, description="image generation is not supported")
    steps: None = Field(None, description="image generation is not supported")


class _Stats(BaseModel):
    model: str
    created_at: str = Field(description="RFC 3339")
    done: bool
    done_reason: str | None = None
    total_duration: int | None = Field(None, description="nanoseconds")
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    logprobs: list[LogprobOut] | None = None


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class LogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut] | None = None

    @classmethod
    def of(cls, token: TokenLogprob, with_top: bool) -> LogprobOut:
        return cls(token=token.token, logprob=token.logprob, bytes=list(token.token.encode()),
                   top_logprobs=[TopLogprobOut(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()))
                                 for t in token.top] if with_top else None)


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    thinking: str | None = Field(None, description="the model's thinking before its answer (a model that thinks)")
    tool_calls: list[OllamaToolCall] | None = None


class ChatResponse(_Stats):
    """One line of the newline-delimited JSON stream (or the whole answer with `stream: false`)."""

    message: ResponseMessage


class GenerateResponse(_Stats):
    """One line of the newline-delimited JSON stream (or the whole answer with `stream: false`)."""

    response: str
    thinking: str | None = Field(None, description="the model's thinking before its answer (a model that thinks)")


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class TagModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(BaseModel):
    models: list[TagModel]


class VersionResponse(BaseModel):
    version: str = Field(description="the Ollama API version these endpoints follow")
    ringlet: str = Field(description="the version of ringlet that serves them")


class ModelRequest(BaseModel):
    """/api/show, /api/delete: one model by name."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, validation_alias=AliasChoices("model", "name"))
    verbose: bool | None = Field(None, description="accepted: the model info is always whole")


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, validation_alias=AliasChoices("model", "name"),
                       description="a Hugging Face repo id, ORG/NAME (a GGUF repo's quantisation as :Q4_K_M), or an "
                                   "Ollama library name (qwen3:8b) that ringlet maps to a GGUF repo")
    stream: bool = True
    insecure: bool | None = Field(None, description="accepted and ignored: downloads are always over HTTPS")


class CopyRequest(BaseModel):
    """/api/copy: `destination` becomes a second name of the model `source` (its files shared, not duplicated)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=300, description="a model on this node, by any of its names")
    destination: str = Field(min_length=1, max_length=300, description="the new name: model[:tag] or "
                                                                        "namespace/model[:tag]")


class ProgressLine(BaseModel):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class StatusLine(BaseModel):
    status: str


class ShowResponse(BaseModel):
    modified_at: str
    template: str = Field(description="the model's chat template, where it is known here (a Jinja template)")
    modelfile: str
    license: str = ""
    details: ModelDetails
    model_info: dict[str, object]
    parameters: str = ""
    capabilities: list[str]


class RunningModel(BaseModel):
    name: str
    model: str
    size: int = Field(description="bytes its instance holds, over all its nodes")
    size_vram: int = Field(description="of which in GPU memory")
    digest: str
    details: ModelDetails
    expires_at: str | None = Field(None, description="when keep_alive unloads it; null: it stays until deleted")
    context_length: int | None = None


class ProcessResponse(BaseModel):
    models: list[RunningModel]
