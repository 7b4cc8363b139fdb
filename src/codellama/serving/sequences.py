"""What the engine runs: a ``Sequence`` (one generation: its job, ``Request`` state, text stream and where its
``Event``s go) and how the HTTP layer builds them from a task (``build_job``, ``make_sequences``), exactly as
``CodeLlama.complete/infill/chat`` build theirs, so that a served greedy result equals the library's."""

from __future__ import annotations

import queue
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import CodeLlamaError
from ..formats import chat_tokens, infilling_tokens
from ..generation import Completion, Request, TextStream, _context, _Job, _normalise_stop, make_requests


@dataclass
class Event:
    """What a sequence produced in one scheduler step. ``text`` is the newly safe text (maybe empty),
    ``tokens``/``logprobs``/``top`` the ids appended with their log-probabilities and top alternatives
    (when asked). The last event has ``done`` set with the final ``completion`` (or an ``error``)."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    done: bool = False
    completion: Completion | None = None
    stop_kind: str | None = None  # "eos" (a stop token), "word" (a stop string), "length", "cancelled"
    error: str | None = None


@dataclass
class Sequence:
    """One generation inside the engine: the job (prompt and how to decode it), its ``Request`` state,
    its text stream and where to send events. ``cancel()`` is safe from any thread."""

    job: _Job
    request: Request
    text: TextStream
    sink: Callable[[Event], None]
    echo: bool = False
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token's logprob + k alternatives
    prompt_logprobs: bool = False  # echo + logprobs: score the prompt tokens as well
    generate: bool = True  # False: max_tokens=0 (score the prompt only)
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    prompt_top: list[list[tuple[int, float]]] = field(default_factory=list)  # echo + logprobs
    generated_top: list[list[tuple[int, float]]] = field(default_factory=list)
    cancelled: bool = False
    failed: bool = False  # its final event (an error) has been sent; its row only needs freeing
    _row: int | None = None
    _next: int = 0  # the last sampled token: fed at the next decode step

    def cancel(self) -> None:
        self.cancelled = True  # read by the engine thread between steps (a bool write is atomic)


class QueueSink:
    """A sink that a plain thread can iterate: ``for event in sink: ...`` until the final event."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def __call__(self, event: Event) -> None:
        self._q.put(event)

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._q.get()
            yield event
            if event.done:
                return


# ---- building sequences -----------------------------------------------------------------------------
def token_text(tokenizer, token: int) -> str:
    """How a token reads in logprobs output: its piece with ``▁`` as a space; byte pieces as the character
    (ASCII) or ``bytes:\\xNN`` (part of a multi-byte character), as OpenAI reports partial bytes."""
    piece = tokenizer.id_to_piece(token)
    m = _BYTE_PIECE.fullmatch(piece)
    if m:
        b = int(m.group(1), 16)
        return chr(b) if b < 128 else f"bytes:\\x{b:02x}"
    return piece.replace("\u2581", " ")


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def build_job(llama, kind: str, *, prompt: str = "", suffix: str = "", messages=None, suffix_first: bool = False,
              echo: bool = False) -> _Job:
    """The prompt ids and text handling of one task, exactly as ``CodeLlama.complete/infill/chat`` build
    them (so a served greedy result equals the library's). Raises ``CodeLlamaError`` for bad input."""
    tok = llama.tokenizer
    if kind == "complete":
        ids = tok.encode(prompt, bos=True)
        return _Job(prompt=ids, decode=tok.decode, context=_context(ids), echo_text=prompt)
    if kind == "infill":
        ids = infilling_tokens(tok, prompt, suffix, suffix_first=suffix_first, model_name=llama.name)
        return _Job(prompt=ids, decode=tok.decode_infilling, context=[], echo_text=prompt, echo_suffix=suffix)
    if kind == "chat":
        ids = chat_tokens(tok, messages)
        return _Job(prompt=ids, decode=tok.decode, context=_context(ids) if echo else [],
                    echo_text=tok.decode(ids) if echo else "")
    raise ValueError(f"unknown task {kind!r}")


def truncated_infill_job(llama, prefix: str, suffix: str, budget: int) -> tuple[_Job, bool]:
    """A PSM infilling job whose prompt fits in ``budget`` tokens: when the whole prefix and suffix do not,
    keep the end of the prefix and the start of the suffix (3:1, as editors' servers do). Returns the job
    and whether anything was cut."""
    job = build_job(llama, "infill", prompt=prefix, suffix=suffix)
    if len(job.prompt) <= budget:
        return job, False
    tok = llama.tokenizer
    pre, suf = tok.encode(prefix), tok.encode_infilling(suffix)
    room = budget - 4  # bos, PRE, SUF, MID
    if room < 2:
        raise CodeLlamaError(f"no room for the prompt: the context leaves {budget} tokens")
    keep_suf = min(len(suf), room // 4)
    keep_pre = min(len(pre), room - keep_suf)
    keep_suf = min(len(suf), room - keep_pre)
    ids = ([tok.bos_id, tok.prefix_id] + pre[len(pre) - keep_pre:] + [tok.suffix_id] + suf[:keep_suf]
           + [tok.middle_id])
    return _Job(prompt=ids, decode=tok.decode_infilling, context=[], echo_text=prefix, echo_suffix=suffix), True


def make_sequences(llama, job: _Job, *, n: int = 1, max_tokens: int = 16, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop=None,
                   logprobs: int | None = None, echo: bool = False,
                   sink: Callable[[int, Event], None]) -> list[Sequence]:
    """``n`` sequences for one job (choice ``i`` samples with ``seed + i``, as a batch does in the library).
    ``max_tokens=0`` scores the prompt only (with ``echo`` and ``logprobs``)."""
    stops = _normalise_stop(stop)
    requests = make_requests(llama.model, [job.prompt] * n, max_new_tokens=max(1, max_tokens),
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             stop_ids=llama.tokenizer.stop_ids, logprobs=logprobs is not None,
                             prompt_logprobs=echo and logprobs is not None)
    return [Sequence(job=job, request=r, text=TextStream(job.decode, job.context, stops),
                     sink=lambda event, i=i: sink(i, event), echo=echo, top_logprobs=logprobs,
                     prompt_logprobs=echo and logprobs is not None, generate=max_tokens > 0)
            for i, r in enumerate(requests)]
