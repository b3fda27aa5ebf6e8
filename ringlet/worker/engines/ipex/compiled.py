"""torch.compile for the ipex engine on native torch.xpu, and its way back to eager.

Compiling happens at the first call of the compiled modules, that is, at warm-up: a compiler that cannot build
for this device (no oneAPI compiler for Triton's XPU backend, an inductor limitation) fails there. The compiled
modules are then given back their eager call and the step runs again; the instance goes on, eagerly, and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ringlet.models.llama import MLP, RMSNorm
from ringlet.shared.errors import first_line
from ringlet.worker.engines.ipex.generator.generate import DeviceGuard, is_device_error, is_out_of_memory

log = logging.getLogger(__name__)

WARM_UP_CALLS = 2  # the warm-up request's prompt step and its one decode step


def compile_fusable_layers(model: nn.Module) -> int:
    """torch.compile the MLPs and RMSNorms in place: they take and return tensors only and fuse well
    (SiLU times up-projection, the norm's casts), cutting kernel launches per token. Whole blocks are not
    compiled: the attention indexes its layer's cache slot by a Python int, which would specialise
    (recompile) once per layer. dynamic: the token count changes between prefill and decode."""
    count = 0
    for module in model.modules():
        if isinstance(module, MLP | RMSNorm):
            module.compile(dynamic=True)
            count += 1
    return count


def undo_compile(model: nn.Module) -> int:
    """The eager call back on every module `compile_fusable_layers` compiled; returns how many."""
    count = 0
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
            count += 1
    return count




class EagerOnCompileFailure:
    """`forward`, whose model has compiled modules: a call of theirs that fails (not on a device fault or an
    out-of-memory, which the `DeviceGuard` around it handles) makes the model eager and runs the call again.
    A step may run twice: it writes the same keys and values to the same cache slots again."""

    def __init__(self, forward: Callable[..., torch.Tensor], model: nn.Module, what: str) -> None:
        self.forward, self.model, self.what = forward, model, what
        self.compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
        self.calls = 0
        self.failure: str | None = None  # e.g. "eager (torch.compile failed at warm-up: ...)"

    def __call__(self, *args: Any) -> torch.Tensor:
        if not self.compiled:
            return self.forward(*args)
        try:
            out = self.forward(*args)
        # a compiler's errors share no base below Exception (dynamo's, inductor's, a backend's own); running the
        # step again eagerly tells a compiler failure from a bug, which fails eagerly too
        except Exception as error:
            if is_device_error(error) or is_out_of_memory(error):
                raise
            undo_compile(self.model)
            self.compiled = False
            when = "warm-up" if self.calls < WARM_UP_CALLS else "a step"
            self.failure = f"eager (torch.compile failed at {when}: {first_line(error)})"
            log.warning("ipex: %s: torch.compile failed at %s (%s); running eagerly", self.what, when,
                        first_line(error))
            return self.forward(*args)
        self.calls += 1
        return out


class ReportsOptimization:
    """What an ipex engine or stage applied and why it left its device, from its compile wrapper and its guard."""

    applied: str  # what loading applied (IPEX, torch.compile, eager)
    compiled: EagerOnCompileFailure
    guard: DeviceGuard[Any]

    @property
    def optimization(self) -> str:
        if self.guard.fallback is not None:
            return "none (the cpu engine, after the device failed)"
        return self.compiled.failure or self.applied

    @property
    def fallback_reason(self) -> str | None:
        return self.guard.fallback_reason
