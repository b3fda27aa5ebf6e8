"""Generation on an Intel GPU: the torch engines' batched steps, behind a guarded forward.

The guard is what differs from the CPU/CUDA engines: device faults of the SYCL runtime are retried a bounded number
of times (a step is idempotent: it writes the same keys and values to the same slots again), and then the instance
moves to the CPU engine with one log line saying why. The CPU engine's KV cache starts empty, so the step raises
`CacheLost` and the batching loop computes every sequence again from its tokens so far: each stream goes on where
it was. An out-of-memory frees the allocator's cache and becomes an IPEXMemoryError that says what to do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

from ringlet.models.paged_cache import CacheLost, SequenceStep
from ringlet.worker.engines.ipex import IPEXMemoryError
from ringlet.worker.engines.ipex.device import ComputeDevice

log = logging.getLogger(__name__)

# How the SYCL / Unified Runtime / Level Zero layers under torch.xpu word device failures in the
# RuntimeErrors they raise; anything else (a shape error, a bug) is not retried.
DEVICE_ERROR_MARKERS = ("UR_RESULT_ERROR", "PI_ERROR", "ZE_RESULT_ERROR", "DEVICE_LOST", "Native API failed",
                        "level_zero", "Level Zero")
OOM_MARKERS = ("out of memory", "OUT_OF_DEVICE_MEMORY", "OUT_OF_HOST_MEMORY", "OUT_OF_RESOURCES")

BatchForward = Callable[[torch.Tensor, Sequence[SequenceStep]], torch.Tensor]
Where = TypeVar("Where")  # what a forward computes besides its input: a batch's steps, or a stage's start position


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or any(m in str(error) for m in OOM_MARKERS)


def is_device_error(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(m in str(error) for m in DEVICE_ERROR_MARKERS)


class DeviceGuard(Generic[Where]):
    """forward(tokens, steps) -> the step's logits (or a stage's hidden states) as host float32, with the guard
    described above.

    Logits come back to the host and the batching loop samples there: that keeps sampling identical to the CPU
    engine's and lets a fallback continue the same streams on the CPU.
    """

    def __init__(self, device_forward: Callable[[torch.Tensor, Where], torch.Tensor], device: ComputeDevice,
                 load_fallback: Callable[[], Callable[[torch.Tensor, Where], torch.Tensor]], max_retries: int = 3,
                 retry_delay_s: float = 0.05, owner: str = "this instance") -> None:
        self.device_forward, self.device, self.load_fallback = device_forward, device, load_fallback
        self.owner = owner  # who moves to the CPU, for the log line: the instance, or one stage of its ring
        self.max_retries, self.retry_delay_s = max_retries, retry_delay_s
        self.fallback: Callable[[torch.Tensor, Where], torch.Tensor] | None = None
        self.fallback_reason: str | None = None

    def __call__(self, tokens: torch.Tensor, steps: Where) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback(tokens, steps)
        failures: list[RuntimeError] = []
        while True:
            try:
                with torch.inference_mode():  # no autograd bookkeeping on the device
                    logits = self.device_forward(tokens, steps)
                self.device.synchronize()  # a failed kernel surfaces here, inside the retry, not later
                return logits.float().cpu()
            except RuntimeError as e:
                if is_out_of_memory(e):
                    raise self._out_of_memory(e) from e
                if not is_device_error(e):
                    raise
                failures.append(e)
                if len(failures) > self.max_retries:
                    self._fall_back(failures)
                    raise CacheLost(f"the KV cache on {self.device.name} is gone: {self.fallback_reason}") from e
                time.sleep(self.retry_delay_s * 2 ** (len(failures) - 1))

    def _out_of_memory(self, error: RuntimeError) -> IPEXMemoryError:
        self.device.empty_cache()
        free = self.device.free_bytes()
        return IPEXMemoryError(
            f"out of memory on {self.device.name} while generating ({str(error).splitlines()[0]}); the allocator's "
            f"cache was freed and {free / 2**30:.2f} GiB is free now: shorten the prompt, lower the context "
            "length or the batch (RINGLET_MAX_BATCH, RINGLET_KV_CACHE_TOKENS), or use a smaller model or precision",
            free_bytes=free,
        )

    def _fall_back(self, failures: list[RuntimeError]) -> None:
        self.fallback_reason = (f"{self.device.name} failed {len(failures)} times in a row "
                                f"({str(failures[-1]).splitlines()[0]})")
        log.warning("ipex: %s; %s now runs on the CPU engine (check the Intel GPU driver and dmesg)",
                    self.fallback_reason, self.owner)
        self.fallback = self.load_fallback()
