"""The install advice ringlet prints (probe fixes, `ringlet info`'s extras) agrees with docs/install.md, and never
offers `ringlet[xpu]` as the way to an XPU PyTorch while pyproject's [xpu] extra cannot install one."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from ringlet.shared.engine_info import CpuInfo, GpuInfo, IntelGpuInfo, NodeHardware
from ringlet.worker.engines import engine_utils
from ringlet.worker.engines.engine_utils import detect_available_engines, probe_cuda, probe_ipex
from ringlet.worker.system_info import install_notes, recommended_extras
from tests.support.xpu import INTEL_ARC_ON_BUS, FakeXpu, probes

ROOT = Path(__file__).resolve().parents[3]
INSTALL_DOC = (ROOT / "docs" / "install.md").read_text()
# a command runs to the end of the advice or to a ';', ',' or '(': prose after it must be set off by one of them
COMMAND = re.compile(r"pip install(?: (?:'[^']*'|[^\s;,()']+))+")
XPU_INDEX = "https://download.pytorch.org/whl/xpu"
NVIDIA_ON_BUS = [("0000:04:00.0", "0x10de", "0x030200", "nvidia")]


def commands(text: str) -> list[str]:
    return COMMAND.findall(text)


def literal_advice() -> list[str]:
    """Every string literal in the modules that give advice that names a pip command, reachable here or not;
    not docstrings, and not the pieces of an f-string (its value is checked where it is given)."""
    found = []
    for module in ("ringlet/worker/engines/engine_utils.py", "ringlet/worker/system_info.py"):
        tree = ast.parse((ROOT / module).read_text())
        skip = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
        skip |= {id(node.body[0].value) for node in ast.walk(tree)
                 if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and node.body
                 and isinstance(node.body[0], ast.Expr)}
        found += [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and id(node) not in skip
                  and isinstance(node.value, str) and "pip install" in node.value]
    return found


def hardware(gpus: list[GpuInfo], flags: list[str], system: str = "Linux", chip: str | None = None) -> NodeHardware:
    cpu = CpuInfo(model="x", physical_cores=8, logical_cores=16, flags=flags, ram_total_bytes=1, ram_available_bytes=1)
    return NodeHardware(system=system, machine="arm64" if chip else "x86_64", cpu=cpu, gpus=gpus, apple_chip=chip)


def given_advice(tmp_path: Path) -> list[str]:
    """The fixes the probes give over fake machines, and `ringlet info`'s extras and notes for each kind of node,
    each advice as one text (an extra's commands joined in their order)."""
    fixes = [probe_ipex(probes(tmp_path / "1", None, INTEL_ARC_ON_BUS, native_torch=True)),
             probe_ipex(probes(tmp_path / "2", None)),
             probe_ipex(probes(tmp_path / "3", FakeXpu(available=False), INTEL_ARC_ON_BUS)),
             probe_ipex(probes(tmp_path / "4", FakeXpu(count_error=RuntimeError("no driver")), INTEL_ARC_ON_BUS)),
             probe_cuda(probes(tmp_path / "5", None, NVIDIA_ON_BUS)),
             *detect_available_engines(probes(tmp_path / "6", None))]
    nvidia = GpuInfo(vendor="nvidia", index=0, name="H100", memory_total_bytes=1)
    intel_on_bus = IntelGpuInfo(available=False, pci_devices=["0000:03:00.0 8086:56a0 (i915)"])
    nodes = [(hardware([], [], "Darwin", "Apple M3 Max"), IntelGpuInfo(available=False)),
             (hardware([nvidia], ["avx2"]), IntelGpuInfo(available=False)),
             (hardware([], ["avx2"]), intel_on_bus),
             (hardware([], ["avx512_bf16", "amx_bf16"]), IntelGpuInfo(available=False)),
             (hardware([], ["asimd"], "Darwin"), IntelGpuInfo(available=False))]
    extras = [advice for node, intel in nodes for advice in recommended_extras(node, intel)]
    notes = [note for node, _ in nodes for note in install_notes(node)]
    return ([s.problem.fix for s in fixes if s.problem is not None] + notes
            + ["; ".join(advice.commands) for advice in extras])


def test_advice_is_gathered_from_every_kind_of_node(tmp_path: Path) -> None:
    advice = " ".join(given_advice(tmp_path))
    for expected in ("--force-reinstall torch --index-url", "'ringlet[xpu]'", "'ringlet[ipex]'", "'ringlet[cuda]'",
                     "'ringlet[mlx]'", "whl/cpu", "libze", "ringlet bench --engine ipex-cpu"):
        assert expected in advice


def test_every_pip_command_the_code_suggests_is_in_docs_install_md(tmp_path: Path) -> None:
    suggested = {c for text in given_advice(tmp_path) + literal_advice() for c in commands(text)}
    assert len(suggested) >= 8, suggested
    missing = sorted(c for c in suggested if c not in INSTALL_DOC)
    assert missing == [], f"advice that docs/install.md does not give: {missing}"


def test_the_command_pattern_stops_where_the_command_does() -> None:
    assert commands("fix: pip install --force-reinstall torch (PyPI's torch), then pip install 'ringlet[cuda]'") == [
        "pip install --force-reinstall torch", "pip install 'ringlet[cuda]'"]
    assert commands(engine_utils.XPU_FRESH_FIX) == [engine_utils.XPU_TORCH_INSTALL, "pip install 'ringlet[xpu]'"]


def test_xpu_extra_is_never_the_way_to_an_xpu_pytorch(tmp_path: Path) -> None:
    # a pip extra cannot name PyTorch's XPU index, so [xpu] would take PyPI's torch, which has no XPU support
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["xpu"]
    assert not any("whl/xpu" in requirement or "+xpu" in requirement for requirement in extra), extra
    advised = 0
    for text in given_advice(tmp_path):  # whole advice: a literal alone may be one step of several
        found = commands(text)
        for i, command in enumerate(found):
            if "ringlet[xpu]" in command:  # only after PyTorch's XPU build, from its index, in the same advice
                assert any(XPU_INDEX in earlier for earlier in found[:i]), text
                advised += 1
    assert advised, "no advice names ringlet[xpu]: the check above checked nothing"
