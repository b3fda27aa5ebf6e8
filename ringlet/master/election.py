"""Which live member is the master: a pure, deterministic choice every node makes for itself.

Every node sees the same membership (zenoh liveliness tokens), so every node picks the same master without a
vote: the member that started earliest, node id breaking ties. A newcomer started later, so a join never moves
the role and the event order goes on uninterrupted; when the master leaves, the next oldest takes over with the
state it has replicated. When two partitions merge, both sides pick the same master (the oldest of all), so the
cluster never keeps two. Start times come from the members' clocks and only need to be roughly comparable.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field


class Member(BaseModel):
    """A live node as its liveliness token announces it."""

    model_config = ConfigDict(frozen=True)

    node_id: str = Field(min_length=1)
    started_at: float = Field(description="wall-clock time the node started (seconds since the epoch)")

    @classmethod
    def starting_now(cls, node_id: str, now: float | None = None) -> Member:
        """This node, started now, in whole milliseconds: the precision its liveliness token carries, so that it
        compares itself with the others by the very number they see for it (two nodes started within one
        millisecond would otherwise each elect the other)."""
        now = time.time() if now is None else now
        return cls(node_id=node_id, started_at=int(now * 1000) / 1000)


def elect(members: Iterable[Member]) -> str | None:
    """The master among `members`; None when there are none."""
    live = list(members)
    if not live:
        return None
    return min(live, key=lambda m: (m.started_at, m.node_id)).node_id
