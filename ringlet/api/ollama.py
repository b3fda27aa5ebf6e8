"""Ollama-compatible endpoints: /api/chat and /api/generate (newline-delimited JSON streams by default),
/api/tags and /api/version, so tools written for Ollama work against a ringlet node."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from ringlet.api.errors import OllamaError, error_responses, to_api_error
from ringlet.api.facade import NodeFacade, node_of
from ringlet.api.generation import DisconnectWatch, Generation, build_task
from ringlet.api.ollama_schemas import (
    ChatRequest,
    ChatResponse,
    GenerateRequest,
    GenerateResponse,
    LogprobOut,
    ModelDetails,
    OllamaToolCall,
    ResponseMessage,
    TagModel,
    TagsResponse,
    VersionResponse,
)
from ringlet.api.tool_calls import CallReader
from ringlet.models.catalog import ModelCard
from ringlet.shared.errors import NoInstanceError, TaskError
from ringlet.shared.tasks import ChatMessage, FunctionSpec, GenerationChunk, TextGenerationTask, TokenLogprob, ToolCall

router = APIRouter(prefix="/api", tags=["ollama"])

OLLAMA_API_VERSION = "0.6.0"
LOAD_WAIT_S = 300.0  # a request waits this long for its model to load, as Ollama's does
NDJSON = "application/x-ndjson"
GENERATION_ERRORS = error_responses(400, 404, 413, 429, 500, 503, ollama=True)


def _ndjson_docs(model: type[BaseModel]) -> dict[int | str, dict[str, object]]:
    """Each line of the stream: a piece of the answer, the last with `done: true`, or an error."""
    line = {"anyOf": [{"$ref": f"#/components/schemas/{model.__name__}"},
                      {"$ref": "#/components/schemas/OllamaError"}]}
    return {200: {"description": "one JSON object, or with `stream: true` (the default) one object per line",
                  "content": {NDJSON: {"schema": line}}}}



def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")



def _task(body: ChatRequest | GenerateRequest, messages: list[ChatMessage] | None = None,
          prompt: str | None = None, tools: list[FunctionSpec] | None = None) -> TextGenerationTask:
    options = body.opts
    return build_task(lambda: TextGenerationTask(model=body.model, messages=messages, prompt=prompt, tools=tools,
                                                 max_tokens=options.max_tokens(), stop=options.stop_list(),
                                                 context_window=options.num_ctx,
                                                 sampling=options.sampling().model_copy(
                                                     update={"constraint": body.constraint(),
                                                             "logprobs": body.logprob_count()})),
                      constraint_param="format")


def _stats(last: GenerationChunk, total_s: float) -> dict[str, object]:
    usage, timings = last.usage, last.timings
    stats: dict[str, object] = {"done_reason": last.finish_reason, "total_duration": int(total_s * 1e9),
                                "load_duration": 0}
    if usage is not None:
        stats |= {"prompt_eval_count": usage.prompt_tokens, "eval_count": usage.completion_tokens}
    if timings is not None:
        stats["prompt_eval_duration"] = int(timings.time_to_first_token_s * 1e9)
        if usage is not None and timings.decode_tokens_per_s > 0:
            stats["eval_duration"] = int(max(usage.completion_tokens - 1, 0) / timings.decode_tokens_per_s * 1e9)
    return stats


Line = Callable[[str, list[ToolCall], dict[str, object]], BaseModel]


async def _start(node: NodeFacade, body: ChatRequest | GenerateRequest, task: TextGenerationTask,
                 request: Request) -> Generation:
    """Ollama's way: a model this node holds but does not serve is loaded first, and the request waits for it."""
    await node.ensure_instance(body.model, LOAD_WAIT_S, DisconnectWatch(request).check)
    return await Generation.start(node, task, request, api="ollama")


async def _answer(generation: Generation, body: ChatRequest | GenerateRequest, node: NodeFacade, line: Line,
                  reader: CallReader | None = None) -> BaseModel | StreamingResponse:
    """Stream one line per chunk plus a final line with the counts, or collect everything into one object (with
    each token's log-probability when asked, and the most likely tokens' with top_logprobs). `reader` reads tool
    calls out of the text: a call comes in a line of its own once its text is complete. Once the answer is out, the
    instance's keep_alive starts."""
    began = datetime.now(UTC)
    reader = reader or CallReader("none", [], "hermes")
    with_top = bool(body.top_logprobs)

    def finished() -> None:
        node.keep_alive(generation.handle.instance_id, body.keep_alive_s())

    def elapsed() -> float:
        return (datetime.now(UTC) - began).total_seconds()

    def logprobs(tokens: list[TokenLogprob]) -> dict[str, object]:
        return {"logprobs": [LogprobOut.of(t, with_top) for t in tokens]} if tokens else {}

    if not body.stream:
        text, last = [], None
        tokens: list[TokenLogprob] = []
        try:
            async for chunk in generation.chunks(watch_disconnect=True):
                text.append(chunk.text)
                tokens.extend(chunk.logprobs or ())
                last = chunk
        finally:
            finished()
        assert last is not None
        piece = reader.read("".join(text), last=True)
        return line(piece.content, reader.calls, {"done": True, **_stats(last, elapsed()), **logprobs(tokens)})

    async def lines() -> AsyncIterator[str]:
        try:
            async for chunk in generation.chunks(watch_disconnect=False):
                piece = reader.read(chunk.text, last=chunk.finish_reason is not None)
                if piece.content or piece.finished or chunk.logprobs:
                    yield line(piece.content, piece.finished, {"done": False, **logprobs(chunk.logprobs or [])}
                               ).model_dump_json(exclude_none=True) + "\n"
                if chunk.finish_reason is not None:
                    yield line("", [], {"done": True, **_stats(chunk, elapsed())}).model_dump_json(
                        exclude_none=True) + "\n"
        except TaskError as failure:  # the status is sent already: Ollama reports errors as a line
            yield json.dumps(OllamaError(error=to_api_error(failure).message).model_dump()) + "\n"
        finally:
            finished()

    return StreamingResponse(lines(), media_type=NDJSON)


@router.post("/chat", response_model=ChatResponse, response_model_exclude_none=True,
             responses={**GENERATION_ERRORS, **_ndjson_docs(ChatResponse)})
async def chat(body: ChatRequest, request: Request) -> BaseModel | StreamingResponse:
    """Chat with a model, Ollama style."""
    tools = [t.spec() for t in body.tools] if body.tools else None
    task = _task(body, messages=[m.to_message() for m in body.messages], tools=tools)
    node = node_of(request)
    generation = await _start(node, body, task, request)

    def line(text: str, calls: list[ToolCall], extra: dict[str, object]) -> ChatResponse:
        message = ResponseMessage(content=text, tool_calls=[OllamaToolCall.of(c) for c in calls] or None)
        return ChatResponse.model_validate({"model": body.model, "created_at": _now(), "message": message, **extra})

    reader = CallReader("auto" if tools else "none", tools or [], generation.tool_format())
    return await _answer(generation, body, node, line, reader)


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True,
             responses={**GENERATION_ERRORS, **_ndjson_docs(GenerateResponse)})
async def generate(body: GenerateRequest, request: Request) -> BaseModel | StreamingResponse:
    """Complete a prompt, Ollama style: through the chat template unless `raw` is true."""
    node = node_of(request)

    def line(text: str, calls: list[ToolCall], extra: dict[str, object]) -> GenerateResponse:
        return GenerateResponse.model_validate({"model": body.model, "created_at": _now(), "response": text, **extra})

    if not body.prompt and (body.raw or not body.system):
        # Ollama answers an empty prompt by loading the model, or with keep_alive 0 by unloading it (`ollama stop`)
        keep_alive = body.keep_alive_s()
        if keep_alive == 0:
            try:
                node.keep_alive(node.instance_for(body.model).instance.instance_id, 0)
            except NoInstanceError:
                pass  # nothing serves it: nothing to unload
            return line("", [], {"done": True, "done_reason": "unload"})
        await node.ensure_instance(body.model, LOAD_WAIT_S, DisconnectWatch(request).check)
        node.keep_alive(node.instance_for(body.model).instance.instance_id, keep_alive)
        return line("", [], {"done": True, "done_reason": "load"})

    if body.raw:
        task = _task(body, prompt=body.prompt)
    else:
        messages = [ChatMessage(role="system", content=body.system)] if body.system else []
        task = _task(body, messages=[*messages, ChatMessage(role="user", content=body.prompt)])
    generation = await _start(node, body, task, request)
    return await _answer(generation, body, node, line)


def _tag(card: ModelCard, modified: str) -> TagModel:
    quantization = next((d for d in card.bytes_per_dtype if d not in ("float32", "bfloat16", "float16")), "bf16")
    size = card.download_bytes or card.weight_bytes("bfloat16")
    name = card.id if card.source == "ollama" else f"{card.id}:latest"  # Ollama's own names carry their tag
    return TagModel(
        name=name, model=name, modified_at=modified, size=size,
        digest=hashlib.sha256(card.id.encode()).hexdigest(),  # an id for tools that key on it, not a file hash
        details=ModelDetails(format=card.format, family=card.architecture, families=[card.architecture],
                             parameter_size=f"{card.num_parameters / 1e9:.2f}B", quantization_level=quantization),
    )


@router.get("/tags", response_model=TagsResponse)
def tags(request: Request) -> TagsResponse:
    """The models this cluster knows, Ollama style."""
    now = _now()
    return TagsResponse(models=[_tag(card, now) for card in node_of(request).catalog.cards()])


@router.get("/version", response_model=VersionResponse)
def version() -> VersionResponse:
    """The Ollama API version these endpoints follow."""
    return VersionResponse(version=OLLAMA_API_VERSION)


class JsonBodiesUnderApi:
    """Ollama reads every request body as JSON whatever its Content-Type, and its documented `curl -d` calls
    send form encoding; so under /api/ a body is JSON here too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/") and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"] = [*headers, (b"content-type", b"application/json")]  # in place: outer middleware
            # (the metrics) reads the route the router records in this same scope
        await self.app(scope, receive, send)
