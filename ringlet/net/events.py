"""The event order on zenoh: proposals to the master, the master's order to everyone, and each node's state for
a newcomer to copy (`master/ordering.py` decides what to send; this is how it travels)."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import TypeAdapter

from ringlet.net import topics
from ringlet.net.session import ControlPlane
from ringlet.shared.messages import ORDERED, PROPOSAL, Ordered, Proposal
from ringlet.shared.state import State

STATE = TypeAdapter(State)


class EventBus:
    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane

    def listen(self, node_id: str, on_proposal: Callable[[Proposal], None], on_ordered: Callable[[Ordered], None],
               state: Callable[[], State]) -> None:
        """Hear proposals and the order; answer queries for this node's state with `state()`."""
        self._plane.subscribe(topics.PROPOSALS, PROPOSAL, lambda _key, proposal: on_proposal(proposal))
        self._plane.subscribe(topics.ORDERED, ORDERED, lambda _key, ordered: on_ordered(ordered))
        self._plane.serve(topics.state_of(node_id), state)

    def propose(self, proposal: Proposal) -> None:
        self._plane.publish(topics.PROPOSALS, proposal)

    def publish(self, ordered: Ordered) -> None:
        self._plane.publish(topics.ORDERED, ordered)

    async def fetch_state(self, node_id: str) -> State | None:
        states = await self._plane.ask(topics.state_of(node_id), STATE)
        return states[0] if states else None
