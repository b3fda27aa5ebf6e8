"""What the master orders when a node leaves: the node goes, and each instance it held a stage of is deleted and
placed again on the nodes that remain, when it still fits; and when a ring's stage died or hung while serving: the
ring is deleted and formed again, on the same nodes where they are all there. Pure functions of the state."""

from __future__ import annotations

from collections.abc import Callable

from ringlet.master.placement import InstanceOptions, PlacementError, created, place
from ringlet.models.catalog import ModelCard
from ringlet.shared.errors import NodeError
from ringlet.shared.instances import Instance
from ringlet.shared.state import Event, InstanceDeleted, NodeInfo, NodeLeft, State, apply

CardOf = Callable[[str], ModelCard]


def lost_node_events(state: State, node_id: str, card_of: CardOf, new_id: Callable[[], str],
                     now: float) -> tuple[list[Event], list[str]]:
    """The events that remove `node_id` and place its instances again, and a line for the log per instance."""
    events: list[Event] = []
    if node_id in state.nodes:
        events.append(NodeLeft(node_id=node_id))
    survivors = list((apply(state, events[0]) if events else state).nodes.values())
    notes = []
    for record in [r for r in state.instances.values() if node_id in r.runners]:
        again, note = _placed_again(record.instance, survivors, None, card_of, new_id, now,
                                    f"lost node {node_id}")
        events.extend(again)
        notes.append(note)
    return events, notes


def reform_events(state: State, instance_id: str, card_of: CardOf, new_id: Callable[[], str],
                  now: float) -> tuple[list[Event], str]:
    """The events that form a failed ring again (deleted, and placed anew on its nodes, or where it fits when one
    of them is gone), and a line for the log."""
    instance = state.instances[instance_id].instance
    ring = [s.node_id for s in instance.shards]
    node_ids = ring if all(n in state.nodes for n in ring) else None
    return _placed_again(instance, list(state.nodes.values()), node_ids, card_of, new_id, now, "failed")


def _placed_again(instance: Instance, nodes: list[NodeInfo], node_ids: list[str] | None, card_of: CardOf,
                  new_id: Callable[[], str], now: float, why: str) -> tuple[list[Event], str]:
    try:
        placement = place(card_of(instance.model), instance.instance_type, nodes, instance_id=new_id(),
                          node_ids=node_ids, options=InstanceOptions.of(instance))
    except (PlacementError, NodeError) as refusal:
        return ([InstanceDeleted(instance_id=instance.instance_id)],
                f"instance {instance.instance_id} {why} and cannot be placed again: {refusal}")
    again = placement.instance.instance_id
    return ([InstanceDeleted(instance_id=instance.instance_id, replaced_by=again), created(placement, now)],
            f"instance {instance.instance_id} {why}; placed again as {again}")
