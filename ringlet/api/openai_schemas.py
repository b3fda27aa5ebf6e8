"""OpenAI's request and response shapes (chat completions, completions, models), and their mapping to a
`TextGenerationTask`. Parameters ringlet cannot honour are in the schema with the one value it accepts,
so a client that sends them learns it from a 400 instead of being silently ignored."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ringlet.api.tool_calls import CallDelta, ToolMode, forced_call
from ringlet.shared.tasks import (
    MAX_TOOLS,
    ChatMessage,
    Constraint,
    FinishReason,
    FunctionSpec,
    SamplingParams,
    StopString,
    TextGenerationTask,
    Timings,
    TokenLogprob,
    ToolCall,
    ToolName,
)

MAX_STOP_STRINGS = 16


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


_NOT_SUPPORTED = "not supported: only null is accepted"


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ToolName
    arguments: str = Field(description="the arguments object as JSON text")


class ToolCallIn(BaseModel):
    """A call from an earlier answer, sent back with the conversation."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=200)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, description="text, or a list of text parts")
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=MAX_TOOLS, description="an assistant's calls")
    tool_call_id: str | None = Field(None, max_length=200, description="a tool message: the call it answers")
    # what a client sends back with an earlier answer of ours: empty, or nothing ringlet answers with
    refusal: None = Field(None, description=_NOT_SUPPORTED)
    function_call: None = Field(None, description=_NOT_SUPPORTED)
    audio: None = Field(None, description=_NOT_SUPPORTED)
    annotations: list[dict[str, object]] | None = Field(None, max_length=0, description="none are produced")
    reasoning_content: str | None = Field(None, description="an earlier answer's thinking: accepted, and left out of "
                                                            "the prompt (as thinking models' templates drop it)")

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> ChatMessageIn:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        return self

    def to_message(self) -> ChatMessage:
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        calls = [ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
                 for c in self.tool_calls] if self.tool_calls else None
        # chat templates know system, user and assistant; OpenAI's newer "developer" is a system message
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=text, tool_calls=calls,
                           tool_call_id=self.tool_call_id, name=self.name if self.role == "tool" else None)


class FunctionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ToolName
    description: str | None = Field(None, max_length=10_000)
    parameters: dict[str, object] | None = Field(None, description="a JSON schema of the arguments object")
    strict: bool | None = Field(None, description="accepted; a forced call (tool_choice required or named) is held "
                                                  "to the schema either way")


class ToolIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionIn

    def spec(self) -> FunctionSpec:
        return FunctionSpec(name=self.function.name, description=self.function.description or "",
                            parameters=self.function.parameters or {})


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ToolName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


def thinking_of(effort: ReasoningEffort | None) -> bool | None:
    """The thinking switch a reasoning effort sets: none turns thinking off, any other level on (how long the model
    thinks is its own affair); None leaves the template's default."""
    return None if effort is None else effort != "none"


class ChatTemplateKwargs(BaseModel):
    """Values for the chat template (vLLM's extension); the thinking switch is the one taken."""

    model_config = ConfigDict(extra="forbid")

    enable_thinking: bool | None = Field(None, description="false: the model answers without thinking, where its "
                                                           "template has the switch (Qwen3)")


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
            raise ValueError("give at most one of response_format (json_object, json_schema), guided_regex, "
                             "guided_choice and tool_choice (required or a named function)")
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
    tools: list[ToolIn] | None = Field(None, max_length=MAX_TOOLS, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="auto (the default with tools): the model chooses; required or a named function: the "
                          "grammar makes the answer a call; none: no call")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call in an answer")
    functions: list[dict[str, object]] | None = Field(None, max_length=0, description="deprecated by OpenAI: use "
                                                                                       "tools")
    function_call: Literal["none", "auto"] | None = Field(None, description="deprecated by OpenAI: use tool_choice")
    response_format: ResponseFormat | None = None
    modalities: list[Literal["text"]] | None = Field(None, description="text only")
    audio: None = Field(None, description=_NOT_SUPPORTED)
    prediction: None = Field(None, description=_NOT_SUPPORTED)
    web_search_options: None = Field(None, description=_NOT_SUPPORTED)
    reasoning_effort: ReasoningEffort | None = Field(
        None, description="none: answer without thinking (where the chat template has the switch); the other levels "
                          "turn thinking on")
    chat_template_kwargs: ChatTemplateKwargs | None = Field(None, description="extension, as in vLLM")
    verbosity: None = Field(None, description=_NOT_SUPPORTED)
    store: Literal[False] | None = Field(None, description="nothing is stored")
    metadata: dict[str, str] | None = Field(None, description="accepted and ignored (for stored completions)")
    service_tier: str | None = Field(None, description="accepted and ignored")
    safety_identifier: str | None = Field(None, description="accepted and ignored")
    prompt_cache_key: str | None = Field(None, description="accepted and ignored: shared prefixes are cached anyway")
    prompt_cache_retention: str | None = Field(None, description="accepted and ignored")
    prompt_cache_options: dict[str, object] | None = Field(None, description="accepted and ignored")
    moderation: None = Field(None, description=_NOT_SUPPORTED)

    @model_validator(mode="after")
    def _tool_choice_among_tools(self) -> ChatCompletionRequest:
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice required or a named function needs tools")
        named = self.named_function()
        if named is not None and named not in {t.function.name for t in self.tools or ()}:
            raise ValueError(f"tool_choice names {named!r}, which is not among the tools")
        switch = self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs is not None else None
        effort = thinking_of(self.reasoning_effort)
        if None not in (switch, effort) and switch != effort:
            raise ValueError(f"reasoning_effort {self.reasoning_effort} and chat_template_kwargs.enable_thinking "
                             f"{str(switch).lower()} contradict each other; give one of them")
        return self

    def thinking(self) -> bool | None:
        """The chat template's thinking switch, as the request sets it (None: the template's default)."""
        switch = self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs is not None else None
        return switch if switch is not None else thinking_of(self.reasoning_effort)

    def _logprobs(self) -> int | None:
        return self.logprob_count()

    def tool_mode(self) -> ToolMode:
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def named_function(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    def tool_specs(self) -> list[FunctionSpec]:
        return [t.spec() for t in self.tools or ()]

    def _constraints(self) -> list[tuple[str, Constraint]]:
        found = super()._constraints()
        formatted = self.response_format.constraint() if self.response_format is not None else None
        if formatted is not None:
            found.insert(0, ("response_format", formatted))
        forced = forced_call(self.tool_mode(), self.tool_specs(), self.named_function(),
                             self.parallel_tool_calls is not False)
        return found + ([("tool_choice", forced)] if forced is not None else [])

    def to_task(self) -> TextGenerationTask:
        # with `none` the model is not told of its tools: it answers in words
        return TextGenerationTask(
            model=self.model, messages=[m.to_message() for m in self.messages],
            max_tokens=self.max_completion_tokens or self.max_tokens, stop=self.stop_list(), sampling=self.sampling(),
            n=self.n or 1, tools=self.tool_specs() if self.tool_mode() != "none" else None, thinking=self.thinking(),
        )


class CompletionRequest(_SamplingFields):
    # the engine needs at least one prompt token to start from
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                             Field(min_length=1, max_length=1)] = Field(
        description="one non-empty prompt (a list of one string is accepted)")
    max_tokens: int | None = Field(16, ge=1, description="most tokens to generate (OpenAI's default is 16)")
    echo: bool | None = Field(False, description="put the prompt before the completion")
    suffix: None = Field(None, description="not supported")
    logprobs: int | None = Field(None, ge=0, le=20, description="each generated token's log-probability, and this "
                                                                "many of the most likely tokens' (not with echo: "
                                                                "the prompt's are not computed)")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")

    @field_validator("logprobs")
    @classmethod
    def _logprobs_without_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("echo"):
            raise ValueError("logprobs with echo would need the prompt tokens' log-probabilities, which are not "
                             "computed; leave out echo")
        return value

    def _logprobs(self) -> int | None:
        return self.logprobs

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


ChatFinishReason = Literal["stop", "length", "error", "tool_calls"]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="the arguments object as JSON text")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut

    @classmethod
    def of(cls, call: ToolCall) -> ToolCallOut:
        return cls(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(None, description="the model's thinking before its answer (a model that "
                                                            "thinks), as vLLM and DeepSeek send it")
    tool_calls: list[ToolCallOut] | None = None


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
    finish_reason: ChatFinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = Field(None, description="the model, engine and ringlet version that answered: "
                                                             "with a seed, the same fingerprint gives the same answer")
    timings: Timings | None = Field(None, description="extension: time to first token and tokens/s")


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str = ""


class ToolCallDelta(BaseModel):
    """A streamed call: its first delta has `id`, `type` and the function's name; the arguments' text comes in
    pieces to concatenate."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta

    @classmethod
    def of(cls, delta: CallDelta) -> ToolCallDelta:
        began = delta.id is not None
        return cls(index=delta.index, id=delta.id, type="function" if began else None,
                   function=FunctionDelta(name=delta.name, arguments=delta.arguments))


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = Field(None, description="more of the model's thinking (it comes before content)")
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: ChatFinishReason | None = None
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
    system_fingerprint: str | None = None
    timings: Timings | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions' log-probabilities: one entry per generated token in each list."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int] = Field(description="where each token starts in the choice's text")

    @classmethod
    def of(cls, logprobs: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
        """`offset`: where the first token starts in the choice's text."""
        starts = []
        for token in logprobs:
            starts.append(offset)
            offset += len(token.token)
        return cls(tokens=[t.token for t in logprobs], token_logprobs=[t.logprob for t in logprobs],
                   top_logprobs=[{o.token: o.logprob for o in t.top} for t in logprobs], text_offset=starts)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A text completion; streamed as chunks of the same shape."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
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
