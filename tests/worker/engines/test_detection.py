"""Engine detection and selection over a fake Intel GPU (torch.xpu surface) and a fake PCI bus (sysfs)."""

from __future__ import annotations

import pytest

from ringlet.shared.engine_info import EngineProblem, EngineStatus
from ringlet.worker.engines.engine_utils import (
    EngineUnavailableError,
    detect_available_engines,
    detect_intel_gpu,
    fallback_engine,
    parse_engine_name,
    pci_display_devices,
    probe_ipex,
    select_best_engine,
)
from ringlet.worker.system_info import collect_engine_info, get_intel_gpu_info
from tests.support.xpu import ARC_A770, INTEL_ARC_ON_BUS, FakeXpu, GiB, make_sysfs, probes


def status(engine, available=True, auto=True):  # type: ignore[no-untyped-def]
    problem = None if available else EngineProblem(reason=f"no {engine}", fix=f"get {engine}")
    return EngineStatus(engine=engine, available=available, problem=problem, auto_select=auto)


ALL_AVAILABLE = [status("mlx"), status("ipex"), status("cuda"), status("cpu")]


@pytest.mark.parametrize("available, expected", [
    ({"mlx", "ipex", "cuda", "cpu"}, "mlx"),
    ({"ipex", "cuda", "cpu"}, "ipex"),
    ({"cuda", "cpu"}, "cuda"),
    ({"cpu"}, "cpu"),
])
def test_priority_is_mlx_then_ipex_then_cuda_then_cpu(available: set[str], expected: str) -> None:
    statuses = [status(e, e in available) for e in ("cpu", "cuda", "ipex", "mlx")]  # order given does not matter
    assert select_best_engine(None, statuses) == expected


def test_mlx_without_metal_is_never_chosen_automatically_but_can_be_asked_for() -> None:
    statuses = [status("mlx", auto=False), status("ipex", False), status("cuda", False), status("cpu")]
    assert select_best_engine(None, statuses) != "ipex"
    assert select_best_engine("mlx", statuses) == "mlx"


def test_explicit_choice_beats_priority() -> None:
    assert select_best_engine("cuda", ALL_AVAILABLE) == "cuda"
    assert select_best_engine("cpu", ALL_AVAILABLE) == "cpu"
    assert select_best_engine("xpu", ALL_AVAILABLE) == "ipex"  # alias
    assert select_best_engine("auto", ALL_AVAILABLE) == "mlx"


def test_unavailable_explicit_engine_is_an_error_listing_the_available_ones() -> None:
    statuses = [status("mlx", False), status("ipex", False), status("cuda"), status("cpu")]
    with pytest.raises(EngineUnavailableError) as caught:
        select_best_engine("ipex", statuses)
    message = str(caught.value)
    assert "'ipex' is not available" in message and "no ipex" in message and "fix: get ipex" in message
    assert message.endswith("Available here: cuda, cpu")
    assert caught.value.engine == "ipex"


def test_unknown_engine_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown engine 'tpu'; known: auto, mlx, ipex, cuda, cpu"):
        parse_engine_name("tpu")


def test_fallback_is_the_next_available_engine_in_priority_order() -> None:
    statuses = [status("mlx", False), status("ipex", False), status("cuda"), status("cpu")]
    assert fallback_engine("ipex", statuses) == "cuda"
    assert fallback_engine("cuda", statuses) == "cpu"
    assert fallback_engine("cpu", statuses) == "cpu"


def test_pci_scan_finds_intel_display_devices_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = make_sysfs(tmp_path, INTEL_ARC_ON_BUS + [("0000:04:00.0", "0x10de", "0x030200", "nvidia")])
    intel = pci_display_devices("0x8086", root)
    assert [str(d) for d in intel] == ["0000:03:00.0 8086:56a0 (i915)"]  # not the Intel host bridge
    assert [d.kernel_driver for d in pci_display_devices("0x10de", root)] == ["nvidia"]
    assert pci_display_devices("0x8086", tmp_path / "missing") == []


def test_intel_gpu_through_torch_xpu_is_detected_and_preferred_over_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    xpu = FakeXpu(count=2)
    inputs = probes(tmp_path, xpu, INTEL_ARC_ON_BUS)
    assert detect_intel_gpu(inputs)
    statuses = detect_available_engines(inputs)
    assert [s.engine for s in statuses] == ["mlx", "ipex", "cuda", "cpu"]
    ipex = statuses[1]
    assert ipex.available and ipex.detail == f"2x {ARC_A770}, 16.0 GiB each"
    assert xpu.synchronize_calls == 2  # the tiny test operation ran, once per probe
    assert select_best_engine(None, statuses) == "ipex"


def test_intel_gpu_with_a_pytorch_lacking_xpu_says_what_to_install(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # this machine's real torch is a CPU build: torch.xpu exists but was not compiled in
    problem = probe_ipex(probes(tmp_path, None, INTEL_ARC_ON_BUS, native_torch=True)).problem
    assert problem is not None
    assert "Intel GPU found on the PCI bus (0000:03:00.0 8086:56a0 (i915))" in problem.reason
    assert "has no XPU support" in problem.reason
    # an installed torch satisfies ringlet's requirement, so only a forced reinstall from the XPU index replaces it
    assert "pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/xpu" in problem.fix
    assert "pip install 'ringlet[xpu]'" not in problem.fix


def test_intel_gpu_without_driver_names_level_zero(tmp_path) -> None:  # type: ignore[no-untyped-def]
    problem = probe_ipex(probes(tmp_path, FakeXpu(available=False), INTEL_ARC_ON_BUS)).problem
    assert problem is not None and "Level Zero driver is missing" in problem.reason
    assert "libze" in problem.fix and "render" in problem.fix


def test_no_intel_gpu_anywhere(tmp_path) -> None:  # type: ignore[no-untyped-def]
    problem = probe_ipex(probes(tmp_path, FakeXpu(available=False))).problem
    assert problem is not None and problem.reason.startswith("no Intel GPU")


def test_failing_test_operation_makes_the_gpu_unavailable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    xpu = FakeXpu()
    xpu.fail(RuntimeError("UR_RESULT_ERROR_DEVICE_LOST"))
    inputs = probes(tmp_path, xpu, INTEL_ARC_ON_BUS)
    statuses = detect_available_engines(inputs)
    assert not statuses[1].available
    assert "test operation on xpu:0 failed: UR_RESULT_ERROR_DEVICE_LOST" in statuses[1].problem.reason  # type: ignore[union-attr]
    assert select_best_engine(None, statuses) != "ipex"


def test_engine_info_carries_seed_fields_and_reasons(tmp_path) -> None:  # type: ignore[no-untyped-def]
    inputs = probes(tmp_path, FakeXpu(count=2, total=8 * GiB), INTEL_ARC_ON_BUS)
    info = collect_engine_info(None, inputs)
    assert info.selected_engine == "ipex" and info.ipex_available and info.cpu_available and info.torch_available
    assert "ipex" in info.available_engines and "cpu" in info.available_engines
    assert info.intel_gpu_count == 2 and info.intel_gpu_memory == 16 * GiB
    missing = {s.engine for s in detect_available_engines(inputs) if not s.available}
    assert missing and set(info.reasons) == missing and all(p.reason and p.fix for p in info.reasons.values())
    round_trip = type(info).model_validate_json(info.model_dump_json())
    assert round_trip == info

    without = collect_engine_info("ipex", probes(tmp_path / "b", FakeXpu(available=False), INTEL_ARC_ON_BUS))
    assert without.selected_engine is None and not without.ipex_available
    assert "Level Zero" in without.reasons["ipex"].reason


def test_intel_gpu_info(tmp_path) -> None:  # type: ignore[no-untyped-def]
    gpu = get_intel_gpu_info(probes(tmp_path, FakeXpu(count=1, total=16 * GiB), INTEL_ARC_ON_BUS))
    assert gpu.available and gpu.count == 1 and gpu.total_memory == 16 * GiB and gpu.device_name == ARC_A770
    assert gpu.driver_version == "1.6.31294+21" and gpu.pci_devices == ["0000:03:00.0 8086:56a0 (i915)"]
    absent = get_intel_gpu_info(probes(tmp_path / "b", FakeXpu(available=False), INTEL_ARC_ON_BUS))
    assert not absent.available and absent.count == 0 and absent.pci_devices
