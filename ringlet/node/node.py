"""The node: this machine's view of the cluster state, its runners, and the facade the API calls.

Every change goes through `emit(event)`, which orders it and folds it into `state` with the pure `apply`.
On a single node the node orders its own events; in a cluster the elected master orders them and every
node applies the same sequence, so `emit` becomes "send to the master" and nothing else here changes.
The worker side follows the state: `Supervisor.reconcile` starts a runner for each shard placed on this
node and stops the runners of deleted instances.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

import psutil

from ringlet.master.placement import Placement, PlacementPreview, place, preview
from ringlet.models.catalog import ModelCard
from ringlet.models.download import DownloadManager, DownloadStatus
from ringlet.node.catalog import Catalog
from ringlet.node.errors import InstanceNotFoundError, NoInstanceError
from ringlet.shared.engine_info import EngineInfo
from ringlet.shared.instances import InstanceType
from ringlet.shared.state import (
    DownloadProgressed,
    DownloadRecord,
    Event,
    InstanceCreated,
    InstanceDeleted,
    InstanceRecord,
    MemoryInfo,
    NodeInfo,
    NodeJoined,
    NodeUpdated,
    RunnerStatus,
    State,
    TaskFinished,
    TaskQueued,
    TaskRecord,
    apply,
    new_instance_record,
)
from ringlet.shared.tasks import GenerationChunk, TextGenerationTask
from ringlet.worker.supervisor import Supervisor

log = logging.getLogger(__name__)

MEMORY_REFRESH_S = 2.0
MEMORY_CHANGE_BYTES = 64 * 1024**2  # smaller changes of free memory are not worth an event


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def read_memory() -> MemoryInfo:
    memory = psutil.virtual_memory()
    return MemoryInfo(total_bytes=memory.total, available_bytes=memory.available)


def create_instance_hint(model: str) -> str:
    return (f"create one with POST /instance {{\"model\": \"{model}\", \"instance_type\": \"CpuRing\"}} "
            f"(or from the dashboard), or start the node with `ringlet node --model {model}`")


@dataclass(eq=False)
class TaskHandle:
    """A submitted task: which instance serves it, and its stream of chunks (close it to cancel the task)."""

    task: TextGenerationTask
    instance_id: str
    _chunks: AsyncIterator[GenerationChunk] = field(repr=False)

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self._chunks

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]


class ClusterRouting(Protocol):
    """What a cluster adds to a node: the master's order of events, and tasks for instances that start elsewhere."""

    def emit(self, event: Event) -> None:
        """Propose an event; it comes back through `Node.apply_ordered` once the master has ordered it."""
        ...

    def forward(self, node_id: str, instance_id: str, task: TextGenerationTask) -> AsyncIterator[GenerationChunk]:
        """Run the task on `node_id`, which holds the instance's first stage; raises TaskError."""
        ...


class Node:
    def __init__(self, info: NodeInfo, catalog: Catalog | None = None, data_host: str = "127.0.0.1") -> None:
        self.info = info
        self.catalog = catalog or Catalog()
        self.data_host = data_host  # where this node's stages listen on the data plane
        self._state = State()
        self._supervisor = Supervisor(self.emit)
        self._cluster: ClusterRouting | None = None
        self._changed = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.downloads = DownloadManager(on_update=self._download_changed)

    def _download_changed(self, status: DownloadStatus) -> None:
        """Called from download threads; emit() hands the event to the event loop."""
        self.emit(DownloadProgressed(download=DownloadRecord(
            node_id=self.node_id, **status.model_dump(include={"download_id", "model", "layers", "state", "done",
                                                                 "total", "error"}))))

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def state(self) -> State:
        return self._state

    @property
    def engine_info(self) -> EngineInfo:
        return self.info.engines

    def attach_cluster(self, cluster: ClusterRouting) -> None:
        """From now on the cluster orders this node's events and carries its tasks to other nodes."""
        self._cluster = cluster

    def emit(self, event: Event) -> None:
        """Record a change: alone, this node orders it; in a cluster, the master does."""
        if self._loop is not None and not self._on_loop():
            # synchronous API routes run on worker threads; the state is only touched on the event loop
            self._loop.call_soon_threadsafe(self.emit, event)
        elif self._cluster is not None:
            self._cluster.emit(event)
        else:
            self.apply_ordered(event)

    def apply_ordered(self, event: Event) -> None:
        """Fold an event, in the order every node applies it; the runners follow the new state."""
        self._state = apply(self._state, event)
        self._changed.set()

    def replace_state(self, state: State) -> None:
        """Take a copy of the master's state (joining a cluster, or after missing events)."""
        self._state = state
        self._changed.set()

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.emit(NodeJoined(node=self.info))
        self._background = [asyncio.create_task(self._follow_state(), name="reconcile"),
                            asyncio.create_task(self._refresh_memory(), name="memory")]

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

    async def _refresh_memory(self) -> None:
        while True:
            await asyncio.sleep(MEMORY_REFRESH_S)
            memory = await asyncio.to_thread(read_memory)
            if abs(memory.available_bytes - self.info.memory.available_bytes) >= MEMORY_CHANGE_BYTES:
                self.info = self.info.model_copy(update={"memory": memory})
                self.emit(NodeUpdated(node=self.info))

    # --- models and instances

    def preview(self, model: str, node_ids: Sequence[str] | None = None, min_nodes: int = 1
                ) -> tuple[ModelCard, list[PlacementPreview]]:
        card = self.catalog.add_local(model)
        return card, preview(card, list(self._state.nodes.values()), node_ids=node_ids, min_nodes=min_nodes)

    def create_instance(self, model: str, instance_type: InstanceType, node_ids: Sequence[str] | None = None,
                        min_nodes: int = 1) -> InstanceRecord:
        """Place the model and record the instance; its runners load in the background (watch its status).

        Raises ModelNotFoundError, or PlacementError saying why it cannot be placed."""
        card = self.catalog.add_local(model)
        placement: Placement = place(card, instance_type, list(self._state.nodes.values()),
                                     instance_id=new_id("inst"), node_ids=node_ids, min_nodes=min_nodes)
        instance = placement.instance
        log.info("instance %s: %s as %s on %s", instance.instance_id, card.id, instance_type.value,
                 ", ".join(f"{s.node_name}[{s.start}:{s.end}]" for s in placement.stages))
        created = InstanceCreated(instance=instance, created_at=time.time(),
                                  memory_bytes={s.node_id: s.memory_bytes for s in placement.stages})
        self.emit(created)
        return new_instance_record(created)  # in a cluster the state has it once the master has ordered it

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

    def submit(self, task: TextGenerationTask) -> TaskHandle:
        """Route a task to the least busy ready instance of its model; raises ModelNotFoundError or
        NoInstanceError at once, so the API can answer with a status before it streams anything."""
        record = self.instance_for(task.model)
        instance = record.instance
        task = task.model_copy(update={"task_id": task.task_id or new_id("task"), "model": instance.model})
        self.emit(TaskQueued(task=TaskRecord(task_id=task.task_id, instance_id=instance.instance_id,
                                             model=instance.model, origin_node_id=self.node_id,
                                             submitted_at=time.time())))
        first = instance.shards[0].node_id
        if first == self.node_id:
            chunks = self._supervisor.generate(instance.instance_id, task)
        else:
            assert self._cluster is not None, "instance_for only picks remote instances in a cluster"
            chunks = self._cluster.forward(first, instance.instance_id, task)
        return TaskHandle(task, instance.instance_id, self._stream(chunks, task.task_id))

    def run_local(self, instance_id: str, task: TextGenerationTask) -> AsyncIterator[GenerationChunk]:
        """Run a task on this node's runner of the instance (its first stage), for a request that reached
        another node; that node tracks the task in the state."""
        if not self._supervisor.runs(instance_id):
            raise NoInstanceError(f"instance {instance_id} has no first stage on node {self.node_id}")
        return self._supervisor.generate(instance_id, task)

    def instance_for(self, model: str) -> InstanceRecord:
        """The ready instance a task for `model` goes to: the least busy one of the model, or the instance whose
        id `model` is (to talk to one instance). Raises ModelNotFoundError or NoInstanceError saying what to do."""
        if model in self._state.instances:
            return self._usable(model, [self._state.instances[model]])
        card = self.catalog.resolve(model)
        return self._usable(card.id, self._state.instances_of(card.id))

    def _usable(self, model: str, records: list[InstanceRecord]) -> InstanceRecord:
        ready = [r for r in records if r.status == RunnerStatus.READY]
        reachable = [r for r in ready if self._cluster is not None or r.instance.shards[0].node_id == self.node_id]
        if reachable:
            tasks = [t.instance_id for t in self._state.tasks.values()]
            return min(reachable, key=lambda r: tasks.count(r.instance.instance_id))
        if ready:
            first = ready[0].instance.shards[0].node_id
            raise NoInstanceError(f"the instances of {model} start on other nodes (first stage on {first}); "
                                  "forwarding requests between nodes needs the cluster control plane, which is "
                                  "not active in this node")
        loading = [r for r in records if r.status == RunnerStatus.LOADING]
        if loading:
            r = loading[0]
            raise NoInstanceError(f"instance {r.instance.instance_id} of {r.instance.model} is still loading "
                                  f"({r.progress:.0%}); retry in a few seconds", loading=True)
        if records:
            failed = records[0]
            raise NoInstanceError(f"instance {failed.instance.instance_id} of {failed.instance.model} has failed "
                                  f"({failed.error}); delete it (DELETE /instance/{failed.instance.instance_id}) "
                                  "and " + create_instance_hint(failed.instance.model))
        raise NoInstanceError(f"no instance of {model} is running; " + create_instance_hint(model))

    async def _stream(self, chunks: AsyncIterator[GenerationChunk], task_id: str) -> AsyncIterator[GenerationChunk]:
        try:
            # aclosing: when our caller closes us early, the inner stream must close now (that cancels the task
            # in the runner), not whenever the garbage collector finds it
            async with aclosing(chunks):  # type: ignore[type-var]
                async for chunk in chunks:
                    yield chunk
        finally:
            self.emit(TaskFinished(task_id=task_id))
