"""Prometheus metrics of one app instance (own registry: no process-global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
LOOP_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "selfadapt_requests",
            "Inference requests by outcome",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "selfadapt_request_latency_seconds",
            "Request latency (arrival to last token)",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "selfadapt_time_to_first_token_seconds",
            "Arrival to first generated token",
            ["model", "endpoint"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "selfadapt_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "selfadapt_completion_tokens", "Tokens generated", ["model"], registry=r
        )
        self.inflight = Gauge(
            "selfadapt_requests_in_flight", "Requests admitted and not finished", registry=r
        )
        self.engine_queue = Gauge(
            "selfadapt_engine_queue_depth", "Unfinished requests inside the engine", registry=r
        )
        self.loop_lag = Histogram(
            "selfadapt_event_loop_lag_seconds",
            "How much later than asked the gateway's event loop woke a 0.25 s timer",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "selfadapt_requests_rejected",
            "Requests refused because the queue was full",
            registry=r,
        )

    def bind_engine_queue(self, depth: Callable[[], int]) -> None:
        self.engine_queue.set_function(lambda: float(depth()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
