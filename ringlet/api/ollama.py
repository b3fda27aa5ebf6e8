"""Ollama-compatible endpoints: /api/chat and /api/generate (newline-delimited JSON streams by default),
/api/tags and /api/version, so tools written for Ollama work against a ringlet node."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from ringlet.api.cluster import ringlet_version
from ringlet.api.errors import ApiError, OllamaError, error_responses, to_api_error
from ringlet.api.facade import NodeFacade, node_of
from ringlet.api.generation import DisconnectWatch, Generation, build_task, error_kind
from ringlet.api.ollama_schemas import (
    ChatRequest,
    ChatResponse,
    CopyRequest,
    GenerateRequest,
    GenerateResponse,
    LogprobOut,
    ModelDetails,
    ModelRequest,
    OllamaToolCall,
    ProcessResponse,
    ProgressLine,
    PullRequest,
    ResponseMessage,
    RunningModel,
    ShowResponse,
    StatusLine,
    TagModel,
    TagsResponse,
    VersionResponse,
)
from ringlet.api.tool_calls import CallReader
from ringlet.models.aliases import ModelAliases
from ringlet.models.catalog import ModelCard
from ringlet.models.download import DownloadStatus, TooManyDownloads
from ringlet.models.ollama import pull_ref
from ringlet.shared.errors import ModelLoadError, ModelNotFoundError, NodeError, NoInstanceError, TaskError
from ringlet.shared.instances import GPU_ENGINES
from ringlet.shared.messages import DeleteModel
from ringlet.shared.tasks import ChatMessage, FunctionSpec, GenerationChunk, TextGenerationTask, TokenLogprob, ToolCall

router = APIRouter(prefix="/api", tags=["ollama"])

OLLAMA_API_VERSION = "0.6.0"
LOAD_WAIT_S = 300.0  # a request waits this long for its model to load, as Ollama's does
PULL_PROGRESS_S = 0.5  # a pull's progress lines, at most this often
NDJSON = "application/x-ndjson"
GENERATION_ERRORS = error_responses(400, 404, 409, 413, 429, 500, 503, ollama=True)  # 409: a load that cannot fit


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
                                                 context_window=options.num_ctx, thinking=body.thinking(),
                                                 sampling=options.sampling().model_copy(
                                                     update={"constraint": body.constraint(),
                                                             "logprobs": body.logprob_count()})),
                      constraint_param="format")


def _stats(last: GenerationChunk, total_s: float, load_s: float) -> dict[str, object]:
    """The final line's counts and durations: `total_s` since the request came, `load_s` of it waiting for a load."""
    usage, timings = last.usage, last.timings
    stats: dict[str, object] = {"done_reason": last.finish_reason, "total_duration": int(total_s * 1e9),
                                "load_duration": int(load_s * 1e9)}
    if usage is not None:
        stats |= {"prompt_eval_count": usage.prompt_tokens, "eval_count": usage.completion_tokens}
    if timings is not None:
        stats["prompt_eval_duration"] = int(timings.time_to_first_token_s * 1e9)
        if usage is not None and timings.decode_tokens_per_s > 0:
            stats["eval_duration"] = int(max(usage.completion_tokens - 1, 0) / timings.decode_tokens_per_s * 1e9)
    return stats


Line = Callable[[str, str | None, list[ToolCall], dict[str, object]], BaseModel]  # (text, thinking, calls, fields)


async def _loaded(node: NodeFacade, body: ChatRequest | GenerateRequest, request: Request) -> float:
    """Ollama's way: a model this node holds but does not serve is loaded first, with the request's num_ctx as its
    context window, and the request waits for it; the seconds it waited (Ollama's load_duration)."""
    began = time.monotonic()
    await node.ensure_instance(body.model, LOAD_WAIT_S, DisconnectWatch(request).check, body.opts.num_ctx)
    return time.monotonic() - began


async def _start(node: NodeFacade, body: ChatRequest | GenerateRequest, task: TextGenerationTask,
                 request: Request) -> tuple[Generation, float]:
    """The generation, once `_loaded` has an instance for it, and the seconds the load took."""
    try:
        load_s = await _loaded(node, body, request)
    except NodeError as refusal:  # counted as Generation.start counts its refusals
        request.app.state.metrics.error("ollama", error_kind(refusal))
        raise
    if task.thinking and node.instance_for(body.model).thinking is None:  # as Ollama refuses it
        raise ApiError(400, f'"{body.model}" does not support thinking', param="think", code="invalid_parameter")
    return await Generation.start(node, task, request, api="ollama"), load_s


async def _answer(generation: Generation, load_s: float, received: float, body: ChatRequest | GenerateRequest,
                  node: NodeFacade, line: Line, reader: CallReader | None = None) -> BaseModel | StreamingResponse:
    """Stream one line per chunk plus a final line with the counts, or collect everything into one object (with
    each token's log-probability when asked, and the most likely tokens' with top_logprobs). `reader` reads tool
    calls out of the text: a call comes in a line of its own once its text is complete. Once the answer is out, the
    instance's keep_alive starts. The durations count from `received` (time.monotonic), the `load_s` seconds the
    request waited for a load among them."""
    reader = reader or CallReader("none", [], "hermes", thinking=generation.thinking_splitter())
    with_top = bool(body.top_logprobs)

    def finished() -> None:
        node.keep_alive(generation.handle.instance_id, body.keep_alive_s())

    def elapsed() -> float:
        return time.monotonic() - received

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
        return line(piece.content, piece.thinking or None, reader.calls,
                    {"done": True, **_stats(last, elapsed(), load_s), **logprobs(tokens)})

    async def lines() -> AsyncIterator[str]:
        try:
            async for chunk in generation.chunks(watch_disconnect=False):
                piece = reader.read(chunk.text, last=chunk.finish_reason is not None)
                if piece.content or piece.thinking or piece.finished or chunk.logprobs:
                    yield line(piece.content, piece.thinking or None, piece.finished,
                               {"done": False, **logprobs(chunk.logprobs or [])}).model_dump_json(
                        exclude_none=True) + "\n"
                if chunk.finish_reason is not None:
                    yield line("", None, [], {"done": True, **_stats(chunk, elapsed(), load_s)}).model_dump_json(
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
    received = time.monotonic()
    generation, load_s = await _start(node, body, task, request)

    def line(text: str, thinking: str | None, calls: list[ToolCall], extra: dict[str, object]) -> ChatResponse:
        message = ResponseMessage(content=text, thinking=thinking,
                                  tool_calls=[OllamaToolCall.of(c) for c in calls] or None)
        return ChatResponse.model_validate({"model": body.model, "created_at": _now(), "message": message, **extra})

    reader = CallReader("auto" if tools else "none", tools or [], generation.tool_format(),
                        thinking=generation.thinking_splitter())
    return await _answer(generation, load_s, received, body, node, line, reader)


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True,
             responses={**GENERATION_ERRORS, **_ndjson_docs(GenerateResponse)})
async def generate(body: GenerateRequest, request: Request) -> BaseModel | StreamingResponse:
    """Complete a prompt, Ollama style: through the chat template unless `raw` is true."""
    node, received = node_of(request), time.monotonic()

    def line(text: str, thinking: str | None, calls: list[ToolCall], extra: dict[str, object]) -> GenerateResponse:
        return GenerateResponse.model_validate({"model": body.model, "created_at": _now(), "response": text,
                                                "thinking": thinking, **extra})

    if not body.prompt and (body.raw or not body.system):
        # Ollama answers an empty prompt by loading the model, or with keep_alive 0 by unloading it (`ollama stop`)
        keep_alive = body.keep_alive_s()
        if keep_alive == 0:
            try:
                node.keep_alive(node.instance_for(body.model).instance.instance_id, 0)
            except NoInstanceError:
                pass  # nothing serves it: nothing to unload
            return line("", None, [], {"done": True, "done_reason": "unload"})
        load_s = await _loaded(node, body, request)
        node.keep_alive(node.instance_for(body.model).instance.instance_id, keep_alive)
        return line("", None, [], {"done": True, "done_reason": "load", "load_duration": int(load_s * 1e9),
                                   "total_duration": int(load_s * 1e9)})

    if body.raw:
        task = _task(body, prompt=body.prompt)
    else:
        messages = [ChatMessage(role="system", content=body.system)] if body.system else []
        task = _task(body, messages=[*messages, ChatMessage(role="user", content=body.prompt)])
    generation, load_s = await _start(node, body, task, request)
    return await _answer(generation, load_s, received, body, node, line)


def _details(card: ModelCard) -> ModelDetails:
    quantization = card.quantization or next(
        (d for d in card.bytes_per_dtype if d not in ("float32", "bfloat16", "float16")), "bf16")
    return ModelDetails(format=card.format, family=card.architecture, families=[card.architecture],
                        parameter_size=f"{card.num_parameters / 1e9:.2f}B", quantization_level=quantization)


def _name(card: ModelCard) -> str:
    # Ollama's names carry their tag; ORG/NAME:QUANT has one already
    return card.id if card.source == "ollama" or ":" in card.id else f"{card.id}:latest"


def _digest(card: ModelCard) -> str:
    return hashlib.sha256(card.id.encode()).hexdigest()  # an id for tools that key on it, not a file hash


def _tag(card: ModelCard, modified: float, size: int | None = None, digest: str | None = None) -> TagModel:
    return TagModel(name=_name(card), model=_name(card),
                    modified_at=datetime.fromtimestamp(modified, UTC).isoformat().replace("+00:00", "Z"),
                    size=size or card.download_bytes or card.weight_bytes("bfloat16"), digest=digest or _digest(card),
                    details=_details(card))


@router.get("/tags", response_model=TagsResponse)
def tags(request: Request) -> TagsResponse:
    """The models on this node's disk (with their files' size, modification time and digest), and those loaded
    elsewhere in the cluster, Ollama style."""
    node = node_of(request)
    listed = {d.card.id: _tag(d.card, d.modified, d.size_bytes, d.digest) for d in node.catalog.on_disk()}
    for record in node.state.instances.values():
        if record.instance.model in listed:
            continue
        try:
            listed[record.instance.model] = _tag(node.catalog.resolve(record.instance.model), record.created_at)
        except NodeError:
            continue  # a path on another node: its name says nothing here
    for alias in ModelAliases().all():  # a copy's name, listed beside its model as `ollama list` lists one
        if (tag := listed.get(alias.target)) is not None:
            listed[alias.name] = tag.model_copy(update={"name": alias.name, "model": alias.name})
    return TagsResponse(models=list(listed.values()))


@router.get("/version", response_model=VersionResponse)
def version() -> VersionResponse:
    """The Ollama API version these endpoints follow, and ringlet's own."""
    return VersionResponse(version=OLLAMA_API_VERSION, ringlet=ringlet_version())


@router.post("/show", response_model=ShowResponse, responses=error_responses(400, 404, ollama=True))
def show(body: ModelRequest, request: Request) -> ShowResponse:
    """A model's details, shape and capabilities, Ollama style."""
    card = node_of(request).catalog.resolve(body.model)
    arch = card.architecture
    info: dict[str, object] = {
        "general.architecture": arch, "general.parameter_count": card.num_parameters, "general.name": card.id,
        f"{arch}.context_length": card.context_length, f"{arch}.block_count": card.num_layers,
        f"{arch}.embedding_length": card.hidden_size, f"{arch}.attention.head_count": card.num_attention_heads,
        f"{arch}.attention.head_count_kv": card.num_key_value_heads, f"{arch}.vocab_size": card.vocab_size}
    thinks = any(record.thinking is not None for record in node_of(request).state.instances_of(card.id))
    return ShowResponse(modified_at=_now(), template="", modelfile=f"FROM {card.id}\n", details=_details(card),
                        model_info=info, capabilities=["completion", "tools", *(["thinking"] if thinks else [])])


@router.get("/ps", response_model=ProcessResponse)
def ps(request: Request) -> ProcessResponse:
    """The models loaded now (each instance, ready or loading), Ollama style."""
    node = node_of(request)
    running = []
    for instance_id, record in node.state.instances.items():
        try:
            card = node.catalog.resolve(record.instance.model)
        except NodeError:
            continue  # a model this node cannot describe (a path on another node)
        on_gpu = sum(record.memory_bytes.get(n, 0) for n, r in record.runners.items() if r.engine in GPU_ENGINES)
        expires = node.expires_at(instance_id)
        running.append(RunningModel(
            name=_name(card), model=_name(card), size=sum(record.memory_bytes.values()), size_vram=on_gpu,
            digest=_digest(card), details=_details(card), context_length=record.context_length,
            expires_at=None if expires is None else datetime.fromtimestamp(expires, UTC).isoformat()))
    return ProcessResponse(models=running)


@router.delete("/delete", response_model=StatusLine, responses=error_responses(400, 404, 409, ollama=True))
def delete(body: ModelRequest, request: Request) -> StatusLine:
    """Remove a model from this node's store (and the names copies gave it); one an instance serves must be stopped
    first. A name made by a copy is removed alone: its files stay with their model."""
    node = node_of(request)
    if ModelAliases().remove(body.model) is not None:
        return StatusLine(status="success")
    try:
        name = node.catalog.resolve(body.model).id
    except ModelNotFoundError:
        name = body.model  # a model in the store that the catalog does not list
    serving = node.state.instances_of(name)
    if serving:
        raise ApiError(409, f"{name} is served by instance {serving[0].instance.instance_id}; stop it first "
                            f"(DELETE /instance/{serving[0].instance.instance_id}, or keep_alive 0)",
                       code="model_in_use")
    removed = node.run_model_command(DeleteModel(origin=node.node_id, model=name))  # the node lists its store anew
    if removed.status >= 300:
        raise ApiError(removed.status, removed.error or f"{name} was not deleted",
                       type="not_found_error" if removed.status == 404 else "invalid_request_error", code=removed.code)
    return StatusLine(status="success")


@router.post("/copy", response_model=StatusLine, responses=error_responses(400, 404, ollama=True))
def copy(body: CopyRequest, request: Request) -> StatusLine:
    """Give a model on this node a second name (Ollama's `cp`); the name shares the model's files, nothing is
    duplicated, and deleting it leaves the model be."""
    node_of(request).catalog.copy(body.source, body.destination)
    return StatusLine(status="success")


@router.post("/pull", response_model=ProgressLine, responses={**error_responses(400, 404, 429, ollama=True),
                                                              **_ndjson_docs(ProgressLine)})
async def pull(body: PullRequest, request: Request) -> BaseModel | StreamingResponse:
    """Download a model into this node's store (a Hugging Face repo id, or an Ollama library name mapped to a GGUF
    repo), with its progress as NDJSON lines."""
    downloads = node_of(request).downloads
    try:
        started = downloads.start(pull_ref(body.model))
    except TooManyDownloads as error:
        raise ApiError(429, str(error), type="rate_limit_error", code="too_many_downloads") from None
    except ModelLoadError as error:
        raise ApiError(400, f"{error}; ringlet pulls Hugging Face repos (ORG/NAME) and the Ollama library names "
                            "it maps (qwen3:8b); a model pulled with Ollama is used from Ollama's store as it is",
                       param="model", code="invalid_model") from None

    def line(status: DownloadStatus) -> ProgressLine:
        if status.state == "done":
            return ProgressLine(status="success")
        return ProgressLine(status=f"pulling {status.model}", digest=status.download_id, total=status.total or None,
                            completed=status.done)

    async def progress() -> AsyncIterator[DownloadStatus]:
        status = started
        while True:
            status = downloads.status(started.download_id)
            yield status
            if status.state != "running":
                return
            await asyncio.sleep(PULL_PROGRESS_S)

    if not body.stream:
        async for status in progress():
            last = status
        if last.state != "done":
            raise ApiError(500, f"the download of {last.model} {last.state}: {last.error}", type="server_error",
                           code="download_failed")
        return line(last)

    async def lines() -> AsyncIterator[str]:
        async for status in progress():
            if status.state in ("failed", "cancelled"):
                yield json.dumps({"error": f"the download of {status.model} {status.state}: {status.error}"}) + "\n"
                return
            yield line(status).model_dump_json(exclude_none=True) + "\n"

    return StreamingResponse(lines(), media_type=NDJSON)


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
