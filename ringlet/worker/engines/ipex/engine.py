"""IpexEngine: one whole model on an Intel GPU (or on the CPU through IPEX's CPU backend)."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import torch

from ringlet.models.cache import StaticKVCache
from ringlet.shared.config import EngineConfig
from ringlet.shared.tasks import GenerationChunk, TextGenerationTask
from ringlet.worker.engines.base import run_warmup_request
from ringlet.worker.engines.ipex import IpexLoadedModel, IPEXModel, IPEXTokenizerWrapper
from ringlet.worker.engines.ipex.device import ComputeDevice
from ringlet.worker.engines.ipex.generator.generate import DeviceForward, ipex_generate
from ringlet.worker.engines.torch.generate import Forward, TextGenerator


class IpexEngine:
    """A loaded model (`utils_ipex.load_ipex_engine` builds one) behind the device guard of `DeviceForward`."""

    name = "ipex"

    def __init__(self, loaded: IpexLoadedModel, device: ComputeDevice, model_ref: str | Path | None,
                 config: EngineConfig = EngineConfig(), max_retries: int = 3) -> None:
        self.loaded, self.device, self.model_ref, self.config = loaded, device, model_ref, config
        self.precision, self.optimization = loaded.precision, loaded.optimization
        self.context_length = loaded.context_length
        args = loaded.stage.args
        self.model: IPEXModel | None = loaded.model
        self.cache: StaticKVCache | None = loaded.model.make_cache(1, self.context_length)
        self.tokenizer = IPEXTokenizerWrapper(loaded.stage.tokenizer, args.vocab_size)
        self.forward = DeviceForward(self._device_forward, device, history=lambda: self.generator.cached,
                                     load_fallback=self._load_cpu_fallback, max_retries=max_retries)
        # The loop runs on the host: ids go to the device inside forward, logits come back (see DeviceForward).
        self.generator = TextGenerator(self.forward, self.tokenizer, self.context_length, args.vocab_size, "cpu")

    @property
    def fallback_reason(self) -> str | None:
        return self.forward.fallback_reason

    def _device_forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        assert self.model is not None and self.cache is not None, "the device model is gone after a fallback"
        logits = self.model(ids, self.cache, start, last_logits_only=True)
        return logits[:, -1]

    def _load_cpu_fallback(self) -> Forward:
        from ringlet.worker.engines.torch.engine import TorchEngine

        self.model = self.cache = None  # let the device memory go; the device may be unusable now
        # the same precision where the CPU runs it (fp16 matmuls are emulated there), so the stream stays alike
        precision = "auto" if self.precision == "fp16" else self.precision
        cpu = TorchEngine.load(self.model_ref, device="cpu",
                               config=self.config.model_copy(update={"precision": precision}))
        self.name = "cpu"
        return cpu.generator.forward

    def warmup(self) -> None:
        """One short generation: compiles (torch.compile) or primes IPEX's kernels before the first request."""
        run_warmup_request(self)

    def generate(self, task: TextGenerationTask) -> Generator[GenerationChunk, None, None]:
        return ipex_generate(self.generator, task)

    def close(self) -> None:
        self.model = self.cache = None
        self.device.empty_cache()

