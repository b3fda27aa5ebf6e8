"""Fakes for what cannot exist on these machines: an Intel GPU (the smallest torch.xpu surface, its
tensors redirected to the CPU) and the PCI bus that would show it (a sysfs tree)."""

from __future__ import annotations

import contextlib
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from ringlet.worker.engines.engine_utils import ProbeInputs, XpuRuntime

GiB = 2**30
ARC_A770 = "Intel(R) Arc(TM) A770 Graphics"
CORE_ULTRA_IGPU = "Intel(R) Arc(TM) Graphics"  # Core Ultra's integrated GPU: no model number
DRIVER = "1.6.31294+21"


@dataclass
class FakeDevice:
    """One fake GPU. `integrated` None: its properties carry no is_integrated_gpu (as before PyTorch 2.9)."""

    name: str = ARC_A770
    total: int = 16 * GiB
    free: int | None = None  # None: all of it
    reserved: int = 0  # what torch.xpu.memory_reserved reports
    integrated: bool | None = None
    properties_error: Exception | None = None  # raised by get_device_properties
    mem_get_info_error: Exception | None = None  # raised by mem_get_info


class FakeXpu:
    """is_available, device_count, get_device_properties, mem_get_info, memory_reserved, synchronize, empty_cache.

    `devices` describes each GPU (default: `count` alike ones from `total`, `free` and `name`); `mem_get_info=False`
    is a PyTorch without torch.xpu.mem_get_info (before 2.6): the attribute is absent; `count_error` is raised by
    is_available and device_count. `failures` are raised by synchronize(), one per call, after `fail_after` good
    calls: that is where a real device reports a failed kernel (asynchronously, at the next synchronisation)."""

    def __init__(self, count: int = 1, total: int = 16 * GiB, free: int | None = None, available: bool = True,
                 name: str = ARC_A770, devices: list[FakeDevice] | None = None, mem_get_info: bool = True,
                 count_error: Exception | None = None) -> None:
        self.devices = devices if devices is not None else [FakeDevice(name, total, free) for _ in range(count)]
        self.available, self.count_error = available, count_error
        self.failures: deque[BaseException] = deque()
        self.fail_after = 0
        self.failing_device: int | None = None
        self.synchronize_calls = self.empty_cache_calls = 0
        self.calls: Counter[str] = Counter()
        if mem_get_info:
            self.mem_get_info = self._mem_get_info

    @property
    def count(self) -> int:
        return len(self.devices)

    def fail(self, *errors: BaseException, after: int = 0, device: int | None = None) -> None:
        """`errors` from synchronize() after `after` good calls; `device`: only that device's calls fail."""
        self.failures.extend(errors)
        self.fail_after, self.failing_device = self.synchronize_calls + after, device

    def is_available(self) -> bool:
        if self.count_error is not None:
            raise self.count_error
        return self.available

    def device_count(self) -> int:
        if self.count_error is not None:
            raise self.count_error
        return self.count if self.available else 0

    def _device(self, device: int) -> FakeDevice:
        assert 0 <= device < self.count, f"no xpu:{device}"
        return self.devices[device]

    def get_device_properties(self, device: int) -> SimpleNamespace:
        self.calls["get_device_properties"] += 1
        spec = self._device(device)
        if spec.properties_error is not None:
            raise spec.properties_error
        flag = {} if spec.integrated is None else {"is_integrated_gpu": spec.integrated}
        return SimpleNamespace(name=spec.name, total_memory=spec.total, driver_version=DRIVER, type="gpu", **flag)

    def _mem_get_info(self, device: int) -> tuple[int, int]:
        self.calls["mem_get_info"] += 1
        spec = self._device(device)
        if spec.mem_get_info_error is not None:
            raise spec.mem_get_info_error
        return (spec.total if spec.free is None else spec.free), spec.total

    def memory_reserved(self, device: int) -> int:
        return self._device(device).reserved

    def synchronize(self, device: int) -> None:
        self.synchronize_calls += 1
        if self.failures and self.synchronize_calls > self.fail_after and self.failing_device in (None, device):
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
           native_torch: bool = False, library_dirs: tuple[Path, ...] = (), host_available: int = 64 * GiB
           ) -> ProbeInputs:
    """ProbeInputs over a fake sysfs, no Level Zero library unless `library_dirs` has one, and `host_available`
    bytes of free RAM; xpu None with native_torch: this machine's real torch.xpu."""
    runtime = XpuRuntime.native() if native_torch else (fake_runtime(xpu) if xpu else None)
    return ProbeInputs(xpu=runtime, sysfs_root=make_sysfs(tmp_path / "sys", bus), system="Linux", machine="x86_64",
                       library_dirs=library_dirs, host_available=lambda: host_available)


@dataclass
class Int4KernelCalls:
    """What the fake int4 kernel was called with: (op, [(shape, dtype) of each tensor argument], group size)."""

    calls: list[tuple[str, list[tuple[tuple[int, ...], torch.dtype]], int]] = field(default_factory=list)

    def record(self, op: str, group: int, *tensors: torch.Tensor) -> None:
        self.calls.append((op, [(tuple(t.shape), t.dtype) for t in tensors], group))


def _unpacked_codes(packed: torch.Tensor) -> torch.Tensor:
    pairs = packed.contiguous().view(torch.uint8)  # [N, K / 2], each int32 holding four bytes in order
    return torch.stack((pairs >> 4, pairs & 0x0F), dim=-1).reshape(packed.shape[0], -1)


@contextlib.contextmanager
def int4_kernel_on_fake_xpu() -> Iterator[Int4KernelCalls]:
    """PyTorch's XPU int4 ops (`_convert_weight_to_int4pack`, `_weight_int4pack_mm`) for the fake GPU's tensors,
    which live on the CPU: a reference implementation of the XPU kernel's layout (uint8 pairs [N, K / 2], the even
    input high, as int32 [N, K / 8]; w = (code - 8) * scale + zero with [K / group, N, 2] pairs), registered for the
    CPU within the block only."""
    seen = Int4KernelCalls()

    def pack(pairs: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
        assert pairs.dtype == torch.uint8 and pairs.dim() == 2 and inner_k_tiles in (2, 4, 8)
        seen.record("_convert_weight_to_int4pack", inner_k_tiles, pairs)
        return pairs.contiguous().view(torch.int32).clone()

    def matmul(x: torch.Tensor, packed: torch.Tensor, group: int, scale_zero: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 2 and x.is_contiguous() and packed.dtype == torch.int32 and group in (32, 64, 128, 256)
        assert scale_zero.shape == (x.shape[1] // group, packed.shape[0], 2) and scale_zero.dtype == x.dtype
        seen.record("_weight_int4pack_mm", group, x, packed, scale_zero)
        scale, zero = (scale_zero[..., i].float().t().repeat_interleave(group, dim=1) for i in (0, 1))
        weight = (_unpacked_codes(packed).float() - 8) * scale + zero
        return (x.float() @ weight.t()).to(x.dtype)

    library = torch.library.Library("aten", "IMPL")
    try:
        library.impl("_convert_weight_to_int4pack", pack, "CPU")
        library.impl("_weight_int4pack_mm", matmul, "CPU")
        yield seen
    finally:
        library._destroy()
