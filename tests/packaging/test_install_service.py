"""`ringlet install-service`: the unit it writes verifies, the service runs this interpreter, and every
obstacle (no systemd, not root, a venv other users cannot read) is reported with its fix."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ringlet.cli import CliError
from ringlet.cli.service import (
    Host,
    ServiceSpec,
    environment_problems,
    exec_quote,
    first_closed_to_others,
    install_unit,
    render_unit,
    unit_path,
)
from tests.support.packaging import REPO, needs_systemd_analyze, unit_directives, verify_unit

ROOT_WITH_SYSTEMD = Host(euid=0, systemctl="/usr/bin/systemctl", systemd_running=True)


def install_service(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringlet", "install-service", *args], check=False,
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)


def exec_start(unit_text: str) -> str:
    return next(value for _, key, value in unit_directives(unit_text) if key == "ExecStart")


@needs_systemd_analyze
def test_dry_run_prints_a_system_unit_that_verifies(tmp_path: Path) -> None:
    result = install_service("--dry-run")
    assert result.returncode == 0, result.stderr
    assert exec_start(result.stdout) == f"{sys.executable} -m ringlet node --api-port 52415"
    assert "would write /etc/systemd/system/ringlet.service" in result.stderr
    verdict = verify_unit(result.stdout, tmp_path)
    assert verdict.clean, verdict


@needs_systemd_analyze
def test_dry_run_user_unit_verifies(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    result = install_service("--user", "--dry-run", "--api-port", "8080", "--engine", "cuda", "--host", "0.0.0.0",
                             env=env)
    assert result.returncode == 0, result.stderr
    assert exec_start(result.stdout) == f"{sys.executable} -m ringlet node --api-port 8080 --host 0.0.0.0"
    assert ("Service", "Environment", "RINGLET_ENGINE=cuda") in unit_directives(result.stdout)
    assert ("Install", "WantedBy", "default.target") in unit_directives(result.stdout)
    assert f"would write {tmp_path}/config/systemd/user/ringlet.service" in result.stderr
    assert "systemctl --user enable --now ringlet.service" in result.stderr
    assert not (tmp_path / "config").exists()  # a dry run changes nothing
    verdict = verify_unit(result.stdout, tmp_path, user=True)
    assert verdict.clean, verdict


def test_bad_options_are_refused() -> None:
    for args in (["--api-port", "70000"], ["--engine", "rocm"]):
        result = install_service("--dry-run", *args)
        assert result.returncode == 2 and "error:" in result.stderr, args


@pytest.mark.skipif(Path("/run/systemd/system").is_dir(),
                    reason="this machine runs systemd: the test would install and start a real service")
def test_without_systemd_it_says_so_and_writes_nothing(tmp_path: Path) -> None:
    result = install_service("--user", env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")})
    assert result.returncode == 2
    assert "systemd is not running here" in result.stderr or "systemctl not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "config").exists()


@needs_systemd_analyze
def test_exec_start_quoting_survives_spaces_and_specifiers(tmp_path: Path) -> None:
    """systemd splits on blanks and expands % (and $, but not in the program path); a venv path with
    them must still start."""
    odd_bin = tmp_path / "my venv 100% $HOME" / "bin"
    odd_bin.mkdir(parents=True)
    (odd_bin / "python").symlink_to(sys.executable)
    unit = render_unit(ServiceSpec(python=odd_bin / "python", user_mode=False))
    assert exec_start(unit).startswith('"') and "100%%" in unit and "$$" not in unit
    verdict = verify_unit(unit, tmp_path)
    assert verdict.clean, verdict  # verify resolves the program: a wrong quote means "not found"


def test_exec_quote_leaves_plain_arguments_alone() -> None:
    assert exec_quote("/opt/ringlet/bin/python") == "/opt/ringlet/bin/python"
    assert exec_quote('a"b') == '"a\\"b"'
    assert exec_quote("$HOME") == "$$HOME" and exec_quote("/x/$y", program=True) == "/x/$y"
    assert exec_quote("") == '""'


def test_system_unit_needs_root() -> None:
    spec = ServiceSpec(python=Path("/opt/ringlet/bin/python"), user_mode=False)
    user = Host(euid=1000, systemctl="/usr/bin/systemctl", systemd_running=True)
    [problem] = environment_problems(spec, user, readable=[])
    assert "needs root" in problem and "sudo /opt/ringlet/bin/python -m ringlet install-service" in problem
    assert "--user" in problem
    user_spec = ServiceSpec(python=spec.python, user_mode=True)
    assert environment_problems(user_spec, user, readable=[]) == []


def test_missing_systemd_is_reported() -> None:
    spec = ServiceSpec(python=Path("/opt/ringlet/bin/python"), user_mode=True)
    no_systemctl = Host(euid=0, systemctl=None, systemd_running=False)
    assert "systemctl not found" in environment_problems(spec, no_systemctl, readable=[])[0]
    container = Host(euid=0, systemctl="/usr/bin/systemctl", systemd_running=False)
    assert "systemd is not running" in environment_problems(spec, container, readable=[])[0]


def test_dynamic_user_must_reach_the_venv() -> None:
    with tempfile.TemporaryDirectory() as scratch:  # pytest's tmp_path sits below a 0700 directory
        check_dynamic_user_reach(Path(scratch))


def check_dynamic_user_reach(tmp_path: Path) -> None:
    home = tmp_path / "home"
    venv_python = home / "alice" / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    venv_python.chmod(0o755)
    for directory in (tmp_path, home, home / "alice", venv_python.parent.parent, venv_python.parent):
        directory.chmod(0o755)
    assert first_closed_to_others(venv_python) is None
    (home / "alice").chmod(0o750)  # Ubuntu's default for home directories
    assert first_closed_to_others(venv_python) == home / "alice"
    spec = ServiceSpec(python=venv_python, user_mode=False)
    [problem] = environment_problems(spec, ROOT_WITH_SYSTEMD, readable=[venv_python])
    assert f"cannot read {venv_python}" in problem and "/opt/ringlet" in problem and "--user" in problem
    assert environment_problems(ServiceSpec(python=venv_python, user_mode=True), ROOT_WITH_SYSTEMD,
                                readable=[venv_python]) == []


def test_unit_paths() -> None:
    assert unit_path(False, {}) == Path("/etc/systemd/system/ringlet.service")
    assert unit_path(True, {"HOME": "/home/alice"}) == Path("/home/alice/.config/systemd/user/ringlet.service")
    assert unit_path(True, {"XDG_CONFIG_HOME": "/cfg", "HOME": "/h"}) == Path("/cfg/systemd/user/ringlet.service")


@pytest.fixture
def recording_systemctl(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for systemctl (systemd cannot run in this container): logs its arguments and
    fails when the environment asks it to."""
    log = tmp_path / "systemctl.log"
    script = tmp_path / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                      'if [ -n "$FAIL_ON" ] && [ "$1 $2" = "$FAIL_ON" ]; then\n'
                      '  echo "Failed to enable unit: Unit file ringlet.service is masked." >&2; exit 1\nfi\n')
    script.chmod(0o755)
    return script, log


def test_install_writes_unit_then_reloads_and_enables(tmp_path: Path, recording_systemctl: tuple[Path, Path]) -> None:
    systemctl, log = recording_systemctl
    spec = ServiceSpec(python=Path(sys.executable), user_mode=True, engine="ipex")
    unit_file = tmp_path / "config" / "systemd" / "user" / "ringlet.service"
    install_unit(spec, unit_file, [str(systemctl)])
    assert unit_file.read_text() == render_unit(spec)
    assert oct(unit_file.stat().st_mode & 0o777) == "0o644"
    assert log.read_text().splitlines() == ["--user daemon-reload", "--user enable --now ringlet.service"]
    install_unit(spec, unit_file, [str(systemctl)])  # running it again replaces the unit in place
    assert [p.name for p in unit_file.parent.iterdir()] == ["ringlet.service"]


def test_install_reports_systemctl_failure(tmp_path: Path, recording_systemctl: tuple[Path, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    systemctl, _ = recording_systemctl
    monkeypatch.setenv("FAIL_ON", "enable --now")
    spec = ServiceSpec(python=Path(sys.executable), user_mode=False)
    unit_file = tmp_path / "ringlet.service"
    with pytest.raises(CliError) as error:
        install_unit(spec, unit_file, [str(systemctl)])
    message = str(error.value)
    assert "enable --now ringlet.service` failed: Failed to enable unit" in message
    assert f"the unit is at {unit_file}" in message and "journalctl -u ringlet.service" in message
