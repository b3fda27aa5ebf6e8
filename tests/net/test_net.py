"""The control plane on its own: two real zenoh sessions on loopback see each other's tokens and messages."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel, TypeAdapter

from ringlet.net import topics
from ringlet.net.membership import Member, Membership
from ringlet.net.session import ControlPlane, NetOptions, check_endpoint
from tests.support.processes import free_port


class Ping(BaseModel):
    n: int


def test_member_token_round_trip_and_bad_keys() -> None:
    assert topics.parse_member_token(topics.member_token("node-a", 12.345)) == ("node-a", 12.345)
    with pytest.raises(ValueError, match="not a member token"):
        topics.parse_member_token("ringlet/members/node-a")


def test_endpoint_check_says_what_is_expected() -> None:
    assert check_endpoint("tcp/127.0.0.1:52414") == "tcp/127.0.0.1:52414"
    with pytest.raises(ValueError, match="tcp/HOST:PORT"):
        check_endpoint("127.0.0.1:52414")


async def until(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_two_sessions_see_members_messages_and_departures() -> None:
    asyncio.run(_two_sessions())


async def _two_sessions() -> None:
    port = free_port()
    a = ControlPlane(NetOptions(listen=[f"tcp/127.0.0.1:{port}"], discovery=False))
    b = ControlPlane(NetOptions(listen=[f"tcp/127.0.0.1:{free_port()}"], connect=[f"tcp/127.0.0.1:{port}"],
                                discovery=False))
    changes: list[tuple[set[str], set[str]]] = []
    ma = Membership(a, Member(node_id="node-a", started_at=1.0), lambda j, l: changes.append((j, l)))
    Membership(b, Member(node_id="node-b", started_at=2.0), lambda j, l: None)
    await until(lambda: "node-b" in ma)
    got: list[int] = []
    a.subscribe("ringlet/test/ping", TypeAdapter(Ping), lambda key, m: got.append(m.n))
    await asyncio.sleep(0.3)  # the subscription reaches b
    b.publish("ringlet/test/ping", Ping(n=1))
    b.publish_once("ringlet/test/ping", Ping(n=2))
    await until(lambda: got == [1, 2])
    b.close()
    await until(lambda: "node-b" not in ma)
    assert changes == [({"node-b"}, set()), (set(), {"node-b"})]
    a.close()


def test_only_peers_with_the_clusters_secret_connect_and_strangers_see_and_change_nothing() -> None:
    asyncio.run(_secured_sessions())


async def _secured_sessions() -> None:
    secret = bytes(range(32))
    port = free_port()
    a = ControlPlane(NetOptions(listen=[f"tcp/127.0.0.1:{port}"], discovery=False, secret=secret))
    heard: list[int] = []
    a.subscribe("ringlet/**", TypeAdapter(Ping), lambda key, m: heard.append(m.n))
    strangers = [ControlPlane(NetOptions(listen=[], connect=[f"tcp/127.0.0.1:{port}"], discovery=False, secret=s))
                 for s in (None, bytes(32))]  # plain TCP, and TLS with another cluster's secret
    friend = ControlPlane(NetOptions(listen=[], connect=[f"tcp/127.0.0.1:{port}"], discovery=False, secret=secret))
    seen_by_strangers: list[list[int]] = [[], []]
    for stranger, seen in zip(strangers, seen_by_strangers, strict=True):
        stranger.subscribe("ringlet/**", TypeAdapter(Ping), lambda key, m, seen=seen: seen.append(m.n))
    await until(lambda: friend.peers() == [a.zid])
    await asyncio.sleep(1.0)  # the subscriptions settle; a stranger's would have connected by now
    for n, stranger in enumerate(strangers):
        stranger.publish("ringlet/test/ping", Ping(n=100 + n))
        assert stranger.peers() == []
    a.publish("ringlet/test/ping", Ping(n=1))  # heard by a itself too
    friend.publish("ringlet/test/ping", Ping(n=2))
    await until(lambda: 2 in heard)
    await asyncio.sleep(0.5)
    # each stranger heard its own message only; nobody heard the strangers'
    assert sorted(heard) == [1, 2] and seen_by_strangers == [[100], [101]] and a.peers() == [friend.zid]
    for session in (*strangers, friend, a):
        session.close()


def test_a_cluster_token_round_trips_and_a_bad_one_says_what_it_should_be(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ringlet.net.trust import cluster_secret, secret_of, token_of

    created = cluster_secret(tmp_path)
    path = tmp_path / "cluster.key"
    assert path.stat().st_mode & 0o777 == 0o600 and cluster_secret(tmp_path) == created
    assert secret_of(token_of(created)) == created and len(token_of(created)) == len("ringlet1-") + 43
    other = bytes(32)
    assert cluster_secret(tmp_path, token_of(other)) == other == cluster_secret(tmp_path)  # joining keeps the key
    for bad in ("", "ringlet1-short", token_of(other)[:-2], "ringlet2-" + token_of(other)[9:]):
        with pytest.raises(ValueError, match="not a ringlet cluster token.*ringlet cluster token"):
            secret_of(bad)
    path.chmod(0o644)
    cluster_secret(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_message_over_the_size_limit_is_dropped_and_the_link_stays() -> None:
    asyncio.run(_oversized())


async def _oversized() -> None:
    from ringlet.net.session import MAX_MESSAGE_BYTES

    class Blob(BaseModel):
        data: str

    port = free_port()
    a = ControlPlane(NetOptions(listen=[f"tcp/127.0.0.1:{port}"], discovery=False, secret=bytes(range(32))))
    b = ControlPlane(NetOptions(listen=[], connect=[f"tcp/127.0.0.1:{port}"], discovery=False, secret=bytes(range(32))))
    sizes: list[int] = []
    a.subscribe("ringlet/test/blob", TypeAdapter(Blob), lambda key, m: sizes.append(len(m.data)))
    await until(lambda: b.peers() == [a.zid])
    await asyncio.sleep(0.5)
    for size in (10, MAX_MESSAGE_BYTES + 1, 20):
        b.publish("ringlet/test/blob", Blob(data="x" * size))
    await until(lambda: 20 in sizes)
    assert sizes == [10, 20] and b.peers() == [a.zid]
    b.close()
    a.close()
