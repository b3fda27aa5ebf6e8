"""Messages on every wire (runner pipes, the control plane): frozen pydantic models as JSON, tagged by a `type`
field. Never pickle: bytes from another process are validated into a known model or rejected."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

T = TypeVar("T")


class Message(BaseModel):
    """The base of every cross-process message and event; each subclass has a `type: Literal[...]` tag."""

    model_config = ConfigDict(frozen=True)


class BadMessageError(ValueError):
    """A peer sent bytes that are not the message expected there."""


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()


def decode(adapter: TypeAdapter[T], data: bytes, where: str) -> T:
    try:
        return adapter.validate_json(data)
    except ValidationError as error:
        raise BadMessageError(f"malformed message on {where}: {error.error_count()} error(s), first: "
                              f"{error.errors()[0]['msg']}") from None
