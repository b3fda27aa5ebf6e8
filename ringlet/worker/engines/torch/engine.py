"""The torch engine: one whole model (a single stage) on a CPU or CUDA device."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from ringlet.models.loader import LoadedStage, Quantization, load_stage
from ringlet.models.moe import routes_in_grouped_products
from ringlet.models.quant import COMPUTE_DTYPES, cpu_supports_bf16
from ringlet.models.tokenizer import Tokenizer
from ringlet.shared.config import PRECISIONS, EngineConfig, sharded_precision
from ringlet.shared.tasks import GenerationChunk, TextGenerationTask
from ringlet.worker.engines.base import run_warmup_request
from ringlet.worker.engines.torch.generate import TextGenerator
from ringlet.worker.engines.torch.static_decode import StaticDecoder

if TYPE_CHECKING:
    from ringlet.models.llama import Transformer
    from ringlet.shared.config import Precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """int8 / int4 (weight-only) on CPUs and CUDA GPUs. auto: bf16 on GPUs; int8 weights with bf16 activations on
    CPUs with native bf16 (int4 where the file itself is stored in 4 bits: see `load_torch_stage`), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision in ("int8", "int4") and device.type not in ("cpu", "cuda"):
        raise ValueError(f"precision {precision} runs on CPUs and CUDA GPUs; use bf16 or fp16 on {device.type}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "int8" if cpu_supports_bf16() else "fp32"
    return "bf16"


def load_torch_stage(model: str | Path | None, start: int = 0, end: int | None = None, precision: str = "auto",
                     device: torch.device | None = None, sharded: bool = False) -> tuple[LoadedStage, str]:
    """Layers [start, end) in `precision`, weight-only quantised for int8 / int4; returns the precision used.

    auto on a CPU picks int4 when the file stores the stage's linears in 4 bits (GGUF Q4_0 / Q4_1 / Q4_K): its own
    codes run as they are, so nothing is rounded twice and half of int8's bytes are read per token; so do its 5-bit
    ones (Q5_0 / Q5_1 / Q5_K) where ringlet's CPU kernels run; the linears it stores in more bits (Q6_K, Q8_0) run
    as int8. `sharded`: this rank's share of a tensor-parallel stage
    (`loader.load_stage`), whose weights stay floats: auto is bf16 on a GPU, fp32 on a CPU.
    """
    device = device or torch.device("cpu")
    if sharded and device.type == "cpu":  # on a GPU auto is a float already (bf16, or fp16 where bf16 is missing)
        precision = sharded_precision(cast("Precision", precision), "cpu")
    resolved = resolve_precision(precision, device)
    quantize: Quantization | None = (
        "int4 where stored" if precision == "auto" and resolved == "int8"
        else cast("Quantization", resolved) if resolved in ("int8", "int4") else None)
    stage = load_stage(model, start, end, dtype=COMPUTE_DTYPES[resolved], device=device,
                       quantize=quantize, sharded=sharded)
    return stage, stage.quantized or resolved


class TorchEngine:
    name = "torch"

    def __init__(self, stage: LoadedStage, device: torch.device, config: EngineConfig = EngineConfig(),
                 cuda_graphs: bool | None = None) -> None:
        """Decode steps: on CUDA, replayed from CUDA graphs (`cuda_graphs`, default on; the fused Triton step or the
        compiled one, as `config` says); on a CPU, compiled at warm-up when `config.cpu_compile`; until then eager."""
        self.stage, self.device = stage, device
        self.precision = str(next(stage.model.parameters()).dtype).removeprefix("torch.")
        self.context_length = min(stage.args.context_length, config.max_context)
        model = cast("Transformer", stage.model)  # every architecture's stage
        model.prepare_positions(self.context_length)
        self.cache = model.make_cache(1, self.context_length)
        graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        compile = device.type != "cpu" or config.cpu_compile
        self.decoder: StaticDecoder | None = None
        # a mixture of experts routes by the data: its steps are compiled on a CPU where its experts run as grouped
        # products (shapes that never depend on the routing), never graphed
        routed = device.type == "cpu" and not graphs and routes_in_grouped_products(stage.model)
        if (graphs or (device.type == "cpu" and compile)) and (not stage.args.has_experts or routed):
            self.decoder = StaticDecoder(stage.model, self.cache, self.context_length, compile=compile,
                                         capture=graphs, config=config)
        self.generator = TextGenerator(
            self._forward, stage.tokenizer, self.context_length, stage.args.vocab_size, device,
            lookahead=device.type == "cuda",
        )

    @classmethod
    def load(cls, model: str | Path | None = None, device: str = "cpu", config: EngineConfig = EngineConfig(),
             cuda_graphs: bool | None = None) -> TorchEngine:
        dev = torch.device(device)
        stage, precision = load_torch_stage(model, precision=config.precision, device=dev)
        engine = cls(stage, dev, config, cuda_graphs)
        engine.precision = precision
        return engine

    @property
    def tokenizer(self) -> Tokenizer:
        return self.stage.tokenizer

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        if self.decoder is not None and self.decoder.ready and ids.shape[1] == 1:
            return self.decoder(ids, start)
        logits = self.stage.model(ids, self.cache, start, last_logits_only=True)
        return logits[:, -1]

    def warmup(self) -> None:
        """Capture the decode graphs (CUDA) or compile the decode step (CPU), then run one short generation."""
        if self.decoder is not None:
            self.decoder.warm()
        run_warmup_request(self)

    def generate(self, task: TextGenerationTask) -> Generator[GenerationChunk, None, None]:
        with torch.inference_mode():
            yield from self.generator.generate(task)

    def close(self) -> None:
        del self.cache
