"""A zenoh session for one node: configuration from the node's options, typed publish/subscribe, membership.

zenoh calls back on its own threads; every callback here is handed to the node's asyncio loop, so the node's
code runs on one thread and needs no locks. Peers find each other by multicast scouting on the LAN (on by
default) or by explicit `--connect tcp/HOST:PORT` endpoints; once connected, gossip tells each peer of the others.
Every link is mutual TLS with identities derived from the cluster's secret (`net/trust.py`): a peer without the
secret, found by scouting or connecting itself, fails the handshake and sees nothing. A peer that scouting finds
but that stays unconnected is logged once, as refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import zenoh
from pydantic import BaseModel, TypeAdapter

from ringlet.net.trust import zenoh_tls
from ringlet.shared.wire import BadMessageError, decode, encode

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_ZENOH_PORT = 52414
# a peer that stops answering is dropped after this long: a link that stalls for less (a Wi-Fi hiccup) changes
# nothing; a peer that closes its connection (a process that exits or is killed) is dropped at once
LEASE_MS = 10_000
# the largest message a peer may send: a forwarded request with a prompt at the API's default body limit (4 MiB) fits
# with room; anything larger is dropped on arrival, the link staying up
MAX_MESSAGE_BYTES = 16 << 20
# a peer found by scouting that is not connected this long after is taken as refused (a member connects within ~1 s)
REFUSED_AFTER_S = 5.0


class ControlPlaneError(RuntimeError):
    """The control plane cannot start as configured; the message says what to change."""


DEFAULT_LISTEN = (f"tcp/0.0.0.0:{DEFAULT_ZENOH_PORT}",)


@dataclass(frozen=True)
class NetOptions:
    listen: Sequence[str] = DEFAULT_LISTEN
    connect: Sequence[str] = ()
    discovery: bool = True  # multicast scouting on the LAN
    # the cluster's secret (net/trust.py): every link is mutual TLS with identities derived from it, so a peer
    # without it cannot connect; None: plain TCP (a test's own sessions)
    secret: bytes | None = field(default=None, repr=False)


def check_endpoint(endpoint: str) -> str:
    """`tcp/HOST:PORT` (or udp/quic); raises ValueError saying what a valid one looks like."""
    proto, _, address = endpoint.partition("/")
    host, _, port = address.rpartition(":")
    if proto not in ("tcp", "udp", "quic", "tls") or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{endpoint!r} is not a zenoh endpoint; expected tcp/HOST:PORT, e.g. tcp/192.168.1.20:52414")
    return endpoint


def secured(endpoint: str, secret: bytes | None) -> str:
    """The endpoint as the link runs it: a tcp/ endpoint becomes tls/ where the cluster has a secret."""
    check_endpoint(endpoint)
    return "tls/" + endpoint.removeprefix("tcp/") if secret is not None and endpoint.startswith("tcp/") else endpoint


def zenoh_config(options: NetOptions) -> zenoh.Config:
    config = zenoh.Config()
    config.insert_json5("mode", '"peer"')
    config.insert_json5("listen/endpoints", json.dumps([secured(e, options.secret) for e in options.listen]))
    config.insert_json5("connect/endpoints", json.dumps([secured(e, options.secret) for e in options.connect]))
    if options.secret is not None:
        config.insert_json5("transport/link/tls", json.dumps(zenoh_tls(options.secret)))
    config.insert_json5("scouting/multicast/enabled", json.dumps(options.discovery))
    config.insert_json5("scouting/gossip/enabled", "true")
    config.insert_json5("transport/link/tx/lease", str(LEASE_MS))
    config.insert_json5("transport/link/rx/max_message_size", str(MAX_MESSAGE_BYTES))
    # the timestamps let peers order what they hear; not needed by ringlet's own ordering (the master's sequence)
    config.insert_json5("timestamping/enabled", "false")
    return config


def _scouting_config(options: NetOptions) -> zenoh.Config:
    config = zenoh.Config()
    config.insert_json5("scouting/multicast/enabled", json.dumps(options.discovery))
    return config


def _open(options: NetOptions) -> zenoh.Session:
    try:
        return zenoh.open(zenoh_config(options))
    except zenoh.ZError as error:
        if tuple(options.listen) == DEFAULT_LISTEN and "in use" in str(error):
            # another node on this machine has the default port: peers still find this one by scouting
            log.warning("zenoh port %d is taken (another node on this machine?); listening on a free port",
                        DEFAULT_ZENOH_PORT)
            return zenoh.open(zenoh_config(replace(options, listen=("tcp/0.0.0.0:0",))))
        raise ControlPlaneError(f"cannot start the control plane ({error}); check --listen/--connect, or pick "
                                "another --listen port if another node runs on this machine") from None


class ControlPlane:
    """One node's zenoh session. Create it inside the running event loop that should receive callbacks."""

    def __init__(self, options: NetOptions) -> None:
        self._loop = asyncio.get_running_loop()
        self._session = _open(options)
        self._declared: list[Any] = []  # subscribers, queryables, tokens: undeclared on close
        self._publishers: dict[str, zenoh.Publisher] = {}
        self._scouted: set[str] = set()  # zenoh ids of peers scouting found, each checked once
        self._scout: Any = None  # a zenoh.Scout
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="answer")  # `answer`'s handlers
        if options.discovery and options.secret is not None:
            # zenoh's stubs pick their first overload (channels) for a callback, which it does take
            self._scout = zenoh.scout(self._on_hello, what="peer",  # type: ignore[arg-type]
                                      config=_scouting_config(options))

    @property
    def zid(self) -> str:
        return str(self._session.zid())

    def peers(self) -> list[str]:
        return [str(z) for z in self._session.info.peers_zid()]

    def publish(self, key: str, message: BaseModel) -> None:
        publisher = self._publishers.get(key)
        if publisher is None:
            publisher = self._publishers[key] = self._session.declare_publisher(
                key, congestion_control=zenoh.CongestionControl.BLOCK, reliability=zenoh.Reliability.RELIABLE)
        publisher.put(encode(message))

    def publish_once(self, key: str, message: BaseModel) -> None:
        """For keys used once (a task's stream): no publisher is kept."""
        self._session.put(key, encode(message), congestion_control=zenoh.CongestionControl.BLOCK)

    def subscribe(self, key: str, adapter: TypeAdapter[T], on_message: Callable[[str, T], object]) -> zenoh.Subscriber:
        """Call `on_message(key, message)` on the event loop for every valid message on `key` (may be a pattern)."""

        def on_sample(sample: zenoh.Sample) -> None:
            topic = str(sample.key_expr)
            try:
                message = decode(adapter, sample.payload.to_bytes(), topic)
            except BadMessageError as error:
                log.warning("%s; ignored (a peer running another ringlet version?)", error)
                return
            self._call_soon(on_message, topic, message)

        subscriber = self._session.declare_subscriber(key, on_sample)
        self._declared.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: zenoh.Subscriber) -> None:
        if subscriber in self._declared:
            self._declared.remove(subscriber)
        subscriber.undeclare()

    def announce(self, key: str) -> zenoh.LivelinessToken:
        """A liveliness token: peers see it until the session closes or `withdraw` takes it back, then see it go."""
        token = self._session.liveliness().declare_token(key)
        self._declared.append(token)
        return token

    def withdraw(self, token: zenoh.LivelinessToken) -> None:
        if token in self._declared:
            self._declared.remove(token)
            token.undeclare()

    def watch_liveliness(self, pattern: str, on_change: Callable[[str, bool], None]) -> None:
        """`on_change(key, alive)` for every token under `pattern`, starting with those alive now."""

        def on_sample(sample: zenoh.Sample) -> None:
            self._call_soon(on_change, str(sample.key_expr), sample.kind == zenoh.SampleKind.PUT)

        self._declared.append(self._session.liveliness().declare_subscriber(pattern, on_sample, history=True))

    def serve(self, key: str, answer: Callable[[], BaseModel]) -> None:
        """Answer queries on `key` with `answer()`, computed on the zenoh thread (it must only read)."""

        def on_query(query: zenoh.Query) -> None:
            query.reply(key, encode(answer()))

        self._declared.append(self._session.declare_queryable(key, on_query))

    def answer(self, key: str, adapter: TypeAdapter[T], handle: Callable[[T], BaseModel]) -> None:
        """Answer each query on `key` that carries a valid message with `handle(message)`, run on a worker thread (it
        may wait on the disk); a query with anything else gets no answer, and a warning is logged."""

        def respond(query: zenoh.Query, message: T) -> None:
            try:
                query.reply(key, encode(handle(message)))
            finally:
                query.drop()  # the query's final reply: the asker stops waiting

        def on_query(query: zenoh.Query) -> None:
            payload = query.payload
            try:
                message = decode(adapter, payload.to_bytes() if payload is not None else b"", key)
            except BadMessageError as error:
                log.warning("%s; ignored", error)
                query.drop()
                return
            self._workers.submit(respond, query, message)

        self._declared.append(self._session.declare_queryable(key, on_query))

    async def request(self, key: str, message: BaseModel, adapter: TypeAdapter[T], timeout_s: float = 10.0) -> T | None:
        """Send `message` to the queryable on `key`; its answer, or None when none came within `timeout_s`."""

        def query() -> T | None:
            for reply in self._session.get(key, payload=encode(message), timeout=timeout_s):
                if reply.ok is None:
                    continue
                try:
                    return decode(adapter, reply.ok.payload.to_bytes(), key)
                except BadMessageError as error:
                    log.warning("%s; ignored", error)
            return None

        return await asyncio.to_thread(query)

    async def ask(self, key: str, adapter: TypeAdapter[T], timeout_s: float = 3.0) -> list[T]:
        """Query `key`; the valid replies."""

        def query() -> list[T]:
            answers = []
            for reply in self._session.get(key, timeout=timeout_s):
                if reply.ok is None:
                    continue
                try:
                    answers.append(decode(adapter, reply.ok.payload.to_bytes(), key))
                except BadMessageError as error:
                    log.warning("%s; ignored", error)
            return answers

        return await asyncio.to_thread(query)

    def _on_hello(self, hello: zenoh.Hello) -> None:
        """A peer answered scouting (on zenoh's thread): if it is not connected a moment later, it was refused."""
        zid = str(hello.zid)
        if zid != self.zid and zid not in self._scouted:
            self._scouted.add(zid)
            where = ", ".join(str(locator) for locator in hello.locators)
            self._call_soon(lambda: self._loop.call_later(REFUSED_AFTER_S, self._check_scouted, zid, where))

    def _check_scouted(self, zid: str, where: str) -> None:
        if not self._loop.is_closed() and zid not in self.peers():
            log.warning("refused zenoh peer %s at %s: it does not hold this node's cluster key (to put it in this "
                        "cluster, start it with `ringlet node --join TOKEN`, the TOKEN that `ringlet cluster token` "
                        "prints here)", zid, where)

    def _call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    def close(self) -> None:
        if self._scout is not None:
            self._scout.stop()
            self._scout = None
        for entity in reversed(self._declared):
            entity.undeclare()
        self._declared.clear()
        for publisher in self._publishers.values():
            publisher.undeclare()
        self._publishers.clear()
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._session.close()


def advertised_host(options: NetOptions) -> str:
    """The address other nodes reach this one at, for the data plane: the --listen host when it names one; the
    loopback when every peer is on it (tests, several nodes on one machine); else the address of the interface
    that routes to the LAN (a UDP socket's connect sends nothing)."""
    hosts = [e.partition("/")[2].rpartition(":")[0].strip("[]") for e in options.listen]
    named = [h for h in hosts if h not in ("0.0.0.0", "::", "")]
    if named:
        return named[0]
    peers = [e.partition("/")[2].rpartition(":")[0].strip("[]") for e in options.connect]
    if peers and all(p.startswith("127.") or p in ("::1", "localhost") for p in peers):
        return "127.0.0.1"
    target = peers[0] if peers else "224.0.0.224"  # zenoh's scouting group: the LAN interface routes to it
    with socket.socket(socket.AF_INET6 if ":" in target else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((target, 7))
            return str(probe.getsockname()[0])
        except OSError:
            log.warning("no route to %s: the data plane of multi-node instances listens on the loopback only; "
                        "pass --listen tcp/ADDRESS:PORT with this node's LAN address", target)
            return "127.0.0.1"
