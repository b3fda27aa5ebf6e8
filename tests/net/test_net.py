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
