"""The data plane of a multi-stage instance: its rendezvous, and frames of hidden states between neighbouring stages.

Rank 0 (the first stage) hosts the rendezvous: a torch TCP store on an ephemeral port of its node's data host,
whose address goes into the cluster state (the `RingHosted` event) so the later stages can join; its keys live
under a random per-instance token that travels with that address, so a client without it finds nothing. Transport
by instance type: gloo for CpuRing and mixed rings (host tensors), NCCL for CudaRing, xccl for IpexRing where this
PyTorch has it (else gloo), `mlx.distributed`'s ring backend for an MlxRing (the store then only spreads each
stage's address). The store, gloo's and MLX's sockets listen on the data host's address only, NCCL's on the
interface that has it (xccl chooses its own). Any broken connection raises `RingBrokenError`: a ring cannot be
mended.

A frame is the header (op, start position, number of positions, or bytes of a payload) as int64, then the first
position's hidden state as float32. A decode step is one frame a hop; a prompt chunk's other positions follow
the frame as a second message.

A batched step (`Op.BATCH`, the stages of `worker/pipeline.py`) is a frame whose header gives the sizes, then one
message: the step's layout as int64, then the hidden states of all its tokens [T, H] as float32. Those stages post
their messages (`post`: the send completes in the background) so that a stage is never held up by a neighbour still
computing: with several steps in flight round the ring, blocking sends could wait on each other in a circle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from datetime import timedelta
from enum import IntEnum
from typing import Protocol, cast

import numpy as np
import torch
import torch.distributed as dist

from ringlet.net.xccl import ring_backend
from ringlet.shared.instances import BoundInstance, EngineType, InstanceType
from ringlet.shared.state import RingAddress

log = logging.getLogger(__name__)

RENDEZVOUS_TIMEOUT_S = 120.0  # stages load their weights before joining; a slow disk must not fail the ring
# after the rendezvous a stage waits this long for its neighbour; a dead peer is seen sooner (its socket closes)
# and a node cut off is seen by the control plane, which stops the runner
STEP_TIMEOUT_S = 600.0
FRAME_HEADER_BYTES = 3 * 8
# what one frame may announce: a neighbour's header is read before anything is allocated for what follows it
MAX_FRAME_POSITIONS = 1 << 20  # hidden states (positions) of a prompt chunk or a batched step
MAX_FRAME_PAYLOAD_BYTES = 16 << 20  # a JSON payload (a request's prompt and sampling, keys that end)
MLX_RING_BACKEND = "mlx-ring"


class Op(IntEnum):
    """What a frame asks of the next stage."""

    STOP = 0  # stop serving
    FILL = 1  # a prompt chunk into the cache; nothing comes back
    SAMPLE = 2  # a step whose last position the last stage samples; its token goes back to rank 0
    BEGIN = 3  # a request begins: a JSON payload of its sampling parameters and prompt follows
    BATCH = 4  # a batched step: its layout and hidden states follow
    END = 5  # batched sequences are done: a JSON payload of their keys follows
    EMBED = 6  # inputs of an embeddings request: their lengths and hidden states follow; the last stage sends back
    #            their pooled vectors


class _Group(Protocol):
    """What a ring uses of a process group, or of gloo's backend made on its own."""

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> dist.Work: ...

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> dist.Work: ...


class RingBrokenError(RuntimeError):
    """A neighbouring stage went away; the instance must be placed again."""


def check_frame(op: int, start: int, length: int) -> None:
    """A frame header as a neighbour may send it; RingBrokenError (the ring cannot go on) otherwise."""
    if op not in Op._value2member_map_:
        raise RingBrokenError(f"a frame with an unknown op {op} came down the ring")
    if Op(op) in (Op.BEGIN, Op.END):
        limit, what = MAX_FRAME_PAYLOAD_BYTES, "payload bytes"
    elif Op(op) == Op.BATCH:  # start: the layout's int64 values (a few per sequence); length: hidden states
        limit, what = MAX_FRAME_POSITIONS, "positions"
        if not 0 <= start <= MAX_FRAME_POSITIONS:
            raise RingBrokenError(f"a batch frame announced a layout of {start} values (at most "
                                  f"{MAX_FRAME_POSITIONS})")
    elif Op(op) == Op.EMBED:  # start: the inputs; length: the positions of each (padded)
        limit, what = MAX_FRAME_POSITIONS // max(start, 1), "positions an input"
        if not 0 < start <= MAX_FRAME_POSITIONS:
            raise RingBrokenError(f"an embed frame announced {start} inputs (at most {MAX_FRAME_POSITIONS})")
    else:
        limit, what = MAX_FRAME_POSITIONS, "positions"
    if not 0 <= length <= limit or start < 0:
        raise RingBrokenError(f"a {Op(op).name} frame announced {length} {what} from position {start} (at most "
                              f"{limit}); the neighbouring stage is not ringlet's, or is broken")


class RingHead:
    """Rank 0 of a ring, whatever runs it: `broken` once one of its calls found the ring broken (no task can run
    any more)."""

    broken = False

    @contextlib.contextmanager
    def _ring_errors(self) -> Iterator[None]:
        try:
            yield
        except RingBrokenError:
            self.broken = True
            raise


def backend_for(instance_type: InstanceType, engines: set[EngineType], tensor_parallel: int = 1) -> str:
    """The torch.distributed backend of a ring whose stages run on `engines`, or MLX_RING_BACKEND."""
    if len(engines) > 1:
        return "gloo"  # mixed ring: host tensors
    if tensor_parallel > 1:  # each stage's ranks have torch.distributed's default group; the ring's is gloo's own
        return "gloo"
    if instance_type == InstanceType.MLX_RING and engines == {"mlx"}:
        return MLX_RING_BACKEND
    if instance_type == InstanceType.CUDA_RING:
        return "nccl"
    if instance_type == InstanceType.IPEX_RING and getattr(dist, "is_xccl_available", lambda: False)():
        return "xccl"
    return "gloo"


def transfer_device(backend: str, device: torch.device | None = None) -> torch.device:
    """Where frames are sent from: the stage's own GPU (`device`) on NCCL or xccl, the host on gloo."""
    if backend == "nccl":
        return device or torch.device("cuda")
    if backend == "xccl":
        return device or torch.device("xpu")
    return torch.device("cpu")


def host_store(host: str, world_size: int) -> tuple[dist.Store, RingAddress]:
    """Rank 0's rendezvous store on an ephemeral port of `host` (torch's TCPStore would listen on every interface:
    it is handed a socket bound to `host` alone), its keys under a fresh random token that only the cluster learns
    (the address travels in the cluster's events, over the authenticated control plane)."""
    listener = _bound_socket(host)
    try:
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    port = int(listener.getsockname()[1])
    store = dist.TCPStore(host, port, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S), master_listen_fd=listener.detach())
    address = RingAddress(host=host, port=port, token=secrets.token_hex(16))
    return dist.PrefixStore(address.token, store), address


def join_store(address: RingAddress, world_size: int) -> dist.Store:
    store = dist.TCPStore(address.host, address.port, world_size, is_master=False,
                          timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
    return dist.PrefixStore(address.token, store)


class Ring:
    """This process's place in the ring: its rank, its neighbours, and frames moved to and from them."""

    def __init__(self, bound: BoundInstance, store: dist.Store, host: str, hidden_size: int,
                 device: torch.device | None = None) -> None:
        """`device`: the GPU this stage computes on (an Intel GPU ring's frames go from there over xccl)."""
        instance = bound.instance
        self.rank, self.size, self.hidden_size = bound.shard.rank, len(instance.shards), hidden_size
        self.next, self.prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.backend = backend_for(instance.instance_type, {s.engine for s in instance.shards},
                                   instance.tensor_parallel)
        if self.backend == "xccl":  # present in this PyTorch; whether it runs between these stages is tried here
            self.backend = ring_backend(store, self.rank, self.size, device or torch.device("xpu"),
                                        f"instance {instance.instance_id}")
        self.device = transfer_device(self.backend, device)
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
        self._posted: deque[tuple[dist.Work, torch.Tensor]] = deque()  # sends under way, and the tensors they read

    def _join(self, store: dist.Store, host: str) -> None:
        # the group's own send/recv: dist.send's checks and logging cost ~0.05 ms a call on a small VM
        if self.backend == "gloo":  # made here to bind its sockets to the data host (its default picks for itself)
            options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            options._timeout = timedelta(seconds=STEP_TIMEOUT_S)
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            self._pg = cast(_Group, dist.ProcessGroupGloo(store, self.rank, self.size, options))
            return
        if self.backend == "nccl" and "NCCL_SOCKET_IFNAME" not in os.environ:
            interface = interface_of(host)
            if interface is not None:
                os.environ["NCCL_SOCKET_IFNAME"] = "=" + interface  # '=': this name exactly
        dist.init_process_group(self.backend, store=store, rank=self.rank, world_size=self.size,
                                timeout=timedelta(seconds=STEP_TIMEOUT_S))
        world = dist.group.WORLD
        assert world is not None, "init_process_group made the default group"
        self._pg = cast(_Group, world)

    def send(self, tensor: torch.Tensor, to: int) -> None:
        try:
            self._pg.send([tensor.to(self.device).contiguous()], to, 0).wait()
        except RuntimeError as error:
            raise RingBrokenError(f"stage {to} of the ring is unreachable: {error}") from error

    def post(self, tensor: torch.Tensor, to: int) -> None:
        """Send without waiting for it to complete (a failure is raised by a later `post` or by `flush`)."""
        while self._posted and self._posted[0][0].is_completed():
            self._wait(*self._posted.popleft(), to)
        tensor = tensor.to(self.device).contiguous()
        try:
            self._posted.append((self._pg.send([tensor], to, 0), tensor))
        except RuntimeError as error:
            raise RingBrokenError(f"stage {to} of the ring is unreachable: {error}") from error

    def flush(self) -> None:
        """Wait for every posted send."""
        while self._posted:
            self._wait(*self._posted.popleft(), self.next)

    @staticmethod
    def _wait(work: dist.Work, tensor: torch.Tensor, to: int) -> None:
        try:
            work.wait()
        except RuntimeError as error:
            raise RingBrokenError(f"stage {to} of the ring is unreachable: {error}") from error

    def post_frame(self, op: Op, start: int, length: int) -> None:
        frame = torch.zeros(FRAME_HEADER_BYTES + 4 * self.hidden_size, dtype=torch.uint8)
        frame[:FRAME_HEADER_BYTES].view(torch.int64).copy_(torch.tensor([op, start, length]))
        self.post(frame, self.next)

    def post_payload(self, op: Op, payload: bytes) -> None:
        self.post_frame(op, 0, len(payload))
        self.post(torch.frombuffer(bytearray(payload), dtype=torch.uint8), self.next)

    def post_batch(self, layout: torch.Tensor, hidden: torch.Tensor) -> None:
        """A batched step: `layout` int64 [M] (on the host), `hidden` [T, H] (sent as float32)."""
        self.post_frame(Op.BATCH, layout.shape[0], hidden.shape[0])
        body = torch.cat((layout.to(self.device).view(torch.uint8),
                          hidden.to(self.device, torch.float32).contiguous().view(-1).view(torch.uint8)))
        self.post(body, self.next)

    def post_embed(self, lengths: torch.Tensor, hidden: torch.Tensor) -> None:
        """Inputs of an embeddings request: `lengths` int64 [B] (on the host), `hidden` [B, L, H] of right-padded
        inputs (sent as float32)."""
        self.post_frame(Op.EMBED, hidden.shape[0], hidden.shape[1])
        body = torch.cat((lengths.to(self.device, torch.int64).view(torch.uint8),
                          hidden.to(self.device, torch.float32).contiguous().view(-1).view(torch.uint8)))
        self.post(body, self.next)

    def recv_embed(self, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The lengths (int64, on the host) and hidden states [B, L, H] (float32) of a frame announcing `count`
        inputs of `length` positions."""
        body = self.recv((8 * count + 4 * count * length * self.hidden_size,), torch.uint8, self.prev)
        lengths = body[:8 * count].cpu().view(torch.int64)
        if not bool(((lengths > 0) & (lengths <= length)).all()):
            raise RingBrokenError(f"an embed frame's input lengths {lengths.tolist()} do not fit its {length} "
                                  "positions")
        return lengths, body[8 * count:].view(torch.float32).view(count, length, self.hidden_size)

    def recv_batch(self, layout_length: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layout (int64, on the host) and hidden states [T, H] (float32) of a frame announcing a batched step."""
        body = self.recv((8 * layout_length + 4 * tokens * self.hidden_size,), torch.uint8, self.prev)
        layout = body[:8 * layout_length].cpu().view(torch.int64)
        return layout, body[8 * layout_length:].view(torch.float32).view(tokens, self.hidden_size)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, source: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            self._pg.recv([buffer], source, 0).wait()
        except RuntimeError as error:
            raise RingBrokenError(f"stage {source} of the ring is unreachable: {error}") from error
        return buffer

    def _send_frame(self, op: Op, start: int, length: int, first: torch.Tensor | None) -> None:
        self._header_fields[:] = op, start, length
        self._frame_header.copy_(self._header_bytes)
        if first is not None:
            self._frame_hidden.copy_(first.reshape(-1))
        self.send(self._frame, self.next)

    def send_hidden(self, op: Op, start: int, hidden: torch.Tensor | None) -> None:
        """float32 on the wire: a mixed ring may compute in other dtypes. Positions after the first (a prompt chunk)
        follow the frame as a second message."""
        self._send_frame(op, start, 0 if hidden is None else hidden.shape[1], None if hidden is None else hidden[:, :1])
        if hidden is not None and hidden.shape[1] > 1:
            self.send(hidden[:, 1:].float(), self.next)

    def send_payload(self, op: Op, payload: bytes) -> None:
        self._send_frame(op, 0, len(payload), None)
        self.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), self.next)

    def recv_frame(self) -> tuple[Op, int, int, torch.Tensor]:
        """(op, start, length, the first position's hidden state [1, 1, H])"""
        frame = self.recv((FRAME_HEADER_BYTES + 4 * self.hidden_size,), torch.uint8, self.prev)
        op, start, length = frame[:FRAME_HEADER_BYTES].view(torch.int64).tolist()
        check_frame(op, start, length)
        return Op(op), start, length, frame[FRAME_HEADER_BYTES:].view(torch.float32).view(1, 1, self.hidden_size)

    def recv_hidden(self, length: int, first: torch.Tensor) -> torch.Tensor:
        """The hidden states [1, length, H] of a frame announcing `length` positions."""
        if length == 1:
            return first
        rest = self.recv((1, length - 1, self.hidden_size), torch.float32, self.prev)
        return torch.cat((first, rest), dim=1)

    def recv_payload(self, length: int) -> bytes:
        """The payload of a frame announcing `length` bytes."""
        return self.recv((length,), torch.uint8, self.prev).numpy().tobytes()

    def post_bytes(self, data: bytes, to: int) -> None:
        """Bytes with their length, outside the frames (the last stage's log-probabilities back to rank 0)."""
        self.post(torch.tensor([len(data)], dtype=torch.int64), to)
        self.post(torch.frombuffer(bytearray(data), dtype=torch.uint8), to)

    def recv_bytes(self, source: int, most: int) -> bytes:
        """What `post_bytes` sent; more than `most` bytes breaks the ring (a stage out of step)."""
        length = int(self.recv((1,), torch.int64, source).item())
        if not 0 < length <= most:
            raise RingBrokenError(f"stage {source} announced {length} bytes where at most {most} can come")
        return self.recv((length,), torch.uint8, source).cpu().numpy().tobytes()

    def close(self) -> None:
        try:
            self.flush()
        except RingBrokenError as error:
            log.info("ring already broken at close: %s", error)
        if dist.is_initialized():
            dist.destroy_process_group()


class MlxRing(Ring):
    """The same ring over `mlx.distributed`'s ring backend (TCP to each neighbour). Each stage listens on a free port
    of its data host; the torch store spreads the addresses, from which each writes the hostfile MLX reads."""

    def _join(self, store: dist.Store, host: str) -> None:
        import mlx.core as mx

        store.set(f"mlx-ring/{self.rank}", f"{host}:{_free_port(host)}")
        hosts = [[store.get(f"mlx-ring/{rank}").decode()] for rank in range(self.size)]
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="ringlet-mlx-hosts-", delete=False) as hostfile:
            json.dump(hosts, hostfile)
        # mlx.distributed.init reads its hostfile and rank from the environment, and only from there
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

    def post(self, tensor: torch.Tensor, to: int) -> None:
        self.send(tensor, to)  # mlx.distributed's sends complete as they return

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


def interface_of(host: str) -> str | None:
    """The name of this machine's network interface that has the address `host`; None if none has it."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == host for a in addresses):
            return name
    return None


def _bound_socket(host: str) -> socket.socket:
    """A TCP socket bound to an ephemeral port of `host`."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
    except OSError:
        sock.close()
        raise
    return sock


def _free_port(host: str) -> int:
    with _bound_socket(host) as sock:
        return int(sock.getsockname()[1])


def open_ring(bound: BoundInstance, store: dist.Store, host: str, hidden_size: int,
              device: torch.device | None = None) -> Ring:
    """This stage's ring: torch.distributed, or mlx.distributed for an MlxRing; `device`: the stage's GPU."""
    mlx = backend_for(bound.instance.instance_type, {s.engine for s in bound.instance.shards}) == MLX_RING_BACKEND
    return (MlxRing if mlx else Ring)(bound, store, host, hidden_size, device)
