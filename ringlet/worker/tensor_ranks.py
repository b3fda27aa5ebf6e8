"""A stage split by tensor parallelism over several processes of one node, one a GPU (`Instance.tensor_parallel`).

The runner the node started is rank 0. It starts the other ranks (`python -m ringlet.worker.tensor_ranks`), hands
each the load command and the address of a rendezvous store on loopback on its stdin, and keeps that pipe open:
its end (the runner stopped or died) ends them. Every rank loads its share of the stage (`loader.load_stage`,
`sharded`) and agrees on one KV cache size. Only rank 0 talks to the node and to the ring; each of its steps
(`forward_batch`) and embeddings requests is first broadcast to the others, which compute the same step on their
shares in lockstep (`follow`): the collectives inside the model (an all-reduce after attention and after the MLP,
the embedding's and the logits') pair up because every rank runs the same calls in the same order.

Transport: torch.distributed's default group of the ranks, NCCL for CUDA tensors (NVLink multicast off), xccl for
Intel GPU ones (an IpexRing stage's ranks run ringlet's torch engine on torch.xpu, without IPEX's optimisation
levels) and gloo for host tensors, on which the steps are broadcast. A rank that exits or a step that fails on any
rank leaves the ranks unable to agree on what comes next: rank 0 then exits, and the node reports the runner failed
(its tasks end with that error; the instance is placed again).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from enum import IntEnum
from typing import IO, TYPE_CHECKING

import torch
import torch.distributed as dist

from ringlet.models.paged_cache import SequenceStep
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance, EngineType, rank_intel_gpus
from ringlet.shared.messages import TO_RUNNER, LoadShard
from ringlet.shared.state import RingAddress
from ringlet.shared.tasks import EmbeddingTask, GenerationChunk
from ringlet.shared.wire import decode, encode

if TYPE_CHECKING:
    from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine

log = logging.getLogger("ringlet.tensor_ranks")

STEP_TIMEOUT_S = 600.0  # a rank waits this long for the next collective; a dead rank is seen sooner (it exits)
HEADER = 6  # op, tokens, steps, block ids, input kind, hidden width
MOST_ERROR_CHARS = 2000  # of what a failed rank says
# what a step's inputs are: token ids, or a later pipeline stage's hidden states in one of these dtypes
INPUT_DTYPES = (torch.int64, torch.float32, torch.bfloat16, torch.float16)


class Op(IntEnum):
    STEP = 1  # a batched step: its layout and inputs follow
    EMBED = 2  # an embeddings request: its JSON follows


def rank_device(bound: BoundInstance, rank: int) -> torch.device:
    """The device of a rank: the node's GPU of its index (CUDA), its Intel GPU as placement chose it
    (`instances.rank_intel_gpus`), else the CPU (tensor-parallel CPU ranks are what the tests run)."""
    if bound.engine == "cuda":
        return torch.device("cuda", rank)
    if bound.engine == "ipex":
        devices = rank_intel_gpus(bound.instance.intel_gpu_devices, bound.instance.tensor_parallel)
        return torch.device("xpu", devices[rank])
    if bound.engine == "cpu":
        return torch.device("cpu")
    raise ValueError(f"tensor parallelism runs on the cuda, ipex and cpu engines, not {bound.engine}")


def group_backend(engine: EngineType) -> str:
    """The ranks' torch.distributed backends: NCCL for CUDA tensors, xccl for Intel GPU ones (torch's own, in its
    XPU builds from 2.8), gloo for host tensors (the broadcast steps, CPU ranks)."""
    if engine == "cuda":
        return "cpu:gloo,cuda:nccl"
    if engine == "ipex":
        if not getattr(dist, "is_xccl_available", lambda: False)():
            raise RuntimeError(f"tensor parallelism on Intel GPUs needs torch.distributed's xccl backend, which this "
                               f"torch ({torch.__version__}) lacks: install an XPU build of torch 2.8 or later "
                               f"(scripts/setup-ipex.sh), or leave tensor_parallel at 1")
        return "cpu:gloo,xpu:xccl"
    return "gloo"


def join_group(store: dist.Store, bound: BoundInstance, rank: int) -> None:
    """Make the ranks' default process group (`group_backend`) on this rank's device; CPU ranks take a share of the
    cores each."""
    size = bound.instance.tensor_parallel
    backend = group_backend(bound.engine)
    if bound.engine == "cuda":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off on every rank (the ranks must agree on it)
        torch.cuda.set_device(rank)
    elif bound.engine == "ipex":
        torch.xpu.set_device(rank_device(bound, rank))
    else:  # the ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group(backend, store=dist.PrefixStore("tensor-parallel", store), rank=rank, world_size=size,
                            timeout=timedelta(seconds=STEP_TIMEOUT_S))


def load_rank_engine(bound: BoundInstance, config: EngineConfig, rank: int,
                     agree: Callable[[int, int], tuple[int, int]] | None = None,
                     loaded: Callable[[], None] = lambda: None) -> tuple[TorchBatchEngine, str]:
    """This rank's share of the stage on its batched engine, and its precision; every rank of the group calls it.
    The KV cache is the smallest any rank can hold, and (rank 0's `agree`) what the ring's other stages agree to;
    `loaded` is called once this rank's weights are in."""
    from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine, own_context_length, own_num_blocks
    from ringlet.worker.engines.torch.engine import load_torch_stage

    device = rank_device(bound, rank)
    shard = bound.shard
    try:
        stage, precision = load_torch_stage(bound.instance.model, shard.start, shard.end, config.precision, device,
                                            sharded=True)
        offer = torch.tensor([own_num_blocks(stage, device, config), own_context_length(stage, config)])
        loaded()
        dist.all_reduce(offer, op=dist.ReduceOp.MIN)
        if agree is not None:
            offer = torch.tensor(agree(int(offer[0]), int(offer[1])))
        dist.broadcast(offer, 0)
        num_blocks, context_length = int(offer[0]), int(offer[1])
        # a compiled CPU step would trace the collectives; the ranks' CPU steps run eagerly
        config = config.model_copy(update={"cpu_compile": False})
        engine = TorchBatchEngine(stage, device, config, num_blocks=num_blocks, context_length=context_length)
        _capture_together(engine)
    except Exception as error:
        # where another rank failed first, this rank's error is only the lost connection: say what failed there
        raise (_others.explained(error) if _others is not None else error) from error
    return engine, precision


def _capture_together(engine: TorchBatchEngine) -> None:
    """Capture the graphed CUDA steps on every rank at once (the collectives in them meet), or on none: a rank that
    fails to build them leaves every rank decoding eagerly, so that all of them run the same kernels."""
    if engine.paged_decode is None:
        return
    began = time.perf_counter()
    built = 1
    try:
        engine.paged_decode.warm()
    except Exception as error:  # noqa: BLE001  the eager step runs every model
        log.warning("the graphed CUDA decode step could not be built on this rank: %s: %s", type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "")
        built = 0
    agreed = torch.tensor([built])
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    if not agreed.item():
        engine.paged_decode = None
        return
    log.info("CUDA graphs of this rank's decode steps captured in %.1f s", time.perf_counter() - began)


def _broadcast_step(inputs: torch.Tensor, steps: Sequence[SequenceStep]) -> None:
    blocks = [b for s in steps for b in s.blocks]
    hidden = inputs.dim() == 2
    header = torch.tensor([Op.STEP, inputs.shape[0], len(steps), len(blocks),
                           INPUT_DTYPES.index(inputs.dtype) if hidden else 0, inputs.shape[1] if hidden else 0])
    dist.broadcast(header, 0)
    layout = torch.tensor([s.start for s in steps] + [s.count for s in steps] + [int(s.wants_logits) for s in steps]
                          + [len(s.blocks) for s in steps] + blocks, dtype=torch.int64)
    dist.broadcast(layout, 0)
    dist.broadcast(inputs.cpu().contiguous(), 0)


def _received_step(header: torch.Tensor) -> tuple[torch.Tensor, list[SequenceStep]]:
    tokens, count, blocks, kind, width = (int(v) for v in header[1:])
    layout = torch.empty(4 * count + blocks, dtype=torch.int64)
    dist.broadcast(layout, 0)
    values = layout.tolist()
    starts, counts, wants, lengths = (values[i * count:(i + 1) * count] for i in range(4))
    steps, at = [], 4 * count
    for start, length, want, table in zip(starts, counts, wants, lengths, strict=True):
        steps.append(SequenceStep(start, length, values[at:at + table], bool(want)))
        at += table
    shape = (tokens, width) if width else (tokens,)
    inputs = torch.empty(shape, dtype=INPUT_DTYPES[kind] if width else torch.int64)
    dist.broadcast(inputs, 0)
    return inputs, steps


def _broadcast_payload(op: Op, payload: bytes) -> None:
    dist.broadcast(torch.tensor([op, len(payload), 0, 0, 0, 0]), 0)
    dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), 0)


def _received_payload(header: torch.Tensor) -> bytes:
    data = torch.empty(int(header[1]), dtype=torch.uint8)
    dist.broadcast(data, 0)
    return data.numpy().tobytes()


def _fatal(what: str) -> None:
    """A collective or a step failed on this rank: the ranks cannot agree on what comes next. Rank 0 first tells
    the node why, where another rank failed first."""
    traceback.print_exc(file=sys.stderr)
    log.error("%s failed on this tensor-parallel rank; the stage's ranks cannot go on together, so it stops", what)
    if _others is not None:
        _others.explained(RuntimeError(what))
    sys.stderr.flush()
    os._exit(1)


def lead(engine: TorchBatchEngine) -> None:
    """Rank 0: each step and embeddings request `engine` computes is first sent to the other ranks."""
    forward, embed = engine.forward_batch, engine.embed

    def forward_batch(tokens: torch.Tensor, steps: Sequence[SequenceStep]) -> torch.Tensor:
        try:
            _broadcast_step(tokens, steps)
            return forward(tokens, steps)
        except Exception:  # any failure leaves the ranks out of step
            _fatal("a step")
            raise

    def embed_mirrored(task: EmbeddingTask, after_forward: Callable[[], None] = lambda: None
                       ) -> list[GenerationChunk]:
        _broadcast_payload(Op.EMBED, task.model_dump_json().encode())
        try:
            return embed(task, after_forward)
        except ValueError:
            raise  # the request itself (a generation-only model, an input too long): every rank refused it alike
        except Exception:
            _fatal("an embeddings request")
            raise

    engine.forward_batch = forward_batch  # type: ignore[method-assign]
    engine.embed = embed_mirrored  # type: ignore[method-assign]


def follow(engine: TorchBatchEngine) -> None:
    """Ranks 1..n-1: compute what rank 0 computes, until it goes away."""
    while True:
        header = torch.empty(HEADER, dtype=torch.int64)
        try:
            dist.broadcast(header, 0)
        except Exception:  # noqa: BLE001  rank 0 went away (its runner stopped): nothing left to follow
            log.info("rank 0 of the tensor-parallel stage went away; this rank stops")
            os._exit(0)
        try:
            if header[0] == Op.STEP:
                inputs, steps = _received_step(header)
                with torch.inference_mode():
                    engine.forward_batch(inputs, steps)
            elif header[0] == Op.EMBED:
                task = EmbeddingTask.model_validate_json(_received_payload(header))
                with contextlib.suppress(ValueError):  # a request refused before any collective, here as on rank 0
                    engine.embed(task)
            else:
                raise ValueError(f"rank 0 sent an unknown op {int(header[0])}")
        except Exception:  # noqa: BLE001
            _fatal("a step")


# rank 0's other ranks, once it has started them
_others: Ranks | None = None


def start_ranks(load: LoadShard, failed: Callable[[str], None]) -> Ranks:
    """Rank 0 (a runner): start the stage's other ranks and join their group; `failed(reason)` tells the node why
    one of them stopped, before this process exits."""
    global _others
    ranks = _others = Ranks(load)
    ranks.failed = failed
    join_group(ranks.store, load.bound, 0)
    return ranks


class Ranks:
    """Rank 0's view of the other ranks: started as processes of this node, watched while they live."""

    def __init__(self, load: LoadShard, store_host: str = "127.0.0.1") -> None:
        from ringlet.net.ring import host_store

        self.size = load.bound.instance.tensor_parallel
        self.store, address = host_store(store_host, self.size)
        env = os.environ | ({"NCCL_NVLS_ENABLE": "0"} if load.bound.engine == "cuda" else {})
        self.processes: list[subprocess.Popen[bytes]] = []
        self.errors: dict[int, str] = {}  # what a rank said failed it, on its stdout
        self._hearing: list[threading.Thread] = []  # each rank's reader, done at the end of its stdout
        for rank in range(1, self.size):
            process = subprocess.Popen([sys.executable, "-m", "ringlet.worker.tensor_ranks", str(rank)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(encode(load) + b"\n" + address.model_dump_json().encode() + b"\n")
            process.stdin.flush()
            self.processes.append(process)
            hearing = threading.Thread(target=self._hear, args=(rank, process.stdout), name=f"rank-{rank}", daemon=True)
            hearing.start()
            self._hearing.append(hearing)
        self.failed: Callable[[str], None] = lambda reason: None
        threading.Thread(target=self._watch, name="tensor-ranks", daemon=True).start()

    def _hear(self, rank: int, stream: IO[bytes]) -> None:
        for line in stream:
            self.errors[rank] = line.decode(errors="replace").strip()[:MOST_ERROR_CHARS]

    def _stopped(self) -> str | None:
        """Why a rank stopped (what it said, else its exit code), or None while all of them run."""
        for rank, process in enumerate(self.processes, start=1):
            code = process.poll()
            if code is not None:
                self._hearing[rank - 1].join(timeout=0.2)  # its last words, if any, reach `_hear`
                said = self.errors.get(rank)
                return (f"tensor-parallel rank {rank} failed: {said}" if said else
                        f"tensor-parallel rank {rank} exited with code {code} (the node's log has its output)")
        return None

    def explained(self, error: Exception, wait_s: float = 2.0) -> Exception:
        """The error to report for `error` on rank 0: a rank that stopped (within `wait_s`) is the cause, and the
        node is told (`failed`); else `error` itself."""
        deadline = time.monotonic() + wait_s
        while (reason := self._stopped()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if reason is None:
            return error
        self.failed(reason)
        return RuntimeError(reason)

    def _watch(self) -> None:
        while (reason := self._stopped()) is None:
            time.sleep(0.2)
        log.error("%s; this runner stops", reason)
        self.failed(reason)
        sys.stderr.flush()
        os._exit(1)


def _leave_when_closed(stream: IO[bytes]) -> None:
    """Exit once rank 0 closes our stdin (it stopped or died)."""
    def wait() -> None:
        stream.read()  # nothing more comes until the end
        os._exit(0)

    threading.Thread(target=wait, name="rank-0-pipe", daemon=True).start()


def main() -> int:
    from ringlet.net.ring import join_store

    # stdout carries only the error that ends this rank, to rank 0 (libraries' prints go to stderr, the node's log)
    report = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
                        datefmt="%H:%M:%S")
    rank = int(sys.argv[1])
    stdin = sys.stdin.buffer
    load = decode(TO_RUNNER, stdin.readline(), "the tensor-parallel rank's stdin")
    address = RingAddress.model_validate_json(stdin.readline())
    if not isinstance(load, LoadShard):
        raise SystemExit(f"expected a load command, got {load.type!r}")
    _leave_when_closed(stdin)
    bound, size = load.bound, load.bound.instance.tensor_parallel
    began = time.perf_counter()
    try:
        join_group(join_store(address, size), bound, rank)
        engine, precision = load_rank_engine(bound, load.config, rank)
    except Exception as error:  # noqa: BLE001  rank 0 sees this rank exit and reports the load failed, with this
        traceback.print_exc(file=sys.stderr)
        print(f"{type(error).__name__}: {error}".replace("\n", " "), file=report, flush=True)
        sys.stderr.flush()
        os._exit(1)  # not through the interpreter's shutdown: the thread that reads stdin holds its lock
    log.info("instance %s: tensor-parallel rank %d/%d of layers %d-%d loaded (%s) in %.1f s",
             bound.instance.instance_id, rank, size, bound.shard.start, bound.shard.end - 1, precision,
             time.perf_counter() - began)
    follow(engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
