"""The stages of a multi-stage instance: each runs in its own runner process on its node, and hidden states flow
stage to stage over the data plane (`net/ring.py`).

Rank 0 (the first stage) keeps the generation loop (tokeniser, stop strings, detokeniser, when to stop:
`TextGenerator`); its forward runs its own layers, sends the hidden states down the ring, and receives the next
token. Every other stage serves in a loop: receive a frame of hidden states, run its layers, pass them on. The last
stage samples: each request's sampling parameters and prompt reach it first (for seeds and penalties), and one token
id travels back to rank 0 per step, not the logits (49152 floats for the embedded model: 196 KB a token).

The loop is the same on every engine: a stage's layers are a `StageModel` (torch here, MLX in
`engines/mlx/stage.py`), which takes and returns torch tensors on the host side of the ring, so a mixed ring can put
an MLX stage anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Protocol, cast

import torch
import torch.distributed as dist
from pydantic import BaseModel, TypeAdapter

from ringlet.models.loader import LoadedStage
from ringlet.models.sampling import RequestSampler
from ringlet.models.tokenizer import Tokenizer
from ringlet.net.ring import Op, Ring, RingBrokenError, RingHead, open_ring
from ringlet.shared.config import DEFAULT_MAX_CONTEXT, EngineConfig
from ringlet.shared.instances import BoundInstance, EngineType
from ringlet.shared.tasks import GenerationChunk, SamplingParams, TextGenerationTask, TokenLogprob
from ringlet.worker.engines.base import run_warmup_request
from ringlet.worker.engines.engine_utils import ProbeInputs
from ringlet.worker.engines.torch.engine import load_torch_stage
from ringlet.worker.engines.torch.generate import TextGenerator

if TYPE_CHECKING:
    from ringlet.models.llama import Transformer

log = logging.getLogger(__name__)


class _Begin(BaseModel):
    """What the last stage needs to sample a request as a single node would: its parameters and prompt."""

    sampling: SamplingParams
    prompt: list[int]


class SamplerReport(BaseModel):
    """What the last stage's sampler has to tell rank 0 beside a token: its log-probabilities, and why the request's
    grammar failed (the answer then ends with finish reason "error")."""

    logprobs: TokenLogprob | None = None
    failure: str | None = None


_REPORTS = TypeAdapter(list[SamplerReport])
# a sampled row's report as JSON (its token's log-probability and up to 20 others'): a few kilobytes at most
MOST_REPORT_BYTES_PER_ROW = 64 * 1024


def reports(sampling: SamplingParams) -> bool:
    """Whether a request's sampler reports back beside its tokens (both ends of the ring decide alike)."""
    return sampling.logprobs is not None or sampling.constraint is not None


class SampledDownTheRing:
    """Rank 0's sampler of a request that the ring's last stage samples: what the step returns is already the
    token; what the last stage's sampler reports comes back after it (`last_logprobs`, `failure`)."""

    def __init__(self, sampling: SamplingParams) -> None:
        self.reports = reports(sampling)
        self.last_logprobs: TokenLogprob | None = None
        self.failure: str | None = None

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        return token

    def take(self, report: SamplerReport | None) -> None:
        if report is not None:
            self.last_logprobs, self.failure = report.logprobs, report.failure or self.failure


def post_reports(ring: Ring, to: int, samplers: list[RequestSampler]) -> None:
    """After the tokens the last stage sampled with `samplers`: their reports, if any of them reports."""
    if any(reports(s.sampler.params) for s in samplers):
        ring.post_bytes(_REPORTS.dump_json([SamplerReport(logprobs=s.last_logprobs, failure=s.failure)
                                            for s in samplers]), to)


def recv_reports(ring: Ring, rows: int) -> list[SamplerReport]:
    """What `post_reports` sent for `rows` sampled rows."""
    got = _REPORTS.validate_json(ring.recv_bytes(ring.prev, rows * MOST_REPORT_BYTES_PER_ROW))
    if len(got) != rows:
        raise RingBrokenError(f"the last stage sent reports of {len(got)} tokens, not {rows}")
    return got


def compute_device(engine: EngineType) -> torch.device:
    return torch.device({"cuda": "cuda", "ipex": "xpu"}.get(engine, "cpu"))


class StageModel(Protocol):
    """One stage's layers on its engine, with the KV cache of those layers."""

    tokenizer: Tokenizer
    hidden_size: int
    vocab_size: int
    context_length: int
    device: torch.device  # where its logits are; the last stage samples there

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: token ids [1, L] on the first stage, float32 hidden states [1, L, H] elsewhere, at positions
        start.. (a start before the cache's end drops what lies past it). Returns hidden states, or on the last
        stage the logits of the last position [1, V]."""
        ...


class TorchStage:
    """Layers [start, end) on a torch engine (cpu, cuda), with a static KV cache. (An Intel GPU's stage is an
    `IpexStage`: `engines/ipex/stage.py`.)"""

    optimization = "none"
    fallback_reason: str | None = None

    def __init__(self, stage: LoadedStage, device: torch.device, max_context: int = DEFAULT_MAX_CONTEXT) -> None:
        self.model, self.tokenizer, self.device = stage.model, stage.tokenizer, device
        self.name = device.type
        self.hidden_size, self.vocab_size = stage.args.hidden_size, stage.args.vocab_size
        self.context_length = min(stage.args.context_length, max_context)
        self.is_last = stage.end == stage.args.num_hidden_layers
        model = cast("Transformer", stage.model)  # every architecture's stage
        model.prepare_positions(self.context_length)
        self.cache = model.make_cache(1, self.context_length)
        self.dtype = next(stage.model.parameters()).dtype

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        if x.is_floating_point():
            x = x.to(self.device, self.dtype)
        out = self.model(x, self.cache, start, last_logits_only=True)
        return out[:, -1] if self.is_last else out


def load_for_stage(bound: BoundInstance, config: EngineConfig = EngineConfig(),
                   probes: ProbeInputs | None = None) -> tuple[StageModel, str]:
    """This node's stage of `bound` on the shard's engine, and the precision it runs in. On an Intel GPU, as a
    single-node instance there: the instance's GPU and optimisation level, a memory check for the stage's layers,
    device faults retried and then the CPU (`probes`: what detection looks at, this machine by default)."""
    shard = bound.shard
    if bound.engine == "mlx":
        from ringlet.worker.engines.mlx.stage import MlxStage

        stage = MlxStage.load(bound.instance.model, shard.start, shard.end, config.precision, config.max_context)
        return stage, config.precision
    if bound.engine == "ipex":
        from ringlet.worker.engines.ipex.stage import IpexStage
        from ringlet.worker.engines.ipex.utils_ipex import load_ipex_layers

        layers, compute = load_ipex_layers(bound, config, probes)
        return IpexStage(layers, compute, bound.instance.model), layers.precision
    device = compute_device(bound.engine)
    loaded, precision = load_torch_stage(bound.instance.model, shard.start, shard.end, config.precision, device)
    return TorchStage(loaded, device, config.max_context), precision


class _Described:
    """What a ring's stage runs on, read from its layers (an MLX stage's say none of it): `name`, the engine
    ("cpu" once an Intel GPU's stage fell back), `optimization`, what was applied to them, `fallback_reason`."""

    stage: StageModel
    engine: EngineType

    @property
    def name(self) -> str:
        return str(getattr(self.stage, "name", self.engine))

    @property
    def optimization(self) -> str:
        return str(getattr(self.stage, "optimization", "none"))

    @property
    def fallback_reason(self) -> str | None:
        return getattr(self.stage, "fallback_reason", None)


class FirstStage(RingHead, _Described):
    """Rank 0: an engine (the `Engine` protocol) whose forward pass spans the whole ring."""

    def __init__(self, bound: BoundInstance, stage: StageModel, store: dist.Store,
                 data_host: str = "127.0.0.1") -> None:
        assert bound.shard.is_first and not bound.shard.is_last, "rank 0 of a ring of two or more stages"
        self.engine = bound.engine
        self.stage, self.context_length = stage, stage.context_length
        self.ring = open_ring(bound, store, data_host, stage.hidden_size)
        self.generator = TextGenerator(self._step, stage.tokenizer, self.context_length, stage.vocab_size,
                                       stage.device, fill=self._fill, sampler_for=self._begin)
        self._sampled = SampledDownTheRing(SamplingParams())  # the current request's

    @property
    def tokenizer(self) -> Tokenizer:
        return self.stage.tokenizer

    def _begin(self, params: SamplingParams, prompt: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        with self._ring_errors():
            self.ring.send_payload(Op.BEGIN, _Begin(sampling=params, prompt=prompt).model_dump_json().encode())
        self._sampled = SampledDownTheRing(params)
        return self._sampled

    def _fill(self, ids: torch.Tensor, start: int) -> None:
        hidden = self.stage.forward(ids, start)
        with self._ring_errors():
            self.ring.send_hidden(Op.FILL, start, hidden)

    def _step(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """The token the last stage sampled from the last position's logits, as a [1] tensor."""
        hidden = self.stage.forward(ids, start)
        with self._ring_errors():
            self.ring.send_hidden(Op.SAMPLE, start, hidden)
            token = self.ring.recv((1,), torch.int64, self.ring.prev)
            if self._sampled.reports:
                self._sampled.take(recv_reports(self.ring, 1)[0])
            return token

    def warmup(self) -> None:
        run_warmup_request(self)

    def generate(self, task: TextGenerationTask) -> Generator[GenerationChunk, None, None]:
        with torch.inference_mode():
            yield from self.generator.generate(task)

    def close(self) -> None:
        """Tell the other stages to stop, then leave the ring."""
        try:
            self.ring.send_hidden(Op.STOP, 0, None)
        except RingBrokenError as error:
            log.info("ring already broken at close: %s", error)
        self.ring.close()


class RelayStage(_Described):
    """A stage after the first: receive hidden states, run this stage's layers, pass the result on."""

    def __init__(self, bound: BoundInstance, stage: StageModel, store: dist.Store,
                 data_host: str = "127.0.0.1") -> None:
        assert not bound.shard.is_first
        self.engine = bound.engine
        self.stage, self.context_length = stage, stage.context_length
        self.ring = open_ring(bound, store, data_host, stage.hidden_size)
        self.is_last = bound.shard.is_last
        self.sampler: RequestSampler | None = None  # the last stage's, for the current request

    def serve(self, after_step: Callable[[], None] = lambda: None) -> None:
        """Relay until rank 0 says stop; raises RingBrokenError when a neighbour goes away. `after_step()` runs after
        each forward (the runner reports there a stage that left its device)."""
        while True:
            op, start, length, first = self.ring.recv_frame()
            if op == Op.STOP:
                if not self.is_last:
                    self.ring.send_hidden(Op.STOP, 0, None)
                self.ring.close()
                return
            if op == Op.BEGIN:
                payload = self.ring.recv_payload(length)
                if self.is_last:
                    begin = _Begin.model_validate_json(payload)
                    self.sampler = RequestSampler(begin.sampling, begin.prompt, self.stage.vocab_size, self.stage.device,
                                                  self.stage.tokenizer)
                else:
                    self.ring.send_payload(Op.BEGIN, payload)
                continue
            out = self.stage.forward(self.ring.recv_hidden(length, first), start)
            if not self.is_last:
                self.ring.send_hidden(op, start, out)
            elif op == Op.SAMPLE:
                if self.sampler is None:
                    raise RingBrokenError("rank 0 asked for a token before it began a request")
                self.ring.send(self.sampler(out).view(1).to(torch.int64), 0)
                post_reports(self.ring, 0, [self.sampler])
            after_step()
