"""The event order without zenoh: nodes joined by an in-memory bus fold the same events into the same state,
a proposal is ordered once even when sent twice, and a new master takes over what its predecessor left."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ringlet.master.ordering import EventOrder
from ringlet.net.membership import Claim, Member
from ringlet.shared.messages import Ordered, Proposal
from ringlet.shared.state import Event, Link, LinkUp, MasterChanged, NodeJoined, NodeLeft, State, apply
from tests.support.node_infos import node_info


class Replica:
    """A node's state, as `Node` holds it."""

    def __init__(self) -> None:
        self.state = State()
        self.applied: list[Event] = []

    def apply_ordered(self, event: Event) -> None:
        self.state = apply(self.state, event)
        self.applied.append(event)

    def replace_state(self, state: State) -> None:
        self.state = state


class Network:
    """Every node's bus: what one publishes reaches every other (in order), unless the sender is cut off."""

    def __init__(self) -> None:
        self.orders: dict[str, EventOrder] = {}
        self.replicas: dict[str, Replica] = {}
        self.proposals: list[Proposal] = []
        self.cut: set[str] = set()
        self.terms: dict[str, int] = {}  # the master claims announced: node id -> term

    def bus(self, node_id: str) -> Bus:
        return Bus(self, node_id)

    def join(self, node_id: str, started_at: float, departures: Callable[[State, str], list[Event]] | None = None
             ) -> EventOrder:
        replica = Replica()
        options = {} if departures is None else {"departures": departures}
        order = EventOrder(Member(node_id=node_id, started_at=started_at), self.bus(node_id), replica,
                           rejoin=lambda: NodeJoined(node=node_info(node_id, 8)),
                           claim=lambda term: self._claim(node_id, term), **options)
        self.orders[node_id], self.replicas[node_id] = order, replica
        return order

    def _claim(self, node_id: str, term: int | None) -> None:
        self.terms.pop(node_id, None)
        if term is not None:
            self.terms[node_id] = term

    def members(self) -> list[Member]:
        return [o.me for node_id, o in self.orders.items() if node_id not in self.cut]

    def claims(self) -> list[Claim]:
        return [Claim(node_id=n, term=t) for n, t in self.terms.items() if n not in self.cut]

    def changed(self, node_id: str, left: set[str] = frozenset(), extra: list[Member] | None = None) -> None:  # type: ignore[assignment]
        """What `node_id`'s membership tells it: the live members (and `extra` ones), and the claims."""
        self.orders[node_id].members_changed([*self.members(), *(extra or [])], set(left), self.claims())


class Bus:
    def __init__(self, network: Network, node_id: str) -> None:
        self.network, self.node_id = network, node_id

    def _others(self) -> list[EventOrder]:
        if self.node_id in self.network.cut:
            return []
        return [o for n, o in self.network.orders.items() if n != self.node_id and n not in self.network.cut]

    def propose(self, proposal: Proposal) -> None:
        self.network.proposals.append(proposal)
        for order in self._others():
            order.on_proposal(proposal)

    def publish(self, ordered: Ordered) -> None:
        for order in self._others():
            order.on_ordered(ordered)

    async def fetch_state(self, node_id: str) -> State | None:
        replica = self.network.replicas.get(node_id)
        return None if replica is None or node_id in self.network.cut else replica.state


async def started(network: Network) -> None:
    members = network.members()
    for order in network.orders.values():
        await order.start(members, network.claims())


async def two_nodes() -> Network:
    """a (the older: master) and b, started."""
    network = Network()
    network.join("a", 0.0)
    network.join("b", 1.0)
    await started(network)
    return network


def joined(node_id: str) -> NodeJoined:
    return NodeJoined(node=node_info(node_id, 8))


def test_every_node_folds_the_same_events_in_the_masters_order() -> None:
    async def scenario() -> Network:
        network = Network()
        for i, node_id in enumerate(("a", "b", "c")):
            network.join(node_id, started_at=float(i))
        await started(network)
        for node_id, order in network.orders.items():
            order.emit(joined(node_id))
        network.orders["c"].emit(LinkUp(link=Link(source="c", target="a")))
        return network

    network = asyncio.run(scenario())
    assert all(o.master == "a" for o in network.orders.values())
    states = [r.state for r in network.replicas.values()]
    assert states[0] == states[1] == states[2]
    assert set(states[0].nodes) == {"a", "b", "c"} and states[0].links == [Link(source="c", target="a")]
    assert [p.seq for p in network.proposals if p.origin == "c"] == [1, 2], "each origin numbers its proposals"
    assert not network.orders["b"]._pending and not network.orders["c"]._pending, "ordered proposals are forgotten"


def test_a_proposal_sent_again_is_ordered_once() -> None:
    async def scenario() -> Network:
        network = await two_nodes()
        network.orders["b"].emit(joined("b"))
        network.orders["a"].on_proposal(network.proposals[-1])  # a duplicate: a resend that crossed the order
        return network

    network = asyncio.run(scenario())
    applied = network.replicas["a"].applied
    assert [type(e).__name__ for e in applied] == ["MasterChanged", "NodeJoined"]
    assert network.replicas["a"].state == network.replicas["b"].state


def test_a_new_master_orders_what_was_pending_and_the_departure() -> None:
    """b proposed an event the old master never ordered (it died first): b becomes master, orders it under its
    original id, marks itself master and removes the departed node."""

    async def scenario() -> Network:
        network = await two_nodes()
        for node_id in ("a", "b"):
            network.orders[node_id].emit(joined(node_id))
        network.cut.add("a")  # a stops hearing and being heard
        network.orders["b"].emit(LinkUp(link=Link(source="b", target="b")))
        assert network.orders["b"]._pending, "the old master cannot order it any more"
        network.changed("b", left={"a"})
        return network

    network = asyncio.run(scenario())
    b = network.orders["b"]
    assert b.is_master and not b._pending
    state = network.replicas["b"].state
    assert state.master == "b" and set(state.nodes) == {"b"}
    assert state.links == [Link(source="b", target="b")]
    kinds = [type(e).__name__ for e in network.replicas["b"].applied]
    assert kinds[-3:] == ["LinkUp", "MasterChanged", "NodeLeft"]


def test_the_master_asks_its_departures_policy_what_a_lost_node_means() -> None:
    seen: list[str] = []

    def departures(state: State, node_id: str) -> list[Event]:
        seen.append(node_id)
        return [NodeLeft(node_id=node_id), MasterChanged(node_id="a")]

    async def scenario() -> Network:
        network = Network()
        network.join("a", 0.0, departures)
        network.join("b", 1.0)
        await started(network)
        for node_id in ("a", "b"):
            network.orders[node_id].emit(joined(node_id))
        network.cut.add("b")
        network.changed("a", left={"b"})
        return network

    network = asyncio.run(scenario())
    assert seen == ["b"]
    assert set(network.replicas["a"].state.nodes) == {"a"}


def test_a_follower_that_missed_events_copies_the_masters_state() -> None:
    async def scenario() -> Network:
        network = await two_nodes()
        network.cut.add("b")  # b misses a's next event
        network.orders["a"].emit(joined("a"))
        network.cut.discard("b")
        network.orders["a"].emit(LinkUp(link=Link(source="a", target="b")))  # b sees a gap: 3 after 1
        await asyncio.sleep(0.05)  # the copy runs as a task
        return network

    network = asyncio.run(scenario())
    assert network.replicas["b"].state == network.replicas["a"].state


def test_members_speak_for_themselves_only_and_strangers_not_at_all() -> None:
    from ringlet.shared.state import RunnerReady

    async def scenario() -> Network:
        network = await two_nodes()
        network.orders["b"].emit(joined("b"))
        master = network.orders["a"]
        forged = [
            Proposal(origin="b", seq=10, master="a", event=joined("a")),  # b speaking for a
            Proposal(origin="b", seq=11, master="a", event=NodeLeft(node_id="a")),  # a departure: the master's
            Proposal(origin="b", seq=12, master="a", event=MasterChanged(node_id="b")),  # an election: likewise
            Proposal(origin="b", seq=13, master="a", event=RunnerReady(instance_id="i", node_id="a", context_length=8)),
            Proposal(origin="b", seq=14, master="a", event=LinkUp(link=Link(source="a", target="b"))),
            Proposal(origin="mallory", seq=1, master="a", event=joined("mallory")),  # not a member
        ]
        for proposal in forged:
            master.on_proposal(proposal)
        master.on_proposal(Proposal(origin="b", seq=15, master="a", event=LinkUp(link=Link(source="b", target="a"))))
        return network

    network = asyncio.run(scenario())
    applied = network.replicas["a"].applied
    assert [type(e).__name__ for e in applied] == ["MasterChanged", "NodeJoined", "LinkUp"]
    state = network.replicas["a"].state
    assert set(state.nodes) == {"b"} and state.links == [Link(source="b", target="a")] and state.master == "a"
    assert network.replicas["b"].state == state


def test_a_follower_applies_only_what_its_master_orders() -> None:
    async def scenario() -> Network:
        network = await two_nodes()
        follower = network.orders["b"]
        seq = network.replicas["b"].state.last_event + 1
        follower.on_ordered(Ordered(master="b-impostor", term=9, seq=seq, origin="b-impostor", origin_seq=1,
                                    event=NodeLeft(node_id="a")))
        return network

    network = asyncio.run(scenario())
    assert network.replicas["b"].state == network.replicas["a"].state
    assert [type(e).__name__ for e in network.replicas["b"].applied] == []  # b copied a's state, then nothing


def test_a_forged_older_member_does_not_become_master_nor_succeed_it() -> None:
    """A member whose token says it started in 1970 joins a running cluster: the claiming master keeps the role;
    when that master goes, the member the cluster admitted first succeeds it, in the next term."""
    forged = Member(node_id="forged", started_at=0.001)

    async def scenario() -> Network:
        network = await two_nodes()
        for node_id in ("a", "b"):
            network.orders[node_id].emit(joined(node_id))
        assert network.terms == {"a": 1}
        for node_id in ("a", "b"):
            network.changed(node_id, extra=[forged])
        assert all(o.master == "a" and o.term == 1 for o in network.orders.values())
        network.cut.add("a")
        network.changed("b", left={"a"}, extra=[forged])
        return network

    network = asyncio.run(scenario())
    b = network.orders["b"]
    assert b.is_master and b.term == 2 and network.terms["b"] == 2
    assert network.replicas["b"].state.master == "b" and network.replicas["b"].state.term == 2


def test_a_follower_ignores_its_masters_events_of_a_past_term() -> None:
    async def scenario() -> Network:
        network = await two_nodes()
        follower = network.orders["b"]
        assert follower.term == 1
        follower.term = 3  # as if the master had been elected again since
        seq = network.replicas["b"].state.last_event + 1
        follower.on_ordered(Ordered(master="a", term=2, seq=seq, origin="a", origin_seq=99,
                                    event=NodeLeft(node_id="b")))
        return network

    network = asyncio.run(scenario())
    assert network.replicas["b"].applied == []


def test_when_partitions_merge_the_master_of_the_lower_term_steps_down_and_rejoins() -> None:
    async def scenario() -> Network:
        network = await two_nodes()
        for node_id in ("a", "b"):
            network.orders[node_id].emit(joined(node_id))
        network.cut.add("a")
        network.changed("b", left={"a"})  # b's side: b is master in term 2
        network.cut.discard("a")  # the partition heals: b sees a and its claim, a sees b's claim of a higher term
        network.changed("b")
        network.changed("a")
        await asyncio.sleep(0.05)  # a copies b's state as a task, then b orders a's NodeJoined
        return network

    network = asyncio.run(scenario())
    a, b = network.orders["a"], network.orders["b"]
    assert a.master == b.master == "b" and a.term == b.term == 2
    assert network.terms == {"b": 2}, "a withdrew its claim"
    assert network.replicas["a"].state == network.replicas["b"].state
    assert set(network.replicas["b"].state.nodes) == {"a", "b"}


def test_a_follower_ahead_of_the_new_master_takes_its_state() -> None:
    async def scenario() -> Network:
        network = Network()
        for node_id, started_at in (("a", 0.0), ("b", 1.0), ("c", 2.0)):
            network.join(node_id, started_at)
        await started(network)
        for node_id in ("a", "b", "c"):
            network.orders[node_id].emit(joined(node_id))
        network.cut.add("b")  # an event of a's reaches c only
        network.orders["a"].emit(LinkUp(link=Link(source="a", target="c")))
        network.cut.discard("b")
        assert network.replicas["c"].state.last_event == network.replicas["b"].state.last_event + 1
        network.cut.add("a")  # a dies: b is the next master, one event behind c
        network.changed("b", left={"a"})
        network.changed("c", left={"a"})
        await asyncio.sleep(0.05)  # c copies b's state as a task
        return network

    network = asyncio.run(scenario())
    b, c = network.replicas["b"].state, network.replicas["c"].state
    assert network.orders["c"].master == "b" and b.term == 2
    assert c == b, "c dropped what the new master never had"
    assert set(c.nodes) == {"b", "c"} and not c.links


def test_a_follower_takes_the_masters_state_at_the_first_event_of_a_new_term() -> None:
    async def scenario() -> Network:
        network = await two_nodes()
        seq = network.replicas["b"].state.last_event + 1
        network.orders["b"].on_ordered(Ordered(master="a", term=2, seq=seq, origin="a", origin_seq=99,
                                               event=NodeLeft(node_id="b")))
        await asyncio.sleep(0.05)
        return network

    network = asyncio.run(scenario())
    assert network.replicas["b"].applied == [], "not applied on top of what the last term left"
    assert network.replicas["b"].state == network.replicas["a"].state


def graced(network: Network, grace_s: float) -> None:
    for order in network.orders.values():
        order.grace_s = grace_s


def test_a_node_back_within_the_grace_loses_nothing() -> None:
    async def scenario() -> Network:
        network = await two_nodes()
        graced(network, 0.2)
        for node_id in ("a", "b"):
            network.orders[node_id].emit(joined(node_id))
        network.cut.add("b")  # a blip: b's link drops ...
        network.changed("a", left={"b"})
        await asyncio.sleep(0.1)
        network.cut.discard("b")  # ... and comes back within the grace
        network.changed("a")
        await asyncio.sleep(0.3)
        return network

    network = asyncio.run(scenario())
    assert set(network.replicas["a"].state.nodes) == {"a", "b"}
    assert "NodeLeft" not in [type(e).__name__ for e in network.replicas["a"].applied]


def test_a_node_gone_past_the_grace_departs_and_a_flap_restarts_the_grace() -> None:
    async def scenario() -> list[set[str]]:
        network = await two_nodes()
        graced(network, 0.2)
        for node_id in ("a", "b"):
            network.orders[node_id].emit(joined(node_id))
        seen: list[set[str]] = []
        network.cut.add("b")
        network.changed("a", left={"b"})
        await asyncio.sleep(0.15)
        network.cut.discard("b")  # back for a moment, then gone again: 0.2 s from now
        network.changed("a")
        network.cut.add("b")
        network.changed("a", left={"b"})
        await asyncio.sleep(0.1)
        seen.append(set(network.replicas["a"].state.nodes))
        await asyncio.sleep(0.2)
        seen.append(set(network.replicas["a"].state.nodes))
        return seen

    seen = asyncio.run(scenario())
    assert seen == [{"a", "b"}, {"a"}]
