"""Who is in the cluster, and who claims to be its master: live liveliness tokens, kept up to date from zenoh."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zenoh
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


class Claim(BaseModel):
    """A node's claim to be master for a term (`master/election.py`)."""

    model_config = ConfigDict(frozen=True)

    node_id: str = Field(min_length=1)
    term: int = Field(ge=1)


class Membership:
    """Announces this node and follows the others and their master claims; `on_change(joined, left)` runs on the
    event loop when either changes."""

    def __init__(self, plane: ControlPlane, me: Member, on_change: Callable[[set[str], set[str]], None]) -> None:
        self.me = me
        self._plane = plane
        self._members: dict[str, Member] = {me.node_id: me}
        self._claims: dict[str, int] = {}  # the other nodes' claims: node id -> term
        self._my_claim: tuple[int, zenoh.LivelinessToken] | None = None
        self._on_change = on_change
        plane.announce(topics.member_token(me.node_id, me.started_at))
        plane.watch_liveliness(f"{topics.MEMBERS}/**", self._token_changed)
        plane.watch_liveliness(f"{topics.MASTERS}/**", self._claim_changed)

    @property
    def members(self) -> list[Member]:
        return sorted(self._members.values(), key=lambda m: m.node_id)

    @property
    def claims(self) -> list[Claim]:
        """The master claims of live members, this node's included."""
        claims = [Claim(node_id=n, term=t) for n, t in self._claims.items() if n in self._members]
        if self._my_claim is not None:
            claims.append(Claim(node_id=self.me.node_id, term=self._my_claim[0]))
        return claims

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._members

    def claim(self, term: int | None) -> None:
        """Claim the master's role for `term` (None: withdraw this node's claim)."""
        if self._my_claim is not None:
            self._plane.withdraw(self._my_claim[1])
            self._my_claim = None
        if term is not None:
            self._my_claim = term, self._plane.announce(topics.master_claim(self.me.node_id, term))

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

    def _claim_changed(self, key: str, alive: bool) -> None:
        try:
            node_id, term = topics.parse_master_claim(key)
        except ValueError as error:
            log.warning("%s; ignored", error)
            return
        if node_id == self.me.node_id or term < 1:
            return
        if alive:
            self._claims[node_id] = term
        elif self._claims.get(node_id) == term:
            del self._claims[node_id]
        else:
            return
        self._on_change(set(), set())
