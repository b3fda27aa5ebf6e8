"""IpexEngine: one whole model, or one stage of a ring, on an Intel GPU (or on the CPU through IPEX's CPU backend),
batching as the torch engines do: the same paged KV cache and batched steps (`TorchBatchEngine`) on the device,
behind `DeviceGuard`."""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import cast

import torch

from ringlet.models.loader import LoadedStage
from ringlet.models.paged_cache import SequenceStep
from ringlet.shared.config import EngineConfig
from ringlet.shared.tasks import GenerationChunk, TextGenerationTask
from ringlet.worker.engines.base import run_warmup_request
from ringlet.worker.engines.ipex import IpexLoadedModel, IPEXTokenizerWrapper
from ringlet.worker.engines.ipex.compiled import EagerOnCompileFailure, ReportsOptimization
from ringlet.worker.engines.ipex.device import ComputeDevice
from ringlet.worker.engines.ipex.generator.generate import BatchForward, DeviceGuard
from ringlet.worker.engines.torch.batch_engine import BLOCK_SIZE, TorchBatchEngine, kv_cache_tokens


class IpexEngine(ReportsOptimization):
    """A loaded model (`utils_ipex.load_ipex_engine` builds one), or one stage's layers of a ring
    (`worker/pipeline.py`), as a batch model (`worker/batching.py`): its steps run on the device, their outputs
    (logits, or a stage's hidden states) come back to the host, where every sequence samples.

    `name` is the engine it runs on ("ipex", "cpu" once the guard fell back), `optimization` what was applied to
    the model (what warm-up left of it), `fallback_reason` why it left the device (None while on it)."""

    device = torch.device("cpu")  # where its outputs are and the samplers run: the host, so a fallback goes on alike

    def __init__(self, loaded: IpexLoadedModel, device: ComputeDevice, model_ref: str | Path | None,
                 config: EngineConfig = EngineConfig(), max_retries: int = 3, num_blocks: int | None = None,
                 context_length: int | None = None, owner: str | None = None) -> None:
        """`num_blocks`, `context_length`: as the stages of a ring agreed (else this device's own); `owner`: what
        moves to the CPU when the device fails, for its log line (the instance, or a stage of its ring)."""
        self.name = "ipex"
        self.loaded, self.compute, self.model_ref, self.config = loaded, device, model_ref, config
        self.precision, self.applied = loaded.precision, loaded.optimization
        self.context_length = context_length or loaded.context_length
        self.stage = dataclasses.replace(loaded.stage, model=cast(torch.nn.Module, loaded.model))  # IPEX may copy it
        self.vocab_size = self.stage.args.vocab_size
        self._tokenizer = IPEXTokenizerWrapper(self.stage.tokenizer, self.stage.args.vocab_size)
        if num_blocks is None:
            num_blocks = -(-own_kv_cache_tokens(self.stage, device, config, self.context_length) // BLOCK_SIZE)
        self.steps: TorchBatchEngine | None = TorchBatchEngine(
            self.stage, device.torch_device, config, num_blocks=num_blocks, context_length=self.context_length)
        self.num_blocks, self.block_size, self.pad_slot = self.steps.num_blocks, BLOCK_SIZE, self.steps.pad_slot
        self.dtype = next(self.stage.model.parameters()).dtype  # a later stage's hidden states arrive in it
        self.compiled = EagerOnCompileFailure(self.steps.forward_batch, self.stage.model,
                                              f"layers {self.stage.start}-{self.stage.end - 1} on {device.name}")
        whole = (self.stage.start, self.stage.end) == (0, self.stage.args.num_hidden_layers)
        self.guard = DeviceGuard(self.compiled, device, self._load_cpu_fallback, max_retries,
                                 owner=owner or ("this instance" if whole else "this stage of the ring"))

    @property
    def tokenizer(self) -> IPEXTokenizerWrapper:
        return self._tokenizer

    @property
    def model(self) -> torch.nn.Module | None:
        """The model on the device; None once a fallback let it go."""
        return None if self.steps is None else self.steps.model

    def forward_batch(self, tokens: torch.Tensor, steps: Sequence[SequenceStep]) -> torch.Tensor:
        if tokens.is_floating_point():  # a later stage's input: the hidden states, in its model's dtype
            tokens = tokens.to(self.dtype)
        return self.guard(tokens, steps)

    def _load_cpu_fallback(self) -> BatchForward:
        from ringlet.worker.engines.torch.engine import load_torch_stage

        self.steps = None  # let the device memory go; the device may be unusable now
        self.compute.empty_cache()
        # the same precision where the CPU runs it (fp16 matmuls are emulated there), so the streams stay alike
        precision = "auto" if self.precision == "fp16" else self.precision
        stage, _ = load_torch_stage(self.model_ref, self.stage.start, self.stage.end, precision=precision,
                                    device=torch.device("cpu"))
        # the same blocks as the device's cache, so the batch's block tables stay valid (their contents are gone)
        cpu = TorchBatchEngine(stage, torch.device("cpu"), self.config, num_blocks=self.num_blocks,
                               context_length=self.context_length)
        self.stage, self.dtype, self.name = stage, next(stage.model.parameters()).dtype, "cpu"
        return cpu.forward_batch

    def warmup(self) -> None:
        """One short generation: primes IPEX's kernels or compiles (eager again if the compiler fails) before the
        first request."""
        run_warmup_request(self)

    def generate(self, task: TextGenerationTask) -> Generator[GenerationChunk, None, None]:
        """One task alone (`ringlet run`, `ringlet bench`): the batched loop with a batch of one."""
        from ringlet.worker.batching import generate_alone

        return generate_alone(self, self.config, task)

    def close(self) -> None:
        self.steps = None
        self.compute.empty_cache()


def own_kv_cache_tokens(stage: LoadedStage, device: ComputeDevice, config: EngineConfig, context_length: int) -> int:
    """Positions of the KV cache the device holds for `stage` (`kv_cache_tokens` over the device's free memory)."""
    return kv_cache_tokens(stage, device.torch_device, config, context_length, device.free_bytes())
