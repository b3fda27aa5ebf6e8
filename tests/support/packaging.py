"""Helpers for the packaging tests: the Nix evaluator and systemd's unit verifier, both real tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
NIX_STUB = REPO / "tests" / "packaging" / "nixpkgs_stub"

NIX_INSTANTIATE = shutil.which("nix-instantiate")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

needs_nix = pytest.mark.skipif(
    NIX_INSTANTIATE is None,
    reason="nix-instantiate is missing; install Debian's nix-bin: apt-get update && apt-get install -y nix-bin")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is missing; install Debian's systemd: apt-get update && apt-get install -y systemd")


def nix(*args: str) -> subprocess.CompletedProcess[str]:
    assert NIX_INSTANTIATE is not None
    # nix-instantiate wants a writable state directory (or a daemon) even for pure evaluation
    own_state = Path(tempfile.gettempdir()) / f"ringlet-test-nix-state-{os.getuid()}"
    env = {**os.environ, "NIX_STATE_DIR": os.environ.get("NIX_STATE_DIR", str(own_state))}
    return subprocess.run([NIX_INSTANTIATE, *args], check=False, capture_output=True, text=True, env=env, timeout=120)


def nix_eval_json(file: Path, **args: str) -> Any:
    """Evaluate a Nix file strictly; `args` are Nix expressions passed with --arg."""
    arg_flags = [flag for name, expr in args.items() for flag in ("--arg", name, expr)]
    result = nix("--eval", "--strict", "--json", str(file), *arg_flags)
    assert result.returncode == 0, f"nix evaluation of {file} failed:\n{result.stderr}"
    return json.loads(result.stdout)


@dataclass(frozen=True)
class Verdict:
    returncode: int
    complaints: list[str]  # lines of systemd-analyze's output that name the unit under test

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and not self.complaints


def verify_unit(unit_text: str, directory: Path, *, user: bool = False, name: str = "ringlet.service") -> Verdict:
    """Run `systemd-analyze verify` on a unit. It exits 0 on unknown keys and bad values, only warning
    about them, so every output line that mentions the unit counts as a complaint too."""
    assert SYSTEMD_ANALYZE is not None
    unit_file = directory / name
    unit_file.write_text(unit_text)
    env = dict(os.environ)
    command = [SYSTEMD_ANALYZE]
    if user:
        runtime_dir = directory / "runtime"  # a user manager needs XDG_RUNTIME_DIR, even to verify
        runtime_dir.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime_dir)
        command.append("--user")
    command += ["verify", "--man=no", str(unit_file)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=60)
    output = (result.stdout + result.stderr).splitlines()
    return Verdict(result.returncode, [line for line in output if name in line or str(unit_file) in line])


def unit_directives(unit_text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every directive, in order; comments and blank lines dropped."""
    directives = []
    section = ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        directives.append((section, key.strip(), value.strip()))
    return directives
