"""The per-accelerator pip extras: `ringlet[cpu]`, `[cuda]`, `[xpu]`, `[ipex]`, `[mlx]`.

ACCELERATOR_EXTRAS is what pyproject.toml must declare; the tests check that it does, that the
markers pick the right packages per platform, and (opt-in, it needs PyPI) that pip resolves each
extra together with ringlet's own dependencies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.packaging import REPO

ACCELERATOR_EXTRAS: dict[str, list[str]] = {
    # torch, a base dependency, is all a CPU needs; docs/install.md shows PyTorch's CPU-only index
    "cpu": [],
    # torch wheels from PyPI already carry CUDA on Linux; NVML reports GPU memory and utilisation
    "cuda": ["nvidia-ml-py>=12"],
    # torch with XPU kernels comes from PyTorch's XPU index (docs/install.md); 2.8 brings the xccl backend
    "xpu": ["torch>=2.8"],
    # IPEX x.y runs only on torch x.y; IPEX stopped at 2.8 (wheels for Python 3.10-3.13)
    "ipex": ["torch==2.8.*", "intel-extension-for-pytorch==2.8.*"],
    # mlx-lm needs mlx only on macOS; on Linux mlx runs on the CPU back end of mlx-cpu (mlx[cpu] pins it)
    "mlx": ["mlx>=0.26.5; sys_platform == 'darwin'", "mlx[cpu]>=0.26.5; sys_platform == 'linux'", "mlx-lm>=0.26"],
}

LINUX = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11"}
MACOS = {"sys_platform": "darwin", "platform_system": "Darwin", "python_version": "3.11"}


def declared_extras() -> dict[str, list[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project.get("optional-dependencies", {})


def normalised(requirements: list[str]) -> set[str]:
    return {str(Requirement(r)) for r in requirements}


def test_pyproject_declares_the_accelerator_extras() -> None:
    declared = declared_extras()
    for extra, requirements in ACCELERATOR_EXTRAS.items():
        assert extra in declared, f"pyproject.toml lacks the extra {extra!r}"
        assert normalised(declared[extra]) == normalised(requirements), extra


def installed_on(extra: str, environment: dict[str, str]) -> dict[str, Requirement]:
    wanted = [Requirement(r) for r in ACCELERATOR_EXTRAS[extra]]
    return {str(canonicalize_name(r.name)): r for r in wanted if r.marker is None or r.marker.evaluate(environment)}


def test_mlx_extra_per_platform() -> None:
    linux, macos = installed_on("mlx", LINUX), installed_on("mlx", MACOS)
    assert set(linux) == set(macos) == {"mlx", "mlx-lm"}
    assert linux["mlx"].extras == {"cpu"}  # pulls mlx-cpu of the same version
    assert macos["mlx"].extras == set()  # mlx brings mlx-metal itself on macOS


def test_ipex_pins_torch_to_its_own_minor_version() -> None:
    pins = {str(canonicalize_name(r.name)): str(r.specifier) for r in map(Requirement, ACCELERATOR_EXTRAS["ipex"])}
    assert pins["torch"] == pins["intel-extension-for-pytorch"] == "==2.8.*"
    # Intel's GPU build of IPEX 2.8 is versioned 2.8.10+xpu and must satisfy the same pin
    assert Requirement(ACCELERATOR_EXTRAS["ipex"][1]).specifier.contains("2.8.10+xpu")


def test_extras_leave_base_torch_requirement_satisfiable() -> None:
    """Each extra's torch pin must overlap ringlet's own `torch>=...`, or no install could satisfy both."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    [base_torch] = [Requirement(r) for r in project["dependencies"] if canonicalize_name(Requirement(r).name) == "torch"]
    for extra in ACCELERATOR_EXTRAS:
        torch_pin = installed_on(extra, LINUX).get("torch")
        if torch_pin is not None:
            for candidate in ("2.8.0", "2.8.0+xpu", "2.9.1"):
                if torch_pin.specifier.contains(candidate):
                    assert base_torch.specifier.contains(candidate), (extra, candidate)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RINGLET_TEST_PYPI") != "1",
                    reason="resolving against PyPI needs the network; tests only talk to loopback unless "
                           "RINGLET_TEST_PYPI=1")
@pytest.mark.parametrize("extra", sorted(ACCELERATOR_EXTRAS))
def test_extra_resolves_with_pip(extra: str, tmp_path: Path) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), *project["dependencies"], *ACCELERATOR_EXTRAS[extra]]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    chosen = {str(canonicalize_name(item["metadata"]["name"])): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    for name, requirement in installed_on(extra, LINUX).items():
        assert name in chosen, f"{extra}: pip did not pick {name}"
        assert requirement.specifier.contains(chosen[name], prereleases=True), (extra, name, chosen[name])
    if extra == "mlx":
        assert chosen["mlx-cpu"] == chosen["mlx"]
