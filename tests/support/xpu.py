"""Fakes for what cannot exist on these machines: an Intel GPU (the smallest torch.xpu surface, its
tensors redirected to the CPU) and the PCI bus that would show it (a sysfs tree)."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from types import SimpleNamespace

from ringlet.worker.engines.engine_utils import ProbeInputs, XpuRuntime

GiB = 2**30
ARC_A770 = "Intel(R) Arc(TM) A770 Graphics"


class FakeXpu:
    """is_available, device_count, get_device_properties, mem_get_info, synchronize, empty_cache.

    `failures` are raised by synchronize(), one per call, after `fail_after` good calls: that is where a
    real device reports a failed kernel (asynchronously, at the next synchronisation)."""

    def __init__(self, count: int = 1, total: int = 16 * GiB, free: int | None = None, available: bool = True,
                 name: str = ARC_A770) -> None:
        self.count, self.total, self.free, self.available, self.name = count, total, free, available, name
        self.failures: deque[BaseException] = deque()
        self.fail_after = 0
        self.synchronize_calls = self.empty_cache_calls = 0

    def fail(self, *errors: BaseException, after: int = 0) -> None:
        self.failures.extend(errors)
        self.fail_after = self.synchronize_calls + after

    def is_available(self) -> bool:
        return self.available

    def device_count(self) -> int:
        return self.count if self.available else 0

    def get_device_properties(self, device: int) -> SimpleNamespace:
        assert 0 <= device < self.count, f"no xpu:{device}"
        return SimpleNamespace(name=self.name, total_memory=self.total, driver_version="1.6.31294+21")

    def mem_get_info(self, device: int) -> tuple[int, int]:
        return (self.total if self.free is None else self.free), self.total

    def synchronize(self, device: int) -> None:
        self.synchronize_calls += 1
        if self.failures and self.synchronize_calls > self.fail_after:
            raise self.failures.popleft()

    def empty_cache(self) -> None:
        self.empty_cache_calls += 1


def fake_runtime(xpu: FakeXpu) -> XpuRuntime:
    return XpuRuntime(xpu, built_with_xpu=True, device_type="cpu")


def make_sysfs(root: Path, devices: list[tuple[str, str, str, str | None]]) -> Path:
    """devices: (pci address, vendor, class, kernel driver or None), as under /sys/bus/pci/devices."""
    base = root / "bus" / "pci" / "devices"
    base.mkdir(parents=True, exist_ok=True)
    for address, vendor, dev_class, driver in devices:
        dev = base / address
        dev.mkdir()
        (dev / "vendor").write_text(vendor + "\n")
        (dev / "class").write_text(dev_class + "\n")
        (dev / "device").write_text("0x56a0\n")
        if driver:
            target = root / "bus" / "pci" / "drivers" / driver
            target.mkdir(parents=True, exist_ok=True)
            (dev / "driver").symlink_to(target)
    return root


INTEL_ARC_ON_BUS = [("0000:00:00.0", "0x8086", "0x060000", None),  # the host bridge: Intel, but no GPU
                    ("0000:03:00.0", "0x8086", "0x030000", "i915")]
NO_GPU_ON_BUS = [("0000:00:00.0", "0x8086", "0x060000", None), ("0000:00:03.0", "0x1af4", "0x020000", None)]


def probes(tmp_path: Path, xpu: FakeXpu | None, bus: list[tuple[str, str, str, str | None]] = NO_GPU_ON_BUS,
           native_torch: bool = False) -> ProbeInputs:
    """ProbeInputs over a fake sysfs; xpu None with native_torch: this machine's real torch.xpu."""
    runtime = XpuRuntime.native() if native_torch else (fake_runtime(xpu) if xpu else None)
    return ProbeInputs(xpu=runtime, sysfs_root=make_sysfs(tmp_path / "sys", bus), system="Linux", machine="x86_64")
