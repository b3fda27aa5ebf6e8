"""Streaming generation on an Intel GPU: the shared TextGenerator loop, behind a guarded forward.

The guard is what differs from the CPU/CUDA engines: device faults of the SYCL runtime are retried a
bounded number of times and then the instance moves to the CPU engine (one log line saying why),
replaying the tokens already in the device's KV cache so that the stream goes on where it was; an
out-of-memory frees the allocator's cache and becomes an IPEXMemoryError that says what to do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator

import torch

from ringlet.shared.tasks import GenerationChunk, TextGenerationTask
from ringlet.worker.engines.ipex import IPEXMemoryError
from ringlet.worker.engines.ipex.device import ComputeDevice
from ringlet.worker.engines.torch.generate import Forward, TextGenerator

log = logging.getLogger(__name__)

# How the SYCL / Unified Runtime / Level Zero layers under torch.xpu word device failures in the
# RuntimeErrors they raise; anything else (a shape error, a bug) is not retried.
DEVICE_ERROR_MARKERS = ("UR_RESULT_ERROR", "PI_ERROR", "ZE_RESULT_ERROR", "DEVICE_LOST", "Native API failed",
                        "level_zero", "Level Zero")
OOM_MARKERS = ("out of memory", "OUT_OF_DEVICE_MEMORY", "OUT_OF_HOST_MEMORY", "OUT_OF_RESOURCES")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or any(m in str(error) for m in OOM_MARKERS)


def is_device_error(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(m in str(error) for m in DEVICE_ERROR_MARKERS)


class DeviceForward:
    """forward(ids, start) -> host float32 logits of the last position, with the guard described above.

    Logits come back to the host (one row per step) and the loop samples there: that keeps sampling
    identical to the CPU engine's and lets a fallback continue the same stream on the CPU.
    """

    def __init__(
        self, device_forward: Forward, device: ComputeDevice, history: Callable[[], list[int]],
        load_fallback: Callable[[], Forward], max_retries: int = 3, retry_delay_s: float = 0.05,
    ) -> None:
        self.device_forward, self.device = device_forward, device
        self.history, self.load_fallback = history, load_fallback
        self.max_retries, self.retry_delay_s = max_retries, retry_delay_s
        self.fallback: Forward | None = None
        self.fallback_reason: str | None = None

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback(ids, start)
        failures: list[RuntimeError] = []
        while True:
            try:
                logits = self.device_forward(ids.to(self.device.torch_device), start)
                self.device.synchronize()  # a failed kernel surfaces here, inside the retry, not later
                return logits.float().cpu()
            except RuntimeError as e:
                if is_out_of_memory(e):
                    raise self._out_of_memory(e) from e
                if not is_device_error(e):
                    raise
                failures.append(e)
                if len(failures) > self.max_retries:
                    return self._fall_back(ids, start, failures)
                time.sleep(self.retry_delay_s * 2 ** (len(failures) - 1))

    def _out_of_memory(self, error: RuntimeError) -> IPEXMemoryError:
        self.device.empty_cache()
        free = self.device.free_bytes()
        return IPEXMemoryError(
            f"out of memory on {self.device.name} while generating ({str(error).splitlines()[0]}); the allocator's "
            f"cache was freed and {free / 2**30:.2f} GiB is free now: shorten the prompt, lower the context "
            "length, or use a smaller model or precision", free_bytes=free,
        )

    def _fall_back(self, ids: torch.Tensor, start: int, failures: list[RuntimeError]) -> torch.Tensor:
        self.fallback_reason = (f"{self.device.name} failed {len(failures)} times in a row "
                                f"({str(failures[-1]).splitlines()[0]})")
        log.warning("ipex: %s; this instance now runs on the CPU engine (check the Intel GPU driver and dmesg)",
                    self.fallback_reason)
        forward = self.load_fallback()
        # The CPU model's cache is empty: replay what the device had cached, then this call's tokens.
        tokens = self.history()[:start] + ids.view(-1).tolist()
        logits = torch.empty(0)
        for begin in range(0, len(tokens), 512):
            logits = forward(torch.tensor([tokens[begin:begin + 512]]), begin)
        self.fallback = forward
        return logits.float()


def ipex_generate(generator: TextGenerator, task: TextGenerationTask) -> Generator[GenerationChunk, None, None]:
    """Stream one task; inference mode keeps autograd bookkeeping off the device."""
    with torch.inference_mode():
        yield from generator.generate(task)
