"""The HTTP API: OpenAI ``/v1/completions`` (``suffix`` = infilling), ``/v1/chat/completions`` and
``/v1/models``; llama.cpp's ``/infill`` for editor plugins; ``/health`` and Prometheus ``/metrics``.

Every request becomes one or more engine ``Sequence``s (see ``scheduler.py``); the handler waits on an
asyncio queue that the engine thread feeds. Bodies are parsed and checked here, by hand, so that every
bad input gets the status and error object the OpenAI API would give (``{"error": {"message", "type",
"param", "code"}}``), never a 500 with a traceback."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

try:
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - depends on the environment
    from ..errors import CodeLlamaError
    raise CodeLlamaError("serving needs fastapi and uvicorn: pip install 'codellama[serve]'") from e

from ..errors import CodeLlamaError
from .scheduler import Engine, EngineStopped, Event, QueueFull, build_job, make_sequences, token_text, \
    truncated_infill_job
from ..generation import _context, _Job

log = logging.getLogger("codellama.serve")
# How often a non-streaming request checks that its client is still there (a streaming one notices at once).
DISCONNECT_POLL_S = 0.25


@dataclass
class ServerConfig:
    """Limits and identity of the server (the engine has its own: batch size, queue, context)."""

    model_name: str = "codellama"
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    max_tokens_cap: int | None = None  # None: the engine's context
    max_n: int = 16
    retry_after_s: int = 1


# ==== errors ==========================================================================================
class APIError(Exception):
    """An error the client caused (or a busy server): becomes an OpenAI-style error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


_STATUS_TYPES = {401: ("authentication_error", "invalid_api_key"), 404: ("invalid_request_error", "not_found"),
                 405: ("invalid_request_error", "method_not_allowed"), 413: ("invalid_request_error", "body_too_large"),
                 503: ("server_error", "overloaded")}


# ==== metrics (Prometheus text format, no dependency) ==================================================
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
                     ("engine_errors_total", "Engine steps that failed.", s.errors),
                     ("engine_batch_rows_total", "Sum over decode steps of rows in the batch.", s.batch_rows_sum)]
        for name, help_, v in counters:
            out += [f"# HELP codellama_{name} {help_}", f"# TYPE codellama_{name} counter", f"codellama_{name} {v}"]
        for name, help_, v in [("queue_depth", "Sequences waiting for a batch row.", engine.queue_depth),
                               ("active_sequences", "Sequences in the running batch.", engine.active),
                               ("max_batch_size", "Rows of the running batch.", engine.max_batch_size)]:
            out += [f"# HELP codellama_{name} {help_}", f"# TYPE codellama_{name} gauge", f"codellama_{name} {v}"]
        return "\n".join(out) + "\n"


class _MetricsMiddleware:
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


# ==== request parsing ===================================================================================
async def read_json(request: Request, limit: int) -> dict:
    """The JSON object in the body; 413 beyond ``limit`` bytes (checked before and while reading), 400 if
    it is not a JSON object."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body is {int(length)} bytes; the limit is {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise _bad(name, f"{name} must be an integer, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(name, f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
    return v


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise _bad(name, f"{name} must be a number, got {v!r}")
    if v > hi or v < lo or (lo_open and v == lo):
        raise _bad(name, f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"{name} must be true or false, got {v!r}")
    return v


def _str(body: dict, name: str, default: str | None) -> str | None:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise _bad(name, f"{name} must be a string, got {type(v).__name__}")
    return v


def _stop(body: dict, name: str = "stop") -> list[str]:
    v = body.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and len(v) <= 16 and all(isinstance(s, str) for s in v):
        return v
    raise _bad(name, f"{name} must be a string or a list of at most 16 strings")


def _unsupported(body: dict) -> None:
    # Accepted when they ask for nothing (clients send defaults), refused otherwise rather than ignored.
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    if body.get("logit_bias") not in (None, {}):
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias",
                       code="unsupported_parameter")
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "tools / function calling is not supported by this server", param="tools",
                       code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt not in (None, {}) and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise APIError(400, "only response_format type 'text' is supported", param="response_format",
                       code="unsupported_parameter")


@dataclass
class _Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    n: int


# ==== the app ===========================================================================================
def create_app(llama, *, engine: Engine | None = None, config: ServerConfig | None = None,
               **engine_kwargs: Any) -> FastAPI:
    """The FastAPI app serving ``llama``. The engine (created from ``engine_kwargs`` unless given) starts
    with the app's lifespan and stops with it."""
    config = config or ServerConfig(model_name=llama.name or "codellama")
    engine = engine or Engine(llama, **engine_kwargs)
    metrics = Metrics()
    cap = min(config.max_tokens_cap or engine.context, engine.context)
    tok = llama.tokenizer

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="codellama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        type_, code = _STATUS_TYPES.get(exc.status_code, ("invalid_request_error", None))
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                          str(exc.detail))
        return _error_response(APIError(exc.status_code, message, type=type_, code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return _error_response(APIError(400, f"invalid request: {exc.errors()[:1]}"))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        log.exception("internal error on %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error",
                                        code="internal_error"))

    async def auth(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        # Constant time, on bytes (compare_digest refuses non-ASCII str).
        if not hmac.compare_digest(given.encode("utf-8"), config.api_key.encode("utf-8")):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    api = APIRouter(dependencies=[Depends(auth)])

    # ---- helpers shared by the endpoints ---------------------------------------------------------------
    def sampling(body: dict, *, max_tokens_default: int | None, temperature_default: float = 1.0,
                 top_p_default: float = 1.0, top_k_default: int = 0, max_tokens_name: str = "max_tokens") -> _Sampling:
        _unsupported(body)
        max_tokens = _int(body, max_tokens_name, max_tokens_default, lo=0)
        if max_tokens is None:
            max_tokens = cap
        if max_tokens > cap:
            raise APIError(400, f"{max_tokens_name} is too large: {max_tokens}; this server generates at most "
                           f"{cap} tokens per request", param=max_tokens_name, code="max_tokens_exceeded")
        n = _int(body, "n", 1, lo=1, hi=config.max_n)
        best_of = _int(body, "best_of", None, lo=1)
        if best_of is not None and best_of != n:
            raise APIError(400, "best_of other than n is not supported", param="best_of",
                           code="unsupported_parameter")
        seed = body.get("seed")
        if seed is not None and (not _is_int(seed) or seed < 0):
            if _is_int(seed) and seed == -1:  # llama.cpp's "random"
                seed = None
            else:
                raise _bad("seed", f"seed must be a non-negative integer, got {seed!r}")
        return _Sampling(max_tokens=max_tokens, temperature=_number(body, "temperature", temperature_default, 0.0, 2.0),
                         top_p=_number(body, "top_p", top_p_default, 0.0, 1.0, lo_open=True),
                         top_k=max(0, _int(body, "top_k", top_k_default, lo=-1)),  # -1: off (vLLM), as 0
                         seed=seed, stop=_stop(body), n=n)

    def check_context(job: _Job, param: str) -> None:
        if len(job.prompt) >= engine.context:
            raise APIError(400, f"This model's maximum context length is {engine.context} tokens, however your "
                           f"prompt is {len(job.prompt)} tokens. Please reduce the length of the prompt.",
                           param=param, code="context_length_exceeded")

    def submit(jobs: list[_Job], s: _Sampling, *, logprobs: int | None = None, echo: bool = False,
               ) -> tuple[list, asyncio.Queue]:
        """Queue n sequences per job; returns them and the asyncio queue their events arrive on."""
        total = len(jobs) * s.n
        if total > engine.max_batch_size + engine.max_queue:
            raise APIError(400, f"the request asks for {total} sequences; this server holds at most "
                           f"{engine.max_batch_size + engine.max_queue}", param="n")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink_for(base: int) -> Callable[[int, Event], None]:
            return lambda i, e: loop.call_soon_threadsafe(events.put_nowait, (base + i, e))
        seqs = []
        try:
            for j, job in enumerate(jobs):
                seqs += make_sequences(llama, job, n=s.n, max_tokens=s.max_tokens, temperature=s.temperature,
                                       top_p=s.top_p, top_k=s.top_k, seed=s.seed, stop=s.stop, logprobs=logprobs,
                                       echo=echo, sink=sink_for(j * s.n))
            engine.submit(seqs)
        except QueueFull as e:
            metrics.rejected_busy += 1
            raise APIError(503, f"{e}; retry after {config.retry_after_s} s", type="server_error", code="overloaded",
                           headers={"Retry-After": str(config.retry_after_s)}) from None
        except EngineStopped as e:
            raise APIError(503, str(e), type="server_error", code="unavailable",
                           headers={"Retry-After": str(config.retry_after_s)}) from None
        except CodeLlamaError as e:
            raise APIError(400, str(e)) from None
        return seqs, events

    async def events_of(request: Request, seqs: list, events: asyncio.Queue, started: float,
                        watch_disconnect: bool) -> AsyncIterator[tuple[int, Event]]:
        """Events until every sequence is done; cancels the rest if the consumer stops (client gone)."""
        left, first = len(seqs), True
        next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            while left:
                if watch_disconnect:
                    # Nothing is sent before the answer, so a gone client is only seen by asking the server.
                    if time.monotonic() >= next_check:
                        if await request.is_disconnected():
                            return
                        next_check = time.monotonic() + DISCONNECT_POLL_S
                    try:
                        i, event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
                    except asyncio.TimeoutError:
                        continue
                else:
                    i, event = await events.get()
                if first and event.tokens:
                    first = False
                    metrics.first_token(time.perf_counter() - started)
                if event.done:
                    left -= 1
                    if event.completion is not None:
                        c = event.completion
                        generated = len(c.tokens) - (c.prompt_tokens if seqs[i].echo else 0)
                        metrics.tokens(c.prompt_tokens, generated)
                yield i, event
        finally:
            for seq in seqs:
                seq.cancel()  # no-op for finished ones; frees the row of the others at the next step

    async def collect(request: Request, seqs, events, started) -> list[Event]:
        """The final event of each sequence (text, tokens, logprobs gathered), for non-streaming answers."""
        finals: list[Event | None] = [None] * len(seqs)
        async for i, event in events_of(request, seqs, events, started, watch_disconnect=True):
            if event.done:
                finals[i] = event
        if any(f is None for f in finals):
            raise APIError(499, "client closed the request")
        for f in finals:
            if f.error:
                raise APIError(500, f.error, type="server_error", code="generation_failed")
        return finals

    def usage(seqs, finals: list[Event], n: int) -> dict:
        # The prompt is counted once per prompt, not once per choice (as OpenAI does).
        prompt = sum(len(seqs[i].job.prompt) for i in range(0, len(seqs), n))
        completion = sum(len(seqs[i].request.tokens) for i in range(len(seqs)))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def stream_response(gen: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- completion logprobs (OpenAI legacy format) ------------------------------------------------------
    def completion_logprobs(seq, tokens: list[int], lps: list[float], tops: list[list[tuple[int, float]]],
                            offset: int, first_is_prompt_start: bool = False) -> dict:
        texts = [token_text(tok, t) for t in tokens]
        offsets, pos = [], offset
        for t, text in zip(tokens, texts):
            offsets.append(pos)
            pos += 0 if tok.sp.is_control(t) else len(text)  # bos is in no text
        top = [{token_text(tok, i): lp for i, lp in alts} for alts in tops]
        token_lps: list[float | None] = list(lps)
        if first_is_prompt_start and token_lps:
            token_lps[0], top[0] = None, None  # the first prompt token is given, not predicted
        return {"tokens": texts, "token_logprobs": token_lps, "top_logprobs": top, "text_offset": offsets}

    def final_completion_logprobs(seq) -> dict | None:
        if seq.top_logprobs is None:
            return None
        r = seq.request
        if seq.echo:
            tokens = seq.job.prompt + r.tokens
            lps = r.prompt_token_logprobs + r.token_logprobs
            tops = seq.prompt_top + seq.generated_top
            return completion_logprobs(seq, tokens, lps, tops, 0, first_is_prompt_start=True)
        return completion_logprobs(seq, r.tokens, r.token_logprobs, seq.generated_top, 0)

    # ---- POST /v1/completions ------------------------------------------------------------------------
    @api.post("/v1/completions")
    async def completions(request: Request):
        started = time.perf_counter()
        body = await read_json(request, config.max_body_bytes)
        s = sampling(body, max_tokens_default=16)
        echo, stream = _bool(body, "echo"), _bool(body, "stream")
        logprobs = _int(body, "logprobs", None, lo=0, hi=20)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        suffix = _str(body, "suffix", None)
        prompts = _completion_prompts(body.get("prompt"))
        jobs = []
        for p in prompts:
            try:
                if isinstance(p, str):
                    jobs.append(build_job(llama, "infill" if suffix is not None else "complete", prompt=p,
                                          suffix=suffix or "", echo=echo))
                else:
                    if suffix is not None:
                        raise APIError(400, "suffix needs a text prompt, not token ids", param="suffix")
                    if min(p) < 0 or max(p) >= llama.config.vocab_size:
                        raise _bad("prompt", f"prompt token ids must be in [0, {llama.config.vocab_size})")
                    jobs.append(_Job(prompt=list(p), decode=tok.decode, context=_context(list(p)),
                                     echo_text=tok.decode(list(p))))
            except CodeLlamaError as e:
                raise APIError(400, str(e), param="suffix" if suffix is not None else "prompt") from None
            check_context(jobs[-1], "prompt")
        seqs, events = submit(jobs, s, logprobs=logprobs, echo=echo)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": config.model_name,
                    "choices": choices, **extra}

        if not stream:
            finals = await collect(request, seqs, events, started)
            choices = [{"text": f.completion.text, "index": i, "logprobs": final_completion_logprobs(seqs[i]),
                        "finish_reason": f.completion.finish_reason} for i, f in enumerate(finals)]
            return JSONResponse(chunk(choices, usage=usage(seqs, finals, s.n)))

        async def gen() -> AsyncIterator[str]:
            text_len = [0] * len(seqs)
            echoed = [not echo] * len(seqs)
            finals: list[Event | None] = [None] * len(seqs)
            async for i, e in events_of(request, seqs, events, started, watch_disconnect=False):
                if not echoed[i]:
                    # The prompt goes first, once the prefill has scored it (its first event comes after).
                    echoed[i], seq = True, seqs[i]
                    lp = None
                    if logprobs is not None:
                        lp = completion_logprobs(seq, seq.job.prompt, seq.request.prompt_token_logprobs,
                                                 seq.prompt_top, 0, first_is_prompt_start=True)
                    text_len[i] = len(seq.job.echo_text)
                    yield sse(chunk([{"text": seq.job.echo_text, "index": i, "logprobs": lp, "finish_reason": None}]))
                if e.error:
                    yield sse(APIError(500, e.error, type="server_error", code="generation_failed").body())
                    continue
                lp = None
                if logprobs is not None and e.tokens:
                    lp = completion_logprobs(seqs[i], e.tokens, e.logprobs, e.top, text_len[i])
                text = e.text + (seqs[i].job.echo_suffix if e.done and echo else "")
                text_len[i] += len(text)
                if e.done:
                    finals[i] = e
                if text or lp or e.done:
                    yield sse(chunk([{"text": text, "index": i, "logprobs": lp,
                                      "finish_reason": e.completion.finish_reason if e.done else None}]))
            if include_usage and all(f is not None and f.completion for f in finals):
                yield sse(chunk([], usage=usage(seqs, finals, s.n)))
            yield "data: [DONE]\n\n"
        return stream_response(gen())

    # ---- POST /v1/chat/completions -------------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        body = await read_json(request, config.max_body_bytes)
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        s = sampling(body, max_tokens_default=None, max_tokens_name=name)
        stream = _bool(body, "stream")
        want_lp = _bool(body, "logprobs")
        top_n = _int(body, "top_logprobs", None, lo=0, hi=20)
        if top_n is not None and not want_lp:
            raise _bad("top_logprobs", "top_logprobs needs logprobs: true")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        messages = _chat_messages(body.get("messages"))
        try:
            job = build_job(llama, "chat", messages=messages)
        except CodeLlamaError as e:
            raise APIError(400, str(e), param="messages") from None
        check_context(job, "messages")
        seqs, events = submit([job], s, logprobs=(top_n or 0) if want_lp else None)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": cid, "object": "chat.completion.chunk" if stream else "chat.completion",
                    "created": created, "model": config.model_name, "choices": choices, **extra}

        def chat_logprobs(tokens, lps, tops) -> dict:
            def entry(t: int, lp: float) -> dict:
                text = token_text(tok, t)
                return {"token": text, "logprob": lp, "bytes": list(_token_bytes(tok, t))}
            return {"content": [entry(t, lp) | {"top_logprobs": [entry(i, v) for i, v in alts]}
                                for t, lp, alts in zip(tokens, lps, tops)]}

        if not stream:
            finals = await collect(request, seqs, events, started)
            choices = []
            for i, f in enumerate(finals):
                r = seqs[i].request
                lp = chat_logprobs(r.tokens, r.token_logprobs, seqs[i].generated_top) if want_lp else None
                choices.append({"index": i, "message": {"role": "assistant", "content": f.completion.text},
                                "logprobs": lp, "finish_reason": f.completion.finish_reason})
            return JSONResponse(chunk(choices, usage=usage(seqs, finals, s.n)))

        async def gen() -> AsyncIterator[str]:
            for i in range(len(seqs)):
                yield sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]))
            finals: list[Event | None] = [None] * len(seqs)
            async for i, e in events_of(request, seqs, events, started, watch_disconnect=False):
                if e.error:
                    yield sse(APIError(500, e.error, type="server_error", code="generation_failed").body())
                    continue
                lp = chat_logprobs(e.tokens, e.logprobs, e.top) if want_lp and e.tokens else None
                if e.text or lp:
                    yield sse(chunk([{"index": i, "delta": {"content": e.text}, "logprobs": lp,
                                      "finish_reason": None}]))
                if e.done:
                    finals[i] = e
                    yield sse(chunk([{"index": i, "delta": {}, "logprobs": None,
                                      "finish_reason": e.completion.finish_reason}]))
            if include_usage and all(f is not None and f.completion for f in finals):
                yield sse(chunk([], usage=usage(seqs, finals, s.n)))
            yield "data: [DONE]\n\n"
        return stream_response(gen())

    # ---- POST /infill (llama.cpp) --------------------------------------------------------------------
    @api.post("/infill")
    async def infill(request: Request):
        started = time.perf_counter()
        body = await read_json(request, config.max_body_bytes)
        if not tok.supports_infilling:
            raise APIError(400, f"model {config.model_name!r} cannot infill: its tokenizer has no FIM pieces",
                           code="infilling_unsupported")
        prefix, suffix = _str(body, "input_prefix", ""), _str(body, "input_suffix", "")
        extra = body.get("input_extra") or []
        if not isinstance(extra, list) or not all(isinstance(c, dict) and isinstance(c.get("text", ""), str)
                                                  and isinstance(c.get("filename", ""), str) for c in extra):
            raise _bad("input_extra", "input_extra must be a list of {\"filename\": str, \"text\": str}")
        n_predict = _int(body, "n_predict", -1, lo=-1)
        if n_predict == -1:
            n_predict = cap
        body = dict(body, n_predict=n_predict)
        # llama.cpp's defaults for sampling.
        s = sampling(body, max_tokens_default=None, temperature_default=0.8, top_p_default=0.95, top_k_default=40,
                     max_tokens_name="n_predict")
        if s.n != 1:
            raise _bad("n", "/infill generates one completion")
        stream = _bool(body, "stream")
        typed = _str(body, "prompt", "")  # text already typed after the cursor's prefix: the middle goes on from it
        # Other files as context: prepended to the prefix (Code Llama's format has no repository tokens).
        context = "".join(f"--- {c.get('filename') or 'snippet'} ---\n{c.get('text', '')}\n" for c in extra)
        budget = engine.context - max(1, min(n_predict, engine.context // 4)) - len(tok.encode_infilling(typed))
        try:
            job, truncated = truncated_infill_job(llama, context + prefix, suffix, budget)
        except CodeLlamaError as e:
            raise APIError(400, str(e), param="input_prefix") from None
        if typed:
            ids = tok.encode_infilling(typed)
            job = _Job(prompt=job.prompt + ids, decode=tok.decode_infilling, context=ids, echo_text=job.echo_text,
                       echo_suffix=job.echo_suffix)
        check_context(job, "input_prefix")
        seqs, events = submit([job], s)

        def result(e: Event, content: str) -> dict:
            seq, now = seqs[0], time.perf_counter()
            first = seq.first_token_at or now
            n_gen = len(seq.request.tokens)
            gen_s = max(now - first, 1e-9)
            return {"content": content, "stop": True, "index": 0, "model": config.model_name,
                    "tokens_predicted": n_gen, "tokens_evaluated": len(job.prompt), "truncated": truncated,
                    "stop_type": {"eos": "eos", "word": "word"}.get(e.stop_kind, "limit"),
                    "stopped_eos": e.stop_kind == "eos", "stopped_word": e.stop_kind == "word",
                    "stopped_limit": e.stop_kind == "length",
                    "timings": {"prompt_n": len(job.prompt), "prompt_ms": round((first - started) * 1e3, 3),
                                "predicted_n": n_gen, "predicted_ms": round(gen_s * 1e3, 3),
                                "predicted_per_second": round(n_gen / gen_s, 3) if n_gen else 0.0}}

        if not stream:
            finals = await collect(request, seqs, events, started)
            return JSONResponse(result(finals[0], finals[0].completion.text))

        async def gen() -> AsyncIterator[str]:
            async for _, e in events_of(request, seqs, events, started, watch_disconnect=False):
                if e.error:
                    yield sse(APIError(500, e.error, type="server_error", code="generation_failed").body())
                elif e.done:
                    if e.text:
                        yield sse({"content": e.text, "stop": False, "index": 0})
                    yield sse(result(e, ""))
                elif e.text:
                    yield sse({"content": e.text, "stop": False, "index": 0})
        return stream_response(gen())

    # ---- models, health, metrics ------------------------------------------------------------------------
    started_at = int(time.time())

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": started_at, "owned_by": "codellama",
                "context_length": engine.context, "infilling": tok.supports_infilling}

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != config.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    @api.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health():
        ok = engine.running
        body = {"status": "ok" if ok else "unavailable", "slots_idle": engine.max_batch_size - engine.active,
                "slots_processing": engine.active, "queue_depth": engine.queue_depth}
        return JSONResponse(body, status_code=200 if ok else 503)

    app.include_router(api)
    return app


def _completion_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, a list of id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings or a list of token ids (non-empty)",
                   param="prompt", code="invalid_value" if prompt is not None else "missing_required_parameter")


def _chat_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI messages → the {"role", "content"} dicts ``chat_tokens`` takes (text parts joined;
    ``developer`` is the newer name of ``system``)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages",
                       code="invalid_value" if messages is not None else "missing_required_parameter")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad("messages", f"messages[{i}] must be an object with a role")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad("messages", f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise _bad("messages", f"messages[{i}].content must be a string or a list of text parts")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def _token_bytes(tok, token: int) -> bytes:
    piece = tok.id_to_piece(token)
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


# ==== running it ==========================================================================================
def _bind(host: str, port: int):
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CodeLlamaError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8080, *, log_level: str = "info",
          on_ready: Callable[[str], None] | None = None) -> None:
    """Run ``app`` with uvicorn until interrupted. ``port=0`` picks a free port; ``on_ready`` gets the URL."""
    import uvicorn

    sock = _bind(host, port)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    if on_ready is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets=sockets)
            on_ready(url)
        server.startup = startup
    server.run(sockets=[sock])


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread (tests, benchmarks); yields the base URL and shuts
    the server (and the engine, via the lifespan) down on exit."""
    import uvicorn

    sock = _bind(host, 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise CodeLlamaError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
