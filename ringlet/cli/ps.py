"""`ringlet ps`: the instances a node knows and the nodes that run them, from its GET /state."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ringlet.cli import CliError
from ringlet.shared.instances import GPU_ENGINES
from ringlet.shared.state import LayerLoad

GIB = 1024**3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ps", help="list instances and nodes of a running node",
                       description="List the instances (model, type, status, requests in flight, idle time since "
                                   "their last request through this node and when keep_alive unloads them, the "
                                   "memory they hold and on which processor, their context window, engines, stages "
                                   "per node) and the nodes.")
    p.add_argument("--url", default="http://localhost:52415", help="the node's API (default http://localhost:52415)")
    p.add_argument("--json", action="store_true", help="print the raw state as JSON")
    p.set_defaults(func=run)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def engine_cell(record: dict[str, Any]) -> str:
    """What each stage runs on: its runner's engine once ready (else the planned one), with any fallback."""
    cells = []
    for shard in record["instance"]["shards"]:
        runner = record["runners"].get(shard["node_id"], {})
        engine = runner.get("engine") or shard["engine"]
        cells.append(f"{engine} ({runner['fallback']})" if runner.get("fallback") else engine)
    return ", ".join(dict.fromkeys(cells))


def stage_engines(record: dict[str, Any]) -> dict[str, str]:
    """Each stage's engine by node id: its runner's once ready, else the planned one."""
    return {shard["node_id"]: record["runners"].get(shard["node_id"], {}).get("engine") or shard["engine"]
            for shard in record["instance"]["shards"]}


def processor_cell(record: dict[str, Any]) -> str:
    """Where the instance's weights are, as `ollama ps` says it: 100% GPU, 100% CPU, or 40%/60% CPU/GPU (the memory
    of the stages on a GPU engine; the stages counted alike while no size is known)."""
    engines = stage_engines(record)
    memory = {node_id: record.get("memory_bytes", {}).get(node_id, 0) for node_id in engines}
    if not sum(memory.values()):
        memory = dict.fromkeys(engines, 1)
    gpu = round(100 * sum(size for node_id, size in memory.items() if engines[node_id] in GPU_ENGINES)
                / sum(memory.values()))
    return {100: "100% GPU", 0: "100% CPU"}.get(gpu, f"{100 - gpu}%/{gpu}% CPU/GPU")


def duration(seconds: float) -> str:
    """12s, 4m, 2h5m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60}m"


def idle_cell(activity: dict[str, Any], tasks: int, now: float) -> str:
    """busy while requests run; else the time since the last one through this node ("-": none yet)."""
    if tasks:
        return "busy"
    last = activity.get("last_request_at")
    return "-" if last is None else duration(now - last)


def until_cell(activity: dict[str, Any], now: float) -> str:
    """How long until keep_alive unloads the instance (4m); forever when no keep_alive is set."""
    expires = activity.get("expires_at")
    return "forever" if expires is None else duration(expires - now)


def instance_settings(instance_id: str, record: dict[str, Any], name: dict[str, str]) -> list[str]:
    """An IpexRing's devices and optimisation level, and what each runner applied to the model."""
    instance, lines = record["instance"], []
    if instance["instance_type"] == "IpexRing":
        devices = instance.get("intel_gpu_devices")
        chosen = ",".join(map(str, devices)) if devices else "the discrete ones"
        lines.append(f"{instance_id}: Intel GPUs {chosen}, optimisation level "
                     f"{instance.get('ipex_optimization_level', 'auto')}")
    for node_id, runner in record["runners"].items():
        if runner.get("optimization"):
            lines.append(f"{instance_id} on {name.get(node_id, node_id)}: {runner['optimization']}")
    return lines


def text_bar(fraction: float, width: int = 10) -> str:
    """[#####.....] for one half."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return f"[{'#' * filled}{'.' * (width - filled)}]"


def loading_status(record: dict[str, Any]) -> str:
    """loading [#####.....] 12/30 layers, 0.45/1.1 GiB; every layer loaded, what the runners do next (warming up);
    a state without layer counts: loading 40%."""
    if record.get("load") is None:
        return f"loading {record['progress']:.0%}"
    load = LayerLoad.model_validate(record["load"])
    status = f"loading {text_bar(load.fraction)} {load.describe()}"
    after = sorted({r["detail"] for r in record.get("runners", {}).values()
                    if r.get("status") == "loading" and r.get("detail") and not r["detail"].startswith("load")})
    return status + (f"; {', '.join(after)}" if after and load.layers_loaded >= load.layers_total else "")


def format_state(state: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    nodes = state["nodes"]
    name = {node_id: n["name"] for node_id, n in nodes.items()}
    instance_rows, settings = [], []
    for instance_id, record in state["instances"].items():
        instance = record["instance"]
        stages = []
        for shard in instance["shards"]:
            runner = record["runners"].get(shard["node_id"], {})
            pid = f" pid {runner['pid']}" if runner.get("pid") else ""
            split = "".join(f" xpu:{d['device']}[{d['start']}:{d['end']}]" for d in shard.get("devices") or [])
            if instance.get("tensor_parallel", 1) > 1:  # each stage over that many GPUs of its node
                split += f" x{instance['tensor_parallel']}"
            stages.append(f"{name.get(shard['node_id'], shard['node_id'])}[{shard['start']}:{shard['end']}]{split}"
                          f"{pid}")
        status = record["status"]
        if status == "loading":
            status = loading_status(record)
        tasks = sum(1 for t in state["tasks"].values() if t["instance_id"] == instance_id)
        contexts = [r["context_length"] for r in record["runners"].values() if r.get("context_length")]
        size = sum(record.get("memory_bytes", {}).values())
        activity = state.get("activity", {}).get(instance_id, {})
        instance_rows.append([instance_id, instance["model"], instance["instance_type"], status, str(tasks),
                              idle_cell(activity, tasks, now), until_cell(activity, now),
                              f"{size / GIB:.2f} GiB" if size else "-", processor_cell(record),
                              str(min(contexts)) if contexts else "-", engine_cell(record), ", ".join(stages)])
        settings += instance_settings(instance_id, record, name)
    node_rows = [[node_id, n["name"], ",".join(n["engines"]["available_engines"]),
                  str(n["engines"]["selected_engine"]), f"{n['memory']['available_bytes'] / GIB:.1f} GiB"]
                 for node_id, n in nodes.items()]
    failed = [f"{instance_id}: {record['error']}" for instance_id, record in state["instances"].items()
              if record.get("error")]
    parts = [_table(["INSTANCE", "MODEL", "TYPE", "STATUS", "TASKS", "IDLE", "UNTIL", "SIZE", "PROCESSOR", "CONTEXT",
                     "ENGINE", "STAGES"], instance_rows)
             if instance_rows else "no instances",
             "",
             _table(["NODE", "NAME", "ENGINES", "SELECTED", "FREE MEMORY"], node_rows)]
    if settings:
        parts += ["", "settings and optimisations:", *settings]
    if failed:
        parts += ["", "errors:", *failed]
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    from ringlet.cli.client import NodeApiError, NodeClient

    try:
        state = NodeClient(args.url, timeout_s=10).get("/state")
    except NodeApiError as error:
        raise CliError(str(error)) from None
    print(json.dumps(state, indent=2) if args.json else format_state(state))
    return 0
