"""Response and request shapes of the cluster endpoints (what the dashboard and `ringlet ps` read)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from ringlet.master.placement import InstanceOptions, PlacementPreview
from ringlet.models.catalog import ModelCard
from ringlet.shared.instances import InstanceType, IpexOptimizationLevel
from ringlet.shared.state import Link, NodeInfo, State, TaskRecord

InstanceTypeName = Literal["MlxRing", "MlxIbv", "MlxJaccl", "CpuRing", "CudaRing", "IpexRing", "MixedRing"]


class NodeIdResponse(BaseModel):
    node_id: str
    name: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    node_id: str
    version: str
    instances_ready: int
    instances_loading: int
    instances_failed: int


class InstanceActivity(BaseModel):
    """An instance's use through this node's API (not replicated): what `ringlet ps` shows as idle time."""

    last_request_at: float | None = Field(None, description="when (seconds since the epoch) the last request "
                                                            "through this node ended; null: none yet")
    expires_at: float | None = Field(None, description="when keep_alive unloads it; null: it stays until deleted")


class StateResponse(State):
    """The cluster state, with the tasks in flight through this node's API and the instances' use through it (those
    are not replicated)."""

    tasks: dict[str, TaskRecord] = Field(default_factory=dict)
    activity: dict[str, InstanceActivity] = Field(default_factory=dict, description="by instance id")


class Topology(BaseModel):
    nodes: list[NodeInfo]
    links: list[Link]


class InstanceTypeFit(BaseModel):
    instance_type: InstanceType
    possible: bool
    reason: str | None = Field(None, description="why this instance type cannot serve the model now")


class CatalogModel(BaseModel):
    card: ModelCard
    on_disk: bool = Field(description="the weights are on this node (the embedded model always is)")
    on_nodes: list[str] = Field(default_factory=list, description="the nodes whose stores hold this model's weights "
                                                                  "(all or some layers; NodeInfo.models)")
    instance_ids: list[str] = Field(description="instances serving this model")
    fits: list[InstanceTypeFit] = Field(description="for each instance type, whether the cluster can place it now")


class ModelsResponse(BaseModel):
    models: list[CatalogModel]


class PreviewsResponse(BaseModel):
    model: str = Field(description="the model id the previews are for")
    card: ModelCard
    previews: list[PlacementPreview]


class CreateInstanceRequest(BaseModel):
    model: str = Field(min_length=1, description="a model id from GET /models, or a model path on this node")
    instance_type: InstanceTypeName = Field("CpuRing", description="MlxIbv is the old name of MlxJaccl")
    nodes: list[str] | None = Field(None, min_length=1, description="node ids or names, in ring order; "
                                                                   "default: placement picks")
    min_nodes: int = Field(1, ge=1, le=64, description="use at least this many nodes")
    intel_gpu_devices: list[int] | None = Field(
        None, min_length=1, description="IpexRing only: the XPU device indexes of its node to run on (GET /state: "
                                        "each node's hardware.gpus); default: the node's discrete Intel GPUs")
    ipex_optimization_level: IpexOptimizationLevel = Field(
        "auto", description="IpexRing only: ipex (intel-extension-for-pytorch), compile (torch.compile), eager "
                            "(neither), or auto: IPEX where a matching version imports, else torch.compile")
    max_context: int | None = Field(None, ge=16, le=1 << 20, description="the context window in tokens (capped by "
                                                                         "the model's own); default: the model's "
                                                                         "own, capped by what the nodes' memory "
                                                                         "holds for the KV cache")
    tensor_parallel: int = Field(1, ge=1, le=64, description="CudaRing, IpexRing: split each stage over this "
                                                            "many GPUs of its node by tensor parallelism (CpuRing: "
                                                            "processes); 1: none")

    @model_validator(mode="after")
    def _options_fit(self) -> CreateInstanceRequest:
        if (misfit := self.options.misfit(InstanceType.parse(self.instance_type))) is not None:
            raise ValueError(misfit)
        return self

    @property
    def options(self) -> InstanceOptions:
        devices = None if self.intel_gpu_devices is None else tuple(self.intel_gpu_devices)
        return InstanceOptions(intel_gpu_devices=devices, ipex_optimization_level=self.ipex_optimization_level,
                               max_context=self.max_context, tensor_parallel=self.tensor_parallel)


class DeletedInstance(BaseModel):
    instance_id: str
    deleted: Literal[True] = True
