"""Models in the nodes' stores: start, follow and cancel downloads, delete a model, on this node or on any node of the
cluster (`node_id`; the command travels over the control plane and that node's answer is the answer here).
Progress lands in /state (`downloads`), and each node's NodeInfo lists the models in its store (`models`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ringlet.api.errors import ApiError, error_responses
from ringlet.api.facade import node_of
from ringlet.models.download import DownloadError, DownloadManager, DownloadStatus
from ringlet.shared.messages import CancelDownload, DeleteModel, ModelCommandReply, StartDownload

router = APIRouter(tags=["models"])

_ERROR_TYPES = {404: "not_found_error", 409: "invalid_request_error", 429: "rate_limit_error",
                503: "unavailable_error"}


class DownloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="a Hugging Face repo id, e.g. Qwen/Qwen3-0.6B")
    layers: tuple[int, int] | None = Field(None, description="[start, end): only the files holding these layers")
    node_id: str | None = Field(None, min_length=1, max_length=100,
                                description="the node whose store gets the model (GET /state lists them); default: "
                                            "this node")

    @model_validator(mode="after")
    def _range(self) -> DownloadRequest:
        if self.layers is not None and not 0 <= self.layers[0] < self.layers[1]:
            raise ValueError("layers must be [start, end) with 0 <= start < end")
        return self


class DeletedModel(BaseModel):
    model: str = Field(description="the repo id removed")
    node_id: str = Field(description="the node whose store it was removed from")


def _manager(request: Request) -> DownloadManager:
    return node_of(request).downloads


def _checked(reply: ModelCommandReply, param: str) -> ModelCommandReply:
    """The reply of a command that succeeded; raises the API error of one that did not."""
    if reply.status < 300:
        return reply
    headers = {"Retry-After": "30"} if reply.status == 429 else None
    raise ApiError(reply.status, reply.error or "the command failed", param=param if reply.status == 400 else None,
                   type=_ERROR_TYPES.get(reply.status, "invalid_request_error"), code=reply.code, headers=headers)


@router.post("/models/download", response_model=DownloadStatus, status_code=202,
             responses=error_responses(400, 404, 429, 503))
async def start_download(body: DownloadRequest, request: Request) -> DownloadStatus:
    """Start (or join the running) download of a model into the store of this node, or of `node_id`."""
    node = node_of(request)
    command = StartDownload(origin=node.node_id, model=body.model, layers=body.layers)
    reply = _checked(await node.model_command(body.node_id, command), "model")
    assert reply.download is not None, "a started download replies with its status"
    return reply.download


@router.get("/models/downloads", response_model=list[DownloadStatus])
def list_downloads(request: Request) -> list[DownloadStatus]:
    """The downloads of this node (with their files); /state has every node's."""
    return _manager(request).statuses()


@router.get("/models/downloads/{download_id}", response_model=DownloadStatus, responses=error_responses(404))
def get_download(download_id: str, request: Request) -> DownloadStatus:
    """A download of this node, or of another node as the cluster state has it (without its files)."""
    node = node_of(request)
    try:
        return node.downloads.status(download_id)
    except DownloadError as e:
        record = node.state.downloads.get(download_id)
        if record is None:
            raise ApiError(404, str(e), type="not_found_error", code="download_not_found") from None
        return DownloadStatus(**record.model_dump(exclude={"node_id"}))


@router.delete("/models/downloads/{download_id}", response_model=DownloadStatus,
               responses=error_responses(404, 503))
async def cancel_download(download_id: Annotated[str, Path(min_length=1, max_length=100)],
                          request: Request) -> DownloadStatus:
    """Stop a download, on whichever node runs it, within one chunk; finished files stay, the partial one resumes
    next time."""
    node = node_of(request)
    record = node.state.downloads.get(download_id)
    where = None if record is None else record.node_id  # one this node has not published yet is its own
    reply = _checked(await node.model_command(where, CancelDownload(origin=node.node_id, download_id=download_id)),
                     "download_id")
    assert reply.download is not None, "a cancelled download replies with its status"
    return reply.download


@router.delete("/models/{model:path}", response_model=DeletedModel, responses=error_responses(400, 404, 409, 503))
async def delete_model(model: Annotated[str, Path(min_length=1, max_length=200, description="a repo id, ORG/NAME")],
                       request: Request,
                       node_id: Annotated[str | None, Query(min_length=1, max_length=100, description=(
                           "the node whose store loses the model (GET /state lists them); default: this node"))] = None,
                       ) -> DeletedModel:
    """Remove a model from the store of this node, or of `node_id` (with the names copies gave it there); one an
    instance serves must be stopped first."""
    node = node_of(request)
    reply = _checked(await node.model_command(node_id, DeleteModel(origin=node.node_id, model=model)), "model")
    assert reply.model is not None, "a deletion replies with the model removed"
    return DeletedModel(model=reply.model, node_id=node_id or node.node_id)
