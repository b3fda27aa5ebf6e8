"""A small client of a node's API for the CLI (`ringlet run`, `chat`, `ps`, `stop`), on the standard library
alone."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

DEFAULT_URL = "http://localhost:52415"


class NodeApiError(Exception):
    """The node answered with an error, or could not be reached; the message says which and what to do."""


class NodeClient:
    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 600.0, api_key: str | None = None) -> None:
        """`api_key`: sent as a Bearer token (default: the first key of $RINGLET_API_KEY, if any)."""
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        from_environment = [k.strip() for k in os.environ.get("RINGLET_API_KEY", "").split(",") if k.strip()]
        self.api_key = api_key or (from_environment[0] if from_environment else None)

    def _open(self, path: str, body: dict[str, Any] | None = None, timeout_s: float | None = None):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "*/*"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                         headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s)
        except urllib.error.HTTPError as error:
            hint = "; set RINGLET_API_KEY to the node's key" if error.code == 401 else ""
            raise NodeApiError(f"{error.code}: {_error_message(error.read())}{hint}") from None
        except urllib.error.URLError as error:
            raise NodeApiError(f"no ringlet node answers at {self.url} ({error.reason}); start one with "
                               "`ringlet node`, or point --url at one") from None

    def get(self, path: str, timeout_s: float | None = None) -> Any:
        with self._open(path, timeout_s=timeout_s) as response:
            return json.load(response)

    def get_json(self, path: str, body: dict[str, Any]) -> Any:
        """POST `body` and read the JSON answer."""
        with self._open(path, body) as response:
            return json.load(response)

    def stream_lines(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST and yield each line of a newline-delimited JSON answer (Ollama's); an error line raises
        NodeApiError."""
        with self._open(path, body) as response:
            for raw in response:
                if not raw.strip():
                    continue
                line = json.loads(raw)
                if "error" in line:
                    raise NodeApiError(str(line["error"]))
                yield line

    def stream_events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST and yield each server-sent event's JSON until `[DONE]`; an error event raises NodeApiError."""
        with self._open(path, body) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise NodeApiError(_error_message(data.encode()))
                yield event


def _error_message(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body.decode(errors="replace")[:500]
    if isinstance(error, dict):
        return str(error.get("message"))
    return str(error)
