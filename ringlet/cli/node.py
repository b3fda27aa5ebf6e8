"""`ringlet node`: run this machine's node, serving the API and dashboard (and the embedded model) on :52415."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, get_args
from urllib.parse import urlsplit

from ringlet.cli import CliError, engine_from_environment
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import EngineType, IpexOptimizationLevel

if TYPE_CHECKING:
    from ringlet.node import InstanceOptions


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "node", help="run a node: API, dashboard and the default model on http://localhost:52415",
        description="Run this machine's node: the OpenAI- and Ollama-compatible API, the dashboard, and (unless "
                    "--no-default-instance) an instance of the default model.")
    p.add_argument("--api-port", type=int, default=52415, help="HTTP port of the API and dashboard (default 52415)")
    p.add_argument("--ollama-port", type=int, nargs="?", const=11434, default=None, metavar="PORT",
                   help="also serve the API on this port (alone: Ollama's 11434), for tools with a fixed Ollama URL")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 serves your LAN, "
                        "with --api-key)")
    p.add_argument("--node-name", default=socket.gethostname(), help="name shown in the dashboard (default: hostname)")
    p.add_argument("--model", default=None,
                   help="model of the default instance: a catalog id, a model directory, a GGUF file, or a model "
                        "pulled with Ollama (llama3.2:1b) (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--engine", choices=get_args(EngineType), default=None,
                   help="engine for this node (default: $RINGLET_ENGINE, else the best available)")
    p.add_argument("--max-context", type=int, default=None, metavar="TOKENS",
                   help="context window of the default instance (capped by the model's own; default: the model's "
                        "own, capped by what the memory left after the weights holds); more takes more memory for "
                        "the KV cache")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="GPUS",
                   help="split the default instance's model over this many GPUs of this node by tensor parallelism "
                        "(--engine cuda: one process a GPU, NCCL between them; --engine ipex: xccl; --engine cpu: "
                        "processes, for testing); "
                        "its weights stay bf16 (default: 1, no split)")
    intel = p.add_argument_group("Intel GPU", "How the default instance runs where it is an IpexRing (--engine ipex, "
                                              "or an Intel GPU detected).")
    intel.add_argument("--intel-gpu-devices", default=None, metavar="INDEXES",
                       help="the XPU devices it may run on, e.g. 0 or 0,1 (default: the discrete Intel GPUs; the "
                            "integrated one where there is no other)")
    intel.add_argument("--ipex-optimization-level", choices=get_args(IpexOptimizationLevel), default="auto",
                       help="ipex: intel-extension-for-pytorch's optimize; compile: torch.compile; eager: neither; "
                            "auto (default): IPEX where a matching version imports, else torch.compile")
    p.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                   help="a directory whose models the API may load by path (repeatable); beyond it only the model "
                        "store, RINGLET_MODEL_DIRS and --model are loaded: any other path is a 404")
    p.add_argument("--no-default-instance", action="store_true",
                   help="start without an instance; create one later (dashboard, or POST /instance)")
    access = p.add_argument_group(
        "API access", "Who may call the API: a key (required on every endpoint but /health where one is set), the "
                      "names the node answers to, and the web sites that may use it from a browser.")
    access.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help="require 'Authorization: Bearer KEY' (repeatable; also $RINGLET_API_KEY, keys separated "
                             "by commas)")
    access.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a name this node answers to beyond localhost, its host name and its addresses (e.g. a "
                             "reverse proxy's name; repeatable)")
    access.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="a web site whose pages may call this API from a browser, e.g. https://chat.example.org "
                             "(repeatable; the node's own dashboard always may)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest request body accepted, in bytes (default 4 MiB)")
    cluster = p.add_argument_group(
        "cluster", "Nodes on one LAN find each other by multicast scouting; elsewhere name a peer with --connect.")
    cluster.add_argument("--connect", action="append", default=[], metavar="tcp/HOST:PORT",
                         help="a peer to connect to, e.g. tcp/192.168.1.20:52414 (repeatable)")
    cluster.add_argument("--listen", default=None, metavar="tcp/HOST:PORT",
                         help="where the control plane listens (default tcp/0.0.0.0:52414); with a specific address, "
                              "also where other nodes reach this one's stages of split models")
    cluster.add_argument("--join", default=None, metavar="TOKEN",
                         help="join the cluster whose token this is (`ringlet cluster token` on one of its nodes "
                              "prints it; or set RINGLET_CLUSTER_KEY); kept for later starts. Without it the node "
                              "uses the key in ~/.ringlet/cluster.key, creating one (a new cluster) if there is none")
    cluster.add_argument("--no-discovery", action="store_true", default=discovery_off_by_env(),
                         help="do not look for peers on the LAN (multicast scouting); only --connect peers join "
                              "(or set RINGLET_DISCOVERY=off)")
    p.set_defaults(func=run)


def discovery_off_by_env() -> bool:
    return os.environ.get("RINGLET_DISCOVERY", "on").strip().lower() in ("0", "off", "false", "no")


def check_endpoints(endpoints: list[str]) -> list[str]:
    from ringlet.net.session import check_endpoint

    try:
        return [check_endpoint(e) for e in endpoints]
    except ValueError as error:
        raise CliError(str(error)) from None


def instance_options(devices: str | None, level: IpexOptimizationLevel, max_context: int | None = None,
                     tensor_parallel: int = 1) -> InstanceOptions:
    """--intel-gpu-devices (indexes separated by commas), --ipex-optimization-level, --max-context and
    --tensor-parallel, checked."""
    from pydantic import ValidationError

    from ringlet.node import InstanceOptions

    try:
        indexes = None if devices is None else tuple(int(i) for i in devices.split(","))
    except ValueError:
        raise CliError(f"--intel-gpu-devices {devices!r}: write device indexes separated by commas, e.g. 0 or 0,1"
                       ) from None
    try:
        return InstanceOptions(intel_gpu_devices=indexes, ipex_optimization_level=level, max_context=max_context,
                               tensor_parallel=tensor_parallel)
    except ValidationError as error:
        field = {"max_context": "--max-context", "tensor_parallel": "--tensor-parallel"}.get(
            str(error.errors()[0]["loc"][0]), "--intel-gpu-devices")
        raise CliError(f"{field}: {error.errors()[0]['msg']}") from None


def engine_choice(requested: str | None) -> EngineType | None:
    """--engine, or $RINGLET_ENGINE (an alias like xpu allowed), or None for the best available."""
    from ringlet.worker.engines.engine_utils import parse_engine_name

    try:
        return parse_engine_name(requested or engine_from_environment() or "auto")
    except ValueError as error:
        raise CliError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    from ringlet.api.security import API_KEY_ENV, keys_from
    from ringlet.models.store import ringlet_home
    from ringlet.net.trust import CLUSTER_KEY_ENV, cluster_secret
    from ringlet.node import NodeOptions, NodeStartError, serve

    if not 0 < args.api_port < 65536:
        raise CliError(f"--api-port must be 1..65535, got {args.api_port}")
    for directory in args.models_dir:
        if not os.path.isdir(os.path.expanduser(directory)):
            raise CliError(f"--models-dir {directory!r} is not a directory")
    for origin in args.allow_origin:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
            raise CliError(f"--allow-origin {origin!r} is not a web origin; write it as a browser does, e.g. "
                           "https://chat.example.org or http://192.168.1.5:3000")
    try:
        config = EngineConfig.from_environment(os.environ)
        secret = cluster_secret(ringlet_home(), args.join or os.environ.get(CLUSTER_KEY_ENV))
    except ValueError as error:
        raise CliError(str(error)) from None
    options = NodeOptions(
        name=args.node_name, host=args.host, api_port=args.api_port, ollama_port=args.ollama_port, model=args.model,
        engine=engine_choice(args.engine), engine_config=config,
        default_instance=not args.no_default_instance, max_body_bytes=args.max_body_bytes,
        connect=tuple(check_endpoints(args.connect)), listen=args.listen and check_endpoints([args.listen])[0],
        discovery=not args.no_discovery, api_keys=keys_from(args.api_key, os.environ.get(API_KEY_ENV)),
        allow_hosts=tuple(args.allow_host), allow_origins=tuple(args.allow_origin), cluster_secret=secret,
        models_dirs=tuple(args.models_dir),
        instance_options=instance_options(args.intel_gpu_devices, args.ipex_optimization_level, args.max_context,
                                          args.tensor_parallel),
    )
    try:
        with asyncio.Runner(loop_factory=_fast_event_loop()) as runner:
            runner.run(serve(options))
    except NodeStartError as error:
        raise CliError(str(error)) from None
    return 0


def _fast_event_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (not on Windows); else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
