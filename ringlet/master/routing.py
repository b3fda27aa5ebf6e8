"""Which instance a request goes to: the least busy ready instance of its model. A pure function of the state."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from ringlet.models.catalog import ModelCard
from ringlet.shared.errors import NoInstanceError
from ringlet.shared.state import InstanceRecord, RunnerStatus, State


def create_instance_hint(model: str) -> str:
    return (f"create one with POST /instance {{\"model\": \"{model}\", \"instance_type\": \"CpuRing\"}} "
            f"(or from the dashboard), or start the node with `ringlet node --model {model}`")


def route(state: State, model: str, resolve: Callable[[str], ModelCard], here: str, clustered: bool,
          busy: Mapping[str, int], gone: Collection[str] = ()) -> InstanceRecord:
    """The ready instance a task for `model` goes to: the one of the model with the fewest tasks in flight (`busy`,
    by instance id), or the instance whose id `model` is. Without a cluster only instances whose first stage is
    `here` can be reached; none with a stage on a node that is `gone` (in the state, not live: within the grace
    before its instances are placed again). Raises ModelNotFoundError (from `resolve`) or NoInstanceError saying
    what to do."""
    if model in state.instances:
        return _usable(model, [state.instances[model]], here, clustered, busy, gone)
    card = resolve(model)
    return _usable(card.id, state.instances_of(card.id), here, clustered, busy, gone)


def _usable(model: str, records: list[InstanceRecord], here: str, clustered: bool,
            busy: Mapping[str, int], gone: Collection[str]) -> InstanceRecord:
    ready = [r for r in records if r.status == RunnerStatus.READY]
    reachable = [r for r in ready if (clustered or r.instance.shards[0].node_id == here)
                 and not any(node_id in gone for node_id in r.runners)]
    if reachable:
        return min(reachable, key=lambda r: busy.get(r.instance.instance_id, 0))
    waiting = [(r, n) for r in ready for n in r.runners if n in gone]
    if waiting:
        record, node_id = waiting[0]
        raise NoInstanceError(f"instance {record.instance.instance_id} of {model} has a stage on node {node_id}, "
                              "which is gone; it is placed again on the other nodes unless that node comes back "
                              "within a few seconds; retry then", loading=True)
    if ready:
        first = ready[0].instance.shards[0].node_id
        raise NoInstanceError(f"the instances of {model} start on other nodes (first stage on {first}); "
                              "forwarding requests between nodes needs the cluster control plane, which is "
                              "not active in this node")
    loading = [r for r in records if r.status == RunnerStatus.LOADING]
    if loading:
        r = loading[0]
        raise NoInstanceError(f"instance {r.instance.instance_id} of {r.instance.model} is still loading "
                              f"({r.progress:.0%}); retry in a few seconds", loading=True)
    if records:
        failed = records[0]
        raise NoInstanceError(f"instance {failed.instance.instance_id} of {failed.instance.model} has failed "
                              f"({failed.error}); delete it (DELETE /instance/{failed.instance.instance_id}) "
                              "and " + create_instance_hint(failed.instance.model))
    raise NoInstanceError(f"no instance of {model} is running; " + create_instance_hint(model))
