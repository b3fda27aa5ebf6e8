"""One stage of a ring that runs one request at a time (a ring with an MLX stage: `worker/stages.py`), on an Intel
GPU: its layers and static KV cache on the device behind the same guard as a whole model's (`DeviceGuard`).

After a fallback the layers reload on the CPU with an empty cache; the stage rebuilds it from the inputs of the
request so far, which it keeps on the host while it runs on the device (token ids on the first stage, hidden
states elsewhere: hidden_size values a position, where the cache holds 2 x layers x KV heads x head_dim), so the
ring goes on with the same request.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from ringlet.models.cache import StaticKVCache
from ringlet.models.loader import LoadedStage
from ringlet.models.paged_cache import CacheLost
from ringlet.models.tokenizer import Tokenizer
from ringlet.worker.engines.ipex import IpexLoadedModel
from ringlet.worker.engines.ipex.compiled import EagerOnCompileFailure, ReportsOptimization
from ringlet.worker.engines.ipex.device import ComputeDevice
from ringlet.worker.engines.ipex.generator.generate import DeviceGuard

if TYPE_CHECKING:
    from ringlet.models.llama import Transformer


class IpexStage(ReportsOptimization):
    """A `StageModel` (`worker/stages.py`): layers [start, end) on an Intel GPU, their outputs on the host."""

    device = torch.device("cpu")  # where its outputs are, and the last stage samples

    def __init__(self, loaded: IpexLoadedModel, compute: ComputeDevice, model_ref: str | Path | None,
                 max_retries: int = 3) -> None:
        stage = loaded.stage
        self.name, self.precision, self.applied = "ipex", loaded.precision, loaded.optimization
        self.compute, self.model_ref, self.start, self.end = compute, model_ref, stage.start, stage.end
        self.tokenizer: Tokenizer = stage.tokenizer
        self.hidden_size, self.vocab_size = stage.args.hidden_size, stage.args.vocab_size
        self.context_length = loaded.context_length
        self.is_last = stage.end == stage.args.num_hidden_layers
        self.model = cast(torch.nn.Module, loaded.model)
        self._use(stage, self.model)
        self.compiled = EagerOnCompileFailure(self._run, self.model, f"layers {self.start}-{self.end - 1} on "
                                              f"{compute.name}")
        self.guard: DeviceGuard[int] = DeviceGuard(self.compiled, compute, self._load_cpu_fallback, max_retries,
                                                   owner="this stage of the ring")
        self.inputs: list[torch.Tensor] = []  # the request's inputs so far, [1, L(, H)] each, on the host
        self.length = 0  # positions they cover

    def _use(self, stage: LoadedStage, model: torch.nn.Module) -> None:
        self.model, self.dtype = model, next(model.parameters()).dtype
        layers = cast("Transformer", stage.model)
        layers.prepare_positions(self.context_length)
        self.cache: StaticKVCache = layers.make_cache(1, self.context_length)
        self.on = next(model.parameters()).device

    def _run(self, x: torch.Tensor, start: int) -> torch.Tensor:
        x = x.to(self.on, self.dtype) if x.is_floating_point() else x.to(self.on)
        out = self.model(x, self.cache, start, last_logits_only=True)
        return out[:, -1] if self.is_last else out

    def _load_cpu_fallback(self) -> Callable[[torch.Tensor, int], torch.Tensor]:
        from ringlet.worker.engines.torch.engine import load_torch_stage

        del self.model, self.cache  # let the device memory go; the device may be unusable now
        self.compute.empty_cache()
        precision = "auto" if self.precision == "fp16" else self.precision
        stage, _ = load_torch_stage(self.model_ref, self.start, self.end, precision, torch.device("cpu"))
        self._use(stage, stage.model)
        self.name = "cpu"
        return self._run

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        try:
            out = self.guard(x, start)
        except CacheLost:  # on the CPU now, with an empty cache: the request's inputs so far fill it again
            if start:
                self.guard(torch.cat(self._kept(start), dim=1), 0)
            out = self.guard(x, start)
        if self.guard.fallback is None:
            kept = x.to("cpu", self.dtype, copy=True) if x.is_floating_point() else x.to("cpu", copy=True)
            self.inputs = self._kept(start) + [kept]
            self.length = start + x.shape[1]
        else:
            self.inputs, self.length = [], 0  # the CPU keeps its cache
        return out

    def _kept(self, start: int) -> list[torch.Tensor]:
        """The inputs of positions before `start` (a start before their end drops what lies past it)."""
        assert start <= self.length, f"position {start} after the {self.length} this stage has seen"
        if start == self.length:
            return self.inputs
        return [torch.cat(self.inputs, dim=1)[:, :start]] if start else []

