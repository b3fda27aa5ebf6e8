"""Typed messages of the control plane (JSON on the wire; see codec.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from ringlet.shared.state import Event
from ringlet.shared.tasks import GenerationChunk, TextGenerationTask


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True)


class Proposal(_Message):
    """An event a node wants ordered; only the master acts on it."""

    origin: str
    master: str = Field(description="the node the sender believes is master; another master ignores it")
    event: Event


class Ordered(_Message):
    """An event in the master's order: `seq` is the state's event count once it is applied."""

    master: str
    seq: int = Field(ge=1)
    event: Event


class TaskRequest(_Message):
    """Run `task` on the instance whose first stage is on the receiving node; stream to task_stream(task_id)."""

    origin: str
    instance_id: str
    task: TextGenerationTask


class StreamChunk(_Message):
    type: Literal["chunk"] = "chunk"
    chunk: GenerationChunk


class StreamError(_Message):
    type: Literal["error"] = "error"
    kind: str
    error: str


class CancelTask(_Message):
    task_id: str


StreamItem = Annotated[StreamChunk | StreamError, Field(discriminator="type")]

PROPOSAL = TypeAdapter(Proposal)
ORDERED = TypeAdapter(Ordered)
TASK_REQUEST = TypeAdapter(TaskRequest)
STREAM_ITEM: TypeAdapter[StreamChunk | StreamError] = TypeAdapter(StreamItem)
CANCEL = TypeAdapter(CancelTask)
