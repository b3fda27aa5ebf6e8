"""Every error that crosses a module boundary, each with a message that says what was wrong and what to do.

The API maps them to statuses (`api/errors.py`), the CLI prints them as one line; nothing here imports above
`shared`, so every layer can raise them.
"""

from __future__ import annotations

from typing import Literal


def first_line(error: BaseException) -> str:
    """An error as one log line: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__

# --- loading models


class ModelLoadError(ValueError):
    """A model file or directory could not be used (missing, corrupt, unsupported)."""


class ContextWindowError(ValueError):
    """A prompt (plus the tokens asked for) does not fit the model's context window."""


# --- what the node refuses


class NodeError(Exception):
    """A request the node cannot serve; the message is meant for the person who sent it."""


class ModelNotFoundError(NodeError):
    def __init__(self, model: str, available: list[str], hint: str = "") -> None:
        """`hint`: what the name is and what to do, where that is known."""
        hint = f"{hint}; " if hint else ""
        super().__init__(f"model {model!r} not found; {hint}available models: {', '.join(available) or 'none'}")
        self.model, self.available = model, available


class InvalidModelError(NodeError):
    """A model path that exists but cannot be used (not a model directory, not a readable .gguf file)."""


class NoInstanceError(NodeError):
    """The model is known but nothing serves it now (none created, all failed, or still loading)."""

    def __init__(self, message: str, loading: bool = False) -> None:
        super().__init__(message)
        self.loading = loading


class InstanceNotFoundError(NodeError):
    def __init__(self, instance_id: str, known: list[str]) -> None:
        super().__init__(f"instance {instance_id!r} not found; instances: {', '.join(known) or 'none'}")
        self.instance_id = instance_id


# --- a task that ended without a finished answer

# whose fault: the request's (context_window, invalid_request), the engine's, or the instance's (its runner
# failed or its node left: runner_failed; it was deleted or is not on the node asked: instance_deleted; it has as
# many requests as it takes: busy)
TaskErrorKind = Literal["context_window", "invalid_request", "engine", "runner_failed", "instance_deleted", "busy"]


class TaskError(Exception):
    """A task ended without a finished answer; `kind` says whose fault."""

    def __init__(self, kind: TaskErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: TaskErrorKind = kind
