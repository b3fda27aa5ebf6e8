"""OpenAI's request and response shapes (chat completions, completions, models), and their mapping to a
`TextGenerationTask`. Parameters ringlet cannot honour are in the schema with the one value it accepts,
so a client that sends them learns it from a 400 instead of being silently ignored."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ringlet.shared.tasks import (
    ChatMessage,
    Constraint,
    FinishReason,
    SamplingParams,
    StopString,
    TextGenerationTask,
    Timings,
    TokenLogprob,
)

MAX_STOP_STRINGS = 16


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


_NOT_SUPPORTED = "not supported: only null is accepted"


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = Field(description="text, or a list of text parts")
    name: str | None = None
    # what a client sends back with an earlier answer of ours: empty, or nothing ringlet answers with
    refusal: None = Field(None, description=_NOT_SUPPORTED)
    tool_calls: list[dict[str, object]] | None = Field(None, max_length=0, description="tool calls are not supported")
    function_call: None = Field(None, description=_NOT_SUPPORTED)
    audio: None = Field(None, description=_NOT_SUPPORTED)
    annotations: list[dict[str, object]] | None = Field(None, max_length=0, description="none are produced")

    def to_message(self) -> ChatMessage:
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        # chat templates know system, user and assistant; OpenAI's newer "developer" is a system message
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=text)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="send a last chunk with the usage of the whole request")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, object] = Field(default_factory=dict, alias="schema",
                                       description="the JSON schema the answer validates against (empty: any JSON)")
    strict: bool | None = Field(None, description="accepted; the schema is enforced either way")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "json_object" or (self.json_schema is not None and not self.json_schema.schema_):
            return Constraint(kind="json_object")
        if self.json_schema is not None:
            return Constraint(kind="json_schema", spec=json.dumps(self.json_schema.schema_))
        return None


class LogprobFields(BaseModel):
    """`logprobs` and `top_logprobs`, as OpenAI's chat completions and Ollama take them."""

    logprobs: bool | None = Field(None, description="each answer token's log-probability (after penalties, bias and "
                                                      "grammar, before temperature)")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="and this many of the most likely tokens' (with "
                                                                    "logprobs)")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def logprob_count(self) -> int | None:
        """SamplingParams.logprobs: None without logprobs, else how many of the most likely tokens to report."""
        return (self.top_logprobs or 0) if self.logprobs else None


class _SamplingFields(BaseModel):
    """The sampling parameters both OpenAI endpoints share (plus top_k, min_p, repetition_penalty as vLLM has). A
    field the model does not declare is a 400 naming it: nothing a client asks for is silently dropped."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="a model id from GET /v1/models, or an instance id to use that one")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate; capped by the context window")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1")
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="nucleus sampling; 0 means greedy")
    top_k: int | None = Field(None, ge=0, description="keep the k most likely tokens (extension); 0 keeps all")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="extension")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="extension, as in vLLM")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, lt=2**63, description="makes sampling reproducible")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    n: int | None = Field(None, ge=1, le=16, description="answers to generate; they share the prompt's KV cache")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=300, description="token id (as a string) -> a bias from -100 to 100 added to its logit")
    guided_regex: str | None = Field(None, min_length=1, description="extension, as in vLLM: the answer matches it")
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, max_length=1000, description="extension, as in vLLM: the answer is one of these")

    @model_validator(mode="after")
    def _stop_strings_not_empty(self) -> _SamplingFields:
        if any(not s for s in self.stop_list()):
            raise ValueError("stop strings must not be empty")
        if len(self._constraints()) > 1:
            raise ValueError("give at most one of response_format (json_object, json_schema), guided_regex and "
                             "guided_choice")
        return self

    def _constraints(self) -> list[tuple[str, Constraint]]:
        """(the field, what it asks of the answer) for each field that constrains the answer."""
        found = []
        if self.guided_regex is not None:
            found.append(("guided_regex", Constraint(kind="regex", spec=self.guided_regex)))
        if self.guided_choice is not None:
            found.append(("guided_choice", Constraint(kind="choice", spec=json.dumps(self.guided_choice))))
        return found

    def constraint(self) -> Constraint | None:
        """What the answer must be, if anything (`models/grammar.py` holds the sampled tokens to it)."""
        return next((c for _, c in self._constraints()), None)

    def constraint_param(self) -> str | None:
        """The field the constraint comes from (named in a 400 when it cannot be compiled)."""
        return next((field for field, _ in self._constraints()), None)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self) -> SamplingParams:
        greedy = self.top_p == 0.0
        return SamplingParams(
            temperature=0.0 if greedy else (1.0 if self.temperature is None else self.temperature),
            top_p=1.0 if greedy or self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            constraint=self.constraint(),
            logit_bias=self._token_bias(),
            logprobs=self._logprobs(),
        )

    def _logprobs(self) -> int | None:
        return None

    def _token_bias(self) -> dict[int, float] | None:
        return {int(token): bias for token, bias in self.logit_bias.items()} if self.logit_bias else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields, LogprobFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    tools: list[dict[str, object]] | None = Field(None, max_length=0, description="not supported")
    tool_choice: Literal["none", "auto"] | None = Field(None, description="with no tools, no call is ever made")
    parallel_tool_calls: bool | None = Field(None, description="with no tools, no call is ever made")
    functions: list[dict[str, object]] | None = Field(None, max_length=0, description="not supported")
    function_call: Literal["none", "auto"] | None = Field(None, description="with no functions, none is called")
    response_format: ResponseFormat | None = None
    modalities: list[Literal["text"]] | None = Field(None, description="text only")
    audio: None = Field(None, description=_NOT_SUPPORTED)
    prediction: None = Field(None, description=_NOT_SUPPORTED)
    web_search_options: None = Field(None, description=_NOT_SUPPORTED)
    reasoning_effort: None = Field(None, description=_NOT_SUPPORTED)
    verbosity: None = Field(None, description=_NOT_SUPPORTED)
    store: Literal[False] | None = Field(None, description="nothing is stored")
    metadata: dict[str, str] | None = Field(None, description="accepted and ignored (for stored completions)")
    service_tier: str | None = Field(None, description="accepted and ignored")
    safety_identifier: str | None = Field(None, description="accepted and ignored")
    prompt_cache_key: str | None = Field(None, description="accepted and ignored: shared prefixes are cached anyway")
    prompt_cache_retention: str | None = Field(None, description="accepted and ignored")
    prompt_cache_options: dict[str, object] | None = Field(None, description="accepted and ignored")
    moderation: None = Field(None, description=_NOT_SUPPORTED)

    def _logprobs(self) -> int | None:
        return self.logprob_count()

    def _constraints(self) -> list[tuple[str, Constraint]]:
        formatted = self.response_format.constraint() if self.response_format is not None else None
        return ([("response_format", formatted)] if formatted is not None else []) + super()._constraints()

    def to_task(self) -> TextGenerationTask:
        return TextGenerationTask(
            model=self.model, messages=[m.to_message() for m in self.messages],
            max_tokens=self.max_completion_tokens or self.max_tokens, stop=self.stop_list(), sampling=self.sampling(),
            n=self.n or 1,
        )


class CompletionRequest(_SamplingFields):
    # the engine needs at least one prompt token to start from
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                             Field(min_length=1, max_length=1)] = Field(
        description="one non-empty prompt (a list of one string is accepted)")
    max_tokens: int | None = Field(16, ge=1, description="most tokens to generate (OpenAI's default is 16)")
    echo: bool | None = Field(False, description="put the prompt before the completion")
    suffix: None = Field(None, description="not supported")
    logprobs: None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def to_task(self) -> TextGenerationTask:
        return TextGenerationTask(model=self.model, prompt=self.prompt_text, max_tokens=self.max_tokens,
                                  stop=self.stop_list(), sampling=self.sampling(), n=self.n or 1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class LogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None

    @classmethod
    def of(cls, token: str, logprob: float) -> LogprobOut:
        return cls(token=token, logprob=logprob, bytes=list(token.encode()))


class ContentLogprob(LogprobOut):
    top_logprobs: list[LogprobOut]


class ChoiceLogprobs(BaseModel):
    content: list[ContentLogprob] | None
    refusal: None = None

    @classmethod
    def of(cls, logprobs: list[TokenLogprob]) -> ChoiceLogprobs:
        return cls(content=[ContentLogprob(**LogprobOut.of(t.token, t.logprob).model_dump(),
                                           top_logprobs=[LogprobOut.of(o.token, o.logprob) for o in t.top])
                            for t in logprobs])


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    timings: Timings | None = Field(None, description="extension: time to first token and tokens/s")


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion; with include_usage the last has no choices."""

    model_config = ConfigDict(json_schema_extra={"description": "sent as `data: {json}` lines, then `data: [DONE]`"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    timings: Timings | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class Completion(BaseModel):
    """A text completion; streamed as chunks of the same shape."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    timings: Timings | None = None


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ringlet"
    ready: bool = Field(description="extension: an instance serving this model is ready")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
