"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions (JSON or server-sent events), /v1/models."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ringlet.api.errors import ErrorDetail, ErrorResponse, error_responses, to_api_error
from ringlet.api.facade import node_of
from ringlet.api.generation import Generation, build_task
from ringlet.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatFinishReason,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ModelList,
    ModelObject,
    ToolCallDelta,
    ToolCallOut,
    Usage,
)
from ringlet.api.tool_calls import CallReader
from ringlet.shared.errors import TaskError
from ringlet.shared.state import RunnerStatus
from ringlet.shared.tasks import FinishReason, GenerationChunk, Timings, TokenLogprob

router = APIRouter(prefix="/v1", tags=["openai"])

GENERATION_ERRORS = error_responses(400, 404, 413, 429, 500, 503)


def _sse_docs(chunk_model: type[BaseModel]) -> dict[int | str, dict[str, object]]:
    """Each event of the stream: a chunk (or an error) as JSON in `data`, then `data: [DONE]`."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk_model.__name__}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]", "description": "the end of the stream"},
        {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
    ]}}}
    return {200: {"description": "JSON, or with `stream: true` server-sent events of chunks ending in `[DONE]`",
                  "content": {"text/event-stream": {"schema": event}}}}



class _Choices:
    """What the choices of one generation said: their text, finish reasons and token counts."""

    def __init__(self, n: int, prefix: str = "") -> None:
        self.text: list[list[str]] = [[prefix] for _ in range(n)]
        self.finish: list[FinishReason] = ["length"] * n
        self.completion_tokens = [0] * n
        self.prompt_tokens = 0
        self.timings: Timings | None = None
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]

    def add(self, chunk: GenerationChunk) -> None:
        self.text[chunk.choice].append(chunk.text)
        self.logprobs[chunk.choice].extend(chunk.logprobs or ())
        if chunk.finish_reason is not None:
            self.finish[chunk.choice] = chunk.finish_reason
        if chunk.usage is not None:
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.completion_tokens[chunk.choice] = chunk.usage.completion_tokens
        self.timings = chunk.timings or self.timings

    def joined(self, choice: int) -> str:
        return "".join(self.text[choice])

    def usage(self) -> Usage:
        completion = sum(self.completion_tokens)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion)


def _sse(payload: BaseModel | str) -> str:
    return f"data: {payload if isinstance(payload, str) else payload.model_dump_json()}\n\n"


class _TextEvents:
    """The JSON of a stream's plain events (one choice's text, no role, finish reason or timings), filled into a
    template that the schema wrote once: building pydantic models for every token costs more than the rest of
    serving the event."""

    INDEX, TEXT = 987654321, "@@ringlet-text@@"

    def __init__(self, sample: BaseModel) -> None:
        """`sample`: an event of the stream with choice INDEX and text TEXT."""
        head, found_index, rest = sample.model_dump_json().partition(str(self.INDEX))
        middle, found_text, tail = rest.partition(json.dumps(self.TEXT))
        assert found_index and found_text, "the sample carries the markers once each"
        self._head, self._middle, self._tail = head, middle, tail

    def __call__(self, choice: int, text: str) -> str:
        return f"{self._head}{choice}{self._middle}{json.dumps(text, ensure_ascii=False)}{self._tail}"


async def _stream_events(generation: Generation, choices: _Choices,
                         make_chunk: Callable[[GenerationChunk], BaseModel | str | None],
                         usage_chunk: Callable[[Usage], BaseModel] | None) -> AsyncIterator[str]:
    """The stream's events; `make_chunk` returns None for a chunk with nothing to send yet (text held back while it
    may be a tool call)."""
    try:
        async for chunk in generation.chunks(watch_disconnect=False):
            choices.add(chunk)
            event = make_chunk(chunk)
            if event is not None:
                yield _sse(event)
    except TaskError as failure:
        # the status line is sent already: report the error in the stream, the way OpenAI does
        error = to_api_error(failure)
        yield _sse(ErrorResponse(error=ErrorDetail(message=error.message, type=error.type, code=error.code)))
        return
    if usage_chunk is not None:
        yield _sse(usage_chunk(choices.usage()))
    yield "data: [DONE]\n\n"


@router.post("/chat/completions", response_model=ChatCompletion, responses={**GENERATION_ERRORS,
                                                                             **_sse_docs(ChatCompletionChunk)})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | StreamingResponse:
    """Chat with a model; `stream: true` streams chunks as server-sent events; `n` answers in `choices`."""
    task = build_task(body.to_task, body.constraint_param())
    generation = await Generation.start(node_of(request), task, request, api="openai")
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    fingerprint = generation.fingerprint()
    choices = _Choices(task.n)
    specs, tool_format = body.tool_specs(), generation.tool_format()
    readers = [CallReader(body.tool_mode(), specs, tool_format, body.named_function(), generation.thinking_splitter())
               for _ in range(task.n)]

    def finish_reason(choice: int, finish: FinishReason | None) -> ChatFinishReason | None:
        return "tool_calls" if finish == "stop" and readers[choice].calls else finish

    if body.stream:
        with_role: set[int] = set()
        text_event, thinking_event = (_TextEvents(ChatCompletionChunk(
            id=completion_id, created=created, model=generation.model, system_fingerprint=fingerprint,
            choices=[ChunkChoice(index=_TextEvents.INDEX, delta=delta)])) for delta in (
                Delta(content=_TextEvents.TEXT), Delta(reasoning_content=_TextEvents.TEXT)))

        def chunk_event(chunk: GenerationChunk) -> ChatCompletionChunk | str | None:
            piece = readers[chunk.choice].read(chunk.text, last=chunk.finish_reason is not None)
            if (chunk.choice in with_role and chunk.finish_reason is None and chunk.timings is None
                    and chunk.logprobs is None and not piece.deltas and not (piece.content and piece.thinking)):
                if piece.thinking:
                    return thinking_event(chunk.choice, piece.thinking)
                return text_event(chunk.choice, piece.content) if piece.content else None
            calls = [ToolCallDelta.of(d) for d in piece.deltas] or None
            delta = Delta(role=None if chunk.choice in with_role else "assistant",
                          content=piece.content if piece.content or not (calls or piece.thinking) else None,
                          reasoning_content=piece.thinking or None, tool_calls=calls)
            with_role.add(chunk.choice)
            logprobs = ChoiceLogprobs.of(chunk.logprobs) if chunk.logprobs else None
            return ChatCompletionChunk(
                id=completion_id, created=created, model=generation.model, system_fingerprint=fingerprint,
                choices=[ChunkChoice(index=chunk.choice, delta=delta,
                                     finish_reason=finish_reason(chunk.choice, chunk.finish_reason),
                                     logprobs=logprobs)],
                timings=chunk.timings)

        def usage_event(usage: Usage) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=completion_id, created=created, model=generation.model,
                                       system_fingerprint=fingerprint, choices=[], usage=usage)

        return StreamingResponse(_stream_events(generation, choices, chunk_event,
                                                usage_event if body.include_usage else None),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async for chunk in generation.chunks(watch_disconnect=True):
        choices.add(chunk)

    def choice(i: int) -> ChatChoice:
        piece = readers[i].read(choices.joined(i), last=True)
        calls = [ToolCallOut.of(c) for c in readers[i].calls] or None
        finish = finish_reason(i, choices.finish[i])
        assert finish is not None
        return ChatChoice(index=i, message=AssistantMessage(content=piece.content or (None if calls else ""),
                                                            reasoning_content=piece.thinking or None,
                                                            tool_calls=calls),
                          finish_reason=finish,
                          logprobs=ChoiceLogprobs.of(choices.logprobs[i]) if task.sampling.logprobs is not None
                          else None)

    return ChatCompletion(
        id=completion_id, created=created, model=generation.model, usage=choices.usage(), timings=choices.timings,
        system_fingerprint=fingerprint, choices=[choice(i) for i in range(task.n)])


@router.post("/completions", response_model=Completion, responses={**GENERATION_ERRORS, **_sse_docs(Completion)})
async def completions(body: CompletionRequest, request: Request) -> Completion | StreamingResponse:
    """Continue a raw prompt (no chat template); `stream: true` streams chunks as server-sent events; `n` answers
    in `choices`."""
    task = build_task(body.to_task, body.constraint_param())
    generation = await Generation.start(node_of(request), task, request, api="openai")
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head: dict[str, Any] = {"id": completion_id, "created": created, "model": generation.model,
                            "system_fingerprint": generation.fingerprint()}
    echo = body.prompt_text if body.echo else ""
    choices = _Choices(task.n, prefix=echo)

    if body.stream:
        echoed: set[int] = set()
        offsets = [0] * task.n  # each choice's text so far, for the logprobs' text_offset
        text_event = _TextEvents(Completion(**head, choices=[CompletionChoice(index=_TextEvents.INDEX,
                                                                              text=_TextEvents.TEXT)]))

        def chunk_event(chunk: GenerationChunk) -> Completion | str:
            offset = offsets[chunk.choice]
            offsets[chunk.choice] += len(chunk.text)
            if (chunk.choice in echoed and chunk.finish_reason is None and chunk.timings is None
                    and chunk.logprobs is None):
                return text_event(chunk.choice, chunk.text)
            text = chunk.text if chunk.choice in echoed else echo + chunk.text
            echoed.add(chunk.choice)
            logprobs = CompletionLogprobs.of(chunk.logprobs, offset) if chunk.logprobs else None
            return Completion(**head, timings=chunk.timings,
                              choices=[CompletionChoice(index=chunk.choice, text=text, logprobs=logprobs,
                                                        finish_reason=chunk.finish_reason)])

        def usage_event(usage: Usage) -> Completion:
            return Completion(**head, choices=[], usage=usage)

        return StreamingResponse(_stream_events(generation, choices, chunk_event,
                                                usage_event if body.include_usage else None),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async for chunk in generation.chunks(watch_disconnect=True):
        choices.add(chunk)
    return Completion(**head, usage=choices.usage(), timings=choices.timings,
                      choices=[CompletionChoice(index=i, text=choices.joined(i), finish_reason=finish,
                                                logprobs=CompletionLogprobs.of(choices.logprobs[i])
                                                if task.sampling.logprobs is not None else None)
                               for i, finish in enumerate(choices.finish)])


@router.get("/models", response_model=ModelList)
def list_models(request: Request) -> ModelList:
    """The models on this node's disk and those the cluster serves; `ready` tells which have an instance serving them
    now (those first: a client that takes the first model gets one that answers)."""
    node = node_of(request)
    state = node.state
    ready = {r.instance.model for r in state.instances.values() if r.status == RunnerStatus.READY}
    created = {d.card.id: int(d.modified) for d in node.catalog.on_disk()}
    for record in state.instances.values():
        created.setdefault(record.instance.model, int(record.created_at))
    ids = sorted(created, key=lambda model: (model not in ready, model))
    return ModelList(data=[ModelObject(id=model, created=created[model], ready=model in ready) for model in ids])
