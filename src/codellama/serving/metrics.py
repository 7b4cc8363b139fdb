"""Prometheus metrics for the server (text format, no dependency): request counts by endpoint and status,
latency and time-to-first-token histograms, token counters and the engine's gauges."""

from __future__ import annotations

import threading
import time

from .scheduler import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/infill", "/health", "/metrics")


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, x: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if x <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += x

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, cum = [], 0
        sep = "," if labels else ""
        for b, c in zip(self.buckets, self.counts):
            cum += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b}"}} {cum}')
        cum += self.counts[-1]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {cum}')
        lb = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lb} {self.sum:.6f}", f"{name}_count{lb} {cum}"]
        return out


class Metrics:
    """Request counts by endpoint and status, token counters, latency and time-to-first-token histograms."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.ttft = Histogram()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.rejected_busy = 0

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            self.latency.setdefault(endpoint, Histogram()).observe(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def render(self, engine: Engine) -> str:
        s = engine.stats
        out = ["# HELP codellama_requests_total HTTP requests by endpoint and status.",
               "# TYPE codellama_requests_total counter"]
        with self.lock:
            for (ep, st), n in sorted(self.requests.items()):
                out.append(f'codellama_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            out += ["# HELP codellama_request_duration_seconds Time from request to the end of the response.",
                    "# TYPE codellama_request_duration_seconds histogram"]
            for ep, h in sorted(self.latency.items()):
                out += h.lines("codellama_request_duration_seconds", f'endpoint="{ep}"')
            out += ["# HELP codellama_time_to_first_token_seconds Time from request to its first generated token.",
                    "# TYPE codellama_time_to_first_token_seconds histogram"]
            out += self.ttft.lines("codellama_time_to_first_token_seconds")
            counters = [("prompt_tokens_total", "Prompt tokens of finished requests.", self.prompt_tokens),
                        ("completion_tokens_total", "Tokens generated for finished requests.", self.completion_tokens),
                        ("rejected_busy_total", "Requests answered 503 because the queue was full.",
                         self.rejected_busy)]
        counters += [("engine_steps_total", "Batched decode steps.", s.steps),
                     ("engine_prefills_total", "Prompts prefilled.", s.prefills),
                     ("engine_generated_tokens_total", "Tokens generated (all sequences).", s.generated_tokens),
                     ("engine_cancelled_total", "Sequences cancelled (client gone).", s.cancelled),
                     ("engine_errors_total", "Engine failures (a failed step, or one sequence's own).", s.errors),
                     ("engine_batch_rows_total", "Sum over decode steps of rows in the batch.", s.batch_rows_sum)]
        for name, help_, v in counters:
            out += [f"# HELP codellama_{name} {help_}", f"# TYPE codellama_{name} counter", f"codellama_{name} {v}"]
        for name, help_, v in [("queue_depth", "Sequences waiting for a batch row.", engine.queue_depth),
                               ("active_sequences", "Sequences in the running batch.", engine.active),
                               ("max_batch_size", "Rows of the running batch.", engine.max_batch_size)]:
            out += [f"# HELP codellama_{name} {help_}", f"# TYPE codellama_{name} gauge", f"codellama_{name} {v}"]
        return "\n".join(out) + "\n"


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
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
            self.metrics.request_done(endpoint, status[0], time.perf_counter() - start)
