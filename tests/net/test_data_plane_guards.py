"""The data plane's guards: a ring's rendezvous store and its gloo sockets listen on the data host's address
alone; the rendezvous keys sit under a random token that only the cluster learns (a client of the store without it
reads and changes none of them); the API never shows that token; and a frame header announcing more than a frame
may carry stops the ring before anything is allocated for it."""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from ringlet.api.cluster import without_secrets
from ringlet.net.ring import (
    MAX_FRAME_PAYLOAD_BYTES,
    MAX_FRAME_POSITIONS,
    Op,
    Ring,
    RingBrokenError,
    check_frame,
    host_store,
    interface_of,
    join_store,
)
from ringlet.shared.instances import BoundInstance, Instance, InstanceType, Shard
from ringlet.shared.state import InstanceRecord, RingAddress

TWO_STAGES = Instance(instance_id="inst-1", model="m", instance_type=InstanceType.CPU_RING, shards=[
    Shard(node_id="a", rank=0, start=0, end=10, num_layers=20), Shard(node_id="b", rank=1, start=10, end=20, num_layers=20)])


def listening() -> set[tuple[str, int]]:
    """(address, port) of every TCP socket this process listens on, read from /proc."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                address, port = fields[1].split(":")
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # 32-bit words, host order
                    found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def test_the_rendezvous_store_and_the_gloo_ring_listen_on_the_data_host_only() -> None:
    before = listening()
    store, address = host_store("127.0.0.1", 2)
    rings: dict[int, Ring] = {}

    def join(rank: int) -> None:
        member = store if rank == 0 else join_store(address, 2)
        rings[rank] = Ring(BoundInstance(instance=TWO_STAGES, node_id="ab"[rank]), member, "127.0.0.1", 4)

    joiners = [threading.Thread(target=join, args=(rank,)) for rank in (0, 1)]
    for joiner in joiners:
        joiner.start()
    for joiner in joiners:
        joiner.join(timeout=60)
    assert set(rings) == {0, 1}, "both stages joined the ring"
    opened = listening() - before
    assert (("127.0.0.1", address.port)) in opened and len(opened) >= 2, opened  # the store, and gloo's listener
    assert {host for host, _ in opened} == {"127.0.0.1"}, opened
    with pytest.raises(ConnectionRefusedError):  # another address of this machine
        socket.create_connection(("127.0.0.2", address.port), timeout=5).close()
    rings[0].post_payload(Op.BEGIN, b"hello")
    op, _, length, _ = rings[1].recv_frame()
    assert (op, rings[1].recv_payload(length)) == (Op.BEGIN, b"hello")
    rings[0].flush()


def test_nccl_is_told_the_interface_of_the_data_host() -> None:
    import psutil

    loopback = interface_of("127.0.0.1")
    assert loopback is not None and any(a.address == "127.0.0.1" for a in psutil.net_if_addrs()[loopback])
    assert interface_of("192.0.2.77") is None  # TEST-NET-1: no interface of this machine has it


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
