"""The cluster's event order: every node proposes its events to the master (`election.py`); the master applies
each one and publishes it with its sequence number and its term; every other node applies them in that order, so
all hold the same `State`.

A newcomer (or a node that missed an event) copies the master's state, then follows the order. A proposal carries
(origin, seq): the proposer forgets it once it sees that id ordered, sends it again to the next master if the old
one died first, and a master never orders one id twice. The master also turns departures into events: a node that
leaves is removed and its instances are placed again on the survivors (`replacement.py`).

Members speak for themselves only: the master orders a proposal only from a live member, and only an event that
member may emit (`refusal`: its own node's information, runners, downloads and links, the rendezvous of a ring it
heads; instances for its API's users; never a departure or an election, which the master orders itself). A follower
applies only what the master it elected orders in that master's current term.

The class talks to the other nodes through an `OrderBus` (zenoh topics in a node, `net/events.py`; a list in the
tests) and folds events into a `Replica` (the node's state), so it runs and is tested without zenoh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from ringlet.master.election import elect
from ringlet.net.membership import Claim, Member
from ringlet.shared.messages import Ordered, Proposal
from ringlet.shared.state import (
    DownloadProgressed,
    Event,
    LinkDown,
    LinkUp,
    MasterChanged,
    NodeJoined,
    NodeLeft,
    NodeUpdated,
    RingHosted,
    RunnerFailed,
    RunnerProgressed,
    RunnerReady,
    State,
)

log = logging.getLogger(__name__)

COPY_ATTEMPTS = 20
RESEND_EVERY_S = 2.0


class Replica(Protocol):
    """The node's copy of the cluster state."""

    @property
    def state(self) -> State: ...

    def apply_ordered(self, event: Event) -> None:
        """Fold an event, in the master's order."""
        ...

    def replace_state(self, state: State) -> None:
        """Take a copy of the master's state."""
        ...


class OrderBus(Protocol):
    """How proposals and the order reach the other nodes."""

    def propose(self, proposal: Proposal) -> None: ...

    def publish(self, ordered: Ordered) -> None: ...

    async def fetch_state(self, node_id: str) -> State | None:
        """The state `node_id` holds now, or None when it does not answer."""
        ...


# what the master orders when a member leaves: at least NodeLeft (see replacement.lost_node_events)
Departures = Callable[[State, str], list[Event]]


def node_left_only(state: State, node_id: str) -> list[Event]:
    return [NodeLeft(node_id=node_id)] if node_id in state.nodes else []


def refusal(origin: str, event: Event, state: State) -> str | None:
    """Why the member `origin` may not propose `event` (None: it may)."""
    match event:
        case NodeLeft() | MasterChanged():
            return "departures and elections are the master's own events"
        case NodeJoined(node=node) | NodeUpdated(node=node):
            about = node.node_id
        case RunnerProgressed(node_id=node_id) | RunnerReady(node_id=node_id) | RunnerFailed(node_id=node_id):
            about = node_id
        case DownloadProgressed(download=download):
            about = download.node_id
        case LinkUp(link=link):
            about = link.source
        case LinkDown(source=source):
            about = source
        case RingHosted(instance_id=instance_id):
            record = state.instances.get(instance_id)
            if record is None:
                return f"no instance {instance_id}"
            about = record.instance.shards[0].node_id  # the ring's first stage hosts its rendezvous
        case _:  # instances created and deleted: any member, for the users of its API
            return None
    return None if about == origin else f"an event about node {about}"


class EventOrder:
    def __init__(self, me: Member, bus: OrderBus, replica: Replica, rejoin: Callable[[], Event],
                 departures: Departures = node_left_only, claim: Callable[[int | None], None] = lambda term: None,
                 grace_s: float = 0.0) -> None:
        """`rejoin()` is this node's NodeJoined, proposed again when its side of a partition merges into another
        cluster; `claim(term)` announces this node's claim to be master for `term` (None withdraws it); `grace_s`:
        how long a node may be gone before the master orders its departure (a node back within it loses nothing)."""
        self.me, self._bus, self._replica = me, bus, replica
        self._rejoin, self._departures, self._claim = rejoin, departures, claim
        self.grace_s = grace_s
        self._departing: dict[str, asyncio.TimerHandle] = {}  # nodes gone, within their grace
        self._copied_for_term = 0  # the last new term whose first event made this node copy the master's state
        self.master: str | None = None
        self.term = 0  # the master's term, as far as this node knows it
        self.members: list[Member] = [me]
        self.claims: list[Claim] = []  # the live members' master claims (this node's own one included)
        self._seq = 0  # this node's proposals so far
        self._pending: dict[int, Event] = {}  # proposed by this node, not yet seen in the order
        self._ordered_from: dict[str, int] = {}  # the highest proposal seq of each origin that is in the order
        self._buffered: list[Ordered] = []  # heard while copying the master's state
        self._early: list[Proposal] = []  # heard while settling: ordered if this node turns out to be master
        self._syncing = True
        self._resync: asyncio.Task[None] | None = None

    @property
    def is_master(self) -> bool:
        return self.master == self.me.node_id

    def live_ids(self) -> set[str]:
        return {m.node_id for m in self.members}

    async def start(self, members: Sequence[Member], claims: Sequence[Claim] = ()) -> None:
        """After settling (listening for members for a moment): elect, then take over or copy the master's state."""
        self.members, self.claims = list(members), list(claims)
        self._elect()
        log.info("cluster: %d member(s), master %s%s", len(self.members), self.master,
                 " (this node)" if self.is_master else "")
        if self.is_master:
            self._syncing = False
            self._take_over()
            for proposal in self._early:
                self.on_proposal(proposal)
        else:
            await self._copy_state(self.master)
            self._resend_pending()  # anything emitted while settling
        self._early.clear()

    async def wait_joined(self, timeout_s: float = 10.0) -> None:
        """Wait until the master has ordered this node's NodeJoined (placement needs the node in the state)."""
        began = resent = time.monotonic()
        while self.me.node_id not in self._replica.state.nodes:
            now = time.monotonic()
            if now - began > timeout_s:
                raise TimeoutError(f"the master ({self.master}) did not add this node to the cluster state within "
                                   f"{timeout_s:.0f} s; check that the nodes reach each other (--connect, firewall)")
            if now - resent > RESEND_EVERY_S:  # a master that was still settling may have missed the proposal
                resent = now
                self._resend_pending()
            await asyncio.sleep(0.05)

    # --- the order

    def emit(self, event: Event) -> None:
        """Propose an event (a master orders it at once); it reaches the replica once ordered."""
        self._seq += 1
        if self.is_master:
            self._order(event, self.me.node_id, self._seq)
            return
        self._pending[self._seq] = event
        self._propose(self._seq, event)

    def _propose(self, seq: int, event: Event) -> None:
        if self.master is not None:
            self._bus.propose(Proposal(origin=self.me.node_id, seq=seq, master=self.master, event=event))

    def _order(self, event: Event, origin: str, origin_seq: int) -> None:
        if origin_seq <= self._ordered_from.get(origin, 0):
            return  # a proposal sent again after it was ordered
        self._ordered_from[origin] = origin_seq
        self._replica.apply_ordered(event)
        self._bus.publish(Ordered(master=self.me.node_id, term=self.term, seq=self._replica.state.last_event,
                                  origin=origin, origin_seq=origin_seq, event=event))

    def on_proposal(self, proposal: Proposal) -> None:
        if self.master is None:
            self._early.append(proposal)  # a node that started beside this one thinks this one is master
        elif self.is_master:
            reason = ("not a member of the cluster" if proposal.origin not in self.live_ids()
                      else refusal(proposal.origin, proposal.event, self._replica.state))
            if reason is not None:
                log.warning("refused a %s proposed by %s: %s", proposal.event.type, proposal.origin, reason)
                return
            self._order(proposal.event, proposal.origin, proposal.seq)
        elif proposal.master == self.me.node_id:
            log.warning("a proposal from %s reached this node, which is not master (master: %s); dropped, the "
                        "sender will send it again to the master", proposal.origin, self.master)

    def on_ordered(self, ordered: Ordered) -> None:
        if ordered.master == self.me.node_id:
            return  # our own, applied when ordered
        if self._syncing:
            self._buffered.append(ordered)
            return
        self._follow(ordered)

    def _follow(self, ordered: Ordered) -> None:
        if ordered.master != self.master:
            log.warning("ignored event %d ordered by %s, which is not the master (%s)", ordered.seq, ordered.master,
                        self.master)
            return
        if ordered.term < self.term:
            log.warning("ignored event %d ordered by %s in its past term %d (now %d)", ordered.seq, ordered.master,
                        ordered.term, self.term)
            return
        self.term = ordered.term  # the master's claim may reach this node after its first events
        expected = self._replica.state.last_event + 1
        if ordered.term > self._replica.state.term and ordered.term != self._copied_for_term:
            # a new master's first events: what this node applied under the last one may differ from what the new
            # master has (an event that reached one of them only), so its state is taken whole (once a term: a
            # master that does not answer is followed from its events)
            self._copied_for_term = ordered.term
            log.info("master %s orders term %d (this node's state is of term %d); copying its state", ordered.master,
                     ordered.term, self._replica.state.term)
            self._start_copy(ordered.master)
            return
        if ordered.seq < expected:
            return
        if ordered.seq > expected:
            log.warning("missed events %d..%d from master %s; copying its state", expected, ordered.seq - 1,
                        ordered.master)
            self._start_copy(ordered.master)
            return
        self._ordered_from[ordered.origin] = max(ordered.origin_seq, self._ordered_from.get(ordered.origin, 0))
        if ordered.origin == self.me.node_id:
            self._pending.pop(ordered.origin_seq, None)
        self._replica.apply_ordered(ordered.event)

    def _start_copy(self, master: str | None) -> None:
        if self._resync is None or self._resync.done():
            self._syncing = True
            self._resync = asyncio.create_task(self._copy_state(master), name="copy-state")

    async def _copy_state(self, master: str | None) -> None:
        self._syncing = True
        try:
            for attempt in range(COPY_ATTEMPTS):
                if master is None or master not in self.live_ids():
                    break
                state = await self._bus.fetch_state(master)
                if state is not None:
                    self._replica.replace_state(state)
                    log.info("copied state from master %s (%d events)", master, state.last_event)
                    break
                await asyncio.sleep(0.1 * (attempt + 1))
            else:
                log.error("master %s did not answer for its state; following its order from here", master)
        finally:
            self._syncing = False
            buffered, self._buffered = self._buffered, []
            for ordered in sorted(buffered, key=lambda o: o.seq):
                self._follow(ordered)

    # --- membership

    def members_changed(self, members: Sequence[Member], left: set[str], claims: Sequence[Claim] = ()) -> None:
        """The live members or their master claims changed (`left` went away); elect again, and as master order the
        departures."""
        self.members, self.claims = list(members), list(claims)
        previous = self.master
        if previous is None:
            return  # still settling; start() elects
        self._elect()
        if self.master != previous:
            log.info("master is now %s%s (was %s)", self.master, " (this node)" if self.is_master else "", previous)
            if previous == self.me.node_id:
                self._claim(None)  # stepping down
            if self.is_master:
                self._syncing = False
                self._take_over()
            elif previous in self.live_ids():
                # the old master lives: this side merged into another cluster, whose state is not ours
                self._pending.clear()
                self._start_copy(self.master)
                self.emit(self._rejoin())
            else:
                self._start_copy(self.master)  # it may have ordered events before this node knew it as master
                self._resend_pending()
        if self.is_master:
            for node_id in left:
                self._depart_later(node_id)

    def _resend_pending(self) -> None:
        if self.is_master:
            pending, self._pending = self._pending, {}
            for seq, event in sorted(pending.items()):
                self._order(event, self.me.node_id, seq)
            return
        for seq, event in sorted(self._pending.items()):
            self._propose(seq, event)

    def _elect(self) -> None:
        leader = elect(self.members, self.claims, list(self._replica.state.nodes))
        master = None if leader is None else leader.node_id
        if master != self.master:
            self.term = 0  # a new master's term is learnt from its claim or its events
        self.master = master
        if leader is not None and leader.term is not None:
            self.term = leader.term

    def _take_over(self) -> None:
        """This node just became master: claim the next term, order what it had proposed, then clear out departed
        nodes."""
        self.term = max(self.term, self._replica.state.term, *(c.term for c in self.claims)) + 1
        self._claim(self.term)
        self._resend_pending()
        self.emit(MasterChanged(node_id=self.me.node_id, term=self.term))
        live = self.live_ids()
        for node_id in [n for n in self._replica.state.nodes if n not in live]:
            self._depart_later(node_id)

    def _depart_later(self, node_id: str) -> None:
        """Order the node's departure once it has been gone `grace_s` (at once without a grace)."""
        if self.grace_s <= 0:
            self._depart(node_id)
            return
        log.info("node %s is gone; its instances are placed again in %.0f s unless it comes back", node_id,
                 self.grace_s)
        if node_id in self._departing:
            self._departing[node_id].cancel()  # gone again: the grace counts from now
        self._departing[node_id] = asyncio.get_running_loop().call_later(self.grace_s, self._depart, node_id)

    def _depart(self, node_id: str) -> None:
        self._departing.pop(node_id, None)
        if not self.is_master or node_id in self.live_ids():
            return  # back within the grace, or no longer this node's to order
        for event in self._departures(self._replica.state, node_id):
            self.emit(event)
