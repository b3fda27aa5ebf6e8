"""`ringlet info`: this node's hardware, its engines (with reasons and fixes), and the one it would use."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ringlet.cli import CliError, engine_from_environment

if TYPE_CHECKING:
    from ringlet.shared.engine_info import GpuInfo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show this machine's hardware, engines and the engine it would use",
                       description="Show this machine's hardware, which engines can run here (and for the "
                                   "others why not and how to fix it), the engine ringlet would choose, and "
                                   "which pip extra of ringlet suits this hardware.")
    p.add_argument("--engine", default=engine_from_environment(), help="check this engine instead of the automatic choice "
                                                 "(cpu, cuda, ipex, mlx; or set RINGLET_ENGINE)")
    p.add_argument("--json", action="store_true", help="print JSON (hardware, engines, extras)")
    p.set_defaults(func=info)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def info(args: argparse.Namespace) -> int:
    from ringlet.worker.engines.engine_utils import ProbeInputs, detect_available_engines, parse_engine_name
    from ringlet.worker.system_info import (
        collect_engine_info,
        collect_node_hardware,
        get_intel_gpu_info,
        install_notes,
        recommended_extras,
    )

    try:
        parse_engine_name(args.engine or "auto")
    except ValueError as e:
        raise CliError(str(e)) from None
    inputs = ProbeInputs()
    hardware = collect_node_hardware(inputs)
    engines = collect_engine_info(args.engine, inputs)
    statuses = detect_available_engines(inputs)
    intel = get_intel_gpu_info(inputs)
    extras = recommended_extras(hardware, intel)
    notes = install_notes(hardware)
    if args.json:
        json.dump({"hardware": hardware.model_dump(), "engine_info": engines.model_dump(),
                   "engines": [s.model_dump() for s in statuses], "intel_gpu": intel.model_dump(),
                   "recommended_extras": [{"extra": a.extra, "why": a.why, "commands": list(a.commands)}
                                          for a in extras], "install_notes": notes}, sys.stdout, indent=2)
        print()
        return 0 if engines.selected_engine else 1

    cpu = hardware.cpu
    print("Hardware")
    print(f"  system   {hardware.system} {hardware.machine}")
    print(f"  cpu      {cpu.model}, {cpu.physical_cores} cores / {cpu.logical_cores} threads, "
          f"{_gib(cpu.ram_total_bytes)} RAM ({_gib(cpu.ram_available_bytes)} free)")
    print(f"  features {' '.join(cpu.flags) or '-'}")
    for gpu in hardware.gpus:
        print(f"  gpu {gpu.index}    {gpu_line(gpu)}")
    if not hardware.gpus:
        print("  gpu      none usable")
    for device in intel.pci_devices if not intel.available else []:
        print(f"  pci      Intel display device {device} (not usable yet: see ipex below)")
    print(f"  IPEX     {intel.ipex_version or 'not installed'}")

    print("Engines (in the order ringlet prefers them)")
    for status in statuses:
        if status.available:
            note = "" if status.auto_select else "  (only when asked for)"
            print(f"  {status.engine:5} yes  {status.detail}{note}")
        else:
            assert status.problem is not None
            print(f"  {status.engine:5} no   {status.problem.reason}")
            print(f"  {'':5}      fix: {status.problem.fix}")

    wanted = args.engine or "auto"
    if engines.selected_engine:
        print(f"Engine: {engines.selected_engine}" + ("" if wanted == "auto" else f" (asked for: {wanted})"))
    else:
        print(f"Engine: {wanted} cannot run here (see above); available: {', '.join(engines.available_engines)}")
    print("Install (the pip extras of ringlet for this hardware; each one's commands in order)")
    for advice in extras:
        print(f"  {advice.extra:5} {advice.why}")
        for command in advice.commands:
            print(f"  {'':5}   {command}")
    for note in notes:
        print(f"Note: {note}")
    return 0 if engines.selected_engine else 1


def gpu_line(gpu: GpuInfo) -> str:
    """"intel Intel(R) Arc(TM) A770 Graphics, discrete, 16.0 GiB (15.6 GiB free), driver 1.6.31294+21, Level Zero 1.21.9"."""
    kind = {True: "integrated, ", False: "discrete, ", None: ""}[gpu.integrated]
    level_zero = f", Level Zero {gpu.level_zero_version}" if gpu.level_zero_version else ""
    return (f"{gpu.vendor} {gpu.name}, {kind}{_gib(gpu.memory_total_bytes)} ({_gib(gpu.memory_free_bytes)} free), "
            f"driver {gpu.driver or '?'}{level_zero}")
