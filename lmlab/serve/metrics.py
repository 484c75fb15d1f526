"""``GET /metrics``: the server's Prometheus metrics, in a registry of its own (two servers in one process,
as the tests start them, never share counters)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no *_created series: they double /metrics and no dashboard reads them

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """Requests by endpoint and status, queue depth, running batch size, time to first token, time per
    output token, and tokens in and out."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lmlab_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.queue_depth = Gauge("lmlab_queue_depth", "requests waiting for a row of the batch", registry=r)
        self.running = Gauge("lmlab_running_batch_size", "sequences decoding in the running batch", registry=r)
        self.ttft = Histogram(
            "lmlab_time_to_first_token_seconds",
            "from a request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "lmlab_time_per_output_token_seconds",
            "between a sequence's consecutive tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("lmlab_prompt_tokens", "prompt tokens read", registry=r)
        self.generation_tokens = Counter("lmlab_generation_tokens", "tokens generated", registry=r)

    def engine_step(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.queue_depth.set(waiting)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
