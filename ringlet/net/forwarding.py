"""Tasks between nodes: a request that reached one node's API runs on the node that holds its instance's first
stage, and the chunks stream back over the control plane (`topics.task_stream`). Either side going away ends the
task: a stream whose serving node leaves fails, and a task whose requesting node leaves is cancelled.

The serving node sends `TaskAlive` whenever no chunk went for `keepalive_s` (the task waits in a queue, or fills
a long prompt), so a stream that hears nothing for `idle_s` lost its node or link before the membership noticed:
it fails and the task is cancelled there."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from ringlet.net import topics
from ringlet.net.session import ControlPlane
from ringlet.shared.errors import NodeError, TaskError
from ringlet.shared.messages import (
    CANCEL_TASK,
    STREAM_ITEM,
    TASK_REQUEST,
    CancelTask,
    Chunk,
    TaskAlive,
    TaskFailed,
    TaskRequest,
)
from ringlet.shared.tasks import GenerationChunk, Task

log = logging.getLogger(__name__)

# runs a task on this node's runner of an instance (its first stage); raises NodeError or TaskError
RunLocal = Callable[[str, Task], AsyncIterator[GenerationChunk]]


class TaskForwarding:
    def __init__(self, plane: ControlPlane, node_id: str, run_local: RunLocal, idle_s: float = 30.0,
                 keepalive_s: float = 5.0) -> None:
        self._plane, self._node_id, self._run_local = plane, node_id, run_local
        self._idle_s, self._keepalive_s = idle_s, keepalive_s
        self._served: dict[str, tuple[str, asyncio.Task[None]]] = {}  # tasks run here for others: id -> origin
        self._streams: dict[str, tuple[str, asyncio.Queue[Chunk | TaskFailed | TaskAlive]]] = {}  # sent elsewhere
        plane.subscribe(topics.node_tasks(node_id), TASK_REQUEST, self._on_task_request)

    async def forward(self, node_id: str, instance_id: str, task: Task) -> AsyncIterator[GenerationChunk]:
        """Send the task to `node_id` (its instance's first stage) and stream the chunks; raises TaskError. Closing
        the stream early cancels the task there."""
        queue: asyncio.Queue[Chunk | TaskFailed | TaskAlive] = asyncio.Queue()
        self._streams[task.task_id] = (node_id, queue)
        subscriber = self._plane.subscribe(topics.task_stream(task.task_id), STREAM_ITEM,
                                           lambda _key, item: queue.put_nowait(item))
        finished = False
        try:
            self._plane.publish_once(topics.node_tasks(node_id),
                                     TaskRequest(origin=self._node_id, instance_id=instance_id, task=task))
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), self._idle_s)
                except TimeoutError:
                    raise TaskError("runner_failed", f"node {node_id} sent nothing about task {task.task_id} for "
                                                     f"{self._idle_s:.0f} s (it or the link to it is gone); the "
                                                     "request was cancelled, retry it") from None
                if isinstance(item, TaskAlive):
                    continue
                if isinstance(item, TaskFailed):
                    finished = True
                    raise TaskError(item.kind, item.error)
                yield item.chunk
                if item.chunk.last:
                    finished = True
                    return
        finally:
            self._streams.pop(task.task_id, None)
            self._plane.unsubscribe(subscriber)
            if not finished:
                self._plane.publish_once(topics.task_cancel(task.task_id), CancelTask(task_id=task.task_id))

    def member_left(self, node_id: str) -> None:
        """Fail the streams `node_id` was serving; cancel the tasks run here for it (nobody reads their answer)."""
        for task_id, (source, queue) in list(self._streams.items()):
            if source == node_id:
                queue.put_nowait(TaskFailed(task_id=task_id, kind="runner_failed",
                                            error=f"node {node_id}, which ran task {task_id}, left the cluster"))
        for origin, served in list(self._served.values()):
            if origin == node_id:
                served.cancel()

    def close(self) -> None:
        for _origin, served in self._served.values():
            served.cancel()

    def _on_task_request(self, _key: str, request: TaskRequest) -> None:
        task_id = request.task.task_id
        self._served[task_id] = (request.origin, asyncio.create_task(self._serve_task(request),
                                                                     name=f"remote-{task_id}"))

    async def _serve_task(self, request: TaskRequest) -> None:
        task = request.task
        stream_key = topics.task_stream(task.task_id)
        me = asyncio.current_task()
        assert me is not None
        cancel = self._plane.subscribe(topics.task_cancel(task.task_id), CANCEL_TASK, lambda _key, _m: me.cancel())
        sent_at = asyncio.get_running_loop().time()

        async def keep_alive() -> None:
            while True:
                await asyncio.sleep(self._keepalive_s)
                if asyncio.get_running_loop().time() - sent_at >= self._keepalive_s:
                    self._plane.publish_once(stream_key, TaskAlive(task_id=task.task_id))

        alive = asyncio.create_task(keep_alive(), name=f"alive-{task.task_id}")
        try:
            async with aclosing(self._run_local(request.instance_id, task)) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    self._plane.publish_once(stream_key, Chunk(chunk=chunk))
                    sent_at = asyncio.get_running_loop().time()
        except TaskError as error:
            self._plane.publish_once(stream_key, TaskFailed(task_id=task.task_id, kind=error.kind, error=str(error)))
        except NodeError as error:
            self._plane.publish_once(stream_key, TaskFailed(task_id=task.task_id, kind="instance_deleted",
                                                            error=str(error)))
        except asyncio.CancelledError:
            log.info("task %s cancelled by %s", task.task_id, request.origin)
        finally:
            alive.cancel()
            self._plane.unsubscribe(cancel)
            self._served.pop(task.task_id, None)
