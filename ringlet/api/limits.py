"""Request bodies are bounded: 413 before reading when Content-Length says too much, or as soon as a
chunked body passes the limit (the error handlers answer it). Pure ASGI, so streamed responses keep
their disconnect handling.

An answer sent before the client has sent its whole body (a 413, say) is only read by the client if the server
reads the rest first: closing a socket with unread data resets the connection, and the client's kernel may drop
the answer with it. So the rest of such a body is read and dropped (up to DRAIN_MAX_BYTES, for DRAIN_MAX_S) before
the answer goes out, as nginx's lingering close does.
"""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ringlet.api.errors import ApiError, error_bytes

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_MAX_S = 5.0


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
                if int(declared) <= DRAIN_MAX_BYTES:
                    await _drain(receive)
                await self._reply(scope, send, self._error(413, str(BodyTooLarge(self.max_bytes).detail)))
                return

        received, body_done = 0, False

        async def counting_receive() -> Message:
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            else:
                body_done = True  # the client went away
            return message

        async def send_after_the_body(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_done:
                await _drain(receive)
            await send(message)

        await self.app(scope, counting_receive, send_after_the_body)


async def _drain(receive: Receive) -> None:
    """Read and drop what is left of the request body (bounded in bytes and time)."""

    async def read_rest() -> None:
        dropped = 0
        while dropped <= DRAIN_MAX_BYTES:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            dropped += len(message.get("body", b""))

    try:
        await asyncio.wait_for(read_rest(), DRAIN_MAX_S)
    except TimeoutError:
        pass  # a client that sends slower than this gets the answer and a closed connection
