"""Where the ipex engine runs: an Intel GPU through torch.xpu, or the CPU through IPEX's CPU backend."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Protocol

import psutil
import torch

from ringlet.worker.engines.engine_utils import (
    ProbeInputs,
    XpuRuntime,
    probe_ipex,
    xpu_device_count,
    xpu_free_bytes,
    xpu_properties,
)
from ringlet.worker.engines.ipex import IPEXDriverError


class ComputeDevice(Protocol):
    @property
    def torch_device(self) -> torch.device: ...
    @property
    def name(self) -> str: ...
    def free_bytes(self) -> int: ...
    def synchronize(self) -> None: ...
    def empty_cache(self) -> None: ...


@dataclass(frozen=True)
class XpuDevice:
    """One Intel GPU; its memory queries and synchronisation go through the torch.xpu surface."""

    runtime: XpuRuntime
    index: int = 0

    @property
    def torch_device(self) -> torch.device:
        return self.runtime.device(self.index)

    @property
    def name(self) -> str:
        props = xpu_properties(self.runtime, self.index)
        return f"xpu:{self.index}" + (f" ({props.name})" if props is not None else "")

    def free_bytes(self) -> int:
        """torch.xpu's figure where it has one, else the guarded fallback (see xpu_free_bytes)."""
        return xpu_free_bytes(self.runtime, self.index, int(psutil.virtual_memory().available))[0]

    def synchronize(self) -> None:
        self.runtime.api.synchronize(self.index)

    def empty_cache(self) -> None:
        self.runtime.api.empty_cache()


@dataclass(frozen=True)
class HostDevice:
    """The CPU, for IPEX's CPU backend. CPU kernels finish before they return and there is no caching
    allocator, so synchronising and emptying a cache have nothing to do."""

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def name(self) -> str:
        return f"cpu ({platform.processor() or platform.machine()})"

    def free_bytes(self) -> int:
        return int(psutil.virtual_memory().available)

    def synchronize(self) -> None:
        return None

    def empty_cache(self) -> None:
        return None


def open_xpu(inputs: ProbeInputs | None = None, index: int = 0) -> XpuDevice:
    """The Intel GPU `index`, checked the way detection checks it; IPEXDriverError says what is missing."""
    inputs = inputs or ProbeInputs()
    status = probe_ipex(inputs)
    if not status.available or inputs.xpu is None:
        assert status.problem is not None
        raise IPEXDriverError(f"{status.problem.reason}; fix: {status.problem.fix}")
    count, _ = xpu_device_count(inputs.xpu)
    if not 0 <= index < count:
        raise IPEXDriverError(f"Intel GPU index {index} does not exist; this machine has {count} (0..{count - 1})")
    return XpuDevice(inputs.xpu, index)
