"""The data plane's guards: a ring's rendezvous keys sit under a random token that only the cluster learns (a
client of the store without it reads and changes none of them), the API never shows that token, and a frame
header announcing more than a frame may carry stops the ring before anything is allocated for it."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch.distributed as dist

from ringlet.api.cluster import without_secrets
from ringlet.net.ring import (
    MAX_FRAME_PAYLOAD_BYTES,
    MAX_FRAME_POSITIONS,
    Op,
    RingBrokenError,
    check_frame,
    host_store,
    join_store,
)
from ringlet.shared.instances import Instance, InstanceType, Shard
from ringlet.shared.state import InstanceRecord, RingAddress

TWO_STAGES = Instance(instance_id="inst-1", model="m", instance_type=InstanceType.CPU_RING, shards=[
    Shard(node_id="a", rank=0, start=0, end=10, num_layers=20), Shard(node_id="b", rank=1, start=10, end=20, num_layers=20)])


def test_the_rendezvous_keys_are_out_of_reach_without_the_instances_token() -> None:
    store, address = host_store("127.0.0.1", 2)
    assert len(address.token) == 32 and address.token not in repr(address)
    store.set("rank-0-address", "10.0.0.1:1234")
    member = join_store(address, 2)
    assert member.get("rank-0-address") == b"10.0.0.1:1234"
    stranger = dist.TCPStore("127.0.0.1", address.port, 2, is_master=False, timeout=timedelta(seconds=5))
    assert not stranger.check(["rank-0-address"])  # the key is not where a guess would look
    stranger.set("rank-0-address", "6.6.6.6:1")  # nor does writing there change the ring's
    assert member.get("rank-0-address") == b"10.0.0.1:1234"
    other = join_store(RingAddress(host="127.0.0.1", port=address.port, token="0" * 32), 2)
    assert not other.check(["rank-0-address"])


def test_the_api_shows_no_rendezvous_token() -> None:
    record = InstanceRecord(instance=TWO_STAGES, runners={}, created_at=0.0,
                            ring=RingAddress(host="10.0.0.1", port=4000, token="secret-token"))
    shown = without_secrets(record)
    assert shown.ring is not None and shown.ring.token == "" and shown.ring.port == 4000
    assert "secret-token" not in shown.model_dump_json()


@pytest.mark.parametrize("header", [
    (99, 0, 1),  # no such op
    (Op.SAMPLE, 0, MAX_FRAME_POSITIONS + 1),
    (Op.FILL, -1, 4),
    (Op.BEGIN, 0, MAX_FRAME_PAYLOAD_BYTES + 1),
    (Op.BATCH, MAX_FRAME_POSITIONS + 1, 4),
    (Op.BATCH, 12, -1),
])
def test_a_frame_announcing_too_much_breaks_the_ring_before_anything_is_allocated(header) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RingBrokenError, match="frame"):
        check_frame(*header)


def test_the_frames_ringlet_sends_pass() -> None:
    for header in ((Op.SAMPLE, 17, 1), (Op.FILL, 0, 512), (Op.BEGIN, 0, 300), (Op.BATCH, 40, 64), (Op.STOP, 0, 0)):
        check_frame(*header)
