"""Prometheus metrics for the server through ``prometheus_client``, in a registry of the app's own (two apps in
one process, as in the tests, do not share counters): request counts by endpoint and status, latency and
time-to-first-token histograms, token counters, and the engine's counters and gauges (read at scrape time)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .scheduler import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Paths counted under their own name; anything else is "other" (so that random paths cannot grow the labels).
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/completions", "/chat/completions",
             "/models", "/completion", "/infill", "/tokenize", "/detokenize", "/props", "/slots", "/health",
             "/v1/health", "/metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector:
    """The engine's own statistics, read when scraped (the engine thread keeps them; nothing is copied)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        s, e = self.engine.stats, self.engine
        for name, help_, v in [("engine_steps", "Batched decode steps.", s.steps),
                               ("engine_prefills", "Prompts prefilled.", s.prefills),
                               ("engine_generated_tokens", "Tokens generated (all sequences).", s.generated_tokens),
                               ("engine_prompt_tokens", "Prompt tokens evaluated (cached ones excluded).",
                                s.prompt_tokens),
                               ("engine_prompt_tokens_cached", "Prompt tokens reused from a slot's cache.",
                                s.prompt_tokens_cached),
                               ("engine_cancelled", "Sequences cancelled (client gone).", s.cancelled),
                               ("engine_errors", "Engine failures (a failed step, or one sequence's own).", s.errors),
                               ("engine_batch_rows", "Sum over decode steps of rows in the batch.", s.batch_rows_sum),
                               ("speculative_proposed", "Tokens a draft model proposed (serve --draft).",
                                s.speculative_proposed),
                               ("speculative_accepted", "Proposed tokens the target kept.", s.speculative_accepted),
                               ("speculative_rounds", "Target verify forwards.", s.speculative_rounds)]:
            yield CounterMetricFamily(f"codellama_{name}", help_, value=v)
        rate = s.speculative_accepted / s.speculative_proposed if s.speculative_proposed else 0.0
        for name, help_, v in [("speculative_acceptance_rate", "Accepted / proposed draft tokens so far.", rate),
                               ("queue_depth", "Sequences waiting for a batch row.", e.queue_depth),
                               ("active_sequences", "Sequences in the running batch.", e.active),
                               ("max_batch_size", "Rows of the running batch.", e.max_batch_size)]:
            yield GaugeMetricFamily(f"codellama_{name}", help_, value=v)


class Metrics:
    """The server's metrics in a registry of its own."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("codellama_requests", "HTTP requests by endpoint and status.",
                                 ["endpoint", "status"], registry=self.registry)
        self._latency = Histogram("codellama_request_duration_seconds",
                                  "Time from request to the end of the response.", ["endpoint"],
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self._ttft = Histogram("codellama_time_to_first_token_seconds",
                               "Time from request to its first generated token.", buckets=LATENCY_BUCKETS,
                               registry=self.registry)
        self._prompt = Counter("codellama_prompt_tokens", "Prompt tokens of finished requests.",
                               registry=self.registry)
        self._completion = Counter("codellama_completion_tokens", "Tokens generated for finished requests.",
                                   registry=self.registry)
        self._busy = Counter("codellama_rejected_busy", "Requests answered 503 because the queue was full.",
                             registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        self._requests.labels(endpoint, str(status)).inc()
        self._latency.labels(endpoint).observe(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        self._prompt.inc(prompt)
        self._completion.inc(completion)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def rejected_busy(self) -> None:
        self._busy.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    return "/v1/models" if path.startswith(("/v1/models/", "/models/")) else "other"


class MetricsMiddleware:
    """Pure ASGI (streaming responses pass through untouched): counts every response by endpoint and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request_done(endpoint_label(scope.get("path", "")), status[0], time.perf_counter() - start)
