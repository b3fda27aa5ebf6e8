"""The torch engine that batches: one stage of a model and its paged KV cache, computing many sequences' tokens in
one forward (`forward_batch`); `worker/batching.py` decides what each step computes.

The cache is sized once, at load: `EngineConfig.kv_cache_tokens` positions, or by default what fits in a share of
the memory left after the weights, capped at every running sequence at the longest context and at what the
instance's placement counted for it.

Most steps only decode. On a CPU that step is compiled at warm-up (`EngineConfig.cpu_compile`) with symbolic
batch and context sizes, so one compile serves them all: eager, a step of the embedded model is about 1200 small
operators whose dispatch rivals its matrix products; steps with prompt chunks run eagerly. On CUDA every step of a
whole model up to `MOST_GRAPHED_ROWS` tokens is replayed from a CUDA graph (`paged_decode.py`), prompt chunks
included, so that a step which admits a prompt while 60 others decode costs the GPU's time, not the host's
launching of a thousand kernels.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import psutil
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringlet.models.kernels import cpu_vnni
from ringlet.models.llama import Transformer
from ringlet.models.loader import LoadedStage
from ringlet.models.moe import routes_in_grouped_products
from ringlet.models.paged_cache import BatchLayout, PagedKVCache, SequenceStep
from ringlet.models.tokenizer import Tokenizer
from ringlet.shared.config import EngineConfig, cache_positions
from ringlet.shared.instances import BoundInstance
from ringlet.shared.tasks import EmbeddingTask, GenerationChunk, SamplingParams, TextGenerationTask
from ringlet.worker.engines.torch.engine import load_torch_stage

if TYPE_CHECKING:
    from ringlet.worker.engines.torch.paged_decode import PagedDecodeStep, Picks

log = logging.getLogger(__name__)

BLOCK_SIZE = 16
# the eager steps' attention kernels: not cuDNN's, which plans (and compiles) anew for every shape of a step, and a
# step's shape changes with every prompt chunk (on an H200 the slowest steps of `python scripts/bench_gpu.py --shape
# llama-3.1-8b --streams 1 8 64` took 0.8-2 s, each the first of its shape; the same steps later took 20-40 ms)
EAGER_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
MOST_GRAPHED_ROWS = 1024  # tokens of the largest step on a CUDA graph; a longer step runs its chunks eagerly


def kv_cache_tokens(stage: LoadedStage, device: torch.device, config: EngineConfig, context_length: int,
                    free: int | None = None) -> int:
    """Positions of the cache: as configured, else `cache_positions` over the free memory (`free` bytes, or what the
    device reports), no more than the instance's placement counted (`config.kv_cache_plan`)."""
    if config.kv_cache_tokens is not None:
        return config.kv_cache_tokens
    args, dtype = stage.args, next(stage.model.parameters()).dtype
    kv_heads = getattr(stage.model, "kv_heads", args.num_key_value_heads)  # a tensor-parallel rank holds its share
    per_token = PagedKVCache.bytes_per_block(stage.end - stage.start, 1, kv_heads, args.head_dim, dtype)
    if free is None and device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    elif free is None and device.type == "xpu":
        free = torch.xpu.mem_get_info(device)[0]
    elif free is None:
        free = psutil.virtual_memory().available
    own = cache_positions(context_length, device.type, config.max_batch, free, per_token)
    return own if config.kv_cache_plan is None else min(own, max(context_length, config.kv_cache_plan))


def own_context_length(stage: LoadedStage, config: EngineConfig) -> int:
    return min(stage.args.context_length, config.max_context)


def own_num_blocks(stage: LoadedStage, device: torch.device, config: EngineConfig) -> int:
    """Blocks of the KV cache this device holds for `stage`."""
    return -(-kv_cache_tokens(stage, device, config, own_context_length(stage, config)) // BLOCK_SIZE)


class TorchBatchEngine:
    name = "torch"

    def __init__(self, stage: LoadedStage, device: torch.device, config: EngineConfig = EngineConfig(),
                 num_blocks: int | None = None, context_length: int | None = None) -> None:
        """`num_blocks`, `context_length`: as the stages of a ring agreed (else this device's own)."""
        self.stage, self.device, self.config = stage, device, config
        self.precision = str(next(stage.model.parameters()).dtype).removeprefix("torch.")
        self.vocab_size = stage.args.vocab_size
        self.context_length = context_length or own_context_length(stage, config)
        self.block_size = BLOCK_SIZE
        self.num_blocks = num_blocks or own_num_blocks(stage, device, config)
        self.model = cast(Transformer, stage.model)
        self.model.prepare_positions(self.context_length)
        self.cache = self.model.make_paged_cache(self.num_blocks, self.block_size)
        self.pad_slot = self.cache.pad_slot
        self._compiled_decode: Callable[..., torch.Tensor] | None = None
        self.last_picks: Picks | None = None  # the last step's greedy tokens, where the graphed step picked them
        self.paged_decode: PagedDecodeStep | None = None
        if device.type == "cpu":
            cpu_vnni.available()  # its decode attention, where this CPU has AVX-512 VNNI (built once, then cached)
        if device.type == "cuda":
            self.paged_decode = _paged_decode(self.model, self.cache, self.context_length, config.max_batch,
                                              min(config.max_step_tokens, MOST_GRAPHED_ROWS))

    @classmethod
    def load(cls, model: str | Path | None = None, device: str = "cpu",
             config: EngineConfig = EngineConfig()) -> TorchBatchEngine:
        dev = torch.device(device)
        stage, precision = load_torch_stage(model, precision=config.precision, device=dev)
        engine = cls(stage, dev, config)
        engine.precision = precision
        return engine

    @property
    def tokenizer(self) -> Tokenizer:
        return self.stage.tokenizer

    def forward_batch(self, tokens: torch.Tensor, steps: Sequence[SequenceStep]) -> torch.Tensor:
        """Token ids (or a later stage's hidden states) of the step, packed in `steps`' order -> the last stage's
        logits [R, V] of the steps that want them (else hidden states [T, H]). A token id may be `FED` (the previous
        step's pick of the same row) where the previous step was graphed and this one is too (`graphs`)."""
        if self.paged_decode is not None and self.paged_decode.takes(steps):
            logits = self.paged_decode(tokens, steps)
            self.last_picks = self.paged_decode.last_picks
            return logits
        self.last_picks = None
        if self.paged_decode is not None:  # a whole model (graphs are built for no other)
            decodes = [i for i, s in enumerate(steps) if s.count == 1 and s.wants_logits]
            if decodes and len(decodes) < len(steps) and self.graphs([steps[i] for i in decodes]):
                return self._forward_split(tokens, steps, decodes)
        return self._forward_eager(tokens, steps)

    def _forward_eager(self, tokens: torch.Tensor, steps: Sequence[SequenceStep]) -> torch.Tensor:
        # built outside inference mode, as the compiled step's warm-up inputs were (its guards compare the two)
        layout = BatchLayout.build(steps, self.block_size, self.device, self.pad_slot)
        tokens = tokens.to(self.device)
        with torch.inference_mode(), sdpa_kernel(EAGER_ATTENTION):
            if self._compiled_decode is not None and layout.decode_only:
                group = layout.groups[0]
                return self._compiled_decode(tokens, layout.positions, layout.slots, group.slots, group.mask)
            return self._host_logits(self.model.forward_batch(tokens, self.cache, layout))

    def _host_logits(self, out: torch.Tensor) -> torch.Tensor:
        """A CPU's logits in float32: the samplers' numpy kernels read them as they are (torch's argmax over a bf16
        vocabulary is several times slower than the cast and numpy's argmax together)."""
        return out.float() if self.device.type == "cpu" and self.model.is_last else out

    def _forward_split(self, tokens: torch.Tensor, steps: Sequence[SequenceStep], decodes: list[int]) -> torch.Tensor:
        """A step of decodes and prompt chunks too long for a graph as two: the decodes on their CUDA graph, the
        chunks eagerly; the logits
        in `steps`' order. `scripts/time_mixed_steps_gpu.py` times both ways; docs/benchmarks.md has the numbers."""
        assert self.paged_decode is not None
        firsts = [0]
        for step in steps:
            firsts.append(firsts[-1] + step.count)
        decoding = set(decodes)
        chunks = [i for i in range(len(steps)) if i not in decoding]
        host = tokens.cpu()
        decoded = self.paged_decode(host[[firsts[i] for i in decodes]], [steps[i] for i in decodes])
        chunked = self._forward_eager(torch.cat([host[firsts[i]:firsts[i + 1]] for i in chunks]),
                                      [steps[i] for i in chunks])
        # rows of (decoded, chunked) in the order of the steps that want logits
        row_of = {i: row for row, i in enumerate(decodes)}
        row_of.update({i: len(decodes) + row for row, i in enumerate(i for i in chunks if steps[i].wants_logits)})
        order = torch.tensor([row_of[i] for i, s in enumerate(steps) if s.wants_logits], device=self.device)
        return torch.cat((decoded, chunked.to(decoded.dtype)))[order]

    def graphs(self, steps: Sequence[SequenceStep]) -> bool:
        """A step over `steps` decodes on a CUDA graph (picking each row's greedy token, and taking `FED` ids)."""
        return self.paged_decode is not None and len(steps) <= self.paged_decode.max_batch and all(
            s.count == 1 and s.wants_logits for s in steps)

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        return self._host_logits(self.model.forward_batch(tokens, self.cache,
                                                          BatchLayout.for_decode(positions, slots, context, mask)))

    def warmup(self) -> None:
        """Compile the CPU decode step (when configured), then run a short generation, so that no request pays for
        either. A step that fails to compile leaves eager decoding, which always works."""
        # a mixture of experts is compiled where its experts run as grouped products (their shapes never depend on
        # the routing; per-expert products ask the host for each expert's rows); its CUDA step has kernels of its own
        if self.device.type == "cpu" and self.config.cpu_compile and routes_in_grouped_products(self.model):
            self._compile_decode()
        if self.paged_decode is not None:
            began = time.perf_counter()
            try:
                self.paged_decode.warm()
            # its kernels compile here, in the runs before each capture: a GPU or Triton that cannot build them leaves
            # the eager step, which runs every model
            except Exception as error:  # noqa: BLE001
                log.warning("the graphed CUDA decode step could not be built, decoding eagerly: %s: %s",
                            type(error).__name__, str(error).splitlines()[0] if str(error) else "")
                self.paged_decode = None
        if self.paged_decode is not None:
            log.info("CUDA graphs for decode steps of %s sequences and steps with prompt chunks of %s tokens captured "
                     "in %.1f s", ", ".join(map(str, self.paged_decode.buckets)),
                     ", ".join(map(str, self.paged_decode.mixed_buckets)), time.perf_counter() - began)
        task = TextGenerationTask(task_id="warm-up", prompt="Hello", max_tokens=2, sampling=SamplingParams(temperature=0))
        deque(self.generate(task), maxlen=0)

    def _compile_decode(self) -> None:
        began = time.perf_counter()
        log.info("compiling the CPU decode step (minutes on a first start; cached for later ones)")
        # No guards on the model's modules and no size checks of the graph's inputs: nothing changes the model after
        # loading (its rotary tables are built for the whole context in __init__), and the step's own inputs keep
        # their guards. Both checks ran on every step over every weight: 0.8 ms of a 9.6 ms step of the embedded
        # model on a 2-core Xeon (compiled with and without, 100 steps each, interleaved three times).
        compiled = torch.compile(self._decode, fullgraph=True, dynamic=True, options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "size_asserts": False})
        try:
            # one graph for a batch of one (a size of 1 is always a graph of its own) and one for every other batch;
            # the inputs are made as the serving loop makes them (not as inference tensors), so no guard fails later
            for batch, context in ((1, 17), (2, 33), (3, 50)):
                inputs = _scratch_decode(batch, context, self.block_size, self.pad_slot, self.device)
                with torch.inference_mode():
                    compiled(*inputs)
        # any failure (no C++ compiler, an inductor limitation) leaves eager decoding
        except Exception as error:  # noqa: BLE001
            log.warning("the CPU decode step could not be compiled, decoding eagerly: %s: %s", type(error).__name__,
                        str(error).splitlines()[0] if str(error) else "")
            return
        self._compiled_decode = compiled
        log.info("CPU decode step compiled in %.1f s", time.perf_counter() - began)

    def generate(self, task: TextGenerationTask) -> Generator[GenerationChunk, None, None]:
        """One task alone (`ringlet run`, `ringlet bench`): the batched loop with a batch of one."""
        from ringlet.worker.batching import generate_alone

        return generate_alone(self, self.config, task)

    def embed(self, task: EmbeddingTask, after_forward: Callable[[], None] = lambda: None) -> list[GenerationChunk]:
        """An embeddings request, all its inputs at once (`embed.py`); ValueError for a generation-only model."""
        from ringlet.worker.engines.torch.embed import embed

        return embed(self.model, self.stage.tokenizer, self.stage.pooling, task, self.context_length,
                     self.config.max_step_tokens, after_forward)

    def close(self) -> None:
        del self.cache


def initialize_torch(bound: BoundInstance, config: EngineConfig) -> TorchBatchEngine:
    """The batched engine of a single-stage instance on this node's CPU or NVIDIA GPU."""
    return TorchBatchEngine.load(bound.instance.model, device="cuda" if bound.engine == "cuda" else "cpu",
                                 config=config)


def _paged_decode(model: Transformer, cache: PagedKVCache, context_length: int, max_batch: int,
                  max_rows: int) -> PagedDecodeStep | None:
    """The graphed CUDA decode step of a whole model, or None (the eager step) for a stage or a model it cannot
    run."""
    from ringlet.worker.engines.torch.fused_decode import unsupported_reason
    from ringlet.worker.engines.torch.paged_decode import PagedDecodeStep

    if not (model.is_first and model.is_last):
        return None
    reason = unsupported_reason(model, experts=True)
    if reason is not None:
        log.warning("decoding eagerly on CUDA: %s", reason)
        return None
    # a prompt chunk's tokens would each read their experts' weights again: chunks of a mixture of experts run eagerly,
    # their rows grouped by expert (`experts.py`)
    return PagedDecodeStep(model, cache, context_length, max_batch, 0 if model.args.has_experts else max_rows)


def _scratch_decode(batch: int, context: int, block_size: int, pad_slot: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of a decode step over the cache's first blocks, built as a serving step builds them (same strides,
    dtypes and devices, so the compiled step's guards hold later). Its writes are scratch: slots are read only
    after their sequence wrote them."""
    blocks = list(range(-(-context // block_size)))
    steps = [SequenceStep(context - 1 - i, 1, blocks) for i in range(batch)]
    layout = BatchLayout.build(steps, block_size, device, pad_slot)
    group = layout.groups[0]
    tokens = torch.zeros(batch, dtype=torch.long, device=device)
    return tokens, layout.positions, layout.slots, group.slots, group.mask
