"""The node's keep-alive bookkeeping, without processes: an instance goes once idle past its keep-alive (never while
a request runs on it), a request without keep_alive leaves an instance without one alone and gives one with one
Ollama's default again, and a negative keep-alive keeps it."""

from __future__ import annotations

import time

from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.node import DEFAULT_KEEP_ALIVE_S, Node
from ringlet.shared.instances import InstanceType
from ringlet.shared.state import NodeJoined, TaskRecord
from tests.support.node_infos import node_info


def node_serving() -> tuple[Node, str]:
    node = Node(node_info("a", 8))
    node.emit(NodeJoined(node=node.info))
    record = node.create_instance(EMBEDDED_MODEL_ID, InstanceType.CPU_RING, node_ids=[node.node_id], save=False)
    return node, record.instance.instance_id


def test_an_instance_goes_once_idle_past_its_keep_alive_and_not_while_it_serves() -> None:
    node, instance = node_serving()
    node.keep_alive(instance, 10)
    now = time.monotonic()
    assert node.expire_idle(now) == []
    node.tasks["t"] = TaskRecord(task_id="t", instance_id=instance, model=EMBEDDED_MODEL_ID, origin_node_id="a",
                                 submitted_at=time.time())
    assert node.expire_idle(now + 11) == [], "a request runs on it"
    node.tasks.clear()
    assert node.expire_idle(now + 11) == [instance] and instance not in node.state.instances


def test_keep_alive_not_given_negative_or_zero() -> None:
    node, instance = node_serving()
    now = time.monotonic()
    node.keep_alive(instance, None)
    assert node.expire_idle(now + 1e6) == [], "an instance without a keep-alive stays"
    node.keep_alive(instance, 5)
    node.keep_alive(instance, None)
    assert node.expire_idle(now + DEFAULT_KEEP_ALIVE_S - 5) == [], "Ollama's default again, not the 5 s"
    node.keep_alive(instance, -1)
    assert node.expire_idle(now + 1e6) == []
    node.keep_alive(instance, 0)
    assert node.expire_idle(time.monotonic()) == [instance]
