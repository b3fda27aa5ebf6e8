"""Messages on every wire: validated JSON tagged by type; garbage (a pickle, an unknown tag) is refused."""

from __future__ import annotations

import pytest

from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance, Instance, Shard
from ringlet.shared.messages import (
    FROM_RUNNER,
    ORDERED,
    STREAM_ITEM,
    TO_RUNNER,
    CancelTask,
    Chunk,
    LoadShard,
    Ordered,
    TaskFailed,
)
from ringlet.shared.state import MasterChanged, RingAddress, RingHosted
from ringlet.shared.tasks import GenerationChunk
from ringlet.shared.wire import BadMessageError, decode, encode


def test_messages_are_validated_json_and_garbage_is_refused() -> None:
    message = Ordered(master="a", term=1, seq=3, origin="b", origin_seq=7, event=MasterChanged(node_id="a"))
    assert decode(ORDERED, encode(message), "t") == message
    with pytest.raises(BadMessageError, match="malformed message on t"):
        decode(ORDERED, b"\x80\x04\x95 pickle bytes", "t")
    with pytest.raises(BadMessageError):  # seq 0 is no place in the order
        decode(ORDERED, b'{"type": "ordered", "master": "a", "seq": 0, "origin": "a", "origin_seq": 1, '
                        b'"event": {"type": "master_changed", "node_id": "a"}}', "t")


def test_one_vocabulary_for_the_runner_and_the_nodes() -> None:
    """The runner reports its ring as the state event itself; chunks and failures read the same on both wires."""
    hosted = RingHosted(instance_id="i", address=RingAddress(host="127.0.0.1", port=4000))
    assert decode(FROM_RUNNER, encode(hosted), "runner") == hosted
    failed = TaskFailed(task_id="t", kind="context_window", error="too long")
    chunk = Chunk(chunk=GenerationChunk(task_id="t", text="hi"))
    for item in (failed, chunk):
        assert decode(STREAM_ITEM, encode(item), "stream") == item
        assert decode(FROM_RUNNER, encode(item), "runner") == item
    assert decode(TO_RUNNER, encode(CancelTask(task_id="t")), "stdin") == CancelTask(task_id="t")
    with pytest.raises(BadMessageError):  # an error kind outside the vocabulary
        decode(STREAM_ITEM, encode(TaskFailed(task_id="t", kind="engine", error="x")).replace(b'"engine"', b'"oops"'),
               "stream")


def test_the_load_message_carries_the_engine_config() -> None:
    bound = BoundInstance(instance=Instance(instance_id="i", model="m", instance_type="CpuRing",
                                            shards=[Shard(node_id="n", rank=0, start=0, end=2, num_layers=2)]),
                          node_id="n")
    load = LoadShard(bound=bound, config=EngineConfig(precision="int4", max_context=2048, cpu_compile=False))
    assert decode(TO_RUNNER, encode(load), "stdin") == load
