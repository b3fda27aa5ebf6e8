"""Cluster management: node id, state, topology, engines, the model catalog, placement previews, instances."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError

from ringlet.api.cluster_schemas import (
    CatalogModel,
    CreateInstanceRequest,
    DeletedInstance,
    Health,
    InstanceActivity,
    InstanceTypeFit,
    ModelsResponse,
    NodeIdResponse,
    PreviewsResponse,
    StateResponse,
    Topology,
)
from ringlet.api.errors import ApiError, error_responses
from ringlet.api.facade import node_of
from ringlet.master.placement import InstanceOptions, preview
from ringlet.models.store import find_local
from ringlet.shared.engine_info import EngineInfo
from ringlet.shared.instances import InstanceType, IpexOptimizationLevel
from ringlet.shared.state import InstanceRecord, RunnerStatus

router = APIRouter(tags=["cluster"])


def ringlet_version() -> str:
    try:
        return version("ringlet")
    except PackageNotFoundError:
        return "unknown"


@router.get("/health", response_model=Health)
def health(request: Request) -> Health:
    """The node is up; counts of its instances by status."""
    node = node_of(request)
    statuses = [r.status for r in node.state.instances.values()]
    return Health(node_id=node.node_id, version=ringlet_version(),
                  instances_ready=statuses.count(RunnerStatus.READY),
                  instances_loading=statuses.count(RunnerStatus.LOADING),
                  instances_failed=statuses.count(RunnerStatus.FAILED))


@router.get("/node_id", response_model=NodeIdResponse)
def node_id(request: Request) -> NodeIdResponse:
    node = node_of(request)
    return NodeIdResponse(node_id=node.node_id, name=node.info.name)


@router.get("/state", response_model=StateResponse)
def state(request: Request) -> StateResponse:
    """The whole cluster state (nodes, links, instances with their runners, downloads) and the tasks in flight
    through this node's API."""
    node = node_of(request)
    state = dict(node.state)
    state["instances"] = {i: without_secrets(r) for i, r in node.state.instances.items()}
    activity = {i: InstanceActivity(last_request_at=node.last_request_at(i), expires_at=node.expires_at(i))
                for i in node.state.instances}
    return StateResponse(**state, tasks=dict(node.tasks), activity=activity)


def without_secrets(record: InstanceRecord) -> InstanceRecord:
    """The record as the API shows it: a ring's rendezvous token stays within the cluster."""
    if record.ring is None or not record.ring.token:
        return record
    return record.model_copy(update={"ring": record.ring.model_copy(update={"token": ""})})


@router.get("/topology", response_model=Topology)
def topology(request: Request) -> Topology:
    current = node_of(request).state
    return Topology(nodes=list(current.nodes.values()), links=current.links)


@router.get("/engines", response_model=EngineInfo)
def engines(request: Request) -> EngineInfo:
    """This node's engines: which are available, which is selected, and why the others are not."""
    return node_of(request).engine_info


@router.get("/models", response_model=ModelsResponse)
def models(request: Request) -> ModelsResponse:
    """The model catalog with sizes, whether each is on disk, and which instance types could serve it now."""
    node = node_of(request)
    current = node.state
    nodes = list(current.nodes.values())
    entries = []
    for card in node.catalog.cards():
        fits = [InstanceTypeFit(instance_type=p.instance_type, possible=p.possible, reason=p.reason)
                for p in preview(card, nodes)]
        on_disk = card.source in ("embedded", "local", "ollama") or find_local(card.id) is not None
        repo_id = card.id.partition(":")[0].lower()  # a GGUF model's id may name its file (org/name:Q4_K_M)
        on_nodes = [n.node_id for n in nodes
                    if any(m.model.lower() == repo_id and m.status != "incomplete" for m in n.models)]
        entries.append(CatalogModel(card=card, on_disk=on_disk, on_nodes=on_nodes, fits=fits,
                                    instance_ids=[r.instance.instance_id for r in current.instances_of(card.id)]))
    return ModelsResponse(models=entries)


@router.get("/instance/previews", response_model=PreviewsResponse, responses=error_responses(400, 404))
def instance_previews(
    request: Request, model: str = Query(min_length=1, description="a model id or local path"),
    min_nodes: int = Query(1, ge=1, le=64),
    intel_gpu_devices: Annotated[list[int] | None, Query(description="IpexRing: the XPU devices to place on "
                                                                     "(repeat the parameter for each)")] = None,
    ipex_optimization_level: Annotated[IpexOptimizationLevel, Query(description="IpexRing: what to apply")] = "auto",
    max_context: Annotated[int | None, Query(ge=16, le=1 << 20, description="the context window to count the KV "
                                                                            "cache for")] = None,
    tensor_parallel: Annotated[int, Query(ge=1, le=64, description="GPUs a stage is split over by tensor "
                                                                   "parallelism (CudaRing, IpexRing, CpuRing)")] = 1,
) -> PreviewsResponse:
    """Where each instance type would put the model's layers (and the memory per node, per Intel GPU device), or
    why it cannot; the Intel options shape IpexRing's preview only."""
    try:
        options = InstanceOptions(intel_gpu_devices=None if intel_gpu_devices is None else tuple(intel_gpu_devices),
                                  ipex_optimization_level=ipex_optimization_level, max_context=max_context,
                                  tensor_parallel=tensor_parallel)
    except ValidationError as error:
        raise ApiError(400, f"invalid request: intel_gpu_devices: {error.errors()[0]['msg']}",
                       param="intel_gpu_devices", code="invalid_parameter") from None
    card, previews = node_of(request).preview(model, min_nodes=min_nodes, options=options)
    return PreviewsResponse(model=card.id, card=card, previews=previews)


@router.post("/instance", response_model=InstanceRecord, status_code=201,
             responses=error_responses(400, 404, 409, 413))
async def create_instance(body: CreateInstanceRequest, request: Request) -> InstanceRecord:
    """Place a model and start loading it; watch GET /instance/{id} until its status is ready."""
    return without_secrets(node_of(request).create_instance(body.model, InstanceType.parse(body.instance_type),
                                                            node_ids=body.nodes, min_nodes=body.min_nodes,
                                                            options=body.options))


@router.get("/instance/{instance_id}", response_model=InstanceRecord, responses=error_responses(404))
def get_instance(instance_id: str, request: Request) -> InstanceRecord:
    return without_secrets(node_of(request).get_instance(instance_id))


@router.delete("/instance/{instance_id}", response_model=DeletedInstance, responses=error_responses(404))
async def delete_instance(instance_id: str, request: Request) -> DeletedInstance:
    """Stop the instance's runners; its requests in flight end with an error."""
    node_of(request).delete_instance(instance_id)
    return DeletedInstance(instance_id=instance_id)
