"""Starts one runner child process per local shard and feeds it the tasks of its instance, first come first served.

The supervisor owns each instance's queue: a runner gets its next task only when the previous one ended
(finished, failed or cancelled), so a cancel frees the runner within one token and no task is lost or
starved. What the runners report about themselves (loading, ready, failed, a ring hosted) becomes state events
(`emit`), which the master orders; tasks cause none.

A watchdog kills a runner that has requests and has sent nothing (a token, or the report a busy runner sends every
second) for `EngineConfig.runner_stall_s`: a hung engine, a stopped process. A runner of a one-stage instance that
dies, so killed or by itself (a crash, the OOM killer), is started again after a back-off: the requests it was
running end with an error, the queued ones wait for it. After `EngineConfig.runner_restarts` restarts within
`RESTART_WINDOW_S`, the next death marks the instance failed with its reason. A stage of a ring is not restarted
alone: its instance fails, and when that stage had served, the master forms the ring again (`Node.reform`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import cast

from ringlet.shared.config import EngineConfig
from ringlet.shared.errors import TaskError
from ringlet.shared.instances import ENGINE_TYPES, BoundInstance, EngineType
from ringlet.shared.messages import (
    FROM_RUNNER,
    BatchStats,
    CancelTask,
    Chunk,
    FellBack,
    FromRunner,
    LoadFailed,
    Loading,
    LoadShard,
    Ready,
    RunTask,
    TaskCancelled,
    TaskFailed,
    TaskStarted,
)
from ringlet.shared.state import (
    Event,
    RingHosted,
    RunnerFailed,
    RunnerFellBack,
    RunnerProgressed,
    RunnerReady,
    RunnerStatus,
    State,
)
from ringlet.shared.tasks import GenerationChunk, Task
from ringlet.shared.wire import BadMessageError, decode, encode
from ringlet.worker.runner import stage_weight_bytes

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
RESTART_WINDOW_S = 600.0
WATCH_EVERY_S = 1.0
RING_OMP_SPINCOUNT = 10_000
# a chunk line is small, but a huge prompt echoed in an error message must not break the reader
_LINE_LIMIT = 64 * 1024 * 1024


def runner_environment(bound: BoundInstance, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the process that runs `bound`'s stage: `environ`, and for a stage of a ring, OpenMP's idle
    threads spinning briefly.

    A stage waits for its neighbours once per token. OpenMP's idle threads spin ~300k rounds after each parallel
    region by default; where stages share cores (several nodes on one machine) that spinning starves the stage that
    is computing: 2 stages of the embedded model on 2 cores decoded 29-34 tok/s with the default and 51 tok/s with
    10k rounds (scripts/bench_cluster.py)."""
    env = dict(environ)
    if len(bound.instance.shards) > 1:
        env.setdefault("GOMP_SPINCOUNT", str(RING_OMP_SPINCOUNT))
    return env


@dataclass(eq=False)
class _Pending:
    task: Task
    on_started: Callable[[], None]
    outbox: asyncio.Queue[GenerationChunk | TaskError] = field(default_factory=asyncio.Queue)
    done: bool = False

    def finish(self, item: GenerationChunk | TaskError) -> None:
        if not self.done:
            self.done = True
            self.outbox.put_nowait(item)


@dataclass(frozen=True)
class InstanceLoad:
    queued: int  # tasks waiting here for a place in the runner's batch
    batch: BatchStats | None  # the runner's last report (None: it does not batch, or has not reported yet)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Runner:
    """The parent's side of one runner process: the tasks waiting for it, those it runs, its output reader.

    The runner takes as many tasks at once as its batch holds (`Ready.slots`: one for an engine that runs one task at a
    time); the others wait here in arrival order, up to `max_queued`, beyond which a task is refused at once."""

    def __init__(self, load: LoadShard, emit: Callable[[Event], None]) -> None:
        self._load, self.bound, self._emit = load, load.bound, emit
        self.queue: deque[_Pending] = deque()
        self.active: dict[str, _Pending] = {}  # sent to the runner, by task id
        self.slots = 1
        self.stats: BatchStats | None = None  # a batching runner's last report
        self.ready = False
        self.failure: str | None = None
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping = False
        self._killed_for: str | None = None  # why the watchdog killed the process, for the reader to report
        self.heard_at = time.monotonic()  # the runner's last message, or when it was last given work while idle
        self._deaths: deque[float] = deque()  # when it died, within RESTART_WINDOW_S

    @property
    def instance_id(self) -> str:
        return self.bound.instance.instance_id

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ringlet.worker.runner", env=runner_environment(self.bound, os.environ),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=_LINE_LIMIT,
            # its own session: a Ctrl-C in the node's terminal reaches the node only, which then stops its
            # runners in order (end of stdin); a runner also exits by itself when the node dies
            start_new_session=True,
        )
        log.info("instance %s: runner pid %d loading %s", self.instance_id, self.process.pid, self.bound.instance.model)
        self._emit(RunnerProgressed(instance_id=self.instance_id, node_id=self.bound.node_id, progress=0.0,
                                    detail="starting runner", pid=self.process.pid))
        self._send(self._load)
        self.heard_at = time.monotonic()
        self._reader = asyncio.create_task(self._read(), name=f"runner-{self.instance_id}")
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch(), name=f"watchdog-{self.instance_id}")

    def _send(self, message: LoadShard | RunTask | CancelTask) -> None:
        assert self.process is not None and self.process.stdin is not None
        if self.process.returncode is None and not self.process.stdin.is_closing():
            self.process.stdin.write(encode(message) + b"\n")
        # else the reader is about to see the exit and fail every task of this runner

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.heard_at = time.monotonic()
            try:
                message = decode(FROM_RUNNER, line, f"runner {self.process.pid}'s stdout")
            except BadMessageError as error:
                log.error("instance %s: %s; ignored", self.instance_id, error)
                continue
            self._handle(message)
        code = await self.process.wait()
        if not self._stopping and self.failure is None:  # not stopped, nor failed already (a load that failed)
            await self._died(code)

    async def _died(self, code: int) -> None:
        """The runner process ended by itself or by the watchdog: start it again after a back-off, or fail it."""
        reason = self._killed_for or (f"the runner process stopped ({describe_exit(code)}; out of memory, or a crash "
                                      "in the engine: see the node's log)")
        self._killed_for = None
        now = time.monotonic()
        while self._deaths and now - self._deaths[0] > RESTART_WINDOW_S:
            self._deaths.popleft()
        if len(self.bound.instance.shards) > 1:  # a ring's stages start together: the master forms it again
            self.fail(reason, reform=self.ready)
            return
        if len(self._deaths) >= self._load.config.runner_restarts:
            self.fail(f"{reason}; delete the instance and create it again")
            return
        self._deaths.append(now)
        back_off = 2.0 ** (len(self._deaths) - 1)
        log.error("instance %s: %s; starting it again in %.0f s", self.instance_id, reason, back_off)
        self.ready = False
        self._end_running(TaskError("runner_failed", f"instance {self.instance_id}: {reason}; it is starting again, "
                                                     "retry the request"))
        self._emit(RunnerProgressed(instance_id=self.instance_id, node_id=self.bound.node_id, progress=0.0,
                                    detail=f"starting again: {reason}", pid=None))
        await asyncio.sleep(back_off)
        if not self._stopping:
            try:
                await self.start()  # the queued requests wait for its Ready
            except OSError as error:
                self.fail(f"could not start the runner again: {error}")

    async def _watch(self) -> None:
        """Kill the runner when it has requests and has been silent for the stall time (its reader restarts it)."""
        stall = self._load.config.runner_stall_s
        while not self._stopping and self.failure is None:
            await asyncio.sleep(WATCH_EVERY_S)
            process = self.process
            silent = time.monotonic() - self.heard_at
            if (self.ready and self.active and silent > stall and process is not None and process.returncode is None
                    and self._killed_for is None):
                self._killed_for = (f"the runner sent nothing for {silent:.0f} s while running {len(self.active)} "
                                    "request(s) (a hung engine, or a stopped process); it was killed")
                log.error("instance %s: %s", self.instance_id, self._killed_for)
                process.kill()

    def _handle(self, message: FromRunner) -> None:
        node_id = self.bound.node_id
        match message:
            case Loading(progress=progress, detail=detail, load=load):
                pid = self.process.pid if self.process else None
                self._emit(RunnerProgressed(instance_id=self.instance_id, node_id=node_id, progress=progress,
                                            detail=detail, pid=pid, load=load))
            case RingHosted():
                # into the state: the nodes of the later stages start their runners when they see it
                self._emit(message)
            case Ready(context_length=context_length, warmup_s=warmup_s, slots=slots):
                log.info("instance %s: ready on %s (warm-up %.1f s, %d at once; optimisation: %s)%s",
                         self.instance_id, message.engine, warmup_s, slots, message.optimization,
                         f"; fell back: {message.fallback}" if message.fallback else "")
                self.ready, self.slots = True, slots
                self._emit(RunnerReady(instance_id=self.instance_id, node_id=node_id, context_length=context_length,
                                       engine=self._engine(message.engine), optimization=message.optimization,
                                       fallback=message.fallback, tool_format=message.tool_format,
                                       thinking=message.thinking))
                self._dispatch()
            case FellBack(engine=engine, reason=reason):
                log.warning("instance %s: %s; it goes on serving", self.instance_id, reason)
                now = self._engine(engine)
                if now is not None:
                    self._emit(RunnerFellBack(instance_id=self.instance_id, node_id=node_id, engine=now,
                                              reason=reason))
            case LoadFailed(error=error):
                self.fail(f"loading failed: {error}")
            case BatchStats():
                self.stats = message
            case TaskStarted(task_id=task_id):
                if (pending := self.active.get(task_id)) is not None:
                    pending.on_started()
            case Chunk(chunk=chunk):
                if (pending := self.active.get(chunk.task_id)) is not None:
                    pending.outbox.put_nowait(chunk)
                    if chunk.last:
                        pending.done = True
                        self._ended(chunk.task_id)
            case TaskFailed(task_id=task_id, kind=kind, error=error):
                if (pending := self.active.get(task_id)) is not None:
                    pending.finish(TaskError(kind, error))
                    self._ended(task_id)
            case TaskCancelled(task_id=task_id):
                self._ended(task_id)

    def _engine(self, name: str | None) -> EngineType | None:
        """A runner's engine name as the state records it; another name (a runner of a newer ringlet) is logged."""
        if name is None or name in ENGINE_TYPES:
            return cast(EngineType | None, name)
        log.warning("instance %s: the runner reports an engine %r ringlet does not know; not recorded",
                    self.instance_id, name)
        return None

    def _ended(self, task_id: str) -> None:
        self.active.pop(task_id, None)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.ready and self.queue and len(self.active) < self.slots:
            if not self.active:  # an idle runner is silent by right: its silence counts from its first task
                self.heard_at = time.monotonic()
            pending = self.queue.popleft()
            self.active[pending.task.task_id] = pending
            self._send(RunTask(task=pending.task))

    def fail(self, reason: str, reform: bool = False) -> None:
        """`reform`: a stage of a ring that served: the master forms the ring again (`Node.apply_ordered`)."""
        if self.failure is not None:
            return
        log.error("instance %s: %s", self.instance_id, reason)
        self.failure, self.ready = reason, False
        self._emit(RunnerFailed(instance_id=self.instance_id, node_id=self.bound.node_id, error=reason, reform=reform))
        self._end_all(TaskError("runner_failed", f"instance {self.instance_id}: {reason}"))

    def _end_all(self, error: TaskError) -> None:
        self._end_running(error)
        for pending in self.queue:
            pending.finish(error)
        self.queue.clear()

    def _end_running(self, error: TaskError) -> None:
        for pending in self.active.values():
            pending.finish(error)
        self.active.clear()

    def submit(self, task: Task, on_started: Callable[[], None]) -> _Pending:
        if self.failure is not None:
            raise TaskError("runner_failed", f"instance {self.instance_id} has failed: {self.failure}")
        if len(self.active) >= self.slots and len(self.queue) >= self._load.config.max_queued:
            raise TaskError("busy", f"instance {self.instance_id} has {len(self.active)} requests running and "
                                    f"{len(self.queue)} waiting, its limit; retry in a moment")
        pending = _Pending(task, on_started)
        self.queue.append(pending)
        self._dispatch()
        return pending

    def cancel(self, pending: _Pending) -> None:
        """Forget a task whose caller went away: drop it from the queue, or stop it between two tokens."""
        pending.done = True
        if self.active.get(pending.task.task_id) is pending:
            # its place goes to the next task at once: the runner drops the task between two steps, and a batch
            # never holds more than its size (a task sent meanwhile waits in the runner)
            self._send(CancelTask(task_id=pending.task.task_id))
            self._ended(pending.task.task_id)
        elif pending in self.queue:
            self.queue.remove(pending)

    async def stop(self, reason: TaskError) -> None:
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._end_all(reason)
        if self.process is None:
            return
        if self.process.stdin is not None:
            self.process.stdin.close()  # end of stdin: the runner exits at once
        try:
            await asyncio.wait_for(self.process.wait(), STOP_GRACE_S)
        except TimeoutError:
            log.warning("instance %s: runner pid %d ignored end of input; killing it", self.instance_id,
                        self.process.pid)
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            await self._reader


def plan(state: State, node_id: str, running: Collection[str], data_host: str = "127.0.0.1",
         config: EngineConfig = EngineConfig()) -> tuple[list[LoadShard], list[str]]:
    """Runners to start (shards placed on this node that have none) and to stop (instance gone, or failed).

    A failed runner anywhere fails the whole instance: its other stages stop and nothing is started again (the
    instance shows the failure until it is deleted or placed anew). A later stage of a ring starts once the
    first stage has hosted the rendezvous, so it knows where to join."""
    start = []
    for instance_id, record in state.instances.items():
        if instance_id in running or node_id not in record.runners or record.status == RunnerStatus.FAILED:
            continue
        bound = BoundInstance(instance=record.instance, node_id=node_id)
        context = record.instance.context_length or record.instance.max_context
        own = config.model_copy(update={"max_context": context or config.max_context,
                                        "kv_cache_plan": record.instance.kv_cache_tokens})
        if bound.shard.rank == 0:
            start.append(LoadShard(bound=bound, config=own, data_host=data_host))
        elif record.ring is not None:
            start.append(LoadShard(bound=bound, config=own, ring=record.ring, data_host=data_host))
    stop = [instance_id for instance_id in running
            if instance_id not in state.instances or state.instances[instance_id].status == RunnerStatus.FAILED]
    return start, stop


class Supervisor:
    """This node's runners, by instance id."""

    def __init__(self, emit: Callable[[Event], None], config: EngineConfig = EngineConfig()) -> None:
        self._emit, self._config = emit, config
        self._runners: dict[str, _Runner] = {}

    async def start(self, load: LoadShard) -> None:
        """Start the runner of this node's shard of an instance."""
        if load.stage_bytes is None:  # from the card this node read when it placed the model, not read again there
            load = load.model_copy(update={"stage_bytes": await asyncio.to_thread(stage_weight_bytes, load, True)})
        instance_id = load.bound.instance.instance_id
        assert instance_id not in self._runners, "one runner per instance on a node"
        runner = _Runner(load, self._emit)
        self._runners[instance_id] = runner
        try:
            await runner.start()
        except OSError as error:  # no python to exec, out of file descriptors: the instance fails, the node stays
            runner.fail(f"could not start a runner process: {error}")

    async def reconcile(self, state: State, node_id: str, data_host: str = "127.0.0.1") -> None:
        to_start, to_stop = plan(state, node_id, self._runners, data_host, self._config)
        for instance_id in to_stop:
            record = state.instances.get(instance_id)
            await self.stop(instance_id, "was deleted" if record is None else f"failed: {record.error}")
        for load in to_start:
            await self.start(load)

    def runs(self, instance_id: str) -> bool:
        return instance_id in self._runners

    def load(self) -> dict[str, InstanceLoad]:
        """How busy each of this node's runners is, by instance id."""
        return {instance_id: InstanceLoad(queued=len(runner.queue), batch=runner.stats)
                for instance_id, runner in self._runners.items()}

    async def generate(self, instance_id: str, task: Task,
                       on_started: Callable[[], None] = lambda: None) -> AsyncIterator[GenerationChunk]:
        """Queue the task and stream its chunks; `on_started` runs when the runner takes it. Raises TaskError.
        Closing the stream early cancels the task."""
        runner = self._runners.get(instance_id)
        if runner is None:
            raise TaskError("instance_deleted", f"instance {instance_id} is not running on this node")
        pending = runner.submit(task, on_started)
        try:
            while True:
                item = await pending.outbox.get()
                if isinstance(item, TaskError):
                    raise item
                yield item
                if item.last:
                    return
        finally:
            if not pending.done:
                runner.cancel(pending)

    async def stop(self, instance_id: str, why: str) -> None:
        """Stop the runner; its tasks end with "instance ID <why>"."""
        runner = self._runners.pop(instance_id, None)
        if runner is not None:
            await runner.stop(TaskError("instance_deleted", f"instance {instance_id} {why}"))

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(instance_id, "stopped with its node") for instance_id in list(self._runners)))
