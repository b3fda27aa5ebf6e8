"""packaging/systemd/ringlet.service (the unit for Linux without Nix) passes `systemd-analyze verify`,
and says the same as the unit `ringlet install-service` writes."""

from __future__ import annotations

import sys
from pathlib import Path

from ringlet.cli.service import ServiceSpec, render_unit
from tests.support.packaging import REPO, needs_systemd_analyze, unit_directives, verify_unit

STATIC_UNIT = REPO / "packaging" / "systemd" / "ringlet.service"
DOCUMENTED_EXEC = "/opt/ringlet/bin/ringlet"


def static_unit_running(executable: str) -> str:
    """The shipped unit with its ExecStart pointed at an executable that exists on this machine
    (systemd-analyze refuses a unit whose program is missing)."""
    text = STATIC_UNIT.read_text()
    assert f"ExecStart={DOCUMENTED_EXEC} node" in text
    return text.replace(f"ExecStart={DOCUMENTED_EXEC} ", f"ExecStart={executable} ")


@needs_systemd_analyze
def test_static_unit_verifies(tmp_path: Path) -> None:
    verdict = verify_unit(static_unit_running(sys.executable), tmp_path)
    assert verdict.clean, verdict


@needs_systemd_analyze
def test_verifier_catches_mistakes(tmp_path: Path) -> None:
    """systemd-analyze exits 0 on an unknown key; the helper must still see it. A missing program fails."""
    misspelt = static_unit_running(sys.executable).replace("Restart=on-failure", "Restat=on-failure")
    assert not verify_unit(misspelt, tmp_path).clean
    missing_program = static_unit_running(str(tmp_path / "no-such-ringlet"))
    assert verify_unit(missing_program, tmp_path).returncode != 0


def test_static_unit_is_what_install_service_writes() -> None:
    """Same directives in the same order; only the program differs (console script vs python -m)."""
    rendered = render_unit(ServiceSpec(python=Path("/opt/ringlet/bin/python"), user_mode=False))
    static = [d for d in unit_directives(STATIC_UNIT.read_text()) if d[1] != "ExecStart"]
    assert static == [d for d in unit_directives(rendered) if d[1] != "ExecStart"]
    exec_static = next(d[2] for d in unit_directives(STATIC_UNIT.read_text()) if d[1] == "ExecStart")
    exec_rendered = next(d[2] for d in unit_directives(rendered) if d[1] == "ExecStart")
    assert exec_static.removeprefix(DOCUMENTED_EXEC) == exec_rendered.removeprefix("/opt/ringlet/bin/python -m ringlet")


def test_static_unit_state_user_and_restart() -> None:
    directives = {(section, key): value for section, key, value in unit_directives(STATIC_UNIT.read_text())
                  if key != "Environment"}
    environment = [value for _, key, value in unit_directives(STATIC_UNIT.read_text()) if key == "Environment"]
    assert directives[("Service", "DynamicUser")] == "yes"
    assert directives[("Service", "StateDirectory")] == "ringlet"
    assert directives[("Service", "Restart")] == "on-failure"
    assert "RINGLET_HOME=%S/ringlet" in environment
    assert directives[("Install", "WantedBy")] == "multi-user.target"
    # these would hide /dev/dri and /dev/nvidia* or break JIT compilers (comments in the unit say why)
    for absent in ("PrivateDevices", "ProtectClock", "MemoryDenyWriteExecute", "DeviceAllow", "SystemCallFilter"):
        assert ("Service", absent) not in directives
