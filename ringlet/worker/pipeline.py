"""Multi-stage instances: each stage runs in its own runner process on its node, and hidden states flow stage to
stage over `torch.distributed`.

Rank 0 (the first stage) hosts the rendezvous: a TCP store on an ephemeral port, whose address its node publishes
through the control plane so the other stages can join. Rank 0 keeps the generation loop (tokeniser, stop strings,
detokeniser, when to stop: `TextGenerator`); its `forward` runs its own layers, sends the hidden states down the
ring, and receives the next token. Every other stage serves in a loop: receive a header and hidden states, run its
layers, pass them on. The last stage samples: each request's sampling parameters and prompt reach it first (for
seeds and penalties), and one token id travels back to rank 0 per step, not the logits (49152 floats for the
embedded model: 196 KB a token, 1.6 ms on a 1 Gbit/s LAN).

The loop is the same on every engine: a stage's layers are a `StageModel` (torch here, MLX in
`engines/mlx/stage.py`), which takes and returns torch tensors on the host side of the ring, so a mixed ring can put
an MLX stage anywhere.

Transport by instance type: gloo for CpuRing and mixed rings (host tensors), NCCL for CudaRing, xccl for IpexRing
where this PyTorch has it (else gloo), `mlx.distributed`'s ring backend for an MlxRing (the torch store then only
spreads each stage's address). Any broken connection raises `RingBrokenError`: the ring cannot be mended,
so the runner reports the failure and exits, and the master places the instance again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel

from ringlet.models.loader import LoadedStage
from ringlet.models.sampling import RequestSampler
from ringlet.models.tokenizer import Tokenizer
from ringlet.shared.instances import BoundInstance, EngineType, InstanceType
from ringlet.shared.state import RingAddress
from ringlet.shared.tasks import GenerationChunk, SamplingParams, TextGenerationTask
from ringlet.worker.engines.base import run_warmup_request
from ringlet.worker.engines.engine_utils import PRECISION_ENV
from ringlet.worker.engines.torch.engine import DEFAULT_MAX_CONTEXT, load_torch_stage
from ringlet.worker.engines.torch.generate import TextGenerator

if TYPE_CHECKING:
    from ringlet.worker.runner import Inbox, LoadShard, Outbox

log = logging.getLogger(__name__)

RENDEZVOUS_TIMEOUT_S = 120.0  # stages load their weights before joining; a slow disk must not fail the ring
# after the rendezvous a stage waits this long for its neighbour; a dead peer is seen sooner (its socket closes)
# and a node cut off is seen by the control plane, which stops the runner
STEP_TIMEOUT_S = 600.0
# ops: stop serving; fill the cache with a prompt chunk (nothing comes back); a step whose last position the last
# stage samples (its token comes back to rank 0); a request begins (a JSON payload of `_Begin`)
_STOP, _FILL, _SAMPLE, _BEGIN = 0, 1, 2, 3
# a frame: the header (op, start position, number of positions or bytes of the payload for _BEGIN) as int64, then
# the first position's hidden state as float32 (unused by _STOP and _BEGIN). A decode step is one frame a hop.
FRAME_HEADER_BYTES = 3 * 8


class _Begin(BaseModel):
    """What the last stage needs to sample a request as a single node would: its parameters and prompt."""

    sampling: SamplingParams
    prompt: list[int]


class RingBrokenError(RuntimeError):
    """A neighbouring stage went away; the instance must be placed again."""


MLX_RING_BACKEND = "mlx-ring"


def backend_for(instance_type: InstanceType, engines: set[EngineType]) -> str:
    """The torch.distributed backend of a ring whose stages run on `engines`, or MLX_RING_BACKEND."""
    if len(engines) > 1:
        return "gloo"  # mixed ring: host tensors
    if instance_type == InstanceType.MLX_RING and engines == {"mlx"}:
        return MLX_RING_BACKEND
    if instance_type == InstanceType.CUDA_RING:
        return "nccl"
    if instance_type == InstanceType.IPEX_RING and getattr(dist, "is_xccl_available", lambda: False)():
        return "xccl"
    return "gloo"


def transfer_device(backend: str) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda")
    if backend == "xccl":
        return torch.device("xpu")
    return torch.device("cpu")


def compute_device(engine: EngineType) -> torch.device:
    return torch.device({"cuda": "cuda", "ipex": "xpu"}.get(engine, "cpu"))


def host_store(host: str, world_size: int) -> tuple[dist.TCPStore, RingAddress]:
    """Rank 0's rendezvous store on an ephemeral port of `host`."""
    store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
    return store, RingAddress(host=host, port=store.port)


def join_store(address: RingAddress, world_size: int) -> dist.TCPStore:
    return dist.TCPStore(address.host, address.port, world_size, is_master=False,
                         timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))


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
    """Layers [start, end) on a torch engine (cpu, cuda, ipex), with a static KV cache."""

    def __init__(self, stage: LoadedStage, device: torch.device, max_context: int = DEFAULT_MAX_CONTEXT) -> None:
        self.model, self.tokenizer, self.device = stage.model, stage.tokenizer, device
        self.hidden_size, self.vocab_size = stage.args.hidden_size, stage.args.vocab_size
        self.context_length = min(stage.args.context_length, max_context)
        self.is_last = stage.end == stage.args.num_hidden_layers
        self.cache = stage.model.make_cache(1, self.context_length)
        self.dtype = next(stage.model.parameters()).dtype

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        if x.is_floating_point():
            x = x.to(self.device, self.dtype)
        out = self.model(x, self.cache, start, last_logits_only=True)
        self.cache.offset = start + x.shape[1]
        return out[:, -1] if self.is_last else out


def load_for_stage(bound: BoundInstance, precision: str | None = None,
                   max_context: int = DEFAULT_MAX_CONTEXT) -> tuple[StageModel, str]:
    """This node's stage of `bound`, on the shard's engine; `precision` defaults to $RINGLET_PRECISION."""
    shard = bound.shard
    precision = precision or os.environ.get(PRECISION_ENV, "auto")
    if bound.engine == "mlx":
        from ringlet.worker.engines.mlx.stage import MlxStage

        return MlxStage.load(bound.instance.model, shard.start, shard.end, precision, max_context), precision
    device = compute_device(bound.engine)
    stage, precision = load_torch_stage(bound.instance.model, shard.start, shard.end, precision, device)
    return TorchStage(stage, device, max_context), precision


class _Ring:
    """This process's place in the ring: its rank, its neighbours, and tensors moved to and from them."""

    def __init__(self, bound: BoundInstance, store: dist.TCPStore, host: str, hidden_size: int) -> None:
        instance = bound.instance
        self.rank, self.size, self.hidden_size = bound.shard.rank, len(instance.shards), hidden_size
        self.next, self.prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.backend = backend_for(instance.instance_type, {s.engine for s in instance.shards})
        self.device = transfer_device(self.backend)
        began = time.perf_counter()
        self._join(store, host)
        log.info("instance %s: stage %d/%d joined the %s ring in %.1f s", instance.instance_id, self.rank, self.size,
                 self.backend, time.perf_counter() - began)
        # every outgoing frame is written into one buffer: a send returns once it may be written again
        self._frame = torch.zeros(FRAME_HEADER_BYTES + 4 * hidden_size, dtype=torch.uint8, device=self.device)
        self._frame_header, self._frame_hidden = (self._frame[:FRAME_HEADER_BYTES],
                                                  self._frame[FRAME_HEADER_BYTES:].view(torch.float32))
        header = torch.zeros(3, dtype=torch.int64)  # op, start, length: written through numpy, copied to the frame
        self._header_fields, self._header_bytes = header.numpy(), header.view(torch.uint8)

    def _join(self, store: dist.TCPStore, host: str) -> None:
        dist.init_process_group(self.backend, store=store, rank=self.rank, world_size=self.size,
                                timeout=timedelta(seconds=STEP_TIMEOUT_S))
        # the group's own send/recv: dist.send's checks and logging cost ~0.05 ms a call on a small VM
        world = dist.group.WORLD
        assert world is not None, "init_process_group made the default group"
        self._pg = world

    def send(self, tensor: torch.Tensor, to: int) -> None:
        try:
            self._pg.send([tensor.to(self.device).contiguous()], to, 0).wait()
        except RuntimeError as error:
            raise RingBrokenError(f"stage {to} of the ring is unreachable: {error}") from error

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, source: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            self._pg.recv([buffer], source, 0).wait()
        except RuntimeError as error:
            raise RingBrokenError(f"stage {source} of the ring is unreachable: {error}") from error
        return buffer

    def _send_frame(self, op: int, start: int, length: int, first: torch.Tensor | None) -> None:
        self._header_fields[:] = op, start, length
        self._frame_header.copy_(self._header_bytes)
        if first is not None:
            self._frame_hidden.copy_(first.reshape(-1))
        self.send(self._frame, self.next)

    def send_hidden(self, op: int, start: int, hidden: torch.Tensor | None) -> None:
        """float32 on the wire: a mixed ring may compute in other dtypes. Positions after the first (a prompt chunk)
        follow the frame as a second message."""
        self._send_frame(op, start, 0 if hidden is None else hidden.shape[1], None if hidden is None else hidden[:, :1])
        if hidden is not None and hidden.shape[1] > 1:
            self.send(hidden[:, 1:].float(), self.next)

    def send_payload(self, op: int, payload: bytes) -> None:
        self._send_frame(op, 0, len(payload), None)
        self.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), self.next)

    def recv_frame(self) -> tuple[int, int, int, torch.Tensor]:
        """(op, start, length, the first position's hidden state [1, 1, H])"""
        frame = self.recv((FRAME_HEADER_BYTES + 4 * self.hidden_size,), torch.uint8, self.prev)
        op, start, length = frame[:FRAME_HEADER_BYTES].view(torch.int64).tolist()
        return op, start, length, frame[FRAME_HEADER_BYTES:].view(torch.float32).view(1, 1, self.hidden_size)

    def recv_hidden(self, length: int, first: torch.Tensor) -> torch.Tensor:
        """The hidden states [1, length, H] of a frame announcing `length` positions."""
        if length == 1:
            return first
        rest = self.recv((1, length - 1, self.hidden_size), torch.float32, self.prev)
        return torch.cat((first, rest), dim=1)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class _MlxRing(_Ring):
    """The same ring over `mlx.distributed`'s ring backend (TCP to each neighbour). Each stage listens on a free port
    of its data host; the torch store spreads the addresses, from which each writes the hostfile MLX reads."""

    def _join(self, store: dist.TCPStore, host: str) -> None:
        import mlx.core as mx

        store.set(f"mlx-ring/{self.rank}", f"{host}:{_free_port(host)}")
        hosts = [[store.get(f"mlx-ring/{rank}").decode()] for rank in range(self.size)]
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="ringlet-mlx-hosts-", delete=False) as hostfile:
            json.dump(hosts, hostfile)
        os.environ["MLX_HOSTFILE"], os.environ["MLX_RANK"] = hostfile.name, str(self.rank)
        try:
            self._mx, self._group = mx, mx.distributed.init(backend="ring", strict=True)
        finally:
            os.unlink(hostfile.name)

    def send(self, tensor: torch.Tensor, to: int) -> None:
        mx = self._mx
        try:
            mx.eval(mx.distributed.send(mx.array(tensor.cpu().numpy()), to, group=self._group))
        except RuntimeError as error:
            raise RingBrokenError(f"stage {to} of the ring is unreachable: {error}") from error

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, source: int) -> torch.Tensor:
        mx = self._mx
        try:
            wires = {torch.int64: mx.int64, torch.float32: mx.float32, torch.uint8: mx.uint8}
            assert dtype in wires, "the ring carries headers, float32 hidden states and byte payloads"
            wire = wires[dtype]
            received = mx.distributed.recv(shape, wire, source, group=self._group)
            mx.eval(received)
        except RuntimeError as error:
            raise RingBrokenError(f"stage {source} of the ring is unreachable: {error}") from error
        return torch.from_numpy(np.array(received, copy=True))

    def close(self) -> None:
        """MLX keeps its group for the life of the process; the runner exits after this."""


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def open_ring(bound: BoundInstance, store: dist.TCPStore, host: str, hidden_size: int) -> _Ring:
    """This stage's ring: torch.distributed, or mlx.distributed for an MlxRing."""
    mlx = backend_for(bound.instance.instance_type, {s.engine for s in bound.instance.shards}) == MLX_RING_BACKEND
    return (_MlxRing if mlx else _Ring)(bound, store, host, hidden_size)


class FirstStage:
    """Rank 0: an engine (the `Engine` protocol) whose forward pass spans the whole ring."""

    def __init__(self, bound: BoundInstance, stage: StageModel, store: dist.TCPStore,
                 data_host: str = "127.0.0.1") -> None:
        assert bound.shard.is_first and not bound.shard.is_last, "rank 0 of a ring of two or more stages"
        self.name = "mlx-pipeline" if bound.engine == "mlx" else "torch-pipeline"
        self.stage, self.context_length = stage, stage.context_length
        self.ring = open_ring(bound, store, data_host, stage.hidden_size)
        self.broken = False  # a neighbour went away: no task can run any more
        self.generator = TextGenerator(self._step, stage.tokenizer, self.context_length, stage.vocab_size,
                                       stage.device, fill=self._fill, sampler_for=self._begin)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.stage.tokenizer

    def _begin(self, params: SamplingParams, prompt: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        with self._ring_errors():
            self.ring.send_payload(_BEGIN, _Begin(sampling=params, prompt=prompt).model_dump_json().encode())
        return _sampled_down_the_ring

    def _fill(self, ids: torch.Tensor, start: int) -> None:
        hidden = self.stage.forward(ids, start)
        with self._ring_errors():
            self.ring.send_hidden(_FILL, start, hidden)

    def _step(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """The token the last stage sampled from the last position's logits, as a [1] tensor."""
        hidden = self.stage.forward(ids, start)
        with self._ring_errors():
            self.ring.send_hidden(_SAMPLE, start, hidden)
            return self.ring.recv((1,), torch.int64, self.ring.prev)

    @contextlib.contextmanager
    def _ring_errors(self) -> Iterator[None]:
        try:
            yield
        except RingBrokenError:
            self.broken = True
            raise

    def warmup(self) -> float:
        began = time.perf_counter()
        run_warmup_request(self)
        return time.perf_counter() - began

    def generate(self, task: TextGenerationTask) -> Iterator[GenerationChunk]:
        with torch.inference_mode():
            yield from self.generator.generate(task)

    def close(self) -> None:
        """Tell the other stages to stop, then leave the ring."""
        try:
            self.ring.send_hidden(_STOP, 0, None)
        except RingBrokenError as error:
            log.info("ring already broken at close: %s", error)
        self.ring.close()


class RelayStage:
    """A stage after the first: receive hidden states, run this stage's layers, pass the result on."""

    def __init__(self, bound: BoundInstance, stage: StageModel, store: dist.TCPStore,
                 data_host: str = "127.0.0.1") -> None:
        assert not bound.shard.is_first
        self.stage, self.context_length = stage, stage.context_length
        self.ring = open_ring(bound, store, data_host, stage.hidden_size)
        self.is_last = bound.shard.is_last
        self.sampler: RequestSampler | None = None  # the last stage's, for the current request

    def serve(self) -> None:
        """Relay until rank 0 says stop; raises RingBrokenError when a neighbour goes away."""
        while True:
            op, start, length, first = self.ring.recv_frame()
            if op == _STOP:
                if not self.is_last:
                    self.ring.send_hidden(_STOP, 0, None)
                self.ring.close()
                return
            if op == _BEGIN:
                payload = self.ring.recv((length,), torch.uint8, self.ring.prev).numpy().tobytes()
                if self.is_last:
                    begin = _Begin.model_validate_json(payload)
                    self.sampler = RequestSampler(begin.sampling, begin.prompt, self.stage.vocab_size, self.stage.device)
                else:
                    self.ring.send_payload(_BEGIN, payload)
                continue
            out = self.stage.forward(self.ring.recv_hidden(length, first), start)
            if not self.is_last:
                self.ring.send_hidden(op, start, out)
            elif op == _SAMPLE:
                if self.sampler is None:
                    raise RingBrokenError("rank 0 asked for a token before it began a request")
                self.ring.send(self.sampler(out).view(1).to(torch.int64), 0)


def _sampled_down_the_ring(token: torch.Tensor) -> torch.Tensor:
    """Rank 0's sampler when the last stage samples: what its forward returned is already the token."""
    return token


def serve_stage(load: LoadShard, inbox: Inbox, outbox: Outbox) -> int:
    """The runner's main loop for one stage of a multi-stage instance; returns the runner's exit code."""
    from ringlet.worker.runner import LoadFailed, Loading, Ready, RingHosted, run_task

    bound, size = load.bound, len(load.bound.instance.shards)
    try:
        if bound.shard.is_first:
            store, address = host_store(load.data_host, size)
            outbox.send(RingHosted(address=address))  # the other stages load while this one does
        elif load.ring is None:
            raise ValueError(f"stage {bound.shard.rank} of instance {bound.instance.instance_id} has no ring to join")
        else:
            store = join_store(load.ring, size)
        outbox.send(Loading(progress=0.05, detail=f"loading layers {bound.shard.start}-{bound.shard.end - 1}"))
        stage, precision = load_for_stage(bound)
        outbox.send(Loading(progress=0.6, detail="waiting for the other stages"))
        kind = FirstStage if bound.shard.is_first else RelayStage
        engine: FirstStage | RelayStage = kind(bound, stage, store, load.data_host)
        warmup_s = 0.0
        if isinstance(engine, FirstStage):
            outbox.send(Loading(progress=0.9, detail="warming up the ring"))
            warmup_s = engine.warmup()
    # a failed load (missing file, driver, a stage that never joined) is reported, then the runner exits
    except Exception as error:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        outbox.send(LoadFailed(error=f"{type(error).__name__}: {error}"))
        return 1
    log.info("instance %s: stage %d ready (%s)", bound.instance.instance_id, bound.shard.rank, precision)
    outbox.send(Ready(context_length=engine.context_length, warmup_s=warmup_s))
    if isinstance(engine, RelayStage):
        try:
            engine.serve()
        except RingBrokenError as error:
            log.error("instance %s: %s; this stage stops", bound.instance.instance_id, error)
            return 1
        return 0
    while not engine.broken:
        command = inbox.commands.get()
        run_task(engine, command.task, inbox, outbox)
    log.error("instance %s: the ring is broken; this stage stops", bound.instance.instance_id)
    return 1
