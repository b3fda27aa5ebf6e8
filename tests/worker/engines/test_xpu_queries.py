"""Guarded torch.xpu queries over a fake Intel GPU: several devices, an integrated one, a PyTorch without
mem_get_info, and queries that raise. Each case checks the fallback figure, its one log line and what the node
reports (GpuInfo, IntelGpuInfo, EngineInfo, the probe)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ringlet.worker.engines.engine_utils import (
    LEVEL_ZERO_FIX,
    ProbeInputs,
    level_zero_version,
    probe_ipex,
    xpu_free_bytes,
    xpu_is_integrated,
)
from ringlet.worker.engines.ipex.device import XpuDevice, open_xpu
from ringlet.worker.system_info import (
    collect_engine_info,
    collect_node_hardware,
    get_intel_gpu_info,
    gpu_memory_moved,
    refresh_gpu_memory,
)
from tests.support.xpu import (
    ARC_A770,
    CORE_ULTRA_IGPU,
    DRIVER,
    INTEL_ARC_ON_BUS,
    FakeDevice,
    FakeXpu,
    GiB,
    fake_runtime,
    probes,
)

LOGGER = "ringlet.worker.engines.engine_utils"
MAX_1550 = "Intel(R) Data Center GPU Max 1550"
IGPU_NO_FREE_MEMORY = "The device (Intel(R) Arc(TM) Graphics) doesn't support querying the available free memory"


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def intel_gpus(inputs: ProbeInputs):  # type: ignore[no-untyped-def]
    return [g for g in collect_node_hardware(inputs).gpus if g.vendor == "intel"]


def test_each_device_is_reported_with_its_own_name_memory_and_kind(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    xpu = FakeXpu(devices=[FakeDevice(ARC_A770, 16 * GiB, free=12 * GiB), FakeDevice(MAX_1550, 128 * GiB),
                           FakeDevice(ARC_A770, 16 * GiB, free=15 * GiB)])
    inputs = probes(tmp_path, xpu, INTEL_ARC_ON_BUS)
    with caplog.at_level(logging.WARNING):
        gpus = intel_gpus(inputs)
        status = probe_ipex(inputs)
        engines = collect_engine_info(None, inputs)
        intel = get_intel_gpu_info(inputs)
    assert [(g.index, g.name, g.memory_total_bytes, g.memory_free_bytes, g.integrated, g.driver) for g in gpus] == [
        (0, ARC_A770, 16 * GiB, 12 * GiB, False, DRIVER), (1, MAX_1550, 128 * GiB, 128 * GiB, False, DRIVER),
        (2, ARC_A770, 16 * GiB, 15 * GiB, False, DRIVER)]
    assert status.available and status.detail == f"2x {ARC_A770}, 16.0 GiB each; 1x {MAX_1550}, 128.0 GiB each"
    assert engines.intel_gpu_count == 3 and engines.intel_gpu_memory == 160 * GiB and engines.selected_engine == "ipex"
    assert intel.count == 3 and intel.total_memory == 160 * GiB and intel.device_name == ARC_A770
    assert warnings(caplog) == []  # every query answered: nothing to warn about


def test_integrated_gpu_whose_mem_get_info_raises_is_bounded_by_the_hosts_free_ram(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    xpu = FakeXpu(devices=[FakeDevice(CORE_ULTRA_IGPU, 32 * GiB, reserved=1 * GiB,
                                      mem_get_info_error=RuntimeError(IGPU_NO_FREE_MEMORY))])
    inputs = probes(tmp_path, xpu, INTEL_ARC_ON_BUS, host_available=6 * GiB)
    with caplog.at_level(logging.WARNING):
        [gpu] = intel_gpus(inputs)
        status = probe_ipex(inputs)
        free, note = xpu_free_bytes(fake_runtime(xpu), 0, host_available=40 * GiB)
    assert gpu.integrated is True and gpu.memory_total_bytes == 32 * GiB
    assert gpu.memory_free_bytes == 6 * GiB  # total less reserved is 31 GiB, but the host has 6 GiB free
    assert free == 31 * GiB and note == f"torch.xpu.mem_get_info failed ({IGPU_NO_FREE_MEMORY})"
    assert status.available and status.detail == f"1x {CORE_ULTRA_IGPU}, 32.0 GiB each (integrated)"
    # one line for the device, though three calls fell back (the fresh runtime of xpu_free_bytes logs its own)
    assert warnings(caplog) == 2 * [
        (f"xpu:0: torch.xpu.mem_get_info failed ({IGPU_NO_FREE_MEMORY}); its free memory is taken as its total less "
        "what this process reserved, at most the host's available RAM (an integrated GPU's memory)")]


def test_integrated_flag_of_the_properties_beats_the_name_and_bounds_a_working_mem_get_info(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    lunar_lake = "Intel(R) Arc(TM) 140V GPU (16GB)"  # integrated, yet with a model number: the name cannot tell
    xpu = FakeXpu(devices=[FakeDevice(lunar_lake, 16 * GiB, free=15 * GiB, integrated=True)])
    with caplog.at_level(logging.WARNING):
        [gpu] = intel_gpus(probes(tmp_path, xpu, INTEL_ARC_ON_BUS, host_available=4 * GiB))
    assert gpu.integrated is True and gpu.memory_free_bytes == 4 * GiB
    assert warnings(caplog) == []  # mem_get_info answered; bounding it is no fallback


@pytest.mark.parametrize("name, integrated", [
    ("Intel(R) Graphics", True), ("Intel(R) UHD Graphics 770", True), ("Intel(R) Iris(R) Xe Graphics", True),
    (CORE_ULTRA_IGPU, True), (ARC_A770, False), ("Intel(R) Arc(TM) B580 Graphics", False),
    ("Intel(R) Arc(TM) Pro B60 Graphics", False), (MAX_1550, False), ("Intel(R) Data Center GPU Flex 170", False),
    ("Intel(R) Arc(TM) 140V GPU (16GB)", None),
])
def test_integrated_or_discrete_from_the_name_where_the_properties_do_not_say(name: str, integrated: bool | None) -> None:
    assert xpu_is_integrated(FakeXpu(name=name).get_device_properties(0)) is integrated


def test_pytorch_without_mem_get_info_counts_total_less_reserved_and_says_so_once_per_device(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    xpu = FakeXpu(devices=[FakeDevice(total=16 * GiB, reserved=2 * GiB), FakeDevice(total=8 * GiB)], mem_get_info=False)
    assert not hasattr(xpu, "mem_get_info")
    inputs = probes(tmp_path, xpu, INTEL_ARC_ON_BUS)
    with caplog.at_level(logging.WARNING):
        hardware = collect_node_hardware(inputs)
        for _ in range(3):  # the node's periodic refresh
            refresh_gpu_memory(hardware, inputs)
        device = XpuDevice(inputs.xpu, 0)  # type: ignore[arg-type]
        assert device.free_bytes() == 14 * GiB
    assert [(g.memory_total_bytes, g.memory_free_bytes) for g in hardware.gpus if g.vendor == "intel"] == [
        (16 * GiB, 14 * GiB), (8 * GiB, 8 * GiB)]
    assert warnings(caplog) == [
        f"xpu:{i}: this PyTorch has no torch.xpu.mem_get_info (it came in 2.6); its free memory is taken as its "
        "total less what this process reserved" for i in (0, 1)]
    assert get_intel_gpu_info(inputs).total_memory == 24 * GiB


def test_device_whose_properties_raise_is_reported_as_unknown_and_the_others_as_usual(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    lost = RuntimeError("Native API failed. Native API returns: -36 (UR_RESULT_ERROR_DEVICE_LOST)")
    xpu = FakeXpu(devices=[FakeDevice(ARC_A770, 16 * GiB), FakeDevice(ARC_A770, 16 * GiB, free=10 * GiB,
                                                                       properties_error=lost)])
    inputs = probes(tmp_path, xpu, INTEL_ARC_ON_BUS)
    with caplog.at_level(logging.WARNING):
        gpus = intel_gpus(inputs)
        engines = collect_engine_info(None, inputs)
        status = probe_ipex(inputs)
        name = XpuDevice(inputs.xpu, 1).name  # type: ignore[arg-type]
    assert [(g.name, g.memory_total_bytes, g.memory_free_bytes, g.integrated, g.driver) for g in gpus] == [
        (ARC_A770, 16 * GiB, 16 * GiB, False, DRIVER), ("Intel GPU xpu:1", 16 * GiB, 10 * GiB, None, None)]
    assert engines.ipex_available and engines.intel_gpu_count == 2 and engines.intel_gpu_memory == 32 * GiB
    assert status.detail == f"1x {ARC_A770}, 16.0 GiB each; 1x Intel GPU xpu:1, 16.0 GiB each"
    assert name == "xpu:1"
    assert warnings(caplog) == [(f"xpu:1: torch.xpu.get_device_properties failed ({lost}); its name, driver and "
                                "memory are reported as unknown")]


def test_device_count_that_raises_means_no_usable_gpu_and_names_level_zero(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    broken = RuntimeError("level_zero backend failed with error: 2147483646 (UR_RESULT_ERROR_UNKNOWN)")
    inputs = probes(tmp_path, FakeXpu(count_error=broken), INTEL_ARC_ON_BUS)
    with caplog.at_level(logging.WARNING):
        problem = probe_ipex(inputs).problem
        engines = collect_engine_info(None, inputs)
        intel = get_intel_gpu_info(inputs)
        assert intel_gpus(inputs) == []
        with pytest.raises(Exception, match="failed to count its devices"):
            open_xpu(inputs)
    assert problem is not None and problem.fix == LEVEL_ZERO_FIX
    assert problem.reason == (f"Intel GPU found on the PCI bus (0000:03:00.0 8086:56a0 (i915)) but torch.xpu failed "
                              f"to count its devices ({broken}): the Level Zero driver is missing or broken")
    assert not engines.ipex_available and engines.intel_gpu_count == 0 and engines.selected_engine == "cpu"
    assert not intel.available and intel.pci_devices
    assert warnings(caplog) == [f"torch.xpu could not count its devices ({broken}); counting none"]


def test_level_zero_version_from_the_loaders_file_name(tmp_path: Path) -> None:
    libs = tmp_path / "lib"
    libs.mkdir()
    for name in ("libze_loader.so.1", "libze_loader.so.1.9.30", "libze_loader.so.1.21.9", "libze_intel_gpu.so.1.6.2"):
        (libs / name).write_text("")
    assert level_zero_version([tmp_path / "missing", libs]) == "1.21.9"  # 21 > 9: compared as numbers
    assert level_zero_version([tmp_path / "missing"]) is None
    [gpu] = intel_gpus(probes(tmp_path, FakeXpu(), INTEL_ARC_ON_BUS, library_dirs=(libs,)))
    assert gpu.level_zero_version == "1.21.9"
    [unknown] = intel_gpus(probes(tmp_path / "b", FakeXpu(), INTEL_ARC_ON_BUS))
    assert unknown.level_zero_version is None


def test_refresh_reads_free_memory_again_and_says_when_it_moved(tmp_path) -> None:  # type: ignore[no-untyped-def]
    xpu = FakeXpu(devices=[FakeDevice(total=16 * GiB, free=16 * GiB), FakeDevice(total=16 * GiB, free=16 * GiB)])
    inputs = probes(tmp_path, xpu, INTEL_ARC_ON_BUS)
    hardware = collect_node_hardware(inputs)
    assert refresh_gpu_memory(hardware, inputs) is hardware  # nothing moved: the same object

    xpu.devices[1].free = 16 * GiB - 2**20  # a megabyte: below the threshold
    nudged = refresh_gpu_memory(hardware, inputs)
    assert [g.memory_free_bytes for g in nudged.gpus if g.vendor == "intel"] == [16 * GiB, 16 * GiB - 2**20]
    assert not gpu_memory_moved(hardware, nudged, 64 * 2**20)

    xpu.devices[1].free = 9 * GiB  # a model loaded
    loaded = refresh_gpu_memory(hardware, inputs)
    assert [g.memory_free_bytes for g in loaded.gpus if g.vendor == "intel"] == [16 * GiB, 9 * GiB]
    assert gpu_memory_moved(hardware, loaded, 64 * 2**20) and not gpu_memory_moved(loaded, loaded, 64 * 2**20)
    assert loaded.cpu == hardware.cpu and [g.name for g in loaded.gpus] == [g.name for g in hardware.gpus]
