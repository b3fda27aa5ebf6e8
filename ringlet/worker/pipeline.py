"""The stages of a split model that batch: every stage runs torch (cpu, cuda, ipex), and each step carries many
sequences' tokens down the ring, several steps at once.

Rank 0 (`PipelineHead`) keeps the continuous-batching loop (`worker/batching.py`): it plans a step, runs its own
layers over the step's tokens, and posts the layout and hidden states to the next stage (`Op.BATCH`). Every other
stage (`PipelineStage`) rebuilds the step's layout from what it received, runs its layers over its own paged KV
cache and passes the hidden states on; the last one samples each sequence with the parameters its `Op.BEGIN`
carried, and posts the token ids back to rank 0. With S stages, up to S steps are in flight, each over its own
share of the running sequences (micro-batches), so every stage computes at once. On NCCL one step is in flight:
its point-to-point sends and receives between two ranks run in order on one stream, and a second step's send would
wait on the first step's tokens coming back.

The stages' caches hold the same blocks: rank 0's block manager decides which block each position goes to, for
every stage. At the rendezvous each stage says how many blocks it can hold and how long a context it serves, and
all take the smallest.

A stage on an Intel GPU is an `IpexEngine` over its layers, as a single-node instance would be (its GPU, memory
check, optimisation level, guarded steps), or an `IpexChain` of them where placement split the stage over several
GPUs of its node. Where a guard falls back to the CPU, that cache is gone: the stage keeps on the host what each
live sequence gave it (`StageInputs`) and computes them again, so the ring goes on with the same sequences.

An embeddings request goes down the ring when no step is in flight (`PipelineHead.embed`): `Op.EMBED` carries its
inputs' hidden states through every stage's layers (no KV cache), and the last stage pools them, as the model's files
say, and sends the vectors back to rank 0.

A ring with an MLX stage runs one request at a time (`worker/stages.py`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from pydantic import BaseModel

from ringlet.models.paged_cache import CacheLost, SequenceStep
from ringlet.models.sampling import RequestSampler
from ringlet.models.tokenizer import Tokenizer
from ringlet.net.ring import Op, Ring, RingBrokenError, RingHead, open_ring
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance
from ringlet.shared.tasks import EmbeddingTask, GenerationChunk, SamplingParams, TextGenerationTask
from ringlet.worker.batching import generate_alone, sample_rows
from ringlet.worker.engines.base import run_warmup_request
from ringlet.worker.engines.engine_utils import ProbeInputs
from ringlet.worker.engines.ipex.chain import IpexChain
from ringlet.worker.engines.ipex.engine import IpexEngine
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine, own_context_length, own_num_blocks
from ringlet.worker.engines.torch.embed import PassThroughCache, embed_inputs, pool
from ringlet.worker.engines.torch.engine import load_torch_stage
from ringlet.worker.stages import SampledDownTheRing, compute_device, post_reports, recv_reports

log = logging.getLogger(__name__)


class _Begin(BaseModel):
    """A sequence the last stage will sample: its key in later steps, its parameters and prompt."""

    key: int
    sampling: SamplingParams
    prompt: list[int]


class _End(BaseModel):
    keys: list[int]


def batches(bound: BoundInstance) -> bool:
    """Whether the ring of `bound` runs batched steps: every stage on a torch engine."""
    return all(shard.engine != "mlx" for shard in bound.instance.shards)


def encode_steps(steps: Sequence[SequenceStep], keys: Sequence[int]) -> torch.Tensor:
    """A step's layout for the other stages, int64: per sequence its key, start, count, whether it wants logits,
    then its block table (the blocks its positions reach)."""
    values: list[int] = []
    for step, key in zip(steps, keys, strict=True):
        blocks = list(step.blocks)
        values += [key, step.start, step.count, int(step.wants_logits), len(blocks), *blocks]
    return torch.tensor(values, dtype=torch.int64)


def decode_steps(encoded: torch.Tensor) -> tuple[list[SequenceStep], list[int]]:
    values = encoded.tolist()
    steps: list[SequenceStep] = []
    keys: list[int] = []
    at = 0
    while at < len(values):
        key, start, count, wants_logits, used = values[at:at + 5]
        steps.append(SequenceStep(start, count, values[at + 5:at + 5 + used], bool(wants_logits)))
        keys.append(key)
        at += 5 + used
    return steps, keys


OnIntelGpu = IpexEngine | IpexChain
StageEngine = TorchBatchEngine | OnIntelGpu


def load_stage_engine(bound: BoundInstance, config: EngineConfig, store: dist.Store,
                      loaded: Callable[[], None] = lambda: None, probes: ProbeInputs | None = None
                      ) -> tuple[StageEngine, str]:
    """This stage's layers on its batched engine, and their precision; the KV cache as large as every stage of the
    ring can hold. `loaded` is called once the weights are in, before waiting for the other stages. `probes`: what
    detection looks at for an Intel GPU's stage (this machine by default)."""
    # rank 0 of the stage's ranks (`start_ranks`); an IpexRing's ranks, too, run ringlet's torch engine on their GPUs
    if bound.instance.tensor_parallel > 1:
        from ringlet.worker.tensor_ranks import lead, load_rank_engine

        share, precision = load_rank_engine(bound, config, 0, lambda b, c: _agreed(bound, b, c, store), loaded)
        lead(share)
        return share, precision
    if bound.engine == "ipex":
        from ringlet.worker.engines.ipex.utils_ipex import ipex_engine_of, load_ipex_parts, own_ipex_blocks

        parts = load_ipex_parts(bound, config, probes)
        loaded()
        own_context = min(part.context_length for part, _ in parts)
        num_blocks, context_length = _agreed(bound, own_ipex_blocks(parts, config, own_context), own_context, store)
        engine = ipex_engine_of(bound, config, parts, num_blocks=num_blocks, context_length=context_length)
        return engine, engine.precision
    device = compute_device(bound.engine)
    stage, precision = load_torch_stage(bound.instance.model, bound.shard.start, bound.shard.end, config.precision,
                                        device)
    loaded()
    num_blocks, context_length = _agreed(bound, own_num_blocks(stage, device, config),
                                         own_context_length(stage, config), store)
    return TorchBatchEngine(stage, device, config, num_blocks=num_blocks, context_length=context_length), precision


def _agreed(bound: BoundInstance, num_blocks: int, context_length: int, store: dist.Store) -> tuple[int, int]:
    """The KV cache's blocks and the context every stage of the ring can hold: the smallest offers."""
    rank, size = bound.shard.rank, len(bound.instance.shards)
    store.set(f"kv-cache/{rank}", f"{num_blocks} {context_length}")
    offers = [tuple(int(v) for v in store.get(f"kv-cache/{r}").decode().split()) for r in range(size)]
    num_blocks, context_length = min(o[0] for o in offers), min(o[1] for o in offers)
    log.info("instance %s: stage %d keeps a KV cache of %d blocks (the smallest of the ring's stages)",
             bound.instance.instance_id, rank, num_blocks)
    return num_blocks, context_length


@dataclass
class _Given:
    """What one sequence gave a stage: its inputs from position `first` on, and its block table."""

    first: int
    chunks: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # positions the chunks cover
    blocks: list[int] = field(default_factory=list)


class StageInputs:
    """The inputs of every live sequence of a stage whose cache can be lost (an `IpexEngine`'s, on the device), on
    the host: token ids on rank 0, hidden states after it (in the stage's dtype: hidden_size values a position,
    where its cache holds 2 x layers x KV heads x head_dim). `rebuild` computes them again into a fresh cache."""

    def __init__(self, engine: OnIntelGpu) -> None:
        self.engine = engine
        self.given: dict[int, _Given] = {}

    def record(self, x: torch.Tensor, steps: Sequence[SequenceStep], keys: Sequence[int]) -> None:
        at = 0
        for step, key in zip(steps, keys, strict=True):
            part = x[at:at + step.count]
            at += step.count
            given = self.given.get(key)
            if given is None or step.start <= given.first or step.start > given.first + given.length:
                given = self.given[key] = _Given(step.start)
            elif step.start < given.first + given.length:  # computed again from `start` (a preempted sequence)
                given.chunks = [torch.cat(given.chunks)[:step.start - given.first]]
                given.length = step.start - given.first
            dtype = self.engine.dtype if part.is_floating_point() else part.dtype
            given.chunks.append(part.to("cpu", dtype, copy=True))
            given.length += step.count
            given.blocks = list(step.blocks)

    def forget(self, keys: Sequence[int]) -> None:
        for key in keys:
            self.given.pop(key, None)

    def rebuild(self) -> None:
        """Every live sequence's positions computed again, a prompt chunk at a time, into the engine's cache."""
        chunk = self.engine.config.max_step_tokens
        for key, given in self.given.items():
            if given.first != 0:
                raise RingBrokenError(f"this stage's cache was lost and sequence {key} cannot be computed again "
                                      f"here: its first {given.first} positions were a prefix another one computed")
            inputs = torch.cat(given.chunks)
            for start in range(0, given.length, chunk):
                count = min(chunk, given.length - start)
                blocks = given.blocks[:-(-(start + count) // self.engine.block_size)]
                self.engine.forward_batch(inputs[start:start + count], [SequenceStep(start, count, blocks, False)])


def _forward(engine: StageEngine, inputs: StageInputs | None, x: torch.Tensor, steps: Sequence[SequenceStep],
             keys: Sequence[int]) -> tuple[torch.Tensor, StageInputs | None]:
    """The stage's step; where its engine lost the cache (an Intel GPU fell back to the CPU), the cache is computed
    again from `inputs` and the step runs once more. Returns the output and the inputs to keep (None once wholly on
    the CPU, whose cache is not lost)."""
    if inputs is None:
        return engine.forward_batch(x, steps), None
    try:
        out = engine.forward_batch(x, steps)
    except CacheLost:
        inputs.rebuild()
        out = engine.forward_batch(x, steps)
    if isinstance(engine, OnIntelGpu) and engine.name == "cpu":  # every part of it on the CPU, whose cache stays
        return out, None
    inputs.record(x, steps, keys)
    return out, inputs


class _Described:
    """What a ring's stage runs on: `name`, the engine ("cpu" once an Intel GPU's stage fell back; "torch" for a
    CPU or CUDA stage, whose device says which), `optimization`, what was applied to its layers, `fallback_reason`."""

    engine: StageEngine

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def optimization(self) -> str:
        return self.engine.optimization if isinstance(self.engine, OnIntelGpu) else "none"

    @property
    def fallback_reason(self) -> str | None:
        return self.engine.fallback_reason if isinstance(self.engine, OnIntelGpu) else None


def _gpu_of(engine: StageEngine) -> torch.device | None:
    """The Intel GPU an ipex stage computes on (its ring's frames go from there where xccl runs), else None."""
    return engine.compute.torch_device if isinstance(engine, OnIntelGpu) else None


class PipelineHead(RingHead, _Described):
    """Rank 0: a `PipelinedModel` for `BatchGenerator`, whose steps run down the whole ring."""

    def __init__(self, bound: BoundInstance, engine: StageEngine, store: dist.Store,
                 data_host: str = "127.0.0.1") -> None:
        assert bound.shard.is_first and not bound.shard.is_last, "rank 0 of a ring of two or more stages"
        self.engine, self.config = engine, engine.config
        self.inputs = StageInputs(engine) if isinstance(engine, OnIntelGpu) else None
        self.ring: Ring = open_ring(bound, store, data_host, engine.stage.args.hidden_size, _gpu_of(engine))
        self.depth = 1 if self.ring.backend == "nccl" else self.ring.size
        self.vocab_size, self.context_length, self.device = engine.vocab_size, engine.context_length, engine.device
        self.num_blocks, self.block_size, self.pad_slot = engine.num_blocks, engine.block_size, engine.pad_slot
        # the sequences whose tokens each step in flight brings back, and whether their samplers' reports follow
        self._sampled: deque[tuple[list[int], bool]] = deque()
        self.samplers: dict[int, SampledDownTheRing] = {}  # by sequence key

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def begin(self, key: int, sampling: SamplingParams, prompt: list[int]) -> SampledDownTheRing:
        with self._ring_errors():
            self.ring.post_payload(Op.BEGIN, _Begin(key=key, sampling=sampling, prompt=prompt).model_dump_json().encode())
        self.samplers[key] = SampledDownTheRing(sampling)
        return self.samplers[key]

    def end(self, keys: list[int]) -> None:
        if self.inputs is not None:
            self.inputs.forget(keys)
        for key in keys:
            self.samplers.pop(key, None)
        with self._ring_errors():
            self.ring.post_payload(Op.END, _End(keys=keys).model_dump_json().encode())

    def launch(self, tokens: torch.Tensor, steps: Sequence[SequenceStep], keys: Sequence[int]) -> None:
        hidden, self.inputs = _forward(self.engine, self.inputs, tokens, steps, keys)
        with self._ring_errors():
            self.ring.post_batch(encode_steps(steps, keys), hidden)
        sampled = [key for step, key in zip(steps, keys, strict=True) if step.wants_logits]
        # decided as the last stage decides, with the samplers of this step (one may end before its tokens are in)
        self._sampled.append((sampled, any(self.samplers[key].reports for key in sampled)))

    def collect(self) -> torch.Tensor:
        sampled, reported = self._sampled.popleft()
        if not sampled:
            return torch.zeros(0, dtype=torch.int64)
        with self._ring_errors():
            tokens = self.ring.recv((len(sampled),), torch.int64, self.ring.prev)
            if reported:
                for key, report in zip(sampled, recv_reports(self.ring, len(sampled)), strict=True):
                    if (sampler := self.samplers.get(key)) is not None:
                        sampler.take(report)
        return tokens

    def warmup(self) -> None:
        run_warmup_request(self)

    def embed(self, task: EmbeddingTask, after_forward: Callable[[], None] = lambda: None) -> list[GenerationChunk]:
        """An embeddings request down the ring (`torch/embed.py`), with no step in flight: each group of inputs
        through this stage's layers, then the next stages'; the last one pools and sends the vectors back."""
        engine = self.engine if isinstance(self.engine, TorchBatchEngine) else None
        if engine is None:  # the request's fault (a 400): it asks what this kind of ring does not do
            raise ValueError(f"model {task.model!r}: a ring of Intel GPU stages computes no embeddings; create an "
                             "instance of one node")
        stage = engine.stage

        @torch.inference_mode()
        def pooled(batch: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            hidden = engine.model(batch.to(engine.device), PassThroughCache(), 0)
            with self._ring_errors():
                self.ring.post_embed(lengths, hidden)
                vectors = self.ring.recv((batch.shape[0], stage.args.hidden_size), torch.float32, self.ring.prev)
            after_forward()
            return vectors.cpu()

        return embed_inputs(pooled, stage.tokenizer, stage.pooling, task, stage.args, self.context_length,
                            self.config.max_step_tokens)

    def generate(self, task: TextGenerationTask) -> Generator[GenerationChunk, None, None]:
        """One task alone: the batched loop with a batch of one."""
        return generate_alone(self, self.config, task)

    def close(self) -> None:
        """Tell the other stages to stop, then leave the ring."""
        try:
            self.ring.post_frame(Op.STOP, 0, 0)
        except RingBrokenError as error:
            log.info("ring already broken at close: %s", error)
        self.ring.close()


class PipelineStage(_Described):
    """A stage after the first: run each step's tokens through this stage's layers; the last stage samples."""

    def __init__(self, bound: BoundInstance, engine: StageEngine, store: dist.Store,
                 data_host: str = "127.0.0.1") -> None:
        assert not bound.shard.is_first
        self.engine, self.context_length = engine, engine.context_length
        self.inputs = StageInputs(engine) if isinstance(engine, OnIntelGpu) else None
        self.ring: Ring = open_ring(bound, store, data_host, engine.stage.args.hidden_size, _gpu_of(engine))
        self.is_last = bound.shard.is_last
        self.dtype = next(engine.stage.model.parameters()).dtype  # what the hidden states are computed in
        self.samplers: dict[int, RequestSampler] = {}  # the last stage's, by sequence key

    def serve(self, after_step: Callable[[], None] = lambda: None) -> None:
        """Serve until rank 0 says stop; raises RingBrokenError when a neighbour goes away. `after_step()` runs after
        each batch (the runner reports there an engine that left its device)."""
        ring = self.ring
        while True:
            op, start, length, _ = ring.recv_frame()
            if op == Op.STOP:
                if not self.is_last:
                    ring.post_frame(Op.STOP, 0, 0)
                ring.close()
                return
            if op in (Op.BEGIN, Op.END):
                payload = ring.recv_payload(length)
                if op == Op.END and self.inputs is not None:
                    self.inputs.forget(_End.model_validate_json(payload).keys)
                if not self.is_last:
                    ring.post_payload(op, payload)
                elif op == Op.BEGIN:
                    begin = _Begin.model_validate_json(payload)
                    self.samplers[begin.key] = RequestSampler(begin.sampling, begin.prompt, self.engine.vocab_size,
                                                              self.engine.device, self.engine.tokenizer)
                else:
                    for key in _End.model_validate_json(payload).keys:
                        self.samplers.pop(key, None)
                continue
            if op == Op.EMBED:
                self._embed(*ring.recv_embed(start, length))
                after_step()
                continue
            if op != Op.BATCH:
                raise RingBrokenError(f"a batched stage got a frame it does not serve ({op.name})")
            encoded, hidden = ring.recv_batch(start, length)
            self._step(encoded, hidden)
            after_step()

    @torch.inference_mode()
    def _embed(self, lengths: torch.Tensor, hidden: torch.Tensor) -> None:
        """Inputs of an embeddings request through this stage's layers; the last stage pools them (as its files say)
        and sends the vectors back to rank 0."""
        engine = self.engine
        if not isinstance(engine, TorchBatchEngine) or engine.stage.pooling is None:
            raise RingBrokenError("rank 0 sent inputs to embed, which this stage cannot (an Intel GPU stage, or "
                                  "a model whose files here name no pooling)")
        out = engine.model(hidden.to(engine.device, self.dtype), PassThroughCache(), 0, head=False)
        if not self.is_last:
            self.ring.post_embed(lengths, out)
            return
        self.ring.post(pool(out, lengths.to(out.device), engine.stage.pooling), self.ring.next)

    def _step(self, encoded: torch.Tensor, hidden: torch.Tensor) -> None:
        engine = self.engine
        steps, keys = decode_steps(encoded)
        out, self.inputs = _forward(engine, self.inputs, hidden.to(engine.device, self.dtype), steps, keys)
        if not self.is_last:
            self.ring.post_batch(encoded, out)
            return
        sampled = [key for step, key in zip(steps, keys, strict=True) if step.wants_logits]
        missing = [key for key in sampled if key not in self.samplers]
        if missing:
            raise RingBrokenError(f"rank 0 asked for tokens of sequences it never began: {missing}")
        if sampled:  # a step of prompt chunks alone samples nothing, and nothing goes back
            samplers = [self.samplers[key] for key in sampled]
            draws: list[Callable[[torch.Tensor], torch.Tensor]] = list(samplers)
            with torch.inference_mode():
                tokens = sample_rows(out, list(range(len(sampled))), draws)
            self.ring.post(torch.tensor(tokens, dtype=torch.int64), self.ring.next)
            post_reports(self.ring, self.ring.next, samplers)
