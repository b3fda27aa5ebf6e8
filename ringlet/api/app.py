"""The HTTP API of a node: `create_app(node)` assembles the routers, error handlers, limits and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.routing import BaseRoute

from ringlet.api import anthropic, cluster, downloads, embeddings, ollama, openai, responses
from ringlet.api import metrics as metrics_router
from ringlet.api.cluster import ringlet_version
from ringlet.api.dashboard import REPO_DASHBOARD_BUILD, mount_dashboard
from ringlet.api.errors import OLLAMA_PREFIX, error_responses, install_error_handlers
from ringlet.api.facade import NodeFacade
from ringlet.api.limits import DEFAULT_MAX_BODY_BYTES, BodySizeLimit
from ringlet.api.metrics import ApiMetrics, HttpMetrics
from ringlet.api.security import Access, ApiAccess


def create_app(node: NodeFacade, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               dashboard_dir: Path = REPO_DASHBOARD_BUILD, access: Access | None = None) -> FastAPI:
    """`access`: the API keys, host names and origins the API accepts (default: no key, this machine's names)."""
    app = FastAPI(
        title="ringlet", version=ringlet_version(),
        description="OpenAI- and Ollama-compatible LLM serving over the devices you own, and cluster management.",
    )
    app.state.node = node
    app.state.metrics = ApiMetrics(node)
    install_error_handlers(app)
    routers = (openai.router, responses.router, anthropic.router, ollama.router, cluster.router, downloads.router,
               metrics_router.router, embeddings.openai_router, embeddings.ollama_router)
    for router in routers:
        app.include_router(router)
    api_roots = _roots([*app.routes, *(route for router in routers for route in router.routes)])
    mount_dashboard(app, dashboard_dir)
    # outermost last: count every response, refuse oversized bodies before anything reads them (and read the rest
    # of a body refused early), refuse unknown hosts, foreign origins and missing keys
    app.add_middleware(ollama.JsonBodiesUnderApi)
    app.add_middleware(ApiAccess, access=access or Access(),
                       is_dashboard=lambda path: "/" + path.lstrip("/").split("/", 1)[0] not in api_roots)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(HttpMetrics, metrics=app.state.metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _roots(routes: list[BaseRoute]) -> frozenset[str]:
    """The first segment of every route's path ("/v1", "/api", "/state", "/docs", ...)."""
    paths = [getattr(route, "path", None) for route in routes]
    return frozenset("/" + path.lstrip("/").split("/", 1)[0] for path in paths if isinstance(path, str) and path.strip("/"))


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents request validation as 422 with its own shape; ringlet answers 400 in the error shape
    of the route's family (OpenAI or Ollama), so the schema says that instead."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path, operations in schema["paths"].items():
            ollama_route = path.startswith(OLLAMA_PREFIX)
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None and "400" not in responses:
                    model = error_responses(400, ollama=ollama_route)[400]["model"]
                    responses["400"] = {"description": "invalid parameters; the message names them",
                                        "content": {"application/json": {
                                            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        components = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema
