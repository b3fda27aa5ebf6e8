"""One generation for one HTTP request, shared by the OpenAI and Ollama adapters.

The first chunk is awaited before any response is sent, so refusals (no instance, a prompt over the
context window, a failed runner) become proper statuses; the rest streams. Until the response has
started the client is watched for a disconnect here; once a stream is running Starlette cancels it when
the client leaves. Either way the task is closed, which cancels it in the runner within one token.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from pydantic import ValidationError

from ringlet.api.errors import ApiError, ClientGone, to_api_error
from ringlet.api.facade import NodeFacade, TaskStream
from ringlet.api.metrics import ApiMetrics, Outcome
from ringlet.models import grammar
from ringlet.models.thinking import ThinkingSplitter, splitter_for
from ringlet.shared.errors import NodeError, TaskError
from ringlet.shared.state import InstanceRecord
from ringlet.shared.tasks import GenerationChunk, Task, TextGenerationTask, ToolFormat

DISCONNECT_POLL_S = 0.1


class DisconnectWatch:
    """Asks whether the client went away at most every DISCONNECT_POLL_S, however fast the chunks come."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self._asked_at = time.monotonic()

    async def check(self) -> None:
        """Raises ClientGone once the client has gone."""
        now = time.monotonic()
        if now - self._asked_at >= DISCONNECT_POLL_S:
            self._asked_at = now
            if await self.request.is_disconnected():
                raise ClientGone


async def _next_watching(chunks: AsyncIterator[GenerationChunk], watch: DisconnectWatch) -> GenerationChunk:
    pending = asyncio.ensure_future(anext(chunks))
    try:
        while True:
            await watch.check()
            done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
            if done:
                return pending.result()
    finally:
        if not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)


def build_task(build: Callable[[], TextGenerationTask], constraint_param: str | None = None) -> TextGenerationTask:
    """Turn an adapter's request into a task; a value the task refuses, or a constraint on the output that cannot be
    compiled (`constraint_param`: the request's field that gave it), is the client's error (400)."""
    try:
        task = build()
    except ValidationError as error:
        raise ApiError(400, f"invalid request: {error.errors()[0]['msg']}", code="invalid_parameter") from None
    if task.sampling.constraint is not None:
        try:
            grammar.check(task.sampling.constraint)
        except grammar.ConstraintError as error:
            raise ApiError(400, f"invalid {constraint_param or 'constraint'}: {error}", param=constraint_param,
                           code="invalid_parameter") from None
    return task


def error_kind(error: Exception) -> str:
    """The metrics label of an error: the same code the client sees (model_not_found, runner_failed, ...)."""
    return to_api_error(error).code or type(error).__name__


def _ringlet_version() -> str:
    try:
        return importlib.metadata.version("ringlet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Generation:
    def __init__(self, handle: TaskStream, request: Request, api: str, metrics: ApiMetrics,
                 instance: InstanceRecord | None = None) -> None:
        """`instance`: the record of the instance that serves the task, as it stood at submission."""
        self.handle, self.request, self.api, self.metrics = handle, request, api, metrics
        self.instance = instance
        self._watch = DisconnectWatch(request)
        self._chunks = aiter(handle)
        self.first: GenerationChunk | None = None

    @property
    def model(self) -> str:
        return self.handle.task.model

    @property
    def task_id(self) -> str:
        return self.handle.task.task_id

    def tool_format(self) -> ToolFormat:
        """How the serving model writes tool calls (from its chat template, as its runner reported)."""
        return self.instance.tool_format if self.instance is not None else "hermes"

    def thinking_splitter(self) -> ThinkingSplitter | None:
        """The splitter of the answer's thinking, when the serving model thinks (as its runner reported)."""
        task = self.handle.task
        thinking = self.instance.thinking if self.instance is not None else None
        return splitter_for(thinking, task) if isinstance(task, TextGenerationTask) else None

    def fingerprint(self) -> str:
        """OpenAI's system_fingerprint: the same model, ring, engines and ringlet version give the same value (and,
        with a seed, the same answer)."""
        parts = [self.model, _ringlet_version()]
        if self.instance is not None:
            parts += [self.instance.instance.instance_type.value, *sorted(
                f"{node}:{runner.engine}:{runner.optimization}" for node, runner in self.instance.runners.items())]
        return "fp_" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]

    @classmethod
    async def start(cls, node: NodeFacade, task: Task, request: Request, api: str) -> Generation:
        """Submit the task and wait for its first chunk; raises NodeError, TaskError or ClientGone."""
        metrics: ApiMetrics = request.app.state.metrics
        try:
            handle = node.submit(task)
        except NodeError as refusal:
            metrics.error(api, error_kind(refusal))
            raise
        generation = cls(handle, request, api, metrics, node.state.instances.get(handle.instance_id))
        try:
            generation.first = await _next_watching(generation._chunks, generation._watch)
        except BaseException as error:
            cancelled = isinstance(error, ClientGone | asyncio.CancelledError)
            await generation._end("cancelled" if cancelled else "failed", None, error)
            raise
        return generation

    async def chunks(self, watch_disconnect: bool) -> AsyncIterator[GenerationChunk]:
        """Every chunk, the first included; the last has finish_reason. Raises TaskError (or ClientGone when
        watching); closing this early cancels the task."""
        assert self.first is not None, "start() first"
        chunk, last, failure = self.first, None, None
        outcome: Outcome = "cancelled"
        try:
            while True:
                yield chunk
                last = chunk
                if chunk.last:
                    outcome = "finished"
                    return
                chunk = await (_next_watching(self._chunks, self._watch) if watch_disconnect else anext(self._chunks))
        except TaskError as error:
            outcome, failure = "failed", error
            raise
        finally:
            await self._end(outcome, last, failure)

    async def _end(self, outcome: Outcome, last: GenerationChunk | None, error: BaseException | None) -> None:
        await self.handle.aclose()
        if isinstance(error, TaskError):
            self.metrics.error(self.api, error_kind(error))
        self.metrics.generation_ended(self.api, self.model, self.handle.instance_id, outcome, last)
