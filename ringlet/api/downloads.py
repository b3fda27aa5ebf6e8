"""Model downloads on this node: start, follow, cancel. Progress also lands in /state (`downloads`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ringlet.api.errors import ApiError, error_responses
from ringlet.api.facade import node_of
from ringlet.models.download import DownloadError, DownloadManager, DownloadStatus, TooManyDownloads
from ringlet.shared.errors import ModelLoadError

router = APIRouter(tags=["models"])


class DownloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="a Hugging Face repo id, e.g. Qwen/Qwen3-0.6B")
    layers: tuple[int, int] | None = Field(None, description="[start, end): only the files holding these layers")

    @model_validator(mode="after")
    def _range(self) -> DownloadRequest:
        if self.layers is not None and not 0 <= self.layers[0] < self.layers[1]:
            raise ValueError("layers must be [start, end) with 0 <= start < end")
        return self


def _manager(request: Request) -> DownloadManager:
    return node_of(request).downloads


@router.post("/models/download", response_model=DownloadStatus, status_code=202,
             responses=error_responses(400, 429))
def start_download(body: DownloadRequest, request: Request) -> DownloadStatus:
    """Start (or join the running) download of a model into this node's store."""
    try:
        return _manager(request).start(body.model, layers=body.layers)
    except TooManyDownloads as e:
        raise ApiError(429, str(e), type="rate_limit_error", code="too_many_downloads",
                       headers={"Retry-After": "30"}) from None
    except ModelLoadError as e:
        raise ApiError(400, str(e), param="model", code="invalid_model") from None


@router.get("/models/downloads", response_model=list[DownloadStatus])
def list_downloads(request: Request) -> list[DownloadStatus]:
    return _manager(request).statuses()


@router.get("/models/downloads/{download_id}", response_model=DownloadStatus, responses=error_responses(404))
def get_download(download_id: str, request: Request) -> DownloadStatus:
    try:
        return _manager(request).status(download_id)
    except DownloadError as e:
        raise ApiError(404, str(e), type="not_found_error", code="download_not_found") from None


@router.delete("/models/downloads/{download_id}", response_model=DownloadStatus, responses=error_responses(404))
def cancel_download(download_id: str, request: Request) -> DownloadStatus:
    """Stop a download within one chunk; finished files stay, the partial one resumes next time."""
    try:
        return _manager(request).cancel(download_id)
    except DownloadError as e:
        raise ApiError(404, str(e), type="not_found_error", code="download_not_found") from None
