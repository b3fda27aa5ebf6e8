"""What the node facade refuses, each with a message that says what to do. The API maps them to statuses."""

from __future__ import annotations


class NodeError(Exception):
    """A request the node cannot serve; the message is meant for the person who sent it."""


class ModelNotFoundError(NodeError):
    def __init__(self, model: str, available: list[str]) -> None:
        super().__init__(f"model {model!r} not found; available models: {', '.join(available) or 'none'}")
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
