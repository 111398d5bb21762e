"""Prometheus metrics of the server, in a registry of its own (several apps may live in one process).

Counters: requests by outcome (finish reason or HTTP error status), prompt and generated tokens.
Gauges: requests waiting for a row, requests running. Histograms: time to first token and end-to-end
latency (seconds, measured from the moment the engine accepted the request).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from moelab.infer.scheduler import Engine, Request

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("moelab_requests", "Finished completion requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("moelab_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("moelab_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("moelab_queue_depth", "Requests waiting for a batch row", registry=r)
        self.queue_depth.set_function(lambda: engine.num_waiting)
        self.running = Gauge("moelab_running_requests", "Requests in the running batch", registry=r)
        self.running.set_function(lambda: engine.num_running)
        self.ttft = Histogram(
            "moelab_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "moelab_request_latency_seconds", "End-to-end request latency", buckets=_LATENCY_BUCKETS, registry=r
        )

    def finished(self, req: Request) -> None:
        """Record a request the engine is done with (called from the engine thread)."""
        self.requests.labels(req.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(req.prompt_ids))
        self.generated_tokens.inc(len(req.output_ids))
        if req.first_token_at is not None:
            self.ttft.observe(req.first_token_at - req.submitted_at)
        if req.finished_at is not None:
            self.latency.observe(req.finished_at - req.submitted_at)

    def rejected(self, status: int) -> None:
        self.requests.labels(f"http_{status}").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
