"""Hardware collection and `ringlet info`."""

from __future__ import annotations

import json

import pytest

from ringlet.cli import main
from ringlet.shared.engine_info import CpuInfo, GpuInfo, IntelGpuInfo, NodeHardware
from ringlet.worker.engines.engine_utils import detect_available_engines, select_best_engine
from ringlet.worker.system_info import collect_node_hardware, get_cpu_info, get_intel_gpu_info, recommended_extras

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
    extras = [name for name, _ in recommended_extras(node, intel)]
    assert extras[0] == first
    assert ("ipex" in extras) == (first == "xpu")  # optional IPEX only where an Intel GPU is


def test_amx_cpu_is_offered_ipex_as_an_option() -> None:
    extras = dict(recommended_extras(hardware(["avx512f", "amx_bf16"]), NO_INTEL))
    assert list(extras) == ["cpu", "ipex"] and "AMX" in extras["ipex"]


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
    assert [e["extra"] for e in report["recommended_extras"]] == [name for name, _ in expected]


def test_ringlet_info_rejects_an_unknown_engine(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "--engine", "tpu"]) == 2
    assert "unknown engine 'tpu'" in capsys.readouterr().err
