"""A runner: the child process that holds one shard's engine, so an engine crash or OOM never kills the node.

The node (`supervisor.py`) starts `python -m ringlet.worker.runner` and talks to it in JSON lines
(`shared/messages.py`): commands on the child's stdin, messages on its stdout. The child moves its stdout to a
private descriptor first and points fd 1 at stderr, so stray prints from libraries cannot corrupt the protocol.
End of stdin means the node stopped or died: the child exits at once. Tasks run one at a time; a cancel is
honoured between tokens.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from ringlet.models.thinking import thinking_format
from ringlet.models.tokenizer import Tokenizer
from ringlet.models.tools import tool_format
from ringlet.shared.config import EngineConfig
from ringlet.shared.errors import ContextWindowError, TaskErrorKind
from ringlet.shared.instances import ENGINE_TYPES, EngineType
from ringlet.shared.messages import (
    TO_RUNNER,
    CancelTask,
    Chunk,
    FellBack,
    LoadFailed,
    Loading,
    LoadShard,
    Ready,
    RunTask,
    TaskCancelled,
    TaskFailed,
    TaskStarted,
)
from ringlet.shared.state import LayerLoad, RingHosted
from ringlet.shared.tasks import EmbeddingTask, TextGenerationTask, ThinkingFormat, ToolFormat
from ringlet.shared.wire import BadMessageError, Message, decode, encode
from ringlet.worker.engines.base import GeneratesText

if TYPE_CHECKING:
    from ringlet.worker.batching import BatchesItself, BatchModel, PipelinedModel

log = logging.getLogger("ringlet.runner")

STATS_EVERY_S = 1.0  # a busy batching runner reports at least this often: the node's watchdog hears it is alive


class Inbox:
    """Reads commands on a thread, so a cancel arrives while the main thread is generating."""

    def __init__(self, stream: BinaryIO) -> None:
        self.commands: queue.Queue[LoadShard | RunTask] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self.woken = threading.Event()  # set on every command, for a loop that waits for any of them
        threading.Thread(target=self._read, args=(stream,), name="runner-inbox", daemon=True).start()

    def _read(self, stream: BinaryIO) -> None:
        try:
            for line in stream:
                message = decode(TO_RUNNER, line, "the runner's stdin")
                if isinstance(message, CancelTask):
                    with self._lock:
                        self._cancelled.add(message.task_id)
                else:
                    self.commands.put(message)
                self.woken.set()
        except BadMessageError:
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

    def take_cancels(self) -> set[str]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            return cancelled


class Outbox:
    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()  # a watching thread may report beside the main one (a tensor-parallel rank lost)
        self.told_ready = False  # Ready was sent: the runner serves

    def send(self, message: Message) -> None:
        self.send_all([message])

    def send_all(self, messages: list[Message]) -> None:
        """Several messages in one write (a batched step's chunks: one system call, not one per sequence)."""
        if messages:
            data = b"".join(encode(message) + b"\n" for message in messages)
            with self._lock:
                self._stream.write(data)
                self._stream.flush()


def _classify(error: Exception) -> TaskErrorKind:
    if isinstance(error, ContextWindowError):
        return "context_window"
    if isinstance(error, ValueError):
        return "invalid_request"
    return "engine"


def _task_failed(task_id: str, error: Exception) -> TaskFailed:
    """The report of a task that `error` ended; an engine's failure also goes to stderr with its traceback."""
    kind = _classify(error)
    if kind == "engine":
        traceback.print_exc(file=sys.stderr)
    return TaskFailed(task_id=task_id, kind=kind, error=str(error) or type(error).__name__)


TORCH_DEVICE_ENGINE: dict[str, EngineType] = {"cpu": "cpu", "cuda": "cuda", "xpu": "ipex"}


def running_engine(engine: object, planned: EngineType) -> EngineType:
    """The engine a loaded stage runs on: its `name` where that is an engine ("ipex"; "cpu" once it fell back), a
    torch engine's device, else (a ring's stage) the one placement planned."""
    name = getattr(engine, "name", None)
    if name in ENGINE_TYPES:
        return cast(EngineType, name)
    device = getattr(getattr(engine, "device", None), "type", None)
    return TORCH_DEVICE_ENGINE.get(device, planned) if name == "torch" and device else planned


def fallback_of(engine: object, planned: EngineType) -> str | None:
    """"ipex -> cpu: <reason>" once the engine left the one placement planned (at load, or later: its
    `fallback_reason`), else None."""
    reason = getattr(engine, "fallback_reason", None)
    now = running_engine(engine, planned)
    if now == planned and not reason:
        return None
    if now == planned:
        now = "cpu"  # a stage that reports a fallback without renaming itself: every engine falls back to the CPU
    reason = reason or f"the {planned} engine cannot run on this node (the node's log says why)"
    return reason if reason.startswith(f"{planned} -> ") else f"{planned} -> {now}: {reason}"


def ready(engine: object, planned: EngineType, context_length: int, warmup_s: float, slots: int = 1) -> Ready:
    """The runner's Ready, with what it runs on and what was applied to the model."""
    optimization = getattr(engine, "optimization", None)
    return Ready(context_length=context_length, warmup_s=warmup_s, slots=slots,
                 engine=running_engine(engine, planned), fallback=fallback_of(engine, planned),
                 optimization=optimization if isinstance(optimization, str) else None,
                 tool_format=_tool_format(engine), thinking=_thinking(engine))


def _tokenizer(engine: object) -> object | None:
    try:
        return getattr(engine, "tokenizer", None)
    except (AttributeError, RuntimeError):  # a middle stage's engine has none to give
        return None


def _tool_format(engine: object) -> ToolFormat | None:
    """The tool-call format the engine's chat template teaches, if the engine holds the tokenizer."""
    tokenizer = _tokenizer(engine)
    return None if tokenizer is None else tool_format(getattr(tokenizer, "chat_template", None))


def _thinking(engine: object) -> ThinkingFormat | None:
    """How the model writes its thinking, if it thinks and the engine holds the tokenizer (ringlet's own)."""
    tokenizer = _tokenizer(engine)
    return thinking_format(tokenizer) if isinstance(tokenizer, Tokenizer) else None


class FallbackWatch:
    """Sends FellBack once when the engine leaves its device while serving (an Intel GPU lost: ipex -> cpu)."""

    def __init__(self, engine: object, planned: EngineType, outbox: Outbox, reported: str | None) -> None:
        self.engine, self.planned, self.outbox, self.reported = engine, planned, outbox, reported

    def __call__(self) -> None:
        fallback = fallback_of(self.engine, self.planned)
        if fallback is not None and fallback != self.reported:
            self.reported = fallback
            log.warning("%s", fallback)
            self.outbox.send(FellBack(engine=running_engine(self.engine, self.planned), reason=fallback))


def announce_ready(engine: Any, planned: EngineType, outbox: Outbox, warmup_s: float, slots: int = 1
                   ) -> FallbackWatch:
    """Sends the runner's Ready for `engine`; returns the watch that reports its later fallback."""
    told = ready(engine, planned, engine.context_length, warmup_s, slots)
    outbox.send(told)
    outbox.told_ready = True
    return FallbackWatch(engine, planned, outbox, told.fallback)


def run_task(engine: GeneratesText, task: TextGenerationTask, inbox: Inbox, outbox: Outbox) -> None:
    from ringlet.worker.engines.engine_init import generate_with_engine

    task_id = task.task_id
    if inbox.begin(task_id):
        outbox.send(TaskCancelled(task_id=task_id))
        return
    outbox.send(TaskStarted(task_id=task_id))
    stream = generate_with_engine(engine, task)
    try:
        for chunk in stream:
            outbox.send(Chunk(chunk=chunk))
            if chunk.last:
                return
            if inbox.take_cancel(task_id):
                outbox.send(TaskCancelled(task_id=task_id))
                return
    except Exception as error:  # noqa: BLE001  a failed task is reported; the runner serves the next one
        outbox.send(_task_failed(task_id, error))
    finally:
        stream.close()


class Heartbeat:
    """Sends `report()` at most every STATS_EVERY_S, however often it is called: a sign of life from inside a long
    piece of work."""

    def __init__(self, outbox: Outbox, report: Callable[[], Message]) -> None:
        self.outbox, self.report, self.sent_at = outbox, report, time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self.sent_at >= STATS_EVERY_S:
            self.sent_at = time.monotonic()
            self.outbox.send(self.report())


def run_embedding(engine: object, task: EmbeddingTask, outbox: Outbox, alive: Callable[[], None] = lambda: None
                  ) -> None:
    """An embeddings request, all its inputs at once, between two steps of the generations; an engine (or a ring's
    stage) that computes none refuses it. `alive()` runs after each of its forwards (a long request's forwards
    tell the node's watchdog that the runner is working)."""
    embed = getattr(engine, "embed", None)
    if embed is None:
        outbox.send(TaskFailed(task_id=task.task_id, kind="invalid_request", error=(
            f"model {task.model!r}: this instance computes no embeddings; embeddings run on the torch engines (cpu, "
            "cuda), on one node or on a ring of torch stages")))
        return
    outbox.send(TaskStarted(task_id=task.task_id))
    try:
        chunks = embed(task, alive)
    except Exception as error:  # noqa: BLE001  a failed request is reported; the runner serves the next one
        outbox.send(_task_failed(task.task_id, error))
        return
    outbox.send_all([Chunk(chunk=chunk) for chunk in chunks])


def serve_tasks(engine: GeneratesText, inbox: Inbox, outbox: Outbox,
                broken: Callable[[], bool] = lambda: False, fell_back: Callable[[], None] = lambda: None) -> None:
    """Run the node's tasks on `engine`, one at a time, until the node goes away (the inbox exits the process) or,
    for a ring's first stage, the ring breaks (`broken()`); `fell_back()` after each task reports a fallback."""
    while not broken():
        command = inbox.commands.get()
        assert isinstance(command, RunTask), "the node loads one shard per runner"
        if isinstance(command.task, EmbeddingTask):
            run_embedding(engine, command.task, outbox)
        else:
            run_task(engine, command.task, inbox, outbox)
        fell_back()


def serve_batched(engine: BatchModel | PipelinedModel | BatchesItself, config: EngineConfig, inbox: Inbox, outbox: Outbox,
                  broken: Callable[[], bool] = lambda: False, fell_back: Callable[[], None] = lambda: None) -> None:
    """Run the node's tasks together, one batched step at a time (a pipeline: as many as it keeps in flight): a task
    joins at the next step and leaves when it ends; a cancel takes effect between two steps. A step that fails fails
    the tasks in it, and the batch starts over empty; for a ring's first stage whose ring broke (`broken()`), the
    loop ends. `fell_back()` after each step reports an engine that left its device. An embeddings request runs
    whole between two steps, once no step is in flight (a ring launches none while one waits)."""
    generator = _batch_generator(engine, config)
    admitted: set[str] = set()
    reported, reported_at = generator.stats(), 0.0
    embeddings: deque[EmbeddingTask] = deque()  # each runs once no step is in flight (a ring's come back first)
    while not broken():
        if not generator and not embeddings:
            inbox.woken.wait()
        inbox.woken.clear()
        while not inbox.commands.empty():
            command = inbox.commands.get()
            assert isinstance(command, RunTask), "the node loads one shard per runner"
            if isinstance(command.task, EmbeddingTask):
                embeddings.append(command.task)
                continue
            try:
                generator.submit(command.task)
            except Exception as error:  # noqa: BLE001  this task cannot start (a ValueError: empty, over the context
                # window, a bad template); the others and the runner go on
                outbox.send(_task_failed(command.task.task_id, error))
        for task_id in inbox.take_cancels():
            if generator.cancel(task_id):
                admitted.discard(task_id)
                outbox.send(TaskCancelled(task_id=task_id))
        while embeddings and not generator.in_flight:
            run_embedding(engine, embeddings.popleft(), outbox, Heartbeat(outbox, generator.stats))
        try:
            if not embeddings:
                generator.launch()
            chunks = generator.collect() if generator.in_flight else []
        except Exception as error:  # noqa: BLE001  the engine failed: its tasks end with the reason, the runner goes on
            traceback.print_exc(file=sys.stderr)
            for task_id in generator.task_ids():
                outbox.send(TaskFailed(task_id=task_id, kind="engine", error=str(error) or type(error).__name__))
            generator = _batch_generator(engine, config)
            admitted.clear()
            fell_back()
            continue
        messages: list[Message] = []
        for task_id in generator.running_ids() - admitted:
            admitted.add(task_id)
            messages.append(TaskStarted(task_id=task_id))
        for chunk in chunks:
            messages.append(Chunk(chunk=chunk))
            if chunk.last:
                admitted.discard(chunk.task_id)
        outbox.send_all(messages)
        fell_back()
        stats = generator.stats()
        if time.monotonic() - reported_at > STATS_EVERY_S or (stats != reported and not generator):
            outbox.send(stats)
            reported, reported_at = stats, time.monotonic()


def _batch_generator(engine: BatchModel | PipelinedModel | BatchesItself, config: EngineConfig) -> Any:
    """The engine's own batching loop (MLX: mlx-lm's), else ringlet's scheduler over the engine's paged cache."""
    if hasattr(engine, "batch_generator"):
        return cast("BatchesItself", engine).batch_generator(config.max_batch)
    from ringlet.worker.batching import BatchGenerator

    return BatchGenerator.configured(cast("BatchModel | PipelinedModel", engine), config)


def _layers_loaded(outbox: Outbox, first: float, last: float, bytes_total: int | None = None
                   ) -> Callable[[int, int, int], None]:
    """Reports each layer a load finishes, as progress from `first` to `last`, with the weight bytes the loaded
    layers keep of `bytes_total` (what the stage holds when loaded, where it is known)."""
    def report(done: int, total: int, kept: int) -> None:
        load = LayerLoad(layers_loaded=done, layers_total=total, bytes_loaded=kept, bytes_total=bytes_total)
        outbox.send(Loading(progress=first + (last - first) * done / total, detail=f"loaded {load.describe()}",
                            load=load))
    return report


def stage_weight_bytes(load: LoadShard, quiet: bool = False) -> int | None:
    """The weight bytes this runner's stage will hold, from the model card of its local files and the format its
    engine holds them in; None where they cannot be read (logged unless `quiet`; the load then reports why)."""
    from ringlet.models.catalog import card_from_path, engine_weight_format
    from ringlet.models.kernels import cpu_vnni
    from ringlet.models.loader import resolve_model_path
    from ringlet.models.quant import cpu_supports_bf16
    from ringlet.shared.config import sharded_precision
    from ringlet.shared.errors import ModelLoadError

    shard = load.bound.shard
    try:
        card = card_from_path(load.bound.instance.model, resolve_model_path(load.bound.instance.model))
        precision = load.config.precision
        if load.bound.instance.tensor_parallel > 1:
            precision = sharded_precision(precision, shard.engine)
        held = engine_weight_format(shard.engine, precision, cpu_bf16=cpu_supports_bf16(),
                                    metal=sys.platform == "darwin", cpu_kernels=cpu_vnni.wanted())
        return card.stage_bytes(shard.start, shard.end, held)
    except (ModelLoadError, OSError, ValueError) as error:
        if quiet:
            return None
        log.info("instance %s: the stage's size is unknown (%s); its load reports layers only",
                 load.bound.instance.instance_id, error)
        return None


def _stage_bytes(load: LoadShard) -> int | None:
    """The weight bytes this runner holds: the stage's as the node sent them, else as this runner reads them (a model
    fetched by it); a tensor-parallel rank's share of them."""
    stage = load.stage_bytes if load.stage_bytes is not None else stage_weight_bytes(load)
    return None if stage is None else stage // load.bound.instance.tensor_parallel


def fetch_stage_files(load: LoadShard, outbox: Outbox, until: float) -> None:
    """A model named by its Hugging Face repo id whose files for this stage's layers are not here: fetch them into
    the store first, reporting the bytes as progress up to `until` (a model on disk, a path, the embedded or an
    Ollama model: nothing to do)."""
    from pathlib import Path

    from ringlet.models.download import DownloadProgress, download_model
    from ringlet.models.store import ModelRef
    from ringlet.shared.errors import ModelLoadError
    from ringlet.shared.sizes import format_bytes_of

    model, shard = load.bound.instance.model, load.bound.shard
    if Path(model).expanduser().exists():
        return
    try:
        ModelRef.parse(model)
    except ModelLoadError:
        return  # not a repo id
    layers = None if (shard.start, shard.end) == (0, shard.num_layers) else (shard.start, shard.end)

    def progress(update: DownloadProgress) -> None:
        if update.total:
            outbox.send(Loading(progress=until * update.done / update.total,
                                detail=f"downloading {format_bytes_of(update.done, update.total)}"))

    download_model(model, layers=layers, progress=progress)


def serve_single(load: LoadShard, inbox: Inbox, outbox: Outbox) -> int:
    """Load, warm up and serve a single-stage instance; returns the runner's exit code."""
    from ringlet.models.loader import reporting_load_progress
    from ringlet.worker.engines.engine_init import initialize_engine, warmup_engine

    try:
        fetch_stage_files(load, outbox, until=0.05)
        outbox.send(Loading(progress=0.05, detail="loading weights"))
        with reporting_load_progress(_layers_loaded(outbox, 0.05, 0.85, _stage_bytes(load))):
            engine = (_lead_ranks(load, outbox) if load.bound.instance.tensor_parallel > 1
                      else initialize_engine(load.bound, load.config))
        outbox.send(Loading(progress=0.9, detail="warming up"))
        warmup_s = warmup_engine(engine)
    except Exception as error:  # noqa: BLE001  any load failure (file, driver, OOM) is reported, then we exit
        traceback.print_exc(file=sys.stderr)
        outbox.send(LoadFailed(error=f"{type(error).__name__}: {error}"))
        return 1
    planned = load.bound.engine
    batching = hasattr(engine, "forward_batch") or hasattr(engine, "batch_generator")
    fell_back = announce_ready(engine, planned, outbox, warmup_s, load.config.max_batch if batching else 1)
    if batching:
        serve_batched(cast("BatchModel | BatchesItself", engine), load.config, inbox, outbox, fell_back=fell_back)
    else:
        serve_tasks(engine, inbox, outbox, fell_back=fell_back)
    return 0


def _lead_ranks(load: LoadShard, outbox: Outbox) -> Any:
    """Rank 0 of a tensor-parallel single-stage instance: its share of the model, each step sent to the other ranks
    first (`tensor_ranks.py`)."""
    from ringlet.worker.tensor_ranks import lead, load_rank_engine, start_ranks

    start_ranks(load, _rank_failed(outbox))
    engine, _ = load_rank_engine(load.bound, load.config, 0)
    lead(engine)
    return engine


def _rank_failed(outbox: Outbox) -> Callable[[str], None]:
    """What rank 0 tells the node before it exits because another rank did: while loading, that the load failed
    (and why); once serving, nothing: the node sees the runner exit, as after a crash, and starts it again."""
    def report(reason: str) -> None:
        if not outbox.told_ready:
            outbox.send(LoadFailed(error=reason))
    return report


def serve_stage(load: LoadShard, inbox: Inbox, outbox: Outbox) -> int:
    """Load one stage of a multi-stage instance, join its ring, and serve; returns the runner's exit code."""
    from ringlet.models.loader import reporting_load_progress
    from ringlet.net.ring import RingBrokenError, host_store, join_store
    from ringlet.worker.engines.engine_init import warmup_engine
    from ringlet.worker.pipeline import PipelineHead, PipelineStage, batches, load_stage_engine
    from ringlet.worker.stages import FirstStage, RelayStage, load_for_stage

    bound, size = load.bound, len(load.bound.instance.shards)
    instance_id = bound.instance.instance_id
    try:
        fetch_stage_files(load, outbox, until=0.05)  # before the ring: a stage joins it once it can load
        if bound.shard.is_first:
            store, address = host_store(load.data_host, size)
            # into the state: the nodes of the later stages start their runners when they see it
            outbox.send(RingHosted(instance_id=instance_id, address=address))
        elif load.ring is None:
            raise ValueError(f"stage {bound.shard.rank} of instance {instance_id} has no ring to join")
        else:
            store = join_store(load.ring, size)
        outbox.send(Loading(progress=0.05, detail=f"loading layers {bound.shard.start}-{bound.shard.end - 1}"))
        engine: FirstStage | RelayStage | PipelineHead | PipelineStage
        stage_bytes = _stage_bytes(load)
        if batches(bound):
            if bound.instance.tensor_parallel > 1:
                from ringlet.worker.tensor_ranks import start_ranks

                start_ranks(load, _rank_failed(outbox))
            with reporting_load_progress(_layers_loaded(outbox, 0.05, 0.55, stage_bytes)):
                batched, precision = load_stage_engine(bound, load.config, store, loaded=lambda: outbox.send(
                    Loading(progress=0.6, detail="waiting for the other stages")))
            engine = (PipelineHead if bound.shard.is_first else PipelineStage)(bound, batched, store, load.data_host)
        else:
            with reporting_load_progress(_layers_loaded(outbox, 0.05, 0.55, stage_bytes)):
                stage, precision = load_for_stage(bound, load.config)
            outbox.send(Loading(progress=0.6, detail="waiting for the other stages"))
            engine = (FirstStage if bound.shard.is_first else RelayStage)(bound, stage, store, load.data_host)
        warmup_s = 0.0
        if isinstance(engine, FirstStage | PipelineHead):
            outbox.send(Loading(progress=0.9, detail="warming up the ring"))
            warmup_s = warmup_engine(engine)
    # a failed load (missing file, driver, a stage that never joined) is reported, then the runner exits
    except Exception as error:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        outbox.send(LoadFailed(error=f"{type(error).__name__}: {error}"))
        return 1
    log.info("instance %s: stage %d ready (%s)", instance_id, bound.shard.rank, precision)
    if isinstance(engine, RelayStage | PipelineStage):
        after_step = announce_ready(engine, bound.engine, outbox, warmup_s)
        try:
            engine.serve(after_step=after_step)
        except RingBrokenError as error:
            log.error("instance %s: %s; this stage stops", instance_id, error)
            return 1
        return 0
    if isinstance(engine, PipelineHead):
        head = engine
        fell_back = announce_ready(head, bound.engine, outbox, warmup_s, load.config.max_batch)
        serve_batched(head, load.config, inbox, outbox, broken=lambda: head.broken, fell_back=fell_back)
    else:
        first = engine
        fell_back = announce_ready(first, bound.engine, outbox, warmup_s)
        serve_tasks(first, inbox, outbox, broken=lambda: first.broken, fell_back=fell_back)
    log.error("instance %s: the ring is broken; this stage stops", instance_id)
    return 1


def serve(inbox: Inbox, outbox: Outbox) -> int:
    first = inbox.commands.get()
    if not isinstance(first, LoadShard):
        outbox.send(LoadFailed(error=f"expected a load command first, got {first.type!r}"))
        return 2
    from ringlet.models.store import ringlet_home
    from ringlet.worker.engines.torch.static_decode import use_persistent_compile_caches

    use_persistent_compile_caches(ringlet_home())
    if len(first.bound.instance.shards) > 1:
        return serve_stage(first, inbox, outbox)
    return serve_single(first, inbox, outbox)


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
