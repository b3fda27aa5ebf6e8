"""Control-plane messages on the wire: typed pydantic models as JSON. Never pickle: a peer's bytes are validated
into a known model or rejected."""

from __future__ import annotations

import logging
from typing import TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

log = logging.getLogger(__name__)
T = TypeVar("T")


class BadMessageError(ValueError):
    """A peer sent bytes that are not the message this topic carries."""


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()


def decode(adapter: TypeAdapter[T], data: bytes, topic: str) -> T:
    try:
        return adapter.validate_json(data)
    except ValidationError as error:
        raise BadMessageError(f"malformed message on {topic}: {error.error_count()} error(s), first: "
                              f"{error.errors()[0]['msg']}") from None
