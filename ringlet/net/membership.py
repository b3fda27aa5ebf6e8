"""Who is in the cluster: the live member tokens, kept up to date from zenoh liveliness."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from ringlet.net import topics
from ringlet.net.session import ControlPlane

log = logging.getLogger(__name__)


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


class Membership:
    """Announces this node and follows the others; `on_change(joined, left)` runs on the event loop."""

    def __init__(self, plane: ControlPlane, me: Member, on_change: Callable[[set[str], set[str]], None]) -> None:
        self.me = me
        self._members: dict[str, Member] = {me.node_id: me}
        self._on_change = on_change
        plane.announce(topics.member_token(me.node_id, me.started_at))
        plane.watch_liveliness(f"{topics.MEMBERS}/**", self._token_changed)

    @property
    def members(self) -> list[Member]:
        return sorted(self._members.values(), key=lambda m: m.node_id)

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._members

    def _token_changed(self, key: str, alive: bool) -> None:
        try:
            node_id, started_at = topics.parse_member_token(key)
        except ValueError as error:
            log.warning("%s; ignored", error)
            return
        if node_id == self.me.node_id:
            return
        if alive and node_id not in self._members:
            self._members[node_id] = Member(node_id=node_id, started_at=started_at)
            log.info("member %s joined (%d live)", node_id, len(self._members))
            self._on_change({node_id}, set())
        elif not alive and node_id in self._members:
            del self._members[node_id]
            log.info("member %s left (%d live)", node_id, len(self._members))
            self._on_change(set(), {node_id})
