"""The cluster state and the events that change it: `apply(state, event) -> state`, pure.

The master orders events (`master/ordering.py`; a lone node is its own master) and every node folds them, in
that order, into the same `State`. Events are facts about the past; one that names an instance or node the
state no longer has (a late progress report of a deleted instance) changes nothing. Requests are not in the
state: each node tracks the tasks its API serves (`TaskRecord`), so a request costs no ordered event.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from ringlet.shared.config import Precision
from ringlet.shared.engine_info import EngineInfo, NodeHardware
from ringlet.shared.instances import EngineType, Instance
from ringlet.shared.sizes import format_bytes, format_bytes_of
from ringlet.shared.tasks import ThinkingFormat, ToolFormat
from ringlet.shared.wire import Message


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


# --- nodes and topology


class MemoryInfo(_Frozen):
    total_bytes: int = Field(ge=0)
    available_bytes: int = Field(ge=0)


MAX_STORED_MODELS = 1000  # models a node lists in its NodeInfo (a store with more lists the first, by name)


class StoredModelInfo(_Frozen):
    """A model in a node's store, as the other nodes see it."""

    model: str = Field(description="the repo id, ORG/NAME")
    bytes: int = Field(ge=0, description="whole files on disk")
    status: Literal["complete", "partial", "incomplete"] = Field(
        description="complete: every layer; partial: some layers (one stage of a split model); incomplete: no "
                    "usable weights yet (a download stopped part-way)")


class NodeInfo(_Frozen):
    node_id: str
    name: str
    hardware: NodeHardware
    engines: EngineInfo
    memory: MemoryInfo
    api_port: int | None = Field(None, description="where this node serves the HTTP API")
    precision: Precision = Field("auto", description="what this node's engines load weights at (--precision)")
    models: list[StoredModelInfo] = Field(default_factory=list, max_length=MAX_STORED_MODELS,
                                          description="the models in this node's store")

    def engine_available(self, engine: EngineType) -> bool:
        return engine in self.engines.available_engines

    def engine_missing_reason(self, engine: EngineType) -> str:
        problem = self.engines.reasons.get(engine)
        return problem.reason if problem else f"the {engine} engine is not available"

    def engine_memory_bytes(self, engine: EngineType) -> int:
        """Memory the engine can hold weights in: device memory for discrete GPUs, free RAM otherwise."""
        if engine in ("cuda", "ipex"):
            vendor = "nvidia" if engine == "cuda" else "intel"
            gpus = [g for g in self.hardware.gpus if g.vendor == vendor]
            if gpus:
                return sum(g.memory_total_bytes if g.memory_free_bytes is None else g.memory_free_bytes
                           for g in gpus)
            if engine == "ipex":  # torch.xpu saw it, the PCI scan did not name it: all its devices together
                return self.engines.intel_gpu_memory
            return 0
        return self.memory.available_bytes  # cpu, and mlx on unified memory


class Link(_Frozen):
    """A connection between two nodes, as the source sees it."""

    source: str
    target: str
    latency_ms: float | None = None


# --- instances and their runners


class RingAddress(_Frozen):
    """Where the first stage of a multi-stage instance hosts the ring's rendezvous (the data plane), and the
    instance's token: every key of the rendezvous is under it, so a client that was not told it (the store listens
    on every interface) can neither read nor change the ring's keys."""

    host: str
    port: int = Field(gt=0, lt=65536)
    token: str = Field("", repr=False, description="the rendezvous' key prefix; secret to the cluster")


class RunnerStatus(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class LayerLoad(_Frozen):
    """How far the load of a stage's layers is: layers read of the stage's, and the weight bytes the loaded layers
    keep of what the stage will hold when loaded (an estimate from the model card, embedding and head included)."""

    layers_loaded: int = Field(ge=0)
    layers_total: int = Field(ge=1)
    bytes_loaded: int = Field(0, ge=0)
    bytes_total: int | None = Field(None, ge=0, description="estimated; None where the model card is unknown")

    @property
    def fraction(self) -> float:
        return min(1.0, self.layers_loaded / self.layers_total)

    def describe(self) -> str:
        """12/30 layers, 0.45/1.1 GiB (or 450 MiB where the total is unknown)."""
        kept = (format_bytes_of(self.bytes_loaded, self.bytes_total) if self.bytes_total
                else format_bytes(self.bytes_loaded))
        return f"{self.layers_loaded}/{self.layers_total} layers, {kept}"

    @classmethod
    def together(cls, loads: list[LayerLoad]) -> LayerLoad | None:
        """The loads of an instance's stages as one (a total only where every stage knows its own)."""
        if not loads:
            return None
        totals = [load.bytes_total for load in loads]
        return cls(layers_loaded=sum(load.layers_loaded for load in loads),
                   layers_total=sum(load.layers_total for load in loads),
                   bytes_loaded=sum(load.bytes_loaded for load in loads),
                   bytes_total=None if None in totals else sum(t or 0 for t in totals))


class RunnerRecord(_Frozen):
    """The runner process of one shard of an instance."""

    node_id: str
    status: RunnerStatus = RunnerStatus.LOADING
    progress: float = Field(0.0, ge=0.0, le=1.0)
    detail: str = "waiting for the runner"
    load: LayerLoad | None = Field(None, description="the layers and weight bytes loaded so far (the last report)")
    error: str | None = None
    pid: int | None = Field(None, description="the runner's process id on its node")
    context_length: int | None = None
    engine: EngineType | None = Field(None, description="the engine the stage runs on now (after any fallback)")
    optimization: str | None = Field(None, description="what was applied to the model, e.g. IPEX, torch.compile")
    fallback: str | None = Field(None, description='why it left its engine, e.g. "ipex -> cpu: device lost"')
    tool_format: ToolFormat | None = Field(None, description="how the model writes tool calls (from its template)")
    thinking: ThinkingFormat | None = Field(None, description="how the model writes its thinking (None: it does not)")


class InstanceRecord(_Frozen):
    instance: Instance
    runners: dict[str, RunnerRecord] = Field(description="by node id, one per shard")
    memory_bytes: dict[str, int] = Field(default_factory=dict, description="estimated memory per node id")
    created_at: float
    ring: RingAddress | None = Field(None, description="the rendezvous of a multi-stage instance, once hosted")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status(self) -> RunnerStatus:
        statuses = {r.status for r in self.runners.values()}
        if RunnerStatus.FAILED in statuses:
            return RunnerStatus.FAILED
        return RunnerStatus.READY if statuses == {RunnerStatus.READY} else RunnerStatus.LOADING

    @computed_field  # type: ignore[prop-decorator]
    @property
    def progress(self) -> float:
        return min(r.progress for r in self.runners.values()) if self.runners else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def load(self) -> LayerLoad | None:
        """The stages' layer loads together; None until a runner reports one."""
        return LayerLoad.together([r.load for r in self.runners.values() if r.load is not None])

    @computed_field  # type: ignore[prop-decorator]
    @property
    def error(self) -> str | None:
        errors = [f"{node_id}: {r.error}" for node_id, r in self.runners.items() if r.error]
        return "; ".join(errors) or None

    @property
    def context_length(self) -> int | None:
        lengths = [r.context_length for r in self.runners.values() if r.context_length is not None]
        return min(lengths) if lengths else None

    @property
    def tool_format(self) -> ToolFormat:
        """How the model writes tool calls, as a stage holding its tokenizer reported (ringlet's default before)."""
        return next((r.tool_format for r in self.runners.values() if r.tool_format is not None), "hermes")

    @property
    def thinking(self) -> ThinkingFormat | None:
        """How the model writes its thinking, as the stage holding its tokenizer reported; None: it does not."""
        return next((r.thinking for r in self.runners.values() if r.thinking is not None), None)


# --- tasks


class TaskStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"


class TaskRecord(_Frozen):
    """A task in flight at the node whose API received it (not replicated: see the module's docstring)."""

    task_id: str
    instance_id: str
    model: str
    origin_node_id: str = Field(description="the node whose API received the request")
    status: TaskStatus = TaskStatus.QUEUED
    submitted_at: float


# --- events


class NodeJoined(Message):
    type: Literal["node_joined"] = "node_joined"
    node: NodeInfo


class NodeUpdated(Message):
    """Fresh information about a known node (free memory, engines)."""

    type: Literal["node_updated"] = "node_updated"
    node: NodeInfo


class NodeLeft(Message):
    type: Literal["node_left"] = "node_left"
    node_id: str


class LinkUp(Message):
    type: Literal["link_up"] = "link_up"
    link: Link


class LinkDown(Message):
    type: Literal["link_down"] = "link_down"
    source: str
    target: str


class InstanceCreated(Message):
    type: Literal["instance_created"] = "instance_created"
    instance: Instance
    memory_bytes: dict[str, int] = Field(default_factory=dict)
    created_at: float


class RingHosted(Message):
    """The first stage hosts the ring's rendezvous here: the later stages may now start and join."""

    type: Literal["ring_hosted"] = "ring_hosted"
    instance_id: str
    address: RingAddress


class MasterChanged(Message):
    type: Literal["master_changed"] = "master_changed"
    node_id: str
    term: int = Field(0, ge=0, description="the term it claims (master/election.py)")


class InstanceDeleted(Message):
    type: Literal["instance_deleted"] = "instance_deleted"
    instance_id: str
    replaced_by: str | None = Field(None, description="the instance placed again in its stead (its node lost, its "
                                                      "ring formed again)")


class RunnerProgressed(Message):
    type: Literal["runner_progressed"] = "runner_progressed"
    instance_id: str
    node_id: str
    progress: float = Field(ge=0.0, le=1.0)
    detail: str
    pid: int | None = None
    load: LayerLoad | None = None


class RunnerReady(Message):
    type: Literal["runner_ready"] = "runner_ready"
    instance_id: str
    node_id: str
    context_length: int
    engine: EngineType | None = None
    optimization: str | None = None
    fallback: str | None = None
    tool_format: ToolFormat | None = None
    thinking: ThinkingFormat | None = None


class RunnerFellBack(Message):
    """A stage left its engine for another (an Intel GPU lost mid-stream: ipex -> cpu); it goes on serving."""

    type: Literal["runner_fell_back"] = "runner_fell_back"
    instance_id: str
    node_id: str
    engine: EngineType = Field(description="the engine it runs on now")
    reason: str = Field(description='e.g. "ipex -> cpu: the device was lost (UR_RESULT_ERROR_DEVICE_LOST)"')


class RunnerFailed(Message):
    type: Literal["runner_failed"] = "runner_failed"
    instance_id: str
    node_id: str
    error: str
    reform: bool = Field(False, description="a stage of a ring that died or hung while serving: the master forms "
                                            "the ring again")





DownloadState = Literal["running", "done", "failed", "cancelled"]


class FileProgress(BaseModel):
    name: str
    done: int
    total: int


class DownloadStatus(BaseModel):
    """One download as the node running it knows it: its API's answer, and the reply to another node's command."""

    download_id: str
    model: str
    layers: tuple[int, int] | None = None
    state: DownloadState = "running"
    done: int = 0
    total: int = 0
    files: list[FileProgress] = []
    error: str | None = None
    path: str | None = None


class DownloadRecord(_Frozen):
    """A model download on one node, as /state and the dashboard show it."""

    download_id: str
    node_id: str
    model: str
    layers: tuple[int, int] | None = None
    state: Literal["running", "done", "failed", "cancelled"]
    done: int = Field(0, description="bytes")
    total: int = Field(0, description="bytes")
    error: str | None = None


class DownloadProgressed(Message):
    type: Literal["download_progressed"] = "download_progressed"
    download: DownloadRecord


Event = Annotated[
    NodeJoined | NodeUpdated | NodeLeft | MasterChanged | LinkUp | LinkDown | InstanceCreated | InstanceDeleted
    | RingHosted | RunnerProgressed | RunnerReady | RunnerFellBack | RunnerFailed | DownloadProgressed,
    Field(discriminator="type"),
]


class State(_Frozen):
    master: str | None = Field(None, description="the node that orders events (in a cluster)")
    term: int = Field(0, description="the master's term: it rises at each election")
    nodes: dict[str, NodeInfo] = Field(default_factory=dict)
    links: list[Link] = Field(default_factory=list)
    instances: dict[str, InstanceRecord] = Field(default_factory=dict)
    downloads: dict[str, DownloadRecord] = Field(default_factory=dict)
    last_event: int = Field(0, description="how many events were applied; equal states have equal counts")

    def instances_of(self, model: str) -> list[InstanceRecord]:
        return [r for r in self.instances.values() if r.instance.model == model]


def apply(state: State, event: Event) -> State:
    match event:
        case NodeJoined(node=node) | NodeUpdated(node=node):
            changed = state.model_copy(update={"nodes": {**state.nodes, node.node_id: node}})
        case NodeLeft(node_id=node_id):
            changed = _node_left(state, node_id)
        case MasterChanged(node_id=node_id, term=term):
            changed = state.model_copy(update={"master": node_id, "term": term})
        case LinkUp(link=link):
            others = [k for k in state.links if (k.source, k.target) != (link.source, link.target)]
            changed = state.model_copy(update={"links": [*others, link]})
        case LinkDown(source=source, target=target):
            changed = state.model_copy(
                update={"links": [k for k in state.links if (k.source, k.target) != (source, target)]})
        case InstanceCreated():
            changed = _instance_created(state, event)
        case InstanceDeleted(instance_id=instance_id):
            changed = state.model_copy(
                update={"instances": {k: v for k, v in state.instances.items() if k != instance_id}})
        case RingHosted(instance_id=instance_id, address=address):
            record = state.instances.get(instance_id)
            changed = state if record is None else state.model_copy(update={
                "instances": {**state.instances, instance_id: record.model_copy(update={"ring": address})}})
        case RunnerProgressed(instance_id=instance_id, node_id=node_id, progress=progress, detail=detail, pid=pid):
            changed = _update_runner(state, instance_id, node_id, status=RunnerStatus.LOADING, progress=progress,
                                     detail=detail, pid=pid, load=event.load)
        case RunnerReady(instance_id=instance_id, node_id=node_id, context_length=context_length):
            changed = _update_runner(state, instance_id, node_id, status=RunnerStatus.READY, progress=1.0,
                                     detail="ready", context_length=context_length, engine=event.engine,
                                     optimization=event.optimization, fallback=event.fallback,
                                     tool_format=event.tool_format, thinking=event.thinking)
        case RunnerFellBack(instance_id=instance_id, node_id=node_id, engine=engine, reason=reason):
            changed = _update_runner(state, instance_id, node_id, engine=engine, fallback=reason)
        case RunnerFailed(instance_id=instance_id, node_id=node_id, error=error):
            changed = _update_runner(state, instance_id, node_id, status=RunnerStatus.FAILED, detail="failed",
                                     error=error)
        case DownloadProgressed(download=download):
            changed = state.model_copy(update={"downloads": _recent({**state.downloads, download.download_id: download})})
    return changed.model_copy(update={"last_event": state.last_event + 1})


KEEP_FINISHED_DOWNLOADS = 100  # finished downloads the state remembers (the oldest are forgotten first)


def _recent(downloads: dict[str, DownloadRecord]) -> dict[str, DownloadRecord]:
    finished = [i for i, d in downloads.items() if d.state != "running"]
    forgotten = set(finished[:max(0, len(finished) - KEEP_FINISHED_DOWNLOADS)])
    return {i: d for i, d in downloads.items() if i not in forgotten} if forgotten else downloads


def _node_left(state: State, node_id: str) -> State:
    # its runners and its downloads are gone with it; the master decides whether to place the instance again
    instances = dict(state.instances)
    for instance_id, record in state.instances.items():
        if node_id in record.runners:
            instances[instance_id] = _with_runner(record, node_id, status=RunnerStatus.FAILED, detail="failed",
                                                  error=f"node {node_id} left the cluster")
    return state.model_copy(update={
        "nodes": {k: v for k, v in state.nodes.items() if k != node_id},
        "links": [k for k in state.links if node_id not in (k.source, k.target)],
        "instances": instances,
        "downloads": {k: d for k, d in state.downloads.items() if d.node_id != node_id},
    })


def new_instance_record(event: InstanceCreated) -> InstanceRecord:
    """The record an InstanceCreated event adds: every runner loading."""
    runners = {s.node_id: RunnerRecord(node_id=s.node_id) for s in event.instance.shards}
    return InstanceRecord(instance=event.instance, runners=runners, memory_bytes=event.memory_bytes,
                          created_at=event.created_at)


def _instance_created(state: State, event: InstanceCreated) -> State:
    record = new_instance_record(event)
    return state.model_copy(update={"instances": {**state.instances, record.instance.instance_id: record}})


def _with_runner(record: InstanceRecord, node_id: str, **changes: object) -> InstanceRecord:
    runner = record.runners[node_id].model_copy(update=changes)
    return record.model_copy(update={"runners": {**record.runners, node_id: runner}})


def _update_runner(state: State, instance_id: str, node_id: str, **changes: object) -> State:
    record = state.instances.get(instance_id)
    if record is None or node_id not in record.runners:
        return state
    if record.runners[node_id].status == RunnerStatus.FAILED:
        return state  # a failed runner stays failed; a new instance gets new runners
    changes = {k: v for k, v in changes.items() if v is not None}
    return state.model_copy(update={"instances": {**state.instances, instance_id: _with_runner(record, node_id,
                                                                                              **changes)}})
