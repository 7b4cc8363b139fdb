"""The HTTP API: OpenAI ``/v1/completions`` (``suffix`` = infilling), ``/v1/chat/completions`` and
``/v1/models``; llama.cpp's ``/infill`` for editor plugins; ``/health`` and Prometheus ``/metrics``.

Every request becomes one or more engine ``Sequence``s (see ``scheduler.py``); the handler waits on an
asyncio queue that the engine thread feeds. Bodies are read and checked by ``schema.py``; every exception
becomes a response in one place, ``errors.py`` (OpenAI-style error objects, ``{"error": {"message", "type",
"param", "code"}}``: 4xx for bad input, never a 500 with a traceback); ``metrics.py`` counts; ``server.py``
runs it with uvicorn."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

try:
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
except ImportError as e:  # pragma: no cover - depends on the environment
    from ..errors import CodeLlamaError
    raise CodeLlamaError("serving needs fastapi and uvicorn: pip install 'codellama[serve]'") from e

from ..errors import CodeLlamaError
from ..generation import _context, _Job
from .errors import APIError, busy_error, install_error_handling
from .metrics import Metrics, MetricsMiddleware
from .scheduler import Engine, EngineStopped, QueueFull
from .schema import (SamplingRequest, bad, bool_field, chat_messages, completion_prompts, include_usage,
                     infill_extra, int_field, read_json, sampling_request, str_field)
from .sequences import Event, build_job, make_sequences, token_text, truncated_infill_job
from .server import ServerConfig, running_server, serve

__all__ = ["APIError", "ServerConfig", "create_app", "running_server", "serve"]

# How often a non-streaming request checks that its client is still there (a streaming one notices at once).
DISCONNECT_POLL_S = 0.25


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
    # Errors first: middleware added later wraps it, so the metrics count the 500s it sends.
    install_error_handling(app, retry_after_s=config.retry_after_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

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
    def sampling(body: dict, **kwargs: Any) -> SamplingRequest:
        return sampling_request(body, cap=cap, max_n=config.max_n, **kwargs)

    def body_of(request: Request) -> Any:
        return read_json(request, config.max_body_bytes, config.body_timeout_s)

    def check_sequences(count: int, param: str) -> None:
        # Before any prompt is tokenized: a 4 MiB list of tiny prompts must not cost a million encodes.
        if count > engine.max_batch_size + engine.max_queue:
            raise APIError(400, f"the request asks for {count} sequences; this server holds at most "
                           f"{engine.max_batch_size + engine.max_queue}", param=param)

    def check_context(job: _Job, param: str) -> None:
        if len(job.prompt) >= engine.context:
            raise APIError(400, f"This model's maximum context length is {engine.context} tokens, however your "
                           f"prompt is {len(job.prompt)} tokens. Please reduce the length of the prompt.",
                           param=param, code="context_length_exceeded")

    def submit(jobs: list[_Job], s: SamplingRequest, *, logprobs: int | None = None, echo: bool = False,
               ) -> tuple[list, asyncio.Queue]:
        """Queue n sequences per job; returns them and the asyncio queue their events arrive on."""
        check_sequences(len(jobs) * s.n, "n")
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
        except (QueueFull, EngineStopped) as e:
            if isinstance(e, QueueFull):
                metrics.rejected_busy += 1
            raise busy_error(e, config.retry_after_s) from None
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
        body = await body_of(request)
        s = sampling(body, max_tokens_default=16)
        echo, stream = bool_field(body, "echo"), bool_field(body, "stream")
        logprobs = int_field(body, "logprobs", None, lo=0, hi=20)
        usage_chunk = include_usage(body, stream)
        suffix = str_field(body, "suffix", None)
        prompts = completion_prompts(body.get("prompt"))
        check_sequences(len(prompts) * s.n, "prompt")
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
                        raise bad("prompt", f"prompt token ids must be in [0, {llama.config.vocab_size})")
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
            if usage_chunk and all(f is not None and f.completion for f in finals):
                yield sse(chunk([], usage=usage(seqs, finals, s.n)))
            yield "data: [DONE]\n\n"
        return stream_response(gen())

    # ---- POST /v1/chat/completions -------------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        body = await body_of(request)
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        s = sampling(body, max_tokens_default=None, max_tokens_name=name)
        stream = bool_field(body, "stream")
        want_lp = bool_field(body, "logprobs")
        top_n = int_field(body, "top_logprobs", None, lo=0, hi=20)
        if top_n is not None and not want_lp:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        usage_chunk = include_usage(body, stream)
        messages = chat_messages(body.get("messages"))
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
            if usage_chunk and all(f is not None and f.completion for f in finals):
                yield sse(chunk([], usage=usage(seqs, finals, s.n)))
            yield "data: [DONE]\n\n"
        return stream_response(gen())

    # ---- POST /infill (llama.cpp) --------------------------------------------------------------------
    @api.post("/infill")
    async def infill(request: Request):
        started = time.perf_counter()
        body = await body_of(request)
        if not tok.supports_infilling:
            raise APIError(400, f"model {config.model_name!r} cannot infill: its tokenizer has no FIM pieces",
                           code="infilling_unsupported")
        prefix, suffix = str_field(body, "input_prefix", ""), str_field(body, "input_suffix", "")
        extra = infill_extra(body.get("input_extra"))
        n_predict = int_field(body, "n_predict", -1, lo=-1)
        if n_predict == -1:
            n_predict = cap
        body = dict(body, n_predict=n_predict)
        # llama.cpp's defaults for sampling.
        s = sampling(body, max_tokens_default=None, temperature_default=0.8, top_p_default=0.95, top_k_default=40,
                     max_tokens_name="n_predict")
        if s.n != 1:
            raise bad("n", "/infill generates one completion")
        stream = bool_field(body, "stream")
        # Text already typed after the cursor's prefix: the middle goes on from it.
        typed = str_field(body, "prompt", "")
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


def _token_bytes(tok, token: int) -> bytes:
    piece = tok.id_to_piece(token)
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")
