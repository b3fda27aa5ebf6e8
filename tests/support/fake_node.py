"""An in-process node for the API's contract tests: the real state, catalog, routing, placement and downloads behind
the API's facade, with a scripted generation in place of runner processes, so no model is loaded.

    node = FakeNode(tmp_path)                 # the embedded model has a ready instance
    with serving(create_app(node)) as url:    # uvicorn in a thread: real HTTP for the official clients
        ...
    node.submitted[-1].sampling.seed          # what the API made of the request

Generation follows the engine's rules (`worker/engines/torch/generate.py`): one token per word of the prompt and one
per message's role, the reply's end counts as an end-of-sequence token, max_tokens and the context window cap the
reply (finish_reason "length"), stop strings go through the real `StopMatcher` (finish_reason "stop").
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from ringlet.master.placement import DEFAULT_OPTIONS, InstanceOptions, PlacementPreview, created, place, preview
from ringlet.master.routing import route
from ringlet.models.catalog import ModelCard
from ringlet.models.commands import run_model_command
from ringlet.models.download import DownloadManager, DownloadStatus, HubSettings
from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.models.names import Catalog
from ringlet.models.stop import StopMatcher
from ringlet.models.store import ModelStore, find_local
from ringlet.shared.config import DEFAULT_MAX_CONTEXT, MIN_CONTEXT
from ringlet.shared.errors import ContextWindowError, InstanceNotFoundError, NoInstanceError, TaskError
from ringlet.shared.instances import InstanceType
from ringlet.shared.messages import ModelCommand, ModelCommandReply
from ringlet.shared.state import (
    DownloadProgressed,
    DownloadRecord,
    Event,
    InstanceDeleted,
    InstanceRecord,
    LayerLoad,
    NodeInfo,
    NodeJoined,
    RunnerProgressed,
    RunnerReady,
    State,
    TaskRecord,
    TaskStatus,
    apply,
    new_instance_record,
)
from ringlet.shared.tasks import (
    EmbeddingTask,
    FinishReason,
    GenerationChunk,
    Task,
    TextGenerationTask,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from ringlet.worker.engines.torch.generate import request_context
from ringlet.worker.supervisor import InstanceLoad
from tests.support.node_infos import node_info
from tests.support.processes import wait_until

REPLY = ("The", " capital", " of", " France", " is", " Paris", ".")
RUNNER_PID = 4242  # shown as the runner's pid; no such process exists
FAKE_DIMENSIONS = 8  # the size of the fake's embeddings
# a download fails at once, without the network, however the environment is set
OFFLINE_HUB = HubSettings(endpoint="http://127.0.0.1:9", offline=True)

Token = str | TaskError  # a TaskError in a script fails the task at that point, as a crashing runner would
Script = Callable[[], Iterable[Token]]


def prompt_tokens(task: TextGenerationTask) -> int:
    if task.messages is not None:
        return sum(1 + len(m.content.split()) for m in task.messages)
    return len((task.prompt or "").split())


@dataclass(eq=False)
class ScriptedStream:
    """A submitted task (the API's TaskStream); the node notes each one the API closes, as a runner hears a cancel."""

    task: Task
    instance_id: str
    chunks: AsyncGenerator[GenerationChunk, None]
    on_close: Callable[[str], None]

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self.chunks

    async def aclose(self) -> None:
        self.on_close(self.task.task_id)
        await self.chunks.aclose()


class FakeNode:
    """A lone node serving the embedded model; `script` makes each reply (a fresh iterable of tokens per task)."""

    def __init__(self, store_dir: Path, info: NodeInfo | None = None, context_window: int = DEFAULT_MAX_CONTEXT,
                 script: Script = lambda: REPLY, token_delay_s: float = 0.0) -> None:
        self.info = info or node_info("node-fake", 8, name="fake-node")
        self.node_id, self.engine_info = self.info.node_id, self.info.engines
        self.context_window, self.script, self.token_delay_s = context_window, script, token_delay_s
        self.catalog = Catalog()
        self.submitted: list[Task] = []  # every task the API submitted, as the API built it
        self.closed: list[str] = []  # the ids of the tasks whose stream the API closed
        self.kept_alive: list[tuple[str, float | None]] = []  # (instance id, seconds) of each keep_alive call
        self.loaded_on_demand: list[str] = []  # the instances ensure_instance created
        self.load_s = 0.0  # how long such an instance takes to load
        self.last_requests: dict[str, float] = {}  # instance id -> when its last generation ended
        self.state = State()
        self._state_lock = threading.Lock()  # downloads report from their own threads
        self.tasks: dict[str, TaskRecord] = {}  # in flight
        self.loads: dict[str, InstanceLoad] = {}
        self.downloads = DownloadManager(ModelStore(store_dir, extra_dirs=[]), on_update=self._download_changed,
                                         settings=lambda: OFFLINE_HUB)
        self.emit(NodeJoined(node=self.info))
        embedded = self.create_instance(EMBEDDED_MODEL_ID, InstanceType.CPU_RING, node_ids=[self.node_id])
        self.make_ready(embedded.instance.instance_id)

    def instance_load(self) -> dict[str, InstanceLoad]:
        """The reports of batching runners, as a test sets them (`loads`)."""
        return self.loads

    def emit(self, event: Event) -> None:
        with self._state_lock:
            self.state = apply(self.state, event)

    def make_ready(self, instance_id: str) -> None:
        """What a runner reports once it has loaded the instance (created instances stay loading until then)."""
        self.emit(RunnerProgressed(instance_id=instance_id, node_id=self.node_id, progress=0.5, detail="loading",
                                   pid=RUNNER_PID))
        instance = self.state.instances[instance_id].instance
        self.emit(RunnerReady(instance_id=instance_id, node_id=self.node_id,
                              context_length=min(instance.context_length or self.context_window, self.context_window)))

    def _download_changed(self, status: DownloadStatus) -> None:
        self.emit(DownloadProgressed(download=DownloadRecord(
            node_id=self.node_id, **status.model_dump(include={"download_id", "model", "layers", "state", "done",
                                                                 "total", "error"}))))

    def run_model_command(self, command: ModelCommand) -> ModelCommandReply:
        return run_model_command(command, self.downloads, lambda model: [
            r.instance.instance_id for r in self.state.instances.values() if r.instance.model.lower() == model.lower()])

    async def model_command(self, node_id: str | None, command: ModelCommand) -> ModelCommandReply:
        """This node's store; another node of the state is out of reach (a fake node has no control plane)."""
        if node_id is None or node_id == self.node_id:
            return await asyncio.to_thread(self.run_model_command, command)
        if node_id not in self.state.nodes:
            return ModelCommandReply(status=404, code="node_not_found", error=f"no node {node_id!r} in the cluster")
        return ModelCommandReply(status=503, code="node_unreachable", error=f"node {node_id} is not connected")

    # --- models and instances, as the real node places and records them

    def preview(self, model: str, node_ids: Sequence[str] | None = None, min_nodes: int = 1,
                options: InstanceOptions = DEFAULT_OPTIONS) -> tuple[ModelCard, list[PlacementPreview]]:
        card = self.catalog.add_local(model)
        return card, preview(card, list(self.state.nodes.values()), node_ids=node_ids, min_nodes=min_nodes,
                             options=options, placed=list(self.state.instances.values()))

    def create_instance(self, model: str, instance_type: InstanceType, node_ids: Sequence[str] | None = None,
                        min_nodes: int = 1, options: InstanceOptions = DEFAULT_OPTIONS) -> InstanceRecord:
        card = self.catalog.add_local(model)
        placement = place(card, instance_type, list(self.state.nodes.values()),
                          instance_id=f"inst-{uuid.uuid4().hex[:12]}", node_ids=node_ids, min_nodes=min_nodes,
                          options=options, placed=list(self.state.instances.values()))
        event = created(placement, time.time())
        self.emit(event)
        return new_instance_record(event)

    def get_instance(self, instance_id: str) -> InstanceRecord:
        record = self.state.instances.get(instance_id)
        if record is None:
            raise InstanceNotFoundError(instance_id, list(self.state.instances))
        return record

    def delete_instance(self, instance_id: str) -> InstanceRecord:
        record = self.get_instance(instance_id)
        self.emit(InstanceDeleted(instance_id=instance_id))
        return record

    # --- generation

    def instance_for(self, model: str) -> InstanceRecord:
        busy = Counter(task.instance_id for task in self.tasks.values())
        return route(self.state, model, self.catalog.resolve, self.node_id, False, busy)

    async def ensure_instance(self, model: str, wait_s: float, watch: Callable[[], Awaitable[None]],
                              context_length: int | None = None) -> None:
        """As the node does for a model on its disk (the embedded one, a local path, one pulled with Ollama or into
        the store): when nothing serves it, it gets an instance (ready at once, or after `load_s` reporting its
        layers loaded as a runner does) with a context window of `context_length`, listed in `loaded_on_demand`."""
        try:
            self.instance_for(model)
        except NoInstanceError:
            card = self.catalog.resolve(model)
            on_disk = card.source in ("embedded", "local", "ollama") or find_local(card.id) is not None
            if not on_disk or self.state.instances_of(card.id):
                raise
            options = DEFAULT_OPTIONS if context_length is None else InstanceOptions(
                max_context=max(context_length, MIN_CONTEXT))
            record = self.create_instance(card.id, InstanceType.CPU_RING, node_ids=[self.node_id], options=options)
            instance_id = record.instance.instance_id
            for layer in range(card.num_layers) if self.load_s else ():
                await asyncio.sleep(self.load_s / card.num_layers)
                self.emit(RunnerProgressed(instance_id=instance_id, node_id=self.node_id, progress=0.0,
                                           detail="loading", load=LayerLoad(layers_loaded=layer + 1,
                                                                            layers_total=card.num_layers)))
            self.make_ready(instance_id)
            self.loaded_on_demand.append(instance_id)

    def keep_alive(self, instance_id: str, seconds: float | None) -> None:
        self.kept_alive.append((instance_id, seconds))

    def expires_at(self, instance_id: str) -> float | None:
        """As the last keep_alive of the instance set it, counted from now."""
        seconds = next((s for i, s in reversed(self.kept_alive) if i == instance_id), None)
        return None if seconds is None or seconds < 0 else time.time() + seconds

    def last_request_at(self, instance_id: str) -> float | None:
        return self.last_requests.get(instance_id)

    def submit(self, task: Task) -> ScriptedStream:
        self.submitted.append(task)
        instance = self.instance_for(task.model).instance
        task_id = task.task_id or f"task-{uuid.uuid4().hex[:12]}"
        task = task.model_copy(update={"task_id": task_id, "model": instance.model})
        self.tasks[task_id] = TaskRecord(task_id=task_id, instance_id=instance.instance_id, model=instance.model,
                                         origin_node_id=self.node_id, submitted_at=time.time())
        chunks = self._embed(task) if isinstance(task, EmbeddingTask) else self._generate(task)
        return ScriptedStream(task, instance.instance_id, chunks, self.closed.append)

    async def _embed(self, task: EmbeddingTask) -> AsyncGenerator[GenerationChunk, None]:
        """Every model embeds here: each input's vector of FAKE_DIMENSIONS values made from its words (or ids), one
        token per word, normalised; `dimensions` cuts them as the engine does."""
        try:
            size = FAKE_DIMENSIONS if task.dimensions is None else task.dimensions
            if size > FAKE_DIMENSIONS:
                raise TaskError("invalid_request", f"dimensions {size} is more than the model's {FAKE_DIMENSIONS}")
            tokens = [item.split() if isinstance(item, str) else item for item in task.inputs]
            if not all(tokens):
                raise TaskError("invalid_request", "an input has no tokens; send some text")
            vectors = []
            for words in tokens:
                digest = hashlib.sha256(str(words).encode()).digest()
                values = [float(1 + digest[i]) for i in range(size)]
                norm = sum(v * v for v in values) ** 0.5
                vectors.append([v / norm for v in values])
            yield GenerationChunk(task_id=task.task_id, embeddings=vectors, finish_reason="stop", last=True,
                                  usage=Usage(prompt_tokens=sum(map(len, tokens)), completion_tokens=0))
        finally:
            self.tasks.pop(task.task_id, None)

    async def _generate(self, task: TextGenerationTask) -> AsyncGenerator[GenerationChunk, None]:
        try:
            prompt = prompt_tokens(task)
            if prompt == 0:
                raise TaskError("invalid_request", "the prompt has no tokens (empty, or only characters the "
                                                   "tokenizer drops); send some text")
            try:
                context = request_context(task, self._context_of(task.task_id))
            except ContextWindowError as refusal:
                raise TaskError("context_window", str(refusal)) from None
            if prompt >= context:
                raise TaskError("context_window", f"the prompt has {prompt} tokens but the context window "
                                                  f"is {context}; shorten the prompt")
            for choice in range(task.n):  # choices one after another, as an engine without batching runs them
                async for chunk in self._choice(task, prompt, choice, context):
                    yield chunk
        finally:
            if (record := self.tasks.pop(task.task_id, None)) is not None:
                self.last_requests[record.instance_id] = time.time()

    def _context_of(self, task_id: str) -> int:
        """The context window of the instance serving the task, as its runner reported it."""
        context = self.state.instances[self.tasks[task_id].instance_id].context_length
        return self.context_window if context is None else context

    async def _choice(self, task: TextGenerationTask, prompt: int, choice: int, context: int
                      ) -> AsyncGenerator[GenerationChunk, None]:
        room = context - prompt
        max_tokens = min(task.max_tokens or room, room)
        tokens, stops = iter(self.script()), StopMatcher(task.stop)
        started, first_token_at, generated = time.perf_counter(), 0.0, 0
        finish: FinishReason = "length"
        while generated < max_tokens:
            await asyncio.sleep(self.token_delay_s)
            token = next(tokens, None)  # the script's end is the end-of-sequence token
            generated += 1
            if generated == 1:
                first_token_at = time.perf_counter()
                self.tasks[task.task_id] = self.tasks[task.task_id].model_copy(
                    update={"status": TaskStatus.RUNNING})
            if isinstance(token, TaskError):
                raise token
            if token is None:
                finish = "stop"
                break
            if text := stops.feed(token):
                yield GenerationChunk(task_id=task.task_id, choice=choice, text=text,
                                      logprobs=_logprobs(token, generated, task.sampling.logprobs))
            if stops.stopped:
                finish = "stop"
                break
        prefill_s = max(first_token_at - started, 1e-9)
        decode_s = time.perf_counter() - first_token_at
        yield GenerationChunk(
            task_id=task.task_id, choice=choice, text=stops.flush(), finish_reason=finish, last=choice == task.n - 1,
            stop_sequence=stops.matched, usage=Usage(prompt_tokens=prompt, completion_tokens=generated),
            timings=Timings(time_to_first_token_s=prefill_s, prefill_tokens_per_s=prompt / prefill_s,
                            decode_tokens_per_s=(generated - 1) / decode_s if generated > 1 else 0.0))


def _logprobs(token: str, generated: int, top: int | None) -> list[TokenLogprob] | None:
    """Made-up log-probabilities for a scripted token: the drawn one first among `top` alternatives."""
    if top is None:
        return None
    best = -0.1 * generated
    return [TokenLogprob(token=token, logprob=best,
                         top=[TopLogprob(token=token if i == 0 else f"alt{i}", logprob=best - i) for i in range(top)])]


def call_api(node: FakeNode, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request to `node`'s API in this process, over ASGI (no server, no port)."""
    from ringlet.api.app import create_app

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(node)),
                                     base_url="http://localhost") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Serve `app` over HTTP on a loopback port in a background thread; its base URL. Stops it on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # a short graceful shutdown: a stream a test left open must not hold up the next module
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fake-node-api", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), 10, "the fake node's API serving")
        assert server.started, "uvicorn stopped before it served (see the log above)"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "the fake node's API did not stop within 10 s"
