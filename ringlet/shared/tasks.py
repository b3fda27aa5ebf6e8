"""Typed messages of one generation: what is asked (a task) and what comes back (chunks)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FinishReason = Literal["stop", "length", "error"]
MAX_STOP_CHARS = 1000  # a stop string's characters: the text held back while it may begin is at most this long
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


MAX_CONSTRAINT_CHARS = 100_000  # a schema, regular expression or choice list, as text


class Constraint(BaseModel):
    """What the output must be (`models/grammar.py` holds each sampled token to it): any JSON object, JSON that
    validates against a schema (`spec`: the schema as JSON text), text matching a regular expression (`spec`), or
    one of a list of strings (`spec`: the JSON list)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["json_object", "json_schema", "regex", "choice"]
    spec: str = Field("", max_length=MAX_CONSTRAINT_CHARS)


class SamplingParams(BaseModel):
    """Validated sampling settings; temperature 0 means greedy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 keeps all")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="over prompt and output (HF style)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="over the output (OpenAI style)")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="over the output (OpenAI style)")
    penalty_window: int | None = Field(None, ge=1, description="the three penalties look at only the last this many "
                                                               "tokens of prompt and output (Ollama's repeat_last_n); "
                                                               "None: as described above")
    seed: int | None = Field(None, ge=0, lt=2**63)
    constraint: Constraint | None = None
    logit_bias: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=300, description="added to the logits of these token ids before sampling (OpenAI's)")
    logprobs: int | None = Field(None, ge=0, le=20, description="report each drawn token's log-probability and this "
                                                               "many of the most likely tokens' (None: none)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


MAX_TOOLS = 128
# how a model writes its tool calls: Hermes/Qwen <tool_call> JSON, Llama 3 JSON (after <|python_tag|>), Mistral's
# [TOOL_CALLS]
ToolFormat = Literal["hermes", "llama3", "mistral"]
ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class ThinkingFormat(BaseModel):
    """How a model that thinks before it answers writes it: `<think>` ... `</think>`, then the answer (Qwen3, QwQ,
    DeepSeek-R1), as its chat template and vocabulary show; and whether the prompt itself opens the thinking, by the
    value of the template's switch (`enable_thinking`: left out, true, false)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    switch: bool = Field(False, description="the chat template reads enable_thinking: thinking can be turned off")
    opened_by_default: bool = Field(False, description="the prompt ends inside <think> (switch left out)")
    opened_when_on: bool = False
    opened_when_off: bool = False

    def opened(self, switch: bool | None) -> bool:
        """Whether the answer starts inside its thinking, the template's switch being `switch`."""
        return self.opened_by_default if switch is None else self.opened_when_on if switch else self.opened_when_off


class FunctionSpec(BaseModel):
    """A function the model may call: its name, what it does, and its parameters as a JSON schema."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ToolName
    description: str = Field("", max_length=10_000)
    parameters: dict[str, Any] = Field(default_factory=dict, description="a JSON schema of the arguments object")

    def template_form(self) -> dict[str, Any]:
        """As chat templates take a tool (OpenAI's shape, which transformers passes on)."""
        function: dict[str, Any] = {"name": self.name, "description": self.description}
        function["parameters"] = self.parameters or {"type": "object", "properties": {}}
        return {"type": "function", "function": function}


class ToolCall(BaseModel):
    """A call the model made: the function's name and its arguments object as JSON text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field("", max_length=200)
    name: ToolName
    arguments: str = Field("{}", max_length=MAX_CONSTRAINT_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS, description="an assistant's calls")
    tool_call_id: str | None = Field(None, max_length=200, description="a tool message: the call it answers")
    name: str | None = Field(None, max_length=200, description="a tool message: the function that answered")


class TextGenerationTask(BaseModel):
    """One request, from any API adapter: either chat messages or a raw prompt."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_id: str = ""
    model: str = ""
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: list[StopString] = Field(default_factory=list, max_length=16)
    sampling: SamplingParams = SamplingParams()
    n: int = Field(1, ge=1, le=16, description="independent answers to the prompt (choices); a seed s gives choice i "
                                               "the seed s + i")
    context_window: int | None = Field(None, ge=1, description="the request's own context window (Ollama's num_ctx): "
                                                               "prompt and answer within this many tokens; more than "
                                                               "the instance holds is refused")
    tools: list[FunctionSpec] | None = Field(None, max_length=MAX_TOOLS, description="functions the model is told "
                                                                                  "it may call (chat only)")
    ignore_eos: bool = False  # benchmarks: always produce max_tokens tokens
    thinking: bool | None = Field(None, description="the chat template's thinking switch (enable_thinking); None: "
                                                    "the template's default")

    @property
    def thinking_switch(self) -> bool | None:
        """The value the chat template's enable_thinking gets (None: left out): the request's; off when a grammar
        holds the whole answer, which leaves no room for thinking."""
        if self.thinking is None and self.sampling.constraint is not None:
            return False
        return self.thinking

    @model_validator(mode="after")
    def _one_input(self) -> TextGenerationTask:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.tools is not None and self.messages is None:
            raise ValueError("tools need chat messages, not a raw prompt")
        if self.thinking is not None and self.messages is None:
            raise ValueError("the thinking switch needs chat messages (it is the chat template's), not a raw prompt")
        if self.thinking and self.sampling.constraint is not None:
            raise ValueError("thinking cannot be on when the answer is held to a format or a forced tool call (the "
                             "grammar holds the whole answer): turn thinking off, or drop the constraint")
        return self


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit of inputs in one embeddings request
MAX_INPUT_CHARS = 1_000_000  # one input's text
MAX_INPUT_TOKENS = 1_000_000  # one input's token ids
EmbeddingInput = Annotated[str, Field(max_length=MAX_INPUT_CHARS)] | Annotated[
    list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_INPUT_TOKENS)]


class EmbeddingTask(BaseModel):
    """One embeddings request, from any API adapter: each input (text, or token ids) through the model, its final
    hidden states pooled (and normalised) as the model's files say; all inputs in the fewest forwards."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_id: str = ""
    model: str = ""
    inputs: list[EmbeddingInput] = Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)
    truncate: bool = Field(True, description="an input longer than the context window is cut to fit it (Ollama's "
                                             "default); false: such an input is refused")
    dimensions: int | None = Field(None, ge=1, description="keep the first this many values of each embedding, "
                                                           "normalised again where the model normalises "
                                                           "(Matryoshka); None: all of them")


Task = TextGenerationTask | EmbeddingTask  # what a runner runs; each refuses the other's fields (extra="forbid")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Timings(BaseModel):
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


class TopLogprob(BaseModel):
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    """A drawn token's text and log-probability (after penalties, bias and grammar, before temperature), with the
    most likely tokens' when asked."""

    token: str
    logprob: float
    top: list[TopLogprob] = Field(default_factory=list)


class GenerationChunk(BaseModel):
    """A piece of the stream: text of one choice to show; a choice's last chunk has its finish reason and counts, and
    the task's very last chunk (every choice finished) has `last`."""

    task_id: str = ""
    choice: int = Field(0, ge=0)
    text: str = ""
    token_id: int | None = None
    finish_reason: FinishReason | None = None
    stop_sequence: str | None = None  # with finish_reason stop: the stop string that ended the text, if one did
    last: bool = False
    error: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    logprobs: list[TokenLogprob] | None = None  # of the tokens this chunk's text completes (asked for: sampling.logprobs)
    embeddings: list[list[float]] | None = None  # an EmbeddingTask's answer: one vector per input, in input order
