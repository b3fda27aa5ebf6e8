"""`ringlet install-service`: run `ringlet node` under systemd, system-wide or for one user.

The unit starts this very interpreter (`python -m ringlet node`), so whatever venv ringlet was installed
into is the one the service uses. `--dry-run` prints the unit and changes nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from ringlet.cli import CliError
from ringlet.shared.instances import EngineType

UNIT_NAME = "ringlet.service"
DEFAULT_API_PORT = 52415
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")

# Hardening that leaves GPUs and JIT compilers working. Left out on purpose: PrivateDevices= and
# ProtectClock= (the latter adds a DeviceAllow= rule, which turns on the device allow-list and hides
# /dev/dri and /dev/nvidia*), MemoryDenyWriteExecute= (torch/oneDNN/Triton JIT need W+X pages),
# SystemCallFilter= (GPU user-space drivers use unusual ioctls and syscalls).
SYSTEM_HARDENING: tuple[tuple[str, str], ...] = (
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "read-only"),  # read-only, not yes: the venv may live in a home directory
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectHostname", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("RestrictRealtime", "yes"),
    ("RestrictNamespaces", "yes"),
    ("LockPersonality", "yes"),
    ("SystemCallArchitectures", "native"),
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK"),  # netlink: interface discovery
    ("CapabilityBoundingSet", ""),
    ("UMask", "0077"),
)


@dataclass(frozen=True)
class ServiceSpec:
    python: Path  # the interpreter as invoked (a venv's bin/python, not its resolved target)
    user_mode: bool
    api_port: int = DEFAULT_API_PORT
    engine: EngineType | None = None
    host: str | None = None  # None: ringlet node's default, this machine only

    def node_argv(self) -> list[str]:
        argv = [str(self.python), "-m", "ringlet", "node", "--api-port", str(self.api_port)]
        return argv + (["--host", self.host] if self.host is not None else [])


@dataclass(frozen=True)
class Host:
    """What install-service needs to know about the machine it runs on."""

    euid: int
    systemctl: str | None
    systemd_running: bool  # sd_booted(): /run/systemd/system exists only under systemd as PID 1

    @classmethod
    def current(cls) -> Host:
        return cls(euid=os.geteuid(), systemctl=shutil.which("systemctl"),
                   systemd_running=Path("/run/systemd/system").is_dir())


def exec_quote(arg: str, *, program: bool = False) -> str:
    """Quote one ExecStart= word: systemd splits on blanks, expands %specifiers everywhere and $VARS
    in the arguments (never in the program path)."""
    escaped = arg.replace("%", "%%") if program else arg.replace("%", "%%").replace("$", "$$")
    if escaped and not any(c.isspace() or c in "\"'\\;" for c in escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(spec: ServiceSpec) -> str:
    lines = [
        "# ringlet node as a systemd service. Written by `ringlet install-service`; run it again to update.",
        "[Unit]",
        "Description=ringlet node: pools this machine's accelerators into a ringlet LLM cluster",
    ]
    if not spec.user_mode:  # a user manager cannot order itself after the system's network-online
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += ["", "[Service]", "Type=exec",
              "ExecStart=" + " ".join(exec_quote(a, program=i == 0) for i, a in enumerate(spec.node_argv())),
              "Environment=PYTHONUNBUFFERED=1"]
    if spec.engine is not None:
        lines.append(f"Environment=RINGLET_ENGINE={spec.engine}")
    if not spec.user_mode:
        lines += [
            # %S is /var/lib, %C is /var/cache; HOME too, so that libraries caching under ~ stay inside
            "Environment=RINGLET_HOME=%S/ringlet",
            "Environment=HOME=%S/ringlet",
            "Environment=XDG_CACHE_HOME=%C/ringlet",
            "DynamicUser=yes",
            "StateDirectory=ringlet",
            "CacheDirectory=ringlet",
            "WorkingDirectory=%S/ringlet",
            # Intel GPUs: /dev/dri/renderD* belongs to group render, /dev/dri/card* to video
            "SupplementaryGroups=render video",
        ]
    lines += [
        "Restart=on-failure",
        "RestartSec=5",
        # SIGTERM to the node only: it stops its runner processes and leaves the cluster itself
        "KillMode=mixed",
        "TimeoutStopSec=30",
    ]
    if spec.user_mode:
        lines.append("NoNewPrivileges=yes")  # most sandboxing needs a system manager
    else:
        lines += [f"{key}={value}" for key, value in SYSTEM_HARDENING]
    lines += ["", "[Install]", f"WantedBy={'default.target' if spec.user_mode else 'multi-user.target'}", ""]
    return "\n".join(lines)


def unit_path(user_mode: bool, env: Mapping[str, str]) -> Path:
    if not user_mode:
        return SYSTEM_UNIT_DIR / UNIT_NAME
    config_home = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", str(Path.home()))) / ".config")
    return Path(config_home) / "systemd" / "user" / UNIT_NAME


def first_closed_to_others(path: Path) -> Path | None:
    """The first directory on the way to `path` that other users cannot enter, or `path` itself if they
    cannot read it; None when an unrelated user can reach it."""
    for directory in reversed(path.parents):
        if not directory.stat().st_mode & stat.S_IXOTH:
            return directory
    needed = stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0)
    return None if path.stat().st_mode & needed == needed else path


def paths_the_service_reads(python: Path) -> list[Path]:
    """The venv, the base interpreter and ringlet's own source: a dynamic user must reach all of them."""
    ringlet_package = Path(__file__).resolve().parents[1]
    return [Path(sys.prefix), Path(os.path.realpath(python)), Path(sys.base_prefix), ringlet_package]


def environment_problems(spec: ServiceSpec, host: Host, readable: Sequence[Path]) -> list[str]:
    """What would stop the unit from being installed or from starting, each with its fix."""
    problems = []
    if host.systemctl is None:
        problems.append("systemctl not found: this system does not use systemd; start `ringlet node` with your "
                        "init system, or see docs/install.md")
    elif not host.systemd_running:
        problems.append("systemd is not running here (no /run/systemd/system; a container or another init?); "
                        "start `ringlet node` directly, or install the service on the host")
    if not spec.user_mode:
        if host.euid != 0:
            problems.append(f"writing {SYSTEM_UNIT_DIR} needs root: run `sudo {spec.python} -m ringlet "
                            "install-service`, or `ringlet install-service --user` for a service of your own")
        for path in readable:
            closed = first_closed_to_others(path)
            if closed is not None:
                problems.append(f"the service's unprivileged dynamic user cannot read {path} ({closed} is closed "
                                "to other users); install ringlet into a world-readable venv such as /opt/ringlet "
                                "(docs/install.md), or use --user")
                break
    return problems


def install_unit(spec: ServiceSpec, unit_file: Path, systemctl: Sequence[str]) -> None:
    """Write the unit atomically, then reload systemd and enable and start the service."""
    unit_file.parent.mkdir(parents=True, exist_ok=True)
    staging = unit_file.with_name(unit_file.name + ".tmp")
    staging.write_text(render_unit(spec))
    staging.chmod(0o644)
    staging.replace(unit_file)
    scope = ["--user"] if spec.user_mode else []
    for action in (["daemon-reload"], ["enable", "--now", UNIT_NAME]):
        command = [*systemctl, *scope, *action]
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            journal = f"journalctl {'--user ' if spec.user_mode else ''}-u {UNIT_NAME}"
            detail = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
            raise CliError(f"`{' '.join(command)}` failed: {detail}; the unit is at {unit_file}; "
                           f"see `{journal}`")


def port_number(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("install-service", help="run `ringlet node` as a systemd service",
                       description="Write a systemd unit that runs `ringlet node` with this Python environment, "
                                   "then enable and start it. System-wide by default (needs root; state in "
                                   "/var/lib/ringlet), or for your user with --user (state in ~/.ringlet).")
    p.add_argument("--user", action="store_true", help="a per-user service (systemctl --user); no root needed")
    p.add_argument("--dry-run", action="store_true", help="print the unit and where it would go; change nothing")
    p.add_argument("--api-port", type=port_number, default=DEFAULT_API_PORT,
                   help=f"port of the API and dashboard (default {DEFAULT_API_PORT})")
    p.add_argument("--host", default=None,
                   help="address the API serves on (default: ringlet node's, 127.0.0.1; 0.0.0.0 serves your LAN, "
                        "and the API has no authentication)")
    p.add_argument("--engine", choices=get_args(EngineType), default=None,
                   help="pin the engine (sets RINGLET_ENGINE); default: the best one available")
    p.set_defaults(func=install_service)


def install_service(args: argparse.Namespace) -> int:
    spec = ServiceSpec(python=Path(os.path.abspath(sys.executable)), user_mode=args.user,
                       api_port=args.api_port, engine=args.engine, host=args.host)
    unit_file = unit_path(spec.user_mode, os.environ)
    host = Host.current()
    problems = environment_problems(spec, host, paths_the_service_reads(spec.python))
    scope = "--user " if spec.user_mode else ""
    if args.dry_run:
        sys.stdout.write(render_unit(spec))
        for problem in problems:
            print(f"warning: {problem}", file=sys.stderr)
        print(f"dry run: would write {unit_file}, then run `systemctl {scope}daemon-reload` and "
              f"`systemctl {scope}enable --now {UNIT_NAME}`", file=sys.stderr)
        return 0
    if problems:
        raise CliError(problems[0])
    assert host.systemctl is not None  # environment_problems reports a missing systemctl
    install_unit(spec, unit_file, [host.systemctl])
    print(f"installed {unit_file}; ringlet node is starting (API on {spec.host or '127.0.0.1'}:{spec.api_port})")
    print(f"  status: systemctl {scope}status {UNIT_NAME}")
    print(f"  logs:   journalctl {scope}-u {UNIT_NAME} -f")
    if spec.user_mode:
        print("  to keep it running after you log out: loginctl enable-linger $USER")
    return 0
