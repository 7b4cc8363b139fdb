"""What every endpoint shares (``Serving``): how a request's jobs become engine sequences, how their events
come back to the handler (an asyncio queue fed by the engine thread), the context checks, and SSE framing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ..errors import CodeLlamaError
from ..formats import banned_ids
from ..generation import _Job
from ..sampling import SamplingParams
from .errors import APIError, busy_error
from .metrics import Metrics
from .scheduler import Engine, EngineStopped, QueueFull
from .schema import SamplingRequest, read_json
from .sequences import Event, make_sequences
from .server import ServerConfig

# How often a non-streaming request checks that its client is still there (a streaming one notices at once).
DISCONNECT_POLL_S = 0.25
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


@dataclasses.dataclass
class Serving:
    """What every endpoint shares: the model, the engine, the limits, the metrics, and the way from jobs to
    engine sequences and back."""

    llama: Any
    engine: Engine
    config: ServerConfig
    metrics: Metrics
    started_at: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.llama.tokenizer

    @property
    def cap(self) -> int:
        """The most tokens one request may ask for."""
        return min(self.config.max_tokens_cap or self.engine.context, self.engine.context)

    @property
    def model_names(self) -> set[str]:
        """The names a request's ``model`` may give: the served name and the model's own (the checkpoint's
        name), as vLLM accepts its served names only."""
        return {n for n in (self.config.model_name, getattr(self.llama, "name", None)) if n}

    async def body(self, request: Request) -> dict:
        return await read_json(request, self.config.max_body_bytes, self.config.body_timeout_s)

    def check_sequences(self, count: int, param: str) -> None:
        # Before any prompt is tokenized: a 4 MiB list of tiny prompts must not cost a million encodes.
        room = self.engine.max_batch_size + self.engine.max_queue
        if count > room:
            raise APIError(400, f"the request asks for {count} sequences; this server holds at most {room}",
                           param=param)

    def check_context(self, job: _Job, param: str, max_tokens: int = 0) -> None:
        """400 unless the prompt and ``max_tokens`` generated tokens fit in the context (at least one must)."""
        context, n = self.engine.context, len(job.prompt)
        if n >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens, however your "
                           f"prompt is {n} tokens. Please reduce the length of the prompt.",
                           param=param, code="context_length_exceeded")
        if n + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens, however you requested "
                           f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion). Please "
                           f"reduce the length of the prompt or the completion.", param=param,
                           code="context_length_exceeded")

    def room(self, job: _Job) -> int:
        """How many tokens fit after the job's prompt."""
        return max(0, self.engine.context - len(job.prompt))

    def submit(self, jobs: list[_Job], s: SamplingRequest, *, max_tokens: list[int] | None = None,
               logprobs: int | None = None, echo: bool = False, **engine_options: Any,
               ) -> tuple[list, asyncio.Queue]:
        """Queue ``s.n`` sequences per job (job ``j`` generates ``max_tokens[j]``, default ``s.max_tokens``);
        returns them and the asyncio queue their events arrive on. ``engine_options`` are passed to
        ``make_sequences`` only when set (None is "not asked"), so that a plain request is a plain one."""
        self.check_sequences(len(jobs) * s.n, "n")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        options = {k: v for k, v in engine_options.items() if v is not None}

        def sink_for(base: int) -> Callable[[int, Event], None]:
            return lambda i, e: loop.call_soon_threadsafe(events.put_nowait, (base + i, e))
        seqs = []
        try:
            for j, job in enumerate(jobs):
                seqs += make_sequences(self.llama, job, n=s.n,
                                       max_tokens=s.max_tokens if max_tokens is None else max_tokens[j],
                                       temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
                                       stop=s.stop, logprobs=logprobs, echo=echo, sink=sink_for(j * s.n), **options)
            self.engine.submit(seqs)
        except (QueueFull, EngineStopped) as e:
            if isinstance(e, QueueFull):
                self.metrics.rejected_busy()
            raise busy_error(e, self.config.retry_after_s) from None
        except CodeLlamaError as e:
            raise APIError(400, str(e)) from None
        return seqs, events

    async def events_of(self, request: Request, seqs: list, events: asyncio.Queue, started: float,
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
                    self.metrics.first_token(time.perf_counter() - started)
                if event.done:
                    left -= 1
                    if event.completion is not None:
                        c = event.completion
                        generated = len(c.tokens) - (c.prompt_tokens if seqs[i].echo else 0)
                        self.metrics.tokens(c.prompt_tokens, generated)
                yield i, event
        finally:
            for seq in seqs:
                seq.cancel()  # no-op for finished ones; frees the row of the others at the next step

    async def collect(self, request: Request, seqs, events, started) -> list[Event]:
        """The final event of each sequence (text, tokens, logprobs gathered), for non-streaming answers."""
        finals: list[Event | None] = [None] * len(seqs)
        async for i, event in self.events_of(request, seqs, events, started, watch_disconnect=True):
            if event.done:
                finals[i] = event
        if any(f is None for f in finals):
            raise APIError(499, "client closed the request")
        for f in finals:
            if f.error:
                raise APIError(500, f.error, type="server_error", code="generation_failed")
        return finals


def hand_made_fim(job: _Job, tokenizer) -> _Job:
    """A plain-completion prompt that is itself a FIM prompt (Continue's and Tabby's Code Llama template
    ``<PRE> {prefix} <SUF>{suffix} <MID>``, whose text encodes to the FIM pieces) is an infilling request:
    the model must be free to end the middle with ``<EOT>``, so it gets infilling's banned ids (PRE, SUF,
    MID) instead of plain completion's (all four)."""
    if tokenizer.middle_id is not None and tokenizer.middle_id in job.prompt:
        return dataclasses.replace(job, banned=banned_ids(tokenizer, "infill"))
    return job


def penalty_options(*, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0, penalty_last_n: int = 64,
                    min_p: float | None = None) -> dict[str, Any]:
    """The engine keywords for the penalties (and ``min_p``) a request asked for; defaults are left out."""
    options: dict[str, Any] = {}
    if repetition_penalty != 1.0:
        options["repetition_penalty"] = repetition_penalty
    if presence_penalty != 0.0:
        options["presence_penalty"] = presence_penalty
    if frequency_penalty != 0.0:
        options["frequency_penalty"] = frequency_penalty
    if options and penalty_last_n != 64:
        options["penalty_last_n"] = penalty_last_n
    # min_p reaches the engine once SamplingParams has it; llama.cpp's default of 0.05 is not imposed.
    if min_p and "min_p" in _SAMPLING_FIELDS:
        options["min_p"] = min_p
    return options


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def stream_response(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def off_loop(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` (tokenizing a prompt: ~0.5 s for a 4 MiB body) in a worker thread, so that the event loop
    keeps streaming other requests' tokens meanwhile; exceptions come back as raised."""
    return await run_in_threadpool(fn, *args, **kwargs)
