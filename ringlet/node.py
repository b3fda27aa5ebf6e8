"""A node, composed: this machine's copy of the cluster state, its runners, its part in the cluster, and the API.

This is the composition root, the one module that imports api, master, worker and net together. `Node` is what
the API's routers call (`api/facade.py`): every change goes through `emit(event)`, which the master orders
(`master/ordering.py`; a lone node orders its own) and every node folds into the same `State` with the pure
`apply`. The worker side follows the state: `Supervisor.reconcile` starts a runner for each shard placed on this
node and stops the runners of deleted instances. A request is routed to the least busy ready instance of its model
(`master/routing.py`) and runs on this node's runner or, over the control plane, on the node holding the instance's
first stage (`net/forwarding.py`); the tasks this node's API serves are tracked here, not in the cluster state.

`serve(options)` starts all of it: `ringlet node` calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from ringlet.api.app import create_app
from ringlet.api.limits import DEFAULT_MAX_BODY_BYTES
from ringlet.api.security import API_KEY_ENV, LOCAL_NAMES, Access, host_name, own_host_names
from ringlet.master.ordering import EventOrder
from ringlet.master.placement import (
    DEFAULT_OPTIONS,
    InstanceOptions,
    Placement,
    PlacementError,
    PlacementPreview,
    created,
    place,
    preview,
)
from ringlet.master.replacement import lost_node_events, reform_events
from ringlet.master.routing import route
from ringlet.models.catalog import ModelCard
from ringlet.models.commands import run_model_command, stored_models
from ringlet.models.download import DownloadManager, DownloadStatus, SavedDownload
from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.models.loader import read_model_config
from ringlet.models.names import Catalog, default_model_roots, is_existing_path
from ringlet.models.store import find_local, ringlet_home
from ringlet.net.events import EventBus
from ringlet.net.forwarding import TaskForwarding
from ringlet.net.membership import Member, Membership
from ringlet.net.model_commands import ModelCommands
from ringlet.net.session import DEFAULT_LISTEN, ControlPlane, ControlPlaneError, NetOptions, advertised_host
from ringlet.shared.config import MIN_CONTEXT, EngineConfig
from ringlet.shared.engine_info import EngineInfo
from ringlet.shared.errors import InstanceNotFoundError, ModelLoadError, NodeError, NoInstanceError
from ringlet.shared.instances import EngineType, InstanceType, single_node_type
from ringlet.shared.messages import DeleteModel, ModelCommand, ModelCommandReply
from ringlet.shared.saved import SavedInstance, SavedInstances, SavedList
from ringlet.shared.state import (
    DownloadProgressed,
    DownloadRecord,
    Event,
    InstanceDeleted,
    InstanceRecord,
    NodeInfo,
    NodeJoined,
    NodeUpdated,
    RunnerFailed,
    RunnerStatus,
    State,
    StoredModelInfo,
    TaskRecord,
    TaskStatus,
    apply,
    new_instance_record,
)
from ringlet.shared.tasks import GenerationChunk, Task
from ringlet.worker.supervisor import RESTART_WINDOW_S, InstanceLoad, Supervisor
from ringlet.worker.system_info import (
    collect_engine_info,
    collect_node_hardware,
    gpu_memory_moved,
    read_memory,
    refresh_gpu_memory,
)

log = logging.getLogger("ringlet.node")

DEFAULT_API_PORT = 52415
DEFAULT_HOST = "127.0.0.1"
MEMORY_REFRESH_S = 2.0
EXPIRY_CHECK_S = 1.0  # how often instances past their keep-alive are looked for
LOAD_POLL_S = 0.05  # how often a request waiting for its instance to load looks again: a check of local state
DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's
LOAD_ORDER_S = 30.0  # an instance made for a request is not made again while the cluster orders it
MEMORY_CHANGE_BYTES = 64 * 1024**2  # smaller changes of free memory are not worth an event
# how long a starting node listens for members before it decides who is master (scouting answers within ~1 s), unless
# a member claims the role first; and how often it looks for that claim
SETTLE_S = 1.5
SETTLE_POLL_S = 0.05


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass(eq=False)
class TaskHandle:
    """A submitted task: which instance serves it, and its stream of chunks (close it to cancel the task)."""

    task: Task
    instance_id: str
    _chunks: AsyncIterator[GenerationChunk] = field(repr=False)

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self._chunks

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]


class Node:
    def __init__(self, info: NodeInfo, catalog: Catalog | None = None, data_host: str = "127.0.0.1",
                 config: EngineConfig = EngineConfig(), saved: SavedInstances | None = None,
                 saved_downloads: SavedList[SavedDownload] | None = None) -> None:
        """`saved`: where the instances created through this node are kept, to be created again after a restart;
        `saved_downloads`: where its unfinished downloads are, to be resumed."""
        self.info = info
        self.saved = saved
        self._unsaved: set[str] = set()  # instances this node made itself (its default one): never saved
        self._reforms: dict[tuple[str, InstanceType], deque[float]] = {}  # when rings were formed again, as master
        self._reformed: set[str] = set()  # the failed rings formed again
        self.catalog = catalog or Catalog()
        self.data_host = data_host  # where this node's stages listen on the data plane
        self.config = config
        self._state = State()
        self._tasks: dict[str, TaskRecord] = {}  # in flight through this node's API
        self._expiry: dict[str, float] = {}  # instance id -> when (time.monotonic) it goes once idle (keep_alive)
        self._last_request: dict[str, float] = {}  # instance id -> when (time.time) its last request here ended
        self._loading_for: dict[str, float] = {}  # model id -> when an instance was made for a request
        self._supervisor = Supervisor(self.emit, config)
        self._order: EventOrder | None = None
        self._forwarding: TaskForwarding | None = None
        self._model_commands: ModelCommands | None = None
        self._changed = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.downloads = DownloadManager(on_update=self._download_changed, saved=saved_downloads)

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def state(self) -> State:
        return self._state

    @property
    def tasks(self) -> dict[str, TaskRecord]:
        return self._tasks

    @property
    def engine_info(self) -> EngineInfo:
        return self.info.engines

    def instance_load(self) -> dict[str, InstanceLoad]:
        return self._supervisor.load()

    def attach_cluster(self, order: EventOrder, forwarding: TaskForwarding,
                       model_commands: ModelCommands | None = None) -> None:
        """From now on the master orders this node's events, tasks may run on other nodes, and model commands may go
        to their stores."""
        self._order, self._forwarding, self._model_commands = order, forwarding, model_commands

    # --- the state

    def emit(self, event: Event) -> None:
        """Record a change: the master orders it (alone, this node is its own master)."""
        if self._loop is not None and not self._on_loop():
            # synchronous API routes and downloads run on other threads; the state is only touched on the loop
            self._loop.call_soon_threadsafe(self.emit, event)
        elif self._order is not None:
            self._order.emit(event)
        else:
            self.apply_ordered(event)

    def apply_ordered(self, event: Event) -> None:
        """Fold an event, in the order every node applies it; the runners follow the new state."""
        self._state = apply(self._state, event)
        self._changed.set()
        if isinstance(event, InstanceDeleted) and self.saved is not None:  # deleted through any node: not kept,
            self.saved.remove(event.instance_id, replaced_by=event.replaced_by)  # unless placed again
        if isinstance(event, RunnerFailed) and event.reform and (self._order is None or self._order.is_master):
            asyncio.get_running_loop().call_soon(self.reform, event.instance_id)  # once this event is applied

    def reform(self, instance_id: str) -> None:
        """Form a ring whose stage died or hung while serving again: deleted, and placed anew on its nodes; at most
        `runner_restarts` times in `RESTART_WINDOW_S` for one model and kind of instance, then it stays failed."""
        record = self._state.instances.get(instance_id)
        if record is None or record.status != RunnerStatus.FAILED or instance_id in self._reformed:
            return  # deleted meanwhile, or formed again already (for another of its stages' failures)
        self._reformed.add(instance_id)
        now = time.monotonic()
        times = self._reforms.setdefault((record.instance.model, record.instance.instance_type), deque())
        while times and now - times[0] > RESTART_WINDOW_S:
            times.popleft()
        if len(times) >= self.config.runner_restarts:
            log.error("instance %s failed (%s), its ring formed again %d times in %.0f min already: it stays failed; "
                      "delete it and create it again", instance_id, record.error, len(times), RESTART_WINDOW_S / 60)
            return
        times.append(now)
        events, note = reform_events(self._state, instance_id, self.catalog.resolve, lambda: new_id("inst"),
                                     time.time())
        log.warning("%s (%s)", note, record.error)
        for event in events:
            self.emit(event)

    def replace_state(self, state: State) -> None:
        """Take a copy of the master's state (joining a cluster, or after missing events)."""
        self._state = state
        self._changed.set()

    def departures(self, state: State, node_id: str) -> list[Event]:
        """What the master orders when `node_id` leaves: its removal and its instances placed again."""
        events, notes = lost_node_events(state, node_id, self.catalog.resolve, lambda: new_id("inst"), time.time())
        for note in notes:
            log.info("%s", note)
        return events

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _download_changed(self, status: DownloadStatus) -> None:
        self.emit(DownloadProgressed(download=DownloadRecord(
            node_id=self.node_id, **status.model_dump(include={"download_id", "model", "layers", "state", "done",
                                                                 "total", "error"}))))
        if status.state != "running":  # done, or stopped with some files on disk
            self.store_changed()

    # --- the model store, on this node and the others

    def store_changed(self) -> None:
        """List this node's store again in its NodeInfo (after a download or a deletion), for every node to see."""
        models = stored_models(self.downloads.store)
        if self._loop is not None and not self._on_loop():
            self._loop.call_soon_threadsafe(self._set_stored, models)
        else:
            self._set_stored(models)

    def _set_stored(self, models: list[StoredModelInfo]) -> None:
        if models != self.info.models:
            self.info = self.info.model_copy(update={"models": models})
            self.emit(NodeUpdated(node=self.info))

    def run_model_command(self, command: ModelCommand) -> ModelCommandReply:
        """A command on this node's store, from its API or another node (blocking: it may wait on the disk)."""
        reply = run_model_command(command, self.downloads, lambda model: [
            r.instance.instance_id for r in self._state.instances.values() if r.instance.model.lower() == model.lower()])
        if isinstance(command, DeleteModel) and reply.status < 300:
            self.store_changed()
        return reply

    async def model_command(self, node_id: str | None, command: ModelCommand) -> ModelCommandReply:
        """Run a command on the store of `node_id` (None: this node's): here, or over the control plane."""
        if node_id is None or node_id == self.node_id:
            return await asyncio.to_thread(self.run_model_command, command)
        if node_id not in self._state.nodes:
            return ModelCommandReply(status=404, code="node_not_found", error=f"no node {node_id!r} in the cluster; "
                                     f"known: {', '.join(self._state.nodes)} (GET /state lists them)")
        live = self._order.live_ids() if self._order is not None else {self.node_id}
        if self._model_commands is None or node_id not in live:
            return ModelCommandReply(status=503, code="node_unreachable",
                                     error=f"node {node_id} is not connected to this node now; try again once it is")
        return await self._model_commands.send(node_id, command)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.emit(NodeJoined(node=self.info))
        self._background = [asyncio.create_task(self._follow_state(), name="reconcile"),
                            asyncio.create_task(self._refresh_memory(), name="memory"),
                            asyncio.create_task(self._expire_idle(), name="keep-alive")]

    async def stop(self) -> None:
        self.downloads.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._supervisor.close()

    async def _follow_state(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self._supervisor.reconcile(self._state, self.node_id, self.data_host)
            except Exception:
                log.exception("starting or stopping runners for the new state failed; trying again on the next change")

    async def _expire_idle(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK_S)
            self.expire_idle(time.monotonic())

    def expire_idle(self, now: float) -> list[str]:
        """Delete the instances whose keep-alive has run out and that serve no request through this node now; their
        ids."""
        busy = {t.instance_id for t in self._tasks.values()}
        expired = [i for i, at in self._expiry.items() if at <= now and i not in busy]
        for gone in set(self._last_request) - set(self._state.instances):
            del self._last_request[gone]
        for instance_id in expired:
            del self._expiry[instance_id]
            if instance_id in self._state.instances:
                log.info("instance %s: idle past its keep_alive; unloading it", instance_id)
                self.delete_instance(instance_id)
                if self.saved is not None:
                    self.saved.remove(instance_id)
        return expired

    def keep_alive(self, instance_id: str, seconds: float | None) -> None:
        """Ollama's keep_alive, after a request: the instance goes once it has been idle `seconds` from now (0: as
        soon as it is idle; negative: never). None (the request did not say): an instance that has a keep-alive gets
        Ollama's default again, one that has none stays until deleted."""
        if seconds is None:
            if instance_id not in self._expiry:
                return
            seconds = DEFAULT_KEEP_ALIVE_S
        if seconds < 0:
            self._expiry.pop(instance_id, None)
        else:
            self._expiry[instance_id] = time.monotonic() + seconds

    def expires_at(self, instance_id: str) -> float | None:
        at = self._expiry.get(instance_id)
        return None if at is None else time.time() + (at - time.monotonic())

    def last_request_at(self, instance_id: str) -> float | None:
        return self._last_request.get(instance_id)

    async def ensure_instance(self, model: str, wait_s: float, watch: Callable[[], Awaitable[None]],
                              context_length: int | None = None) -> None:
        """Ollama's way with a model: one that has no instance but whose files this node holds gets an instance
        here, with a context window of `context_length` where the request names one (Ollama's num_ctx), and a request
        waits (at most `wait_s`; `watch` raises when its client has gone) while one loads. Raises what `instance_for`
        raises for anything else (unknown, failed, or not on this node's disk); a path is a model file or folder in the
        node's model folders, or a 400/404 saying why not."""
        deadline = time.monotonic() + wait_s
        if is_existing_path(model):
            self.catalog.add_local(model)
        while True:
            try:
                self.instance_for(model)
                return
            except NoInstanceError as refusal:
                if not refusal.loading and not self._load_here(model, context_length):
                    raise
                if time.monotonic() >= deadline:
                    raise
            await watch()
            await asyncio.sleep(LOAD_POLL_S)

    def _load_here(self, model: str, context_length: int | None = None) -> bool:
        """Create an instance of `model` on this node when it has none at all and its files are here, its context
        window `context_length` (None: the model's own as memory allows); whether one was created."""
        if model in self._state.instances:
            return False
        card = self.catalog.resolve(model)
        if self._state.instances_of(card.id):
            return False
        if time.monotonic() - self._loading_for.get(card.id, -LOAD_ORDER_S) < LOAD_ORDER_S:
            return True  # made already; the cluster's state has not shown it yet
        if not (card.source in ("embedded", "local", "ollama") or find_local(card.id) is not None):
            return False
        engine = self.engine_info.selected_engine or "cpu"
        options = DEFAULT_OPTIONS if context_length is None else InstanceOptions(
            max_context=max(context_length, MIN_CONTEXT))  # a smaller window is the request's own, within it
        record = self.create_instance(card.id, single_node_type(engine), node_ids=[self.node_id], options=options,
                                      save=False)
        self._loading_for[card.id] = time.monotonic()
        log.info("instance %s: %s loads for a request (as Ollama loads a model on use)", record.instance.instance_id,
                 card.id)
        return True

    async def _refresh_memory(self) -> None:
        while True:
            await asyncio.sleep(MEMORY_REFRESH_S)
            memory = await asyncio.to_thread(read_memory)
            hardware = await asyncio.to_thread(refresh_gpu_memory, self.info.hardware)
            if (abs(memory.available_bytes - self.info.memory.available_bytes) >= MEMORY_CHANGE_BYTES
                    or gpu_memory_moved(self.info.hardware, hardware, MEMORY_CHANGE_BYTES)):
                self.info = self.info.model_copy(update={"memory": memory, "hardware": hardware})
                self.emit(NodeUpdated(node=self.info))

    # --- models and instances

    def preview(self, model: str, node_ids: Sequence[str] | None = None, min_nodes: int = 1,
                options: InstanceOptions = DEFAULT_OPTIONS) -> tuple[ModelCard, list[PlacementPreview]]:
        card = self.catalog.add_local(model)
        return card, preview(card, list(self._state.nodes.values()), node_ids=node_ids, min_nodes=min_nodes,
                             options=options, placed=list(self._state.instances.values()))

    def create_instance(self, model: str, instance_type: InstanceType, node_ids: Sequence[str] | None = None,
                        min_nodes: int = 1, options: InstanceOptions = DEFAULT_OPTIONS,
                        save: bool = True) -> InstanceRecord:
        """Place the model beside the instances the cluster has and record the instance; its runners load in the
        background (watch its status). `save`: keep it among the instances this node creates again after a restart.

        Raises ModelNotFoundError, or PlacementError saying why it cannot be placed."""
        card = self.catalog.add_local(model)
        placement: Placement = place(card, instance_type, list(self._state.nodes.values()),
                                     instance_id=new_id("inst"), node_ids=node_ids, min_nodes=min_nodes,
                                     options=options, placed=list(self._state.instances.values()))
        self._check_room(placement)
        devices = "" if instance_type != InstanceType.IPEX_RING else (
            f" (Intel GPUs {options.intel_gpu_devices or 'discrete'}, optimisation {options.ipex_optimization_level})")
        log.info("instance %s: %s as %s on %s%s", placement.instance.instance_id, card.id, instance_type.value,
                 ", ".join(f"{s.node_name}[{s.start}:{s.end}]" for s in placement.stages), devices)
        event = created(placement, time.time())
        self.emit(event)
        instance_id = placement.instance.instance_id
        if not save:
            self._unsaved.add(instance_id)
        elif self.saved is not None:
            self.saved.add(SavedInstance(instance_id=instance_id, model=model, instance_type=instance_type,
                                         min_nodes=min_nodes, intel_gpu_devices=options.intel_gpu_devices,
                                         ipex_optimization_level=options.ipex_optimization_level,
                                         max_context=options.max_context, tensor_parallel=options.tensor_parallel))
        return new_instance_record(event)  # in a cluster the state has it once the master has ordered it

    def restore_saved(self) -> None:
        """Create again the saved instances the cluster no longer has: one that still exists (by id), or for which
        another instance of its model and kind runs, is left be; one that cannot be created is forgotten, with a
        warning saying why."""
        if self.saved is None:
            return
        others = Counter((r.instance.model, r.instance.instance_type) for i, r in self._state.instances.items()
                         if i not in self._unsaved)
        for saved in self.saved.load():
            if saved.instance_id in self._state.instances:
                continue
            try:
                key = (self.catalog.add_local(saved.model).id, saved.instance_type)
                if others[key]:
                    others[key] -= 1
                    continue
                options = InstanceOptions(intel_gpu_devices=saved.intel_gpu_devices,
                                          ipex_optimization_level=saved.ipex_optimization_level,
                                          max_context=saved.max_context, tensor_parallel=saved.tensor_parallel)
                record = self.create_instance(saved.model, saved.instance_type, min_nodes=saved.min_nodes,
                                              options=options, save=False)
            except (NodeError, PlacementError) as error:
                log.warning("the saved instance %s of %s was not created again, and is forgotten: %s",
                            saved.instance_id, saved.model, error)
                self.saved.remove(saved.instance_id)
                continue
            created_id = record.instance.instance_id
            self._unsaved.discard(created_id)
            self.saved.remove(saved.instance_id)
            self.saved.add(saved.model_copy(update={"instance_id": created_id}))
            log.info("instance %s: %s as %s, created again (it was %s before the restart)", created_id, saved.model,
                     saved.instance_type.value, saved.instance_id)

    def _check_room(self, placement: Placement) -> None:
        """Each node of the placement has room for one more runner: fewer than `max_instances` instances there (its
        memory, with what its instances still loading will take, placement counted already)."""
        for stage in placement.stages:
            here = [r for r in self._state.instances.values() if stage.node_id in r.runners]
            if len(here) >= self.config.max_instances:
                raise PlacementError(
                    f"node {stage.node_name} runs {len(here)} instances already, the most it takes "
                    f"(RINGLET_MAX_INSTANCES={self.config.max_instances}); delete one first (DELETE /instance/ID)")

    def get_instance(self, instance_id: str) -> InstanceRecord:
        record = self._state.instances.get(instance_id)
        if record is None:
            raise InstanceNotFoundError(instance_id, list(self._state.instances))
        return record

    def delete_instance(self, instance_id: str) -> InstanceRecord:
        """Remove the instance; its runners stop and its tasks in flight end with an error."""
        record = self.get_instance(instance_id)
        self.emit(InstanceDeleted(instance_id=instance_id))
        return record

    # --- generation

    def instance_for(self, model: str) -> InstanceRecord:
        busy: dict[str, int] = {}
        for task in self._tasks.values():
            busy[task.instance_id] = busy.get(task.instance_id, 0) + 1
        live = self._order.live_ids() if self._order is not None else set(self._state.nodes)
        return route(self._state, model, self.catalog.resolve, self.node_id, self._forwarding is not None, busy,
                     gone=set(self._state.nodes) - live)

    def submit(self, task: Task) -> TaskHandle:
        """Route a task to the least busy ready instance of its model; raises ModelNotFoundError or
        NoInstanceError at once, so the API can answer with a status before it streams anything."""
        instance = self.instance_for(task.model).instance
        task = task.model_copy(update={"task_id": task.task_id or new_id("task"), "model": instance.model})
        record = TaskRecord(task_id=task.task_id, instance_id=instance.instance_id, model=instance.model,
                            origin_node_id=self.node_id, submitted_at=time.time())
        self._tasks[task.task_id] = record
        first = instance.shards[0].node_id
        if first == self.node_id:
            chunks = self._supervisor.generate(instance.instance_id, task, lambda: self._running(task.task_id))
        else:
            assert self._forwarding is not None, "route only picks remote instances in a cluster"
            chunks = self._forwarding.forward(first, instance.instance_id, task)
        return TaskHandle(task, instance.instance_id, self._in_flight(chunks, task.task_id))

    def run_local(self, instance_id: str, task: Task) -> AsyncIterator[GenerationChunk]:
        """Run a task on this node's runner of the instance (its first stage), for a request that reached
        another node; that node tracks the task."""
        if not self._supervisor.runs(instance_id):
            raise NoInstanceError(f"instance {instance_id} has no first stage on node {self.node_id}")
        return self._supervisor.generate(instance_id, task)

    def _running(self, task_id: str) -> None:
        if (record := self._tasks.get(task_id)) is not None and record.status != TaskStatus.RUNNING:
            self._tasks[task_id] = record.model_copy(update={"status": TaskStatus.RUNNING})

    async def _in_flight(self, chunks: AsyncIterator[GenerationChunk], task_id: str) -> AsyncIterator[GenerationChunk]:
        """The task's chunks, while it counts as in flight here (a forwarded task runs once its first chunk is in)."""
        try:
            # aclosing: when our caller closes us early, the inner stream must close now (that cancels the task
            # in the runner), not whenever the garbage collector finds it
            async with aclosing(chunks):  # type: ignore[type-var]
                async for chunk in chunks:
                    self._running(task_id)
                    yield chunk
        finally:
            if (record := self._tasks.pop(task_id, None)) is not None:
                self._last_request[record.instance_id] = time.time()


# --- starting a node


class NodeStartError(Exception):
    """The node cannot start as asked; the message says what to change."""


@dataclass(frozen=True)
class NodeOptions:
    name: str = field(default_factory=socket.gethostname)
    host: str = DEFAULT_HOST
    api_port: int = DEFAULT_API_PORT
    ollama_port: int | None = None  # the same API on Ollama's port too, for tools with a fixed Ollama URL
    model: str | None = None  # None: the embedded model
    engine: EngineType | None = None  # None: the best available
    engine_config: EngineConfig = EngineConfig()
    default_instance: bool = True
    instance_options: InstanceOptions = DEFAULT_OPTIONS  # the default instance's (an IpexRing's devices, ...)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # the API's callers: keys wanted as Bearer tokens (none: no key), names it answers to and web origins it
    # serves beyond its own (api/security.py)
    models_dirs: tuple[str, ...] = ()  # directories the API may load models from, beyond the store
    api_keys: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    # the control plane: zenoh endpoints to connect to and listen on, and multicast scouting on the LAN
    connect: tuple[str, ...] = ()
    listen: str | None = None  # None: tcp/0.0.0.0:52414 (a free port when another node has it)
    discovery: bool = True
    cluster_secret: bytes | None = field(default=None, repr=False)  # None: no TLS (only tests' own nodes)

    @property
    def net(self) -> NetOptions:
        return NetOptions(listen=(self.listen,) if self.listen else DEFAULT_LISTEN, connect=self.connect,
                          discovery=self.discovery, secret=self.cluster_secret)


def detect_node(options: NodeOptions) -> NodeInfo:
    return NodeInfo(node_id=new_id("node"), name=options.name, hardware=collect_node_hardware(),
                    engines=collect_engine_info(options.engine), memory=read_memory(), api_port=options.api_port,
                    precision=options.engine_config.precision, models=stored_models())


def model_roots(options: NodeOptions) -> list[Path]:
    """Where the API may load models from: the store, RINGLET_MODEL_DIRS, --models-dir, and the --model given."""
    given = [Path(options.model).expanduser()] if options.model and Path(options.model).expanduser().exists() else []
    return [*default_model_roots(), *(Path(d).expanduser() for d in options.models_dirs), *given]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host_name(host) in LOCAL_NAMES


def bind(host: str, port: int, flag: str = "--api-port") -> socket.socket:
    """A listening socket; `flag`: the option that chose the port (named in the error)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        running = "is Ollama running?" if flag == "--ollama-port" else "is another node running?"
        raise NodeStartError(f"cannot listen on {host}:{port} ({error.strerror}); {running} pick another port "
                             f"with {flag}") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def read_default_model(options: NodeOptions) -> None:
    """Read the default instance's model configuration into the process's cache, where it is on disk. Whatever
    fails here fails again where the instance is created, which says so."""
    with contextlib.suppress(ModelLoadError, OSError):
        read_model_config(options.model)


def create_default_instance(node: Node, options: NodeOptions) -> None:
    engine = options.engine or node.engine_info.selected_engine or "cpu"
    instance_type = single_node_type(engine)
    model = options.model or EMBEDDED_MODEL_ID
    try:
        record = node.create_instance(model, instance_type, node_ids=[node.node_id], options=options.instance_options,
                                      save=False)
    except (NodeError, PlacementError) as error:
        raise NodeStartError(f"cannot serve {model} as {instance_type.value}: {error}; start with "
                             "--no-default-instance to run the node without it") from None
    log.info("serving %s as %s (instance %s); it is loading in a runner process", record.instance.model,
             instance_type.value, record.instance.instance_id)


class Cluster:
    """This node's part in the cluster: the control plane, membership, the event order and task forwarding.
    Made inside the running event loop, which receives zenoh's callbacks."""

    def __init__(self, node: Node, options: NetOptions) -> None:
        self.me = Member.starting_now(node.node_id)
        self.plane = ControlPlane(options)
        bus = EventBus(self.plane)
        self.order = EventOrder(self.me, bus, node, rejoin=lambda: NodeJoined(node=node.info),
                                departures=node.departures, claim=lambda term: self.membership.claim(term),
                                grace_s=node.config.replace_grace_s)
        bus.listen(node.node_id, self.order.on_proposal, self.order.on_ordered, lambda: node.state)
        idle_s = node.config.stream_idle_s
        self.forwarding = TaskForwarding(self.plane, node.node_id, node.run_local, idle_s, min(5.0, idle_s / 3))
        self.membership = Membership(self.plane, self.me, self._members_changed)
        commands = ModelCommands(self.plane, node.node_id, node.run_model_command,
                                 lambda node_id: node_id in self.order.live_ids())
        node.attach_cluster(self.order, self.forwarding, commands)

    def _members_changed(self, joined: set[str], left: set[str]) -> None:
        self.order.members_changed(self.membership.members, left, self.membership.claims)
        for node_id in left:
            self.forwarding.member_left(node_id)

    async def join(self, settle_s: float = SETTLE_S) -> None:
        """Listen for members for a moment, elect, and take the master's state (unless this node is master). The
        moment ends early once a live member claims the master's role: a joining node defers to a claim whoever else
        it would have seen (`master/election.py`), and a higher claim seen later is weighed as members change."""
        until = time.monotonic() + settle_s
        while time.monotonic() < until and not self._master_claimed():
            await asyncio.sleep(SETTLE_POLL_S)
        await self.order.start(self.membership.members, self.membership.claims)

    def _master_claimed(self) -> bool:
        return any(claim.node_id != self.me.node_id for claim in self.membership.claims)

    def close(self) -> None:
        self.forwarding.close()
        self.plane.close()


def _let_serving_end_on_signals() -> None:
    """uvicorn stops on SIGINT/SIGTERM, then raises the signal again for the handler it found: with the default
    one the process would die there, before the runners are stopped. A handler that only logs lets serve()
    return, so the node shuts down in order and exits 0."""
    if threading.current_thread() is not threading.main_thread():
        return  # uvicorn only listens to signals in the main thread either
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _: log.info("%s: stopping", signal.Signals(signum).name))


async def serve(options: NodeOptions) -> None:
    try:
        net = options.net
        data_host = advertised_host(net)
    except ValueError as error:
        raise NodeStartError(str(error)) from None
    sock = bind(options.host, options.api_port)
    socks = [sock]
    if options.ollama_port is not None:
        try:
            socks.append(bind(options.host, options.ollama_port, "--ollama-port"))
        except NodeStartError:
            sock.close()
            raise
    info = await asyncio.to_thread(detect_node, options)
    node = Node(info, catalog=Catalog(model_roots(options)), data_host=data_host, config=options.engine_config,
                saved=SavedInstances(ringlet_home() / "instances.json"),
                saved_downloads=SavedList(ringlet_home() / "downloads.json", SavedDownload, lambda d: d.download_id))
    try:
        cluster = Cluster(node, net)
    except ControlPlaneError as error:
        for listening in socks:
            listening.close()
        raise NodeStartError(str(error)) from None
    # the default model's configuration is read (seconds for a GGUF file) while the node listens for members
    reading = asyncio.create_task(asyncio.to_thread(read_default_model, options)) if options.default_instance else None
    await cluster.join()
    await node.start()
    try:
        try:
            await cluster.order.wait_joined()
        except TimeoutError as error:
            raise NodeStartError(str(error)) from None
        if reading is not None:
            await reading
            create_default_instance(node, options)
        node.restore_saved()
        node.downloads.resume()
        access = Access(options.api_keys, frozenset(own_host_names()) | set(options.allow_hosts),
                        frozenset(options.allow_origins))
        app = create_app(node, max_body_bytes=options.max_body_bytes, access=access)
        shown = "localhost" if options.host in ("127.0.0.1", "::1") else options.host
        log.info("node %s (%s): dashboard http://%s:%d/  OpenAI API http://%s:%d/v1  engine %s", info.name,
                 info.node_id, shown, options.api_port, shown, options.api_port, info.engines.selected_engine)
        if options.ollama_port is not None:
            log.info("the same API on Ollama's port: http://%s:%d/api", shown, options.ollama_port)
        if options.api_keys:
            log.info("the API wants one of %d API key(s) (Authorization: Bearer KEY)", len(options.api_keys))
        elif options.host == DEFAULT_HOST:
            log.info("listening on this machine only; --host 0.0.0.0 serves the LAN (with --api-key KEY, please)")
        elif not is_loopback(options.host):
            log.warning("WARNING: the API serves %s with no API key: anyone on your network can use this node's "
                        "models and change its instances; restart it with --api-key KEY (or %s)", options.host,
                        API_KEY_ENV)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
        _let_serving_end_on_signals()
        await server.serve(sockets=socks)
    finally:
        await node.stop()
        cluster.close()
        for listening in socks:
            listening.close()
