"""This node's part in the cluster: membership, the master's event order, and tasks for instances started elsewhere.

Every node proposes its events to the master (the oldest live member, `master.election`); the master applies
each one and publishes it with its sequence number; every other node applies them in that order, so all hold the
same `State`. A newcomer (or a node that missed an event) copies the master's state, then follows the order. A
proposal the master had not ordered when it died is sent again to the next master. The master also turns
departures into events: a node that leaves is removed, and its instances are placed again on the survivors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING

from pydantic import TypeAdapter

from ringlet.master.election import Member, elect
from ringlet.master.placement import PlacementError
from ringlet.net import topics
from ringlet.net.membership import Membership
from ringlet.net.messages import (
    CANCEL,
    ORDERED,
    PROPOSAL,
    STREAM_ITEM,
    TASK_REQUEST,
    CancelTask,
    Ordered,
    Proposal,
    StreamChunk,
    StreamError,
    TaskRequest,
)
from ringlet.net.session import ControlPlane, NetOptions
from ringlet.node.errors import NodeError
from ringlet.shared.state import Event, InstanceDeleted, MasterChanged, NodeJoined, NodeLeft, State
from ringlet.shared.tasks import GenerationChunk, TextGenerationTask
from ringlet.worker.supervisor import TaskError

if TYPE_CHECKING:
    from ringlet.node.node import Node

log = logging.getLogger(__name__)

# how long a starting node listens for members before it decides who is master (scouting answers within ~1 s)
SETTLE_S = 1.5
STATE_ADAPTER = TypeAdapter(State)


class ClusterLink:
    def __init__(self, node: Node, options: NetOptions, settle_s: float = SETTLE_S) -> None:
        self._node = node
        self._options, self._settle_s = options, settle_s
        self.me = Member.starting_now(node.node_id)
        self.master: str | None = None
        self._pending: list[Event] = []  # proposed, not yet seen in the order
        self._buffered: list[Ordered] = []  # heard while copying the master's state
        self._early: list[Proposal] = []  # heard while settling: ordered if this node turns out to be master
        self._syncing = True
        self._resync: asyncio.Task[None] | None = None
        self._plane: ControlPlane | None = None
        self._membership: Membership | None = None
        self._served: dict[str, tuple[str, asyncio.Task[None]]] = {}  # tasks run here for others: id -> origin
        self._streams: dict[str, tuple[str, asyncio.Queue[StreamChunk | StreamError]]] = {}  # tasks sent elsewhere

    @property
    def is_master(self) -> bool:
        return self.master == self.me.node_id

    @property
    def members(self) -> list[Member]:
        return self._membership.members if self._membership else [self.me]

    @property
    def plane(self) -> ControlPlane:
        assert self._plane is not None, "the cluster link is not started"
        return self._plane

    async def start(self) -> None:
        """Join: listen for members for a moment, elect, and copy the master's state (unless this node is master).
        Then start the node, whose NodeJoined goes to the master like every later event."""
        self._plane = ControlPlane(self._options)
        self.plane.subscribe(topics.ORDERED, ORDERED, self._on_ordered)
        self.plane.subscribe(topics.PROPOSALS, PROPOSAL, self._on_proposal)
        self.plane.subscribe(topics.node_tasks(self.me.node_id), TASK_REQUEST, self._on_task_request)
        self.plane.serve(topics.state_of(self.me.node_id), lambda: self._node.state)
        self._membership = Membership(self.plane, self.me, self._members_changed)
        await asyncio.sleep(self._settle_s)
        self.master = elect(self.members)
        log.info("cluster: %d member(s), master %s%s", len(self.members), self.master,
                 " (this node)" if self.is_master else "")
        if self.is_master:
            self._syncing = False
            self._take_over()
            for proposal in self._early:
                self._order(proposal.event)
        else:
            await self._copy_state(self.master)
            self._resend_pending()  # anything emitted while settling
        self._early.clear()

    async def wait_joined(self, timeout_s: float = 10.0) -> None:
        """Wait until the master has ordered this node's NodeJoined (placement needs the node in the state)."""
        began = time.monotonic()
        resent = began
        while self.me.node_id not in self._node.state.nodes:
            now = time.monotonic()
            if now - began > timeout_s:
                raise TimeoutError(f"the master ({self.master}) did not add this node to the cluster state within "
                                   f"{timeout_s:.0f} s; check that the nodes reach each other (--connect, firewall)")
            if now - resent > 2.0:  # a master that was still settling may have missed the proposal
                resent = now
                self._resend_pending()
            await asyncio.sleep(0.05)

    def close(self) -> None:
        for _origin, task in self._served.values():
            task.cancel()
        if self._plane is not None:
            self._plane.close()

    # --- the event order

    def emit(self, event: Event) -> None:
        """Called by `Node.emit`, on the event loop's thread."""
        if self.is_master:
            self._order(event)
            return
        self._pending.append(event)
        if self.master is not None:
            self.plane.publish(topics.PROPOSALS, Proposal(origin=self.me.node_id, master=self.master, event=event))

    def _order(self, event: Event) -> None:
        self._node.apply_ordered(event)
        self.plane.publish(topics.ORDERED, Ordered(master=self.me.node_id, seq=self._node.state.last_event,
                                                   event=event))

    def _on_proposal(self, _key: str, proposal: Proposal) -> None:
        if self.master is None:
            self._early.append(proposal)  # a node that started beside this one thinks this one is master
        elif self.is_master:
            self._order(proposal.event)
        elif proposal.master == self.me.node_id:
            log.warning("a proposal from %s reached this node, which is not master (master: %s); dropped, the "
                        "sender will send it again to the master", proposal.origin, self.master)

    def _on_ordered(self, _key: str, ordered: Ordered) -> None:
        if ordered.master == self.me.node_id:
            return  # our own, applied when ordered
        if self._syncing:
            self._buffered.append(ordered)
            return
        self._follow(ordered)

    def _follow(self, ordered: Ordered) -> None:
        expected = self._node.state.last_event + 1
        if ordered.seq < expected:
            return
        if ordered.seq > expected:
            log.warning("missed events %d..%d from master %s; copying its state", expected, ordered.seq - 1,
                        ordered.master)
            self._start_copy(ordered.master)
            return
        if ordered.event in self._pending:
            self._pending.remove(ordered.event)
        self._node.apply_ordered(ordered.event)

    def _start_copy(self, master: str) -> None:
        if self._resync is None or self._resync.done():
            self._syncing = True
            self._resync = asyncio.create_task(self._copy_state(master), name="copy-state")

    async def _copy_state(self, master: str | None) -> None:
        self._syncing = True
        try:
            for attempt in range(20):
                if master is None or master not in self._membership_ids():
                    break
                states = await self.plane.ask(topics.state_of(master), STATE_ADAPTER)
                if states:
                    self._node.replace_state(states[0])
                    log.info("copied state from master %s (%d events)", master, states[0].last_event)
                    break
                await asyncio.sleep(0.1 * (attempt + 1))
            else:
                log.error("master %s did not answer for its state; following its order from here", master)
        finally:
            self._syncing = False
            buffered, self._buffered = self._buffered, []
            for ordered in sorted(buffered, key=lambda o: o.seq):
                self._follow(ordered)

    def _membership_ids(self) -> set[str]:
        return {m.node_id for m in self.members}

    # --- membership

    def _members_changed(self, joined: set[str], left: set[str]) -> None:
        previous = self.master
        if previous is None:
            return  # still settling; start() elects
        self.master = elect(self.members)
        if self.master != previous:
            log.info("master is now %s%s (was %s)", self.master, " (this node)" if self.is_master else "", previous)
            if self.is_master:
                self._syncing = False
                self._take_over()
            elif previous in self._membership_ids():
                # the old master lives: this side merged into an older cluster, whose state is not ours
                self._pending.clear()
                self._start_copy(self.master)
                self.emit(NodeJoined(node=self._node.info))
            else:
                self._resend_pending()
        if self.is_master:
            for node_id in left:
                self._node_left(node_id)
        for node_id in left:
            self._fail_streams_from(node_id)
            for origin, task in list(self._served.values()):
                if origin == node_id:
                    task.cancel()  # nobody is left to read the answer

    def _resend_pending(self) -> None:
        pending, self._pending = self._pending, []
        for event in pending:
            self.emit(event)

    def _take_over(self) -> None:
        """This node just became master: first order what it had proposed, then clear out departed nodes."""
        pending, self._pending = self._pending, []
        for event in pending:
            self._order(event)
        live = self._membership_ids()
        self._order(MasterChanged(node_id=self.me.node_id))
        for node_id in [n for n in self._node.state.nodes if n not in live]:
            self._node_left(node_id)

    def _node_left(self, node_id: str) -> None:
        affected = [r for r in self._node.state.instances.values() if node_id in r.runners]
        if node_id in self._node.state.nodes:
            self._order(NodeLeft(node_id=node_id))
        for record in affected:
            instance = record.instance
            self._order(InstanceDeleted(instance_id=instance.instance_id))
            try:
                placed = self._node.create_instance(instance.model, instance.instance_type)
            except (PlacementError, NodeError) as refusal:
                log.warning("instance %s lost node %s and cannot be placed again: %s", instance.instance_id,
                            node_id, refusal)
            else:
                log.info("instance %s lost node %s; placed again as %s", instance.instance_id, node_id,
                         placed.instance.instance_id)

    # --- tasks for instances whose first stage is elsewhere

    async def forward(self, node_id: str, instance_id: str, task: TextGenerationTask) -> AsyncIterator[GenerationChunk]:
        """Send the task to `node_id` (its instance's first stage) and stream the chunks; raises TaskError."""
        queue: asyncio.Queue[StreamChunk | StreamError] = asyncio.Queue()
        self._streams[task.task_id] = (node_id, queue)
        subscriber = self.plane.subscribe(topics.task_stream(task.task_id), STREAM_ITEM,
                                          lambda _key, item: queue.put_nowait(item))
        finished = False
        try:
            self.plane.publish_once(topics.node_tasks(node_id),
                                    TaskRequest(origin=self.me.node_id, instance_id=instance_id, task=task))
            while True:
                item = await queue.get()
                if isinstance(item, StreamError):
                    finished = True
                    raise TaskError(item.kind, item.error)  # type: ignore[arg-type]
                yield item.chunk
                if item.chunk.finish_reason is not None:
                    finished = True
                    return
        finally:
            self._streams.pop(task.task_id, None)
            self.plane.unsubscribe(subscriber)
            if not finished:
                self.plane.publish_once(topics.task_cancel(task.task_id), CancelTask(task_id=task.task_id))

    def _fail_streams_from(self, node_id: str) -> None:
        for task_id, (source, queue) in list(self._streams.items()):
            if source == node_id:
                queue.put_nowait(StreamError(kind="runner_failed",
                                             error=f"node {node_id}, which ran task {task_id}, left the cluster"))

    def _on_task_request(self, _key: str, request: TaskRequest) -> None:
        task_id = request.task.task_id
        self._served[task_id] = (request.origin, asyncio.create_task(self._serve_task(request),
                                                                     name=f"remote-{task_id}"))

    async def _serve_task(self, request: TaskRequest) -> None:
        task = request.task
        stream_key = topics.task_stream(task.task_id)
        me = asyncio.current_task()
        assert me is not None
        cancel = self.plane.subscribe(topics.task_cancel(task.task_id), CANCEL, lambda _key, _m: me.cancel())
        try:
            async with aclosing(self._node.run_local(request.instance_id, task)) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    self.plane.publish_once(stream_key, StreamChunk(chunk=chunk))
        except TaskError as error:
            self.plane.publish_once(stream_key, StreamError(kind=error.kind, error=str(error)))
        except NodeError as error:
            self.plane.publish_once(stream_key, StreamError(kind="instance_deleted", error=str(error)))
        except asyncio.CancelledError:
            log.info("task %s cancelled by %s", task.task_id, request.origin)
        finally:
            self.plane.unsubscribe(cancel)
            self._served.pop(task.task_id, None)

