"""Request bodies are bounded: 413 before reading when Content-Length says too much, or as soon as a
chunked body passes the limit (the error handlers answer it). Pure ASGI, so streamed responses keep
their disconnect handling."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ringlet.api.errors import ApiError, error_bytes

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class BodyTooLarge(HTTPException):
    """Raised while the route reads the body; FastAPI passes HTTPExceptions through to the error handlers."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body over {max_bytes} bytes; send less (a shorter prompt or fewer messages)")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _error(self, status: int, message: str) -> ApiError:
        return ApiError(status, message, code="request_too_large" if status == 413 else "invalid_request")

    async def _reply(self, scope: Scope, send: Send, error: ApiError) -> None:
        body = error_bytes(scope["path"], error)
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._reply(scope, send, self._error(400, "the Content-Length header is not a number"))
                return
            if int(declared) > self.max_bytes:
                await self._reply(scope, send, self._error(413, str(BodyTooLarge(self.max_bytes).detail)))
                return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)
