"""Start a node: detect this machine, start the state and the runners, create the default instance, serve the API."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import uuid
from dataclasses import dataclass, field

import uvicorn

from ringlet.api.app import create_app
from ringlet.api.limits import DEFAULT_MAX_BODY_BYTES
from ringlet.master.placement import PlacementError
from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.net.session import DEFAULT_LISTEN, ControlPlaneError, NetOptions, advertised_host
from ringlet.node.cluster import ClusterLink
from ringlet.node.errors import NodeError
from ringlet.node.node import Node, read_memory
from ringlet.shared.instances import EngineType, InstanceType
from ringlet.shared.state import NodeInfo

log = logging.getLogger("ringlet.node")

DEFAULT_API_PORT = 52415
DEFAULT_HOST = "127.0.0.1"
# the instance type that runs a single-node instance on each engine
ENGINE_INSTANCE_TYPE: dict[EngineType, InstanceType] = {
    "cpu": InstanceType.CPU_RING, "cuda": InstanceType.CUDA_RING, "ipex": InstanceType.IPEX_RING,
    "mlx": InstanceType.MLX_RING,
}


class NodeStartError(Exception):
    """The node cannot start as asked; the message says what to change."""


@dataclass(frozen=True)
class NodeOptions:
    name: str = field(default_factory=socket.gethostname)
    host: str = DEFAULT_HOST
    api_port: int = DEFAULT_API_PORT
    model: str | None = None  # None: the embedded model
    engine: EngineType | None = None  # None: the best available
    default_instance: bool = True
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # the control plane: zenoh endpoints to connect to and listen on, and multicast scouting on the LAN
    connect: tuple[str, ...] = ()
    listen: str | None = None  # None: tcp/0.0.0.0:52414 (a free port when another node has it)
    discovery: bool = True

    @property
    def net(self) -> NetOptions:
        return NetOptions(listen=(self.listen,) if self.listen else DEFAULT_LISTEN, connect=self.connect,
                          discovery=self.discovery)


def detect_node(options: NodeOptions) -> NodeInfo:
    from ringlet.worker.system_info import collect_engine_info, collect_node_hardware

    return NodeInfo(node_id=f"node-{uuid.uuid4().hex[:12]}", name=options.name, hardware=collect_node_hardware(),
                    engines=collect_engine_info(options.engine), memory=read_memory(), api_port=options.api_port)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise NodeStartError(f"cannot listen on {host}:{port} ({error.strerror}); is another node running? "
                             "pick another port with --api-port") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def create_default_instance(node: Node, options: NodeOptions) -> None:
    engine = options.engine or node.engine_info.selected_engine or "cpu"
    instance_type = ENGINE_INSTANCE_TYPE[engine]
    model = options.model or EMBEDDED_MODEL_ID
    try:
        record = node.create_instance(model, instance_type, node_ids=[node.node_id])
    except (NodeError, PlacementError) as error:
        raise NodeStartError(f"cannot serve {model} as {instance_type.value}: {error}; start with "
                             "--no-default-instance to run the node without it") from None
    log.info("serving %s as %s (instance %s); it is loading in a runner process", record.instance.model,
             instance_type.value, record.instance.instance_id)


def _let_serving_end_on_signals() -> None:
    """uvicorn stops on SIGINT/SIGTERM, then raises the signal again for the handler it found: with the default
    one the process would die there, before the runners are stopped. A handler that only logs lets serve()
    return, so the node shuts down in order and exits 0."""
    if threading.current_thread() is not threading.main_thread():
        return  # uvicorn only listens to signals in the main thread either
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _: log.info("%s: stopping", signal.Signals(signum).name))


async def serve(options: NodeOptions) -> None:
    try:
        net = options.net
        data_host = advertised_host(net)
    except ValueError as error:
        raise NodeStartError(str(error)) from None
    sock = bind(options.host, options.api_port)
    info = await asyncio.to_thread(detect_node, options)
    node = Node(info, data_host=data_host)
    cluster = ClusterLink(node, net)
    node.attach_cluster(cluster)
    try:
        await cluster.start()
    except ControlPlaneError as error:
        sock.close()
        raise NodeStartError(str(error)) from None
    await node.start()
    try:
        try:
            await cluster.wait_joined()
        except TimeoutError as error:
            raise NodeStartError(str(error)) from None
        if options.default_instance:
            create_default_instance(node, options)
        app = create_app(node, max_body_bytes=options.max_body_bytes)
        shown = "localhost" if options.host in ("127.0.0.1", "::1") else options.host
        log.info("node %s (%s): dashboard http://%s:%d/  OpenAI API http://%s:%d/v1  engine %s", info.name,
                 info.node_id, shown, options.api_port, shown, options.api_port, info.engines.selected_engine)
        if options.host == DEFAULT_HOST:
            log.info("listening on this machine only; --host 0.0.0.0 serves the LAN (the API has no authentication)")
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
        _let_serving_end_on_signals()
        await server.serve(sockets=[sock])
    finally:
        await node.stop()
        cluster.close()
        sock.close()
