"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions (JSON or server-sent events), /v1/models."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable

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
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ModelList,
    ModelObject,
    Usage,
)
from ringlet.shared.errors import TaskError
from ringlet.shared.state import RunnerStatus
from ringlet.shared.tasks import GenerationChunk

router = APIRouter(prefix="/v1", tags=["openai"])

GENERATION_ERRORS = error_responses(400, 404, 413, 500, 503)


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



def _usage(chunk: GenerationChunk | None) -> Usage:
    prompt = chunk.usage.prompt_tokens if chunk and chunk.usage else 0
    completion = chunk.usage.completion_tokens if chunk and chunk.usage else 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)



def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


async def _stream_events(generation: Generation, make_chunk: Callable[[GenerationChunk], BaseModel],
                         usage_chunk: Callable[[GenerationChunk | None], BaseModel] | None) -> AsyncIterator[str]:
    last = None
    try:
        async for chunk in generation.chunks(watch_disconnect=False):
            last = chunk
            yield _sse(make_chunk(chunk))
    except TaskError as failure:
        # the status line is sent already: report the error in the stream, the way OpenAI does
        error = to_api_error(failure)
        yield _sse(ErrorResponse(error=ErrorDetail(message=error.message, type=error.type, code=error.code)))
        return
    if usage_chunk is not None:
        yield _sse(usage_chunk(last))
    yield "data: [DONE]\n\n"


@router.post("/chat/completions", response_model=ChatCompletion, responses={**GENERATION_ERRORS,
                                                                             **_sse_docs(ChatCompletionChunk)})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | StreamingResponse:
    """Chat with a model; `stream: true` streams chunks as server-sent events."""
    task = build_task(body.to_task)
    generation = await Generation.start(node_of(request), task, request, api="openai")
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:
        sent_role = False
        include_usage = body.include_usage

        def chunk_event(chunk: GenerationChunk) -> ChatCompletionChunk:
            nonlocal sent_role
            delta = Delta(role=None if sent_role else "assistant", content=chunk.text)
            sent_role = True
            return ChatCompletionChunk(
                id=completion_id, created=created, model=generation.model,
                choices=[ChunkChoice(delta=delta, finish_reason=chunk.finish_reason)],
                timings=chunk.timings)

        def usage_event(last: GenerationChunk | None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=completion_id, created=created, model=generation.model, choices=[],
                                       usage=_usage(last))

        return StreamingResponse(_stream_events(generation, chunk_event, usage_event if include_usage else None),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    text, last = [], None
    async for chunk in generation.chunks(watch_disconnect=True):
        text.append(chunk.text)
        last = chunk
    assert last is not None and last.finish_reason is not None
    return ChatCompletion(
        id=completion_id, created=created, model=generation.model, usage=_usage(last), timings=last.timings,
        choices=[ChatChoice(message=AssistantMessage(content="".join(text)), finish_reason=last.finish_reason)])


@router.post("/completions", response_model=Completion, responses={**GENERATION_ERRORS, **_sse_docs(Completion)})
async def completions(body: CompletionRequest, request: Request) -> Completion | StreamingResponse:
    """Continue a raw prompt (no chat template); `stream: true` streams chunks as server-sent events."""
    task = build_task(body.to_task)
    generation = await Generation.start(node_of(request), task, request, api="openai")
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = body.prompt_text if body.echo else ""

    if body.stream:
        echoed = False

        def chunk_event(chunk: GenerationChunk) -> Completion:
            nonlocal echoed
            text = chunk.text if echoed else echo + chunk.text
            echoed = True
            return Completion(id=completion_id, created=created, model=generation.model, timings=chunk.timings,
                              choices=[CompletionChoice(text=text, finish_reason=chunk.finish_reason)])

        def usage_event(last: GenerationChunk | None) -> Completion:
            return Completion(id=completion_id, created=created, model=generation.model, choices=[],
                              usage=_usage(last))

        return StreamingResponse(_stream_events(generation, chunk_event, usage_event if body.include_usage else None),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    text, last = [echo], None
    async for chunk in generation.chunks(watch_disconnect=True):
        text.append(chunk.text)
        last = chunk
    assert last is not None and last.finish_reason is not None
    return Completion(id=completion_id, created=created, model=generation.model, usage=_usage(last),
                      timings=last.timings,
                      choices=[CompletionChoice(text="".join(text), finish_reason=last.finish_reason)])


@router.get("/models", response_model=ModelList)
def list_models(request: Request) -> ModelList:
    """The models this cluster knows; `ready` tells which have an instance serving them now."""
    node = node_of(request)
    state = node.state
    ready = {r.instance.model for r in state.instances.values() if r.status == RunnerStatus.READY}
    created = {r.instance.model: int(r.created_at) for r in state.instances.values()}
    cards = node.catalog.cards()
    # models being served first: a client that takes the first model gets one that answers
    cards.sort(key=lambda c: (c.id not in ready, c.id not in created))
    return ModelList(data=[ModelObject(id=c.id, created=created.get(c.id, 0), ready=c.id in ready) for c in cards])
