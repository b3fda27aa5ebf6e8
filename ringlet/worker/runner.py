"""A runner: the child process that holds one shard's engine, so an engine crash or OOM never kills the node.

The node (`supervisor.py`) starts `python -m ringlet.worker.runner` and talks to it in JSON lines: commands
on the child's stdin, messages on its stdout. The child moves its stdout to a private descriptor first and
points fd 1 at stderr, so stray prints from libraries cannot corrupt the protocol. End of stdin means the
node stopped or died: the child exits at once. Tasks run one at a time; a cancel is honoured between tokens.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import traceback
from typing import Annotated, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ringlet.shared.instances import BoundInstance
from ringlet.shared.state import RingAddress
from ringlet.shared.tasks import GenerationChunk, TextGenerationTask

log = logging.getLogger("ringlet.runner")


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True)


# node -> runner


class LoadShard(_Message):
    type: Literal["load"] = "load"
    bound: BoundInstance
    data_host: str = Field("127.0.0.1", description="where this node's data plane listens (a first stage hosts "
                                                    "the ring's rendezvous there)")
    ring: RingAddress | None = Field(None, description="the rendezvous a later stage of a multi-stage ring joins")


class RunTask(_Message):
    type: Literal["run"] = "run"
    task: TextGenerationTask


class CancelTask(_Message):
    type: Literal["cancel"] = "cancel"
    task_id: str


ToRunner = Annotated[LoadShard | RunTask | CancelTask, Field(discriminator="type")]

# runner -> node

TaskErrorKind = Literal["context_window", "invalid_request", "engine"]


class Loading(_Message):
    type: Literal["loading"] = "loading"
    progress: float = Field(ge=0.0, le=1.0)
    detail: str


class Ready(_Message):
    type: Literal["ready"] = "ready"
    context_length: int
    warmup_s: float


class RingHosted(_Message):
    """The first stage of a multi-stage instance listens for the other stages here (published to the cluster)."""

    type: Literal["ring_hosted"] = "ring_hosted"
    address: RingAddress


class LoadFailed(_Message):
    type: Literal["load_failed"] = "load_failed"
    error: str


class Chunk(_Message):
    type: Literal["chunk"] = "chunk"
    chunk: GenerationChunk


class TaskFailed(_Message):
    type: Literal["task_failed"] = "task_failed"
    task_id: str
    kind: TaskErrorKind
    error: str


class TaskCancelled(_Message):
    type: Literal["task_cancelled"] = "task_cancelled"
    task_id: str


FromRunner = Annotated[Loading | RingHosted | Ready | LoadFailed | Chunk | TaskFailed | TaskCancelled,
                       Field(discriminator="type")]

TO_RUNNER: TypeAdapter[ToRunner] = TypeAdapter(ToRunner)
FROM_RUNNER: TypeAdapter[FromRunner] = TypeAdapter(FromRunner)


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode() + b"\n"


class Inbox:
    """Reads commands on a thread, so a cancel arrives while the main thread is generating."""

    def __init__(self, stream: BinaryIO) -> None:
        self.commands: queue.Queue[LoadShard | RunTask] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, args=(stream,), name="runner-inbox", daemon=True).start()

    def _read(self, stream: BinaryIO) -> None:
        try:
            for line in stream:
                message = TO_RUNNER.validate_json(line)
                if isinstance(message, CancelTask):
                    with self._lock:
                        self._cancelled.add(message.task_id)
                else:
                    self.commands.put(message)
        except ValidationError:
            log.exception("the node sent a command this runner does not understand; stopping")
            os._exit(3)
        # the node closed our stdin (stop) or died: nothing left to serve
        os._exit(0)

    def begin(self, task_id: str) -> bool:
        """Start a task; True if it was cancelled already. Cancels of earlier tasks that raced their end are dropped."""
        with self._lock:
            cancelled = task_id in self._cancelled
            self._cancelled.clear()
            return cancelled

    def take_cancel(self, task_id: str) -> bool:
        with self._lock:
            if task_id in self._cancelled:
                self._cancelled.discard(task_id)
                return True
            return False


class Outbox:
    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def send(self, message: BaseModel) -> None:
        self._stream.write(encode(message))
        self._stream.flush()


def _classify(error: Exception) -> TaskErrorKind:
    from ringlet.models.errors import ContextWindowError

    if isinstance(error, ContextWindowError):
        return "context_window"
    if isinstance(error, ValueError):
        return "invalid_request"
    return "engine"


def run_task(engine, task: TextGenerationTask, inbox: Inbox, outbox: Outbox) -> None:  # type: ignore[no-untyped-def]
    if inbox.begin(task.task_id):
        outbox.send(TaskCancelled(task_id=task.task_id))
        return
    stream = engine.generate(task)
    try:
        for chunk in stream:
            outbox.send(Chunk(chunk=chunk))
            if chunk.finish_reason is not None:
                return
            if inbox.take_cancel(task.task_id):
                outbox.send(TaskCancelled(task_id=task.task_id))
                return
    except Exception as error:  # noqa: BLE001  a failed task is reported; the runner serves the next one
        kind = _classify(error)
        if kind == "engine":
            traceback.print_exc(file=sys.stderr)
        outbox.send(TaskFailed(task_id=task.task_id, kind=kind, error=str(error) or type(error).__name__))
    finally:
        stream.close()


def serve(inbox: Inbox, outbox: Outbox) -> int:
    first = inbox.commands.get()
    if not isinstance(first, LoadShard):
        outbox.send(LoadFailed(error=f"expected a load command first, got {first.type!r}"))
        return 2
    if len(first.bound.instance.shards) > 1:
        from ringlet.worker.pipeline import serve_stage

        return serve_stage(first, inbox, outbox)
    try:
        outbox.send(Loading(progress=0.05, detail="loading weights"))
        from ringlet.worker.engines.engine_init import initialize_engine, warmup_engine

        engine = initialize_engine(first.bound)
        outbox.send(Loading(progress=0.9, detail="warming up"))
        warmup_s = warmup_engine(engine)
    except Exception as error:  # noqa: BLE001  any load failure (file, driver, OOM) is reported, then we exit
        traceback.print_exc(file=sys.stderr)
        outbox.send(LoadFailed(error=f"{type(error).__name__}: {error}"))
        return 1
    outbox.send(Ready(context_length=engine.context_length, warmup_s=warmup_s))
    while True:
        command = inbox.commands.get()
        assert isinstance(command, RunTask), "the node loads one shard per runner"
        run_task(engine, command.task, inbox, outbox)


def main() -> int:
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
                        datefmt="%H:%M:%S")
    began = time.perf_counter()
    code = serve(Inbox(sys.stdin.buffer), Outbox(protocol_out))
    log.info("runner exits after %.1f s", time.perf_counter() - began)
    return code


if __name__ == "__main__":
    sys.exit(main())
