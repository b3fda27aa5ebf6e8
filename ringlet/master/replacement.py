"""What the master orders when a node leaves: the node goes, and each instance it held a stage of is deleted and
placed again on the nodes that remain, when it still fits. A pure function of the state."""

from __future__ import annotations

from collections.abc import Callable

from ringlet.master.placement import PlacementError, created, place
from ringlet.models.catalog import ModelCard
from ringlet.shared.errors import NodeError
from ringlet.shared.state import Event, InstanceDeleted, NodeLeft, State, apply


def lost_node_events(state: State, node_id: str, card_of: Callable[[str], ModelCard], new_id: Callable[[], str],
                     now: float) -> tuple[list[Event], list[str]]:
    """The events that remove `node_id` and place its instances again, and a line for the log per instance."""
    events: list[Event] = []
    if node_id in state.nodes:
        events.append(NodeLeft(node_id=node_id))
    survivors = list((apply(state, events[0]) if events else state).nodes.values())
    notes = []
    for record in [r for r in state.instances.values() if node_id in r.runners]:
        instance = record.instance
        events.append(InstanceDeleted(instance_id=instance.instance_id))
        try:
            placement = place(card_of(instance.model), instance.instance_type, survivors, instance_id=new_id())
        except (PlacementError, NodeError) as refusal:
            notes.append(f"instance {instance.instance_id} lost node {node_id} and cannot be placed again: {refusal}")
            continue
        events.append(created(placement, now))
        notes.append(f"instance {instance.instance_id} lost node {node_id}; placed again as "
                     f"{placement.instance.instance_id}")
    return events, notes
