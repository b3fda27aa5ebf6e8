"""What the API needs from the node it serves: `ringlet.node.Node` in a node, an in-process fake in the API's
contract tests. The routers only ever see this protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

from fastapi import Request

from ringlet.master.placement import DEFAULT_OPTIONS, InstanceOptions, PlacementPreview
from ringlet.models.aliases import ModelAlias
from ringlet.models.catalog import ModelCard
from ringlet.models.download import DownloadManager
from ringlet.models.names import DiskModel
from ringlet.shared.engine_info import EngineInfo
from ringlet.shared.instances import InstanceType
from ringlet.shared.messages import ModelCommand, ModelCommandReply
from ringlet.shared.state import InstanceRecord, NodeInfo, State, TaskRecord
from ringlet.shared.tasks import GenerationChunk, Task
from ringlet.worker.supervisor import InstanceLoad


class TaskStream(Protocol):
    """A submitted task: iterate it for chunks; closing it early cancels the generation."""

    task: Task
    instance_id: str

    def __aiter__(self) -> AsyncIterator[GenerationChunk]: ...

    async def aclose(self) -> None: ...


class ModelResolver(Protocol):
    def cards(self) -> list[ModelCard]: ...

    def resolve(self, name: str) -> ModelCard: ...

    def on_disk(self) -> list[DiskModel]:
        """The models whose files are on this node."""
        ...

    def copy(self, source: str, destination: str) -> ModelAlias:
        """A second name for a model on this node (Ollama's `cp`)."""
        ...


class NodeFacade(Protocol):
    @property
    def node_id(self) -> str: ...

    @property
    def info(self) -> NodeInfo: ...

    @property
    def state(self) -> State: ...

    @property
    def tasks(self) -> dict[str, TaskRecord]:
        """The tasks in flight through this node's API, by id."""
        ...

    @property
    def engine_info(self) -> EngineInfo: ...

    def instance_load(self) -> dict[str, InstanceLoad]:
        """How busy this node's runners are, by instance id (batch, queue, KV cache)."""
        ...

    downloads: DownloadManager

    @property
    def catalog(self) -> ModelResolver: ...

    def preview(self, model: str, node_ids: Sequence[str] | None = None, min_nodes: int = 1,
                options: InstanceOptions = DEFAULT_OPTIONS) -> tuple[ModelCard, list[PlacementPreview]]: ...

    def create_instance(self, model: str, instance_type: InstanceType, node_ids: Sequence[str] | None = None,
                        min_nodes: int = 1, options: InstanceOptions = DEFAULT_OPTIONS) -> InstanceRecord: ...

    def get_instance(self, instance_id: str) -> InstanceRecord: ...

    def delete_instance(self, instance_id: str) -> InstanceRecord: ...

    def instance_for(self, model: str) -> InstanceRecord: ...

    async def ensure_instance(self, model: str, wait_s: float, watch: Callable[[], Awaitable[None]],
                              context_length: int | None = None) -> None:
        """Load the model here if it has no instance and this node holds its files, placed with a context window of
        `context_length` (Ollama's num_ctx; None: the model's own, as memory allows), and wait while an instance of it
        loads (Ollama's way); raises as `instance_for` does."""
        ...

    def keep_alive(self, instance_id: str, seconds: float | None) -> None:
        """Unload the instance once idle this long (Ollama's keep_alive; 0: now, negative: never)."""
        ...

    def expires_at(self, instance_id: str) -> float | None:
        """When (time.time) keep_alive unloads the instance; None: never."""
        ...

    def last_request_at(self, instance_id: str) -> float | None:
        """When (time.time) the instance's last request through this node ended; None: none yet."""
        ...

    def submit(self, task: Task) -> TaskStream: ...

    def run_model_command(self, command: ModelCommand) -> ModelCommandReply:
        """A command on this node's model store (blocking: it may wait on the disk)."""
        ...

    async def model_command(self, node_id: str | None, command: ModelCommand) -> ModelCommandReply:
        """A command on the store of `node_id` (None: this node's), with that node's answer; an unknown node is a 404
        answer, one that cannot be reached a 503."""
        ...


def node_of(request: Request) -> NodeFacade:
    """The node an app serves (`create_app` puts it in the app's state)."""
    node: NodeFacade = request.app.state.node
    return node
