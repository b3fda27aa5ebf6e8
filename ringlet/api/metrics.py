"""Prometheus metrics at GET /metrics: HTTP requests, generations (tokens, time to first token, tokens/s,
errors) per model and instance, and instance/task gauges read from the state at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ringlet.api.facade import NodeFacade
from ringlet.shared.state import RunnerStatus, State, TaskStatus
from ringlet.shared.tasks import GenerationChunk

Outcome = Literal["finished", "cancelled", "failed"]


class _StateCollector(Collector):
    """Gauges derived from the node's state when scraped, so they can never drift from it."""

    def __init__(self, node: NodeFacade) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        state = self.node.state
        instances = GaugeMetricFamily("ringlet_instances", "instances by status", labels=["status"])
        for status in RunnerStatus:
            count = sum(1 for r in state.instances.values() if r.status == status)
            instances.add_metric([status.value], count)
        yield instances
        tasks = GaugeMetricFamily("ringlet_tasks", "tasks in flight by instance and status",
                                  labels=["instance_id", "model", "status"])
        for instance_id, record in state.instances.items():
            for task_status in TaskStatus:
                count = sum(1 for t in self.node.tasks.values()
                            if t.instance_id == instance_id and t.status == task_status)
                tasks.add_metric([instance_id, record.instance.model, task_status.value], count)
        yield tasks
        nodes = GaugeMetricFamily("ringlet_nodes", "nodes in the cluster")
        nodes.add_metric([], len(state.nodes))
        yield nodes
        yield from self._batches(state)

    def _batches(self, state: State) -> Iterator[Metric]:
        """This node's runners: their batches, queues and KV caches."""
        labels = ["instance_id", "model"]
        queued = GaugeMetricFamily("ringlet_requests_queued", "requests waiting for a place in the batch", labels=labels)
        running = GaugeMetricFamily("ringlet_batch_running", "sequences in the batch", labels=labels)
        waiting = GaugeMetricFamily("ringlet_batch_waiting", "sequences in the runner waiting for KV cache room",
                                    labels=labels)
        step_tokens = GaugeMetricFamily("ringlet_batch_step_tokens", "tokens the last batched step computed",
                                        labels=labels)
        kv_used = GaugeMetricFamily("ringlet_kv_cache_blocks_used", "KV cache blocks in use", labels=labels)
        kv_total = GaugeMetricFamily("ringlet_kv_cache_blocks", "KV cache blocks", labels=labels)
        preemptions = CounterMetricFamily("ringlet_preemptions", "sequences put back to wait for KV cache room",
                                          labels=labels)
        for instance_id, load in self.node.instance_load().items():
            record = state.instances.get(instance_id)
            values = [instance_id, record.instance.model if record else ""]
            queued.add_metric(values, load.queued)
            if (batch := load.batch) is not None:
                running.add_metric(values, batch.running)
                waiting.add_metric(values, batch.waiting)
                step_tokens.add_metric(values, batch.step_tokens)
                kv_used.add_metric(values, batch.kv_blocks_used)
                kv_total.add_metric(values, batch.kv_blocks)
                preemptions.add_metric(values, batch.preemptions)
        yield from (queued, running, waiting, step_tokens, kv_used, kv_total, preemptions)


class ApiMetrics:
    def __init__(self, node: NodeFacade) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(node))
        r = self.registry
        self.http_requests = Counter("ringlet_http_requests", "HTTP requests", ["method", "route", "status"],
                                     registry=r)
        generation = ["api", "model", "instance_id"]
        self.generations = Counter("ringlet_generations", "generation requests by outcome",
                                   [*generation, "outcome"], registry=r)
        self.errors = Counter("ringlet_errors", "requests that ended in an error, by kind", ["api", "kind"],
                              registry=r)
        self.prompt_tokens = Counter("ringlet_prompt_tokens", "prompt tokens processed", generation, registry=r)
        self.completion_tokens = Counter("ringlet_completion_tokens", "tokens generated", generation, registry=r)
        self.time_to_first_token = Histogram(
            "ringlet_time_to_first_token_seconds", "time from the task reaching the engine to its first token",
            generation, registry=r, buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.decode_tokens_per_second = Histogram(
            "ringlet_decode_tokens_per_second", "decode speed of each generation", generation, registry=r,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))

    def generation_ended(self, api: str, model: str, instance_id: str, outcome: Outcome,
                         last: GenerationChunk | None) -> None:
        labels = (api, model, instance_id)
        self.generations.labels(*labels, outcome).inc()
        if last is None:
            return
        if last.usage is not None:
            self.prompt_tokens.labels(*labels).inc(last.usage.prompt_tokens)
            self.completion_tokens.labels(*labels).inc(last.usage.completion_tokens)
        if last.timings is not None:
            self.time_to_first_token.labels(*labels).observe(last.timings.time_to_first_token_s)
            if last.timings.decode_tokens_per_s > 0:
                self.decode_tokens_per_second.labels(*labels).observe(last.timings.decode_tokens_per_s)

    def error(self, api: str, kind: str) -> None:
        self.errors.labels(api, kind).inc()


class HttpMetrics:
    """Counts every response by route template (not raw path, which would make one series per id)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http_requests.labels(scope["method"], route, str(status)).inc()


router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                                                                   "description": "Prometheus text format"}})
def metrics(request: Request) -> Response:
    """Prometheus metrics of this node."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
