"""What the API needs from the node it serves: `ringlet.node.Node` in a node, an in-process fake in the API's
contract tests. The routers only ever see this protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

from fastapi import Request

from ringlet.master.placement import DEFAULT_OPTIONS, InstanceOptions, PlacementPreview
from ringlet.models.catalog import ModelCard
from ringlet.models.download import DownloadManager
from ringlet.models.names import DiskModel
from ringlet.shared.engine_info import EngineInfo
from ringlet.shared.instances import InstanceType
from ringlet.shared.state import InstanceRecord, NodeInfo, State, TaskRecord
from ringlet.shared.tasks import GenerationChunk, TextGenerationTask
from ringlet.worker.supervisor import InstanceLoad


class TaskStream(Protocol):
    """A submitted task: iterate it for chunks; closing it early cancels the generation."""

    task: TextGenerationTask
    instance_id: str

    def __aiter__(self) -> AsyncIterator[GenerationChunk]: ...

    async def aclose(self) -> None: ...


class ModelResolver(Protocol):
    def cards(self) -> list[ModelCard]: ...

    def resolve(self, name: str) -> ModelCard: ...

    def on_disk(self) -> list[DiskModel]:
        """The models whose files are on this node."""
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

    async def ensure_instance(self, model: str, wait_s: float, watch: Callable[[], Awaitable[None]]) -> None:
        """Load the model here if it has no instance and this node holds its files, and wait while an instance of it
        loads (Ollama's way); raises as `instance_for` does."""
        ...

    def keep_alive(self, instance_id: str, seconds: float | None) -> None:
        """Unload the instance once idle this long (Ollama's keep_alive; 0: now, negative: never)."""
        ...

    def expires_at(self, instance_id: str) -> float | None:
        """When (time.time) keep_alive unloads the instance; None: never."""
        ...

    def submit(self, task: TextGenerationTask) -> TaskStream: ...


def node_of(request: Request) -> NodeFacade:
    """The node an app serves (`create_app` puts it in the app's state)."""
    node: NodeFacade = request.app.state.node
    return node
