"""Errors as clients expect them: OpenAI's `{"error": {...}}` everywhere, Ollama's `{"error": "..."}` under /api/,
Anthropic's `{"type": "error", "error": {...}}` under /v1/messages.

Each refusal of the node maps to one status: unknown model 404, invalid parameters 400 (naming the
parameter), no instance 503 (saying how to create one), prompt over the context window 400, placement
impossible 409, body too large 413.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ringlet.master.placement import DeviceChoiceError, PlacementError
from ringlet.shared.errors import (
    InstanceNotFoundError,
    InvalidModelError,
    ModelNotFoundError,
    NodeError,
    NoInstanceError,
    TaskError,
)

log = logging.getLogger(__name__)

OLLAMA_PREFIX = "/api/"
ANTHROPIC_PREFIX = "/v1/messages"
RETRY_AFTER_LOADING_S = 5
RETRY_AFTER_BUSY_S = 1


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, not_found_error, unavailable_error, server_error")
    param: str | None = Field(None, description="the request field that was wrong, if one was")
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


class OllamaError(BaseModel):
    """Ollama's error shape."""

    error: str


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


class ApiError(Exception):
    """An error a route raises itself (e.g. a parameter ringlet does not support)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code
        self.headers = headers or {}

    @property
    def message(self) -> str:
        return str(self)


# Anthropic's error types, for ours
_ANTHROPIC_TYPES = {"invalid_request_error": "invalid_request_error", "not_found_error": "not_found_error",
                    "rate_limit_error": "rate_limit_error", "unavailable_error": "overloaded_error",
                    "authentication_error": "authentication_error", "permission_error": "permission_error"}


def anthropic_error(error: ApiError) -> dict[str, str]:
    """The `error` of Anthropic's error shape."""
    return {"type": _ANTHROPIC_TYPES.get(error.type, "api_error"), "message": error.message}


def error_body(path: str, error: ApiError) -> dict[str, Any]:
    if path.startswith(OLLAMA_PREFIX):
        return OllamaError(error=error.message).model_dump()
    if path.startswith(ANTHROPIC_PREFIX):
        return {"type": "error", "error": anthropic_error(error)}
    detail = ErrorDetail(message=error.message, type=error.type, param=error.param, code=error.code)
    return ErrorResponse(error=detail).model_dump()


def error_bytes(path: str, error: ApiError) -> bytes:
    return json.dumps(error_body(path, error)).encode()


def to_api_error(error: Exception) -> ApiError:
    """The status and shape of anything the node or a task can raise."""
    match error:
        case ApiError():
            return error
        case ClientGone():  # nobody reads this answer; 499 as nginx logs it, for the metrics and the log
            return ApiError(499, "the client closed the connection", code="client_closed_request")
        case ModelNotFoundError():
            return ApiError(404, str(error), type="not_found_error", param="model", code="model_not_found")
        case InvalidModelError():
            return ApiError(400, str(error), param="model", code="invalid_model")
        case InstanceNotFoundError():
            return ApiError(404, str(error), type="not_found_error", code="instance_not_found")
        case NoInstanceError(loading=True):
            return ApiError(503, str(error), type="unavailable_error", code="instance_loading",
                            headers={"Retry-After": str(RETRY_AFTER_LOADING_S)})
        case NoInstanceError():
            return ApiError(503, str(error), type="unavailable_error", code="no_instance")
        case DeviceChoiceError():
            return ApiError(400, str(error), param="intel_gpu_devices", code="invalid_device")
        case PlacementError():
            return ApiError(409, str(error), code="placement_impossible")
        case TaskError(kind="context_window"):
            return ApiError(400, str(error), param="messages", code="context_length_exceeded")
        case TaskError(kind="invalid_request"):
            return ApiError(400, str(error))
        case TaskError(kind="busy"):
            return ApiError(429, str(error), type="rate_limit_error", code="queue_full",
                            headers={"Retry-After": str(RETRY_AFTER_BUSY_S)})
        case TaskError(kind="runner_failed" | "instance_deleted"):
            return ApiError(503, str(error), type="unavailable_error", code=error.kind)
        case TaskError():
            return ApiError(500, f"the engine failed: {error}", type="server_error", code=error.kind)
        case _:
            return ApiError(500, f"internal error: {type(error).__name__}: {error}", type="server_error")


def _validation_error(error: RequestValidationError) -> ApiError:
    problems = []
    first_param = None
    for item in error.errors():
        kind, message = item.get("type"), str(item.get("msg"))
        if kind == "json_invalid":  # FastAPI puts the character offset where a field's name would be
            reason = (item.get("ctx") or {}).get("error", message)
            return ApiError(400, f"the body is not valid JSON: {reason} (at character {item['loc'][-1]})",
                            code="invalid_json")
        if kind == "missing" and tuple(item.get("loc", ())) == ("body",):
            return ApiError(400, "the body is empty: send a JSON object", code="invalid_json")
        value = item.get("input")
        if isinstance(value, float) and not math.isfinite(value):
            message = f"{value} is not a number this field takes; send a finite number"
        location = [str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(location) or None
        first_param = first_param or param
        problems.append(f"{param}: {message}" if param else message)
    return ApiError(400, "invalid request: " + "; ".join(problems), param=first_param, code="invalid_parameter")


def _respond(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, error), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return _respond(request, _validation_error(error))

    async def on_http(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        api_error = ApiError(error.status_code, str(error.detail), type=kind, headers=dict(error.headers or {}))
        return _respond(request, api_error)

    async def on_known(request: Request, error: Exception) -> JSONResponse:
        return _respond(request, to_api_error(error))

    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return _respond(request, to_api_error(error))

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for known in (ApiError, ClientGone, NodeError, PlacementError, TaskError):
        app.add_exception_handler(known, on_known)
    app.add_exception_handler(Exception, on_unexpected)


def error_responses(*statuses: int, ollama: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer."""
    descriptions = {
        400: "invalid parameters (the message names them), or a prompt over the context window",
        404: "unknown model or instance; the message lists the known ones",
        409: "the instance cannot be placed; the message says why",
        413: "request body too large",
        429: "the instance has as many requests running and waiting as it takes; retry after `Retry-After` seconds",
        500: "internal error",
        503: "no instance serves the model (the message says how to create one), or it is still loading",
    }
    model = OllamaError if ollama else ErrorResponse
    return {status: {"model": model, "description": descriptions[status]} for status in statuses}
