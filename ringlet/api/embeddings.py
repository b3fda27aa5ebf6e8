"""Embeddings: OpenAI's /v1/embeddings, Ollama's /api/embed and its older /api/embeddings.

Every input of a request goes to the runner as one `EmbeddingTask`, computed in the fewest forwards
(`worker/engines/torch/embed.py`; down the ring of a split model, `worker/pipeline.py`). The model must be an
embedding model (its sentence-transformers files, or its GGUF metadata, say how to pool); any other is a 400 naming
it. `dimensions` keeps the first values of each embedding, normalised again where the model normalises, as
Matryoshka-trained models (Qwen3-Embedding) are meant to be cut; more than the model has is a 400.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from pydantic import ValidationError

from ringlet.api.embedding_schemas import (
    EmbeddingList,
    EmbeddingObject,
    EmbeddingRequest,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingUsage,
    EmbedRequest,
    EmbedResponse,
    encoded,
)
from ringlet.api.errors import ApiError, error_responses
from ringlet.api.facade import NodeFacade, node_of
from ringlet.api.generation import DisconnectWatch, Generation, error_kind
from ringlet.api.ollama import LOAD_WAIT_S
from ringlet.shared.errors import NodeError, TaskError
from ringlet.shared.tasks import EmbeddingTask

openai_router = APIRouter(prefix="/v1", tags=["openai"])
ollama_router = APIRouter(prefix="/api", tags=["ollama"])

ERRORS = error_responses(400, 404, 413, 429, 500, 503)
OLLAMA_ERRORS = error_responses(400, 404, 413, 429, 500, 503, ollama=True)


def _task(build: Callable[[], EmbeddingTask]) -> EmbeddingTask:
    """The adapter's task; a value the task refuses (too many inputs, say) is the client's error."""
    try:
        return build()
    except ValidationError as error:
        raise ApiError(400, f"invalid request: {error.errors()[0]['msg']}", param="input",
                       code="invalid_parameter") from None


@dataclass
class Embedded:
    vectors: list[list[float]]  # in input order
    prompt_tokens: int
    model: str  # the id of the model that computed them
    instance_id: str


async def embed(node: NodeFacade, task: EmbeddingTask, request: Request, api: str) -> Embedded:
    """Run the task on an instance of its model and gather its chunks."""
    try:
        generation = await Generation.start(node, task, request, api=api)
        vectors: list[list[float]] = []
        prompt_tokens = 0
        async for chunk in generation.chunks(watch_disconnect=True):
            vectors.extend(chunk.embeddings or ())
            if chunk.usage is not None:
                prompt_tokens = chunk.usage.prompt_tokens
    except TaskError as failure:
        if failure.kind == "context_window":
            raise ApiError(400, str(failure), param="input", code="context_length_exceeded") from None
        raise
    if len(vectors) != len(task.inputs):
        raise ApiError(500, f"the runner answered {len(vectors)} embeddings for {len(task.inputs)} inputs",
                       type="server_error", code="engine")
    return Embedded(vectors, prompt_tokens, generation.model, generation.handle.instance_id)


@openai_router.post("/embeddings", response_model=EmbeddingList, responses=ERRORS)
async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingList:
    """Embeddings of one or several inputs (texts or token ids) by an embedding model, OpenAI style."""
    done = await embed(node_of(request), _task(body.to_task), request, "openai")
    return EmbeddingList(model=done.model, usage=EmbeddingUsage(prompt_tokens=done.prompt_tokens,
                                                                total_tokens=done.prompt_tokens),
                         data=[EmbeddingObject(index=i, embedding=encoded(v, body.encoding_format))
                               for i, v in enumerate(done.vectors)])


async def _ollama_embed(body: EmbedRequest | EmbeddingsRequest, inputs: int,
                        request: Request) -> tuple[list[list[float]], int]:
    """Ollama's way: a model this node holds but does not serve is loaded first; no inputs only loads it. The
    instance's keep_alive starts once the answer is out."""
    node = node_of(request)
    try:
        await node.ensure_instance(body.model, LOAD_WAIT_S, DisconnectWatch(request).check)
    except NodeError as refusal:
        request.app.state.metrics.error("ollama", error_kind(refusal))
        raise
    if inputs == 0:
        node.keep_alive(node.instance_for(body.model).instance.instance_id, body.keep_alive_s())
        return [], 0
    done = await embed(node, _task(body.to_task), request, "ollama")
    node.keep_alive(done.instance_id, body.keep_alive_s())
    return done.vectors, done.prompt_tokens


@ollama_router.post("/embed", response_model=EmbedResponse, responses=OLLAMA_ERRORS)
async def ollama_embed(body: EmbedRequest, request: Request) -> EmbedResponse:
    """Embeddings of one input or a list of them, Ollama style."""
    began = time.perf_counter()
    vectors, prompt_tokens = await _ollama_embed(body, len(body.inputs()), request)
    return EmbedResponse(model=body.model, embeddings=vectors, prompt_eval_count=prompt_tokens,
                         total_duration=int((time.perf_counter() - began) * 1e9))


@ollama_router.post("/embeddings", response_model=EmbeddingsResponse, responses=OLLAMA_ERRORS)
async def ollama_embeddings(body: EmbeddingsRequest, request: Request) -> EmbeddingsResponse:
    """The embedding of one prompt (Ollama's older endpoint)."""
    vectors, _ = await _ollama_embed(body, 1 if body.prompt else 0, request)
    return EmbeddingsResponse(embedding=vectors[0] if vectors else [])
