"""Hardware collection and `ringlet info`."""

from __future__ import annotations

import json

import pytest

from ringlet.cli import main
from ringlet.shared.engine_info import CpuInfo, GpuInfo, IntelGpuInfo, NodeHardware
from ringlet.worker.engines.engine_utils import detect_available_engines, select_best_engine
from ringlet.worker.system_info import (
    collect_node_hardware,
    get_cpu_info,
    get_intel_gpu_info,
    install_notes,
    recommended_extras,
)

SAPPHIRE_RAPIDS = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni amx_tile amx_bf16 amx_int8 sha_ni
"""


def test_cpu_info_reads_model_and_the_flags_that_matter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(SAPPHIRE_RAPIDS)
    cpu = get_cpu_info(cpuinfo)
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu.flags == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"]
    assert cpu.logical_cores >= cpu.physical_cores >= 1 and cpu.ram_total_bytes >= cpu.ram_available_bytes > 0


def test_this_node_hardware_round_trips_as_json() -> None:
    hardware = collect_node_hardware()
    assert hardware.cpu.ram_total_bytes > 0 and hardware.system
    assert NodeHardware.model_validate_json(hardware.model_dump_json()) == hardware


def hardware(flags: list[str], gpus: list[GpuInfo] = [], chip: str | None = None) -> NodeHardware:  # noqa: B006
    cpu = CpuInfo(model="x", physical_cores=8, logical_cores=16, flags=flags, ram_total_bytes=1, ram_available_bytes=1)
    return NodeHardware(system="Linux", machine="x86_64", cpu=cpu, gpus=gpus, apple_chip=chip)


NO_INTEL = IntelGpuInfo(available=False)


@pytest.mark.parametrize("node, intel, first", [
    (hardware([], chip="Apple M3 Max"), NO_INTEL, "mlx"),
    (hardware([], [GpuInfo(vendor="nvidia", index=0, name="H100", memory_total_bytes=1)]), NO_INTEL, "cuda"),
    (hardware(["avx2"]), IntelGpuInfo(available=False, pci_devices=["0000:03:00.0 8086:56a0 (i915)"]), "xpu"),
    (hardware(["avx2"]), NO_INTEL, "cpu"),
])
def test_recommended_extra_follows_the_hardware(node, intel, first) -> None:  # type: ignore[no-untyped-def]
    extras = [advice.extra for advice in recommended_extras(node, intel)]
    assert extras[0] == first
    assert ("ipex" in extras) == (first == "xpu")  # optional IPEX only where an Intel GPU is


def test_intel_gpu_gets_pytorchs_xpu_build_before_ringlet_and_ipex_only_on_top() -> None:
    node = hardware(["avx2"])
    xpu, ipex = recommended_extras(node, IntelGpuInfo(available=False, pci_devices=["0000:03:00.0 8086:56a0 (i915)"]))
    assert xpu.commands == ("pip install torch --index-url https://download.pytorch.org/whl/xpu",
                            "pip install 'ringlet[xpu]'")
    assert ipex.why.startswith("optional") and ipex.commands[0].startswith("pip install torch==2.8.0 --index-url "
                                                                           "https://download.pytorch.org/whl/xpu")
    assert ipex.commands[-1] == "pip install 'ringlet[ipex]'"


@pytest.mark.parametrize("flags", [["avx512f", "avx512_bf16"], ["avx512f", "avx512_bf16", "amx_bf16", "amx_int8"]])
def test_a_cpu_is_never_recommended_ipex(flags: list[str]) -> None:
    [cpu] = recommended_extras(hardware(flags), NO_INTEL)
    assert cpu.extra == "cpu" and cpu.commands == ("pip install torch --index-url https://download.pytorch.org/whl/cpu",
                                                   "pip install 'ringlet[cpu]'")
    notes = install_notes(hardware(flags))
    if "amx_bf16" in flags:  # an AMX Xeon may measure IPEX's CPU backend, not install it on advice
        [note] = notes
        assert "not recommended" in note and "ringlet bench --engine ipex-cpu" in note and "pip install" not in note
    else:
        assert notes == []


def test_ringlet_info_shows_each_intel_gpu_on_its_own_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ringlet.cli.info import gpu_line
    from tests.support.xpu import ARC_A770, CORE_ULTRA_IGPU, INTEL_ARC_ON_BUS, FakeDevice, FakeXpu, probes

    libs = tmp_path / "lib"
    libs.mkdir()
    (libs / "libze_loader.so.1.21.9").write_text("")
    xpu = FakeXpu(devices=[FakeDevice(ARC_A770, 16 * 2**30, free=12 * 2**30),
                           FakeDevice(CORE_ULTRA_IGPU, 32 * 2**30, free=30 * 2**30)])
    inputs = probes(tmp_path, xpu, INTEL_ARC_ON_BUS, library_dirs=(libs,), host_available=8 * 2**30)
    lines = [gpu_line(g) for g in collect_node_hardware(inputs).gpus if g.vendor == "intel"]
    assert lines == [
        f"intel {ARC_A770}, discrete, 16.0 GiB (12.0 GiB free), driver 1.6.31294+21, Level Zero 1.21.9",
        f"intel {CORE_ULTRA_IGPU}, integrated, 32.0 GiB (8.0 GiB free), driver 1.6.31294+21, Level Zero 1.21.9"]
    unknown = GpuInfo(vendor="nvidia", index=0, name="H100", memory_total_bytes=80 * 2**30)
    assert gpu_line(unknown) == "nvidia H100, 80.0 GiB (? free), driver ?"


def test_ringlet_info_prints_hardware_engines_choice_and_extra(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("RINGLET_ENGINE", raising=False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    chosen = select_best_engine()
    for expected in ("Hardware", "  cpu  ", "Engines (in the order ringlet prefers them)", "  cpu   yes",
                     "fix: ", f"Engine: {chosen}", "pip install 'ringlet["):
        assert expected in out, out
    for status in detect_available_engines():
        assert f"  {status.engine:5} {'yes' if status.available else 'no '}" in out, out


def test_ringlet_info_for_an_engine_that_cannot_run_here(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "--engine", "ipex", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["engine_info"]["selected_engine"] is None
    assert report["engine_info"]["reasons"]["ipex"]["fix"]
    assert [e["engine"] for e in report["engines"]] == ["mlx", "ipex", "cuda", "cpu"]
    expected = recommended_extras(collect_node_hardware(), get_intel_gpu_info())
    assert [(e["extra"], e["commands"]) for e in report["recommended_extras"]] == [
        (advice.extra, list(advice.commands)) for advice in expected]


def test_ringlet_info_rejects_an_unknown_engine(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "--engine", "tpu"]) == 2
    assert "unknown engine 'tpu'" in capsys.readouterr().err
