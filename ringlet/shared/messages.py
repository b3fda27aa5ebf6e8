"""Every message between processes: the node and its runners (JSON lines on the runner's pipes) and the nodes of a
cluster (zenoh topics, `net/topics.py`). Events, which change the cluster state, are in `state.py`; they travel
inside `Proposal` and `Ordered`, and a runner reports its ring's rendezvous as the `RingHosted` event itself.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from ringlet.shared.config import EngineConfig
from ringlet.shared.errors import TaskErrorKind
from ringlet.shared.instances import BoundInstance
from ringlet.shared.state import DownloadStatus, Event, LayerLoad, RingAddress, RingHosted
from ringlet.shared.tasks import GenerationChunk, Task, ThinkingFormat, ToolFormat
from ringlet.shared.wire import Message

# --- node -> runner


class LoadShard(Message):
    type: Literal["load_shard"] = "load_shard"
    bound: BoundInstance
    config: EngineConfig = EngineConfig()
    data_host: str = Field("127.0.0.1", description="where this node's data plane listens (a first stage hosts "
                                                    "the ring's rendezvous there)")
    ring: RingAddress | None = Field(None, description="the rendezvous a later stage of a multi-stage ring joins")
    stage_bytes: int | None = Field(None, description="the weight bytes the stage will hold, as the node reckoned "
                                                      "them from the model's card (None: the runner reckons them)")


class RunTask(Message):
    type: Literal["run_task"] = "run_task"
    task: Task


class CancelTask(Message):
    """Stop a task between two tokens: node -> its runner, and the requesting node -> the node running it."""

    type: Literal["cancel_task"] = "cancel_task"
    task_id: str


# --- runner -> node


class Loading(Message):
    type: Literal["loading"] = "loading"
    progress: float = Field(ge=0.0, le=1.0)
    detail: str
    load: LayerLoad | None = None


class Ready(Message):
    type: Literal["ready"] = "ready"
    context_length: int
    warmup_s: float
    slots: int = Field(1, ge=1, description="tasks the runner takes at once (its batch); more wait in the node")
    engine: str | None = Field(None, description="the engine the stage runs on (after a fallback at load, the new one)")
    optimization: str | None = Field(None, description="what was applied to the model (IPEX, torch.compile, none)")
    fallback: str | None = Field(None, description='a fallback at load: "ipex -> cpu: reason"')
    tool_format: ToolFormat | None = Field(None, description="how the model writes tool calls (a stage that renders "
                                                             "or reads no text: None)")
    thinking: ThinkingFormat | None = Field(None, description="how the model writes its thinking (None: it does not, "
                                                              "or the stage reads no text)")


class FellBack(Message):
    """The runner's engine left its device mid-stream for another (ipex -> cpu) and goes on serving."""

    type: Literal["fell_back"] = "fell_back"
    engine: str
    reason: str


class BatchStats(Message):
    """How a batching runner's batch and KV cache stand (sent when they change, at most about once a second)."""

    type: Literal["batch_stats"] = "batch_stats"
    running: int = Field(ge=0, description="sequences with a place in the batch")
    waiting: int = Field(ge=0, description="sequences the runner holds that wait for room in the KV cache")
    step_tokens: int = Field(ge=0, description="tokens the last step computed")
    kv_blocks_used: int = Field(ge=0)
    kv_blocks: int = Field(ge=0)
    preemptions: int = Field(ge=0, description="sequences put back to wait for room, since the runner started")


class TaskStarted(Message):
    """The task has a place in the batch (it was waiting for one, or for room in the KV cache)."""

    type: Literal["task_started"] = "task_started"
    task_id: str


class LoadFailed(Message):
    type: Literal["load_failed"] = "load_failed"
    error: str


class Chunk(Message):
    """A piece of a task's answer: runner -> node, and the running node -> the requesting node."""

    type: Literal["chunk"] = "chunk"
    chunk: GenerationChunk


class TaskFailed(Message):
    """A task ended without an answer: runner -> node, and the running node -> the requesting node."""

    type: Literal["task_failed"] = "task_failed"
    task_id: str
    kind: TaskErrorKind
    error: str


class TaskAlive(Message):
    """The running node -> the requesting node: the task is still waiting or running (sent when no chunk went for a
    while), so a silent stream means a node or link that is gone."""

    type: Literal["task_alive"] = "task_alive"
    task_id: str


class TaskCancelled(Message):
    type: Literal["task_cancelled"] = "task_cancelled"
    task_id: str


# --- node -> node


class Proposal(Message):
    """An event a node wants ordered; only the master acts on it. (origin, seq) identifies it."""

    type: Literal["proposal"] = "proposal"
    origin: str
    seq: int = Field(ge=1, description="the origin's own count of its proposals")
    master: str = Field(description="the node the sender believes is master; another master ignores it")
    event: Event


class Ordered(Message):
    """An event in the master's order: `seq` is the state's event count once it is applied; (origin, origin_seq)
    is the proposal it answers."""

    type: Literal["ordered"] = "ordered"
    master: str
    term: int = Field(ge=0, description="the master's term; a follower ignores an event of a past term")
    seq: int = Field(ge=1)
    origin: str
    origin_seq: int = Field(ge=1)
    event: Event


class TaskRequest(Message):
    """Run `task` on the instance whose first stage is on the receiving node; stream to task_stream(task_id)."""

    type: Literal["task_request"] = "task_request"
    origin: str
    instance_id: str
    task: Task


class StartDownload(Message):
    """Download a model into the receiving node's store (`POST /models/download` with that node's id)."""

    type: Literal["start_download"] = "start_download"
    origin: str
    model: str = Field(min_length=1, max_length=200)
    layers: tuple[int, int] | None = None


class CancelDownload(Message):
    type: Literal["cancel_download"] = "cancel_download"
    origin: str
    download_id: str = Field(min_length=1, max_length=100)


class DeleteModel(Message):
    """Remove a model from the receiving node's store."""

    type: Literal["delete_model"] = "delete_model"
    origin: str
    model: str = Field(min_length=1, max_length=200)


class ModelCommandReply(Message):
    """What a model command did, as the HTTP answer of the API that received it: `status` is that answer's code."""

    type: Literal["model_command_reply"] = "model_command_reply"
    status: int = Field(ge=200, le=599)
    download: DownloadStatus | None = None
    model: str | None = Field(None, description="a deleted model's repo id")
    error: str | None = None
    code: str | None = Field(None, description="the API's error code (too_many_downloads, model_in_use, ...)")


ToRunner = Annotated[LoadShard | RunTask | CancelTask, Field(discriminator="type")]
FromRunner = Annotated[Loading | RingHosted | Ready | FellBack | LoadFailed | TaskStarted | BatchStats | Chunk | TaskFailed
                       | TaskCancelled,
                       Field(discriminator="type")]
StreamItem = Annotated[Chunk | TaskFailed | TaskAlive, Field(discriminator="type")]

TO_RUNNER: TypeAdapter[ToRunner] = TypeAdapter(ToRunner)
FROM_RUNNER: TypeAdapter[FromRunner] = TypeAdapter(FromRunner)
STREAM_ITEM: TypeAdapter[StreamItem] = TypeAdapter(StreamItem)
PROPOSAL = TypeAdapter(Proposal)
ORDERED = TypeAdapter(Ordered)
TASK_REQUEST = TypeAdapter(TaskRequest)
CANCEL_TASK = TypeAdapter(CancelTask)
ModelCommand = Annotated[StartDownload | CancelDownload | DeleteModel, Field(discriminator="type")]
MODEL_COMMAND: TypeAdapter[ModelCommand] = TypeAdapter(ModelCommand)
MODEL_COMMAND_REPLY = TypeAdapter(ModelCommandReply)
