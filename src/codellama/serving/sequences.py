"""What the engine runs: a ``Sequence`` (one generation: its job, ``Request`` state, text stream and where its
``Event``s go) and how the HTTP layer builds them from a task (``build_job``, ``make_sequences``), exactly as
``CodeLlama.complete/infill/chat`` build theirs, so that a served greedy result equals the library's."""

from __future__ import annotations

import math
import queue
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import CodeLlamaError
from ..formats import banned_ids, chat_tokens, infilling_tokens
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
    # "eos" (a stop token), "word" (a stop string), "length", "time" (t_max_predict_ms), "indent" (n_indent),
    # "cancelled", "error"
    stop_kind: str | None = None
    error: str | None = None
    tokens_cached: int = 0  # prompt tokens reused from the row's cache (final event)
    timings: dict = field(default_factory=dict)  # llama.cpp's timings object (final event)
    id_slot: int | None = None  # the slot (cache row id) that ran it


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
    # Budget: the engine sets request.max_new_tokens from these at submit (it knows the context).
    until_context_end: bool = False  # max_tokens=None: up to the end of the context
    shrink_max_tokens: bool = True  # a budget beyond the context is cut ("length") rather than refused
    # llama.cpp's prompt cache and slot choice (see prefix_cache.py).
    cache_prompt: bool = False
    slot: int | None = None  # id_slot: None or -1 = any free slot
    # llama.cpp's FIM time and indentation limits (0 / None: off); see ``check_limits``.
    t_max_predict_ms: float | None = None
    n_indent: int = 0
    task_id: int = -1  # set by Engine.submit (llama.cpp's id_task in /slots)
    tokens_cached: int = 0
    id_slot: int | None = None  # the slot it runs in (set at prefill)
    prefill_started: float | None = None
    n_decoded: int = 0  # tokens sampled, the one that stopped it included (llama.cpp's predicted_n)
    stop_kind: str | None = None  # "time" / "indent" when a limit ended it
    _row: int | None = None
    _next: int = 0  # the last sampled token: fed at the next decode step
    _sent: int = 0  # characters of text.text sent so far
    _pending: str = ""  # text released by the stream but held back (a new line whose indentation is unknown)
    _line_start: int | None = None  # start of the first line not yet checked against n_indent
    _scanned: int = 0  # text.text before this has been searched for newlines
    _seen_newline: bool = False

    def cancel(self) -> None:
        self.cancelled = True  # read by the engine thread between steps (a bool write is atomic)

    @property
    def has_limits(self) -> bool:
        return bool(self.n_indent > 0 or self.t_max_predict_ms)

    def deliver(self, delta: str, now: float, *, final: bool = False) -> str:
        """Text to send for ``delta`` (just released by the text stream), after the FIM limits: with
        ``n_indent``, a new line is held back until its indentation is known, and the first line (after the
        first generated newline) indented less than ``n_indent`` ends the sequence, cut at that line's start;
        with ``t_max_predict_ms``, once a newline was generated and that many ms passed since the first token,
        the sequence ends. Both end it as llama.cpp does: finish_reason "length", stop_kind "time"/"indent"."""
        if not self.has_limits:
            return delta
        self._pending += delta
        released = self._sent + len(self._pending)  # text.text[:released] is final (a stop string may follow)
        text = self.text.text
        hold = released
        if self.n_indent > 0:
            hold = self._check_indent(text, released, final)
        if not self._seen_newline:
            self._seen_newline = "\n" in text[:released]
        if (self.t_max_predict_ms and self._seen_newline and self.first_token_at is not None
                and not self.request.finished and (now - self.first_token_at) * 1000.0 >= self.t_max_predict_ms):
            self._end("time")
        out = self.text.text[self._sent:hold]
        self._sent += len(out)
        self._pending = self.text.text[self._sent:released]
        return out

    def _check_indent(self, text: str, released: int, final: bool) -> int:
        # Lines after the first generated newline: llama.cpp counts spaces and tabs, a blank line as 0.
        while True:
            if self._line_start is None:
                nl = text.find("\n", self._scanned, released)
                if nl < 0:
                    self._scanned = released
                    return released
                self._line_start = self._scanned = nl + 1
            i = self._line_start
            while i < released and text[i] in " \t":
                i += 1
            if i == released and not final:
                return self._line_start  # only whitespace so far: wait for the line's first character
            if i < released and i - self._line_start < self.n_indent:
                cut = self._line_start
                self.text.text = text[:cut]  # the dedented line is not part of the completion
                self.text.stopped = True
                self._end("indent")
                return cut
            self._scanned, self._line_start = i, None
            if i == released:
                return released

    def _end(self, kind: str) -> None:
        self.request.finish("length")
        if self.request.finish_reason == "length":  # also when max_tokens ran out on the same token
            self.stop_kind = kind


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
        return _Job(prompt=ids, decode=tok.decode, context=_context(ids), echo_text=prompt,
                    banned=banned_ids(tok, kind))
    if kind == "infill":
        ids = infilling_tokens(tok, prompt, suffix, suffix_first=suffix_first, model_name=llama.name)
        return _Job(prompt=ids, decode=tok.decode_infilling, context=[], echo_text=prompt, echo_suffix=suffix,
                    banned=banned_ids(tok, kind))
    if kind == "chat":
        ids = chat_tokens(tok, messages)
        return _Job(prompt=ids, decode=tok.decode, context=_context(ids) if echo else [],
                    echo_text=tok.decode(ids) if echo else "", banned=banned_ids(tok, kind))
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
    return _Job(prompt=ids, decode=tok.decode_infilling, context=[], echo_text=prefix, echo_suffix=suffix,
                banned=job.banned), True


def make_sequences(llama, job: _Job, *, n: int = 1, max_tokens: int | None = 16, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop=None,
                   logprobs: int | None = None, echo: bool = False, sink: Callable[[int, Event], None],
                   cache_prompt: bool = False, slot: int | None = None, t_max_predict_ms: float | None = None,
                   n_indent: int = 0, shrink_max_tokens: bool = False, t_max_prompt_ms: float | None = None,
                   **sampling_options: Any) -> list[Sequence]:
    """``n`` sequences for one job (choice ``i`` samples with ``seed + i``, as a batch does in the library).
    ``max_tokens=0`` scores the prompt only (with ``echo`` and ``logprobs``); ``None`` generates up to the end
    of the engine's context. A prompt + ``max_tokens`` beyond the context is refused at ``Engine.submit``
    unless ``shrink_max_tokens``. ``sampling_options`` are further ``SamplingParams`` fields (penalties);
    the job's banned ids are added to them. ``cache_prompt``, ``slot`` (llama.cpp ``id_slot``),
    ``t_max_predict_ms`` and ``n_indent`` have llama.cpp's meaning (see ``Sequence.deliver``);
    ``t_max_prompt_ms`` is accepted and unused, as in llama.cpp (its server declares it "TODO: implement")."""
    stops = _normalise_stop(stop)
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 0):
        raise CodeLlamaError(f"max_tokens must be an integer >= 0 or None, got {max_tokens!r}")
    _check_limits(slot=slot, t_max_predict_ms=t_max_predict_ms, n_indent=n_indent)
    banned = tuple(sorted(set(sampling_options.pop("banned_ids", None) or ()) | set(job.banned)))
    until_end = max_tokens is None
    # Until the engine knows the context, the model's own bounds the budget (submit cuts it to the room left).
    budget = llama.model.config.max_seq_len if until_end else max(1, max_tokens)
    requests = make_requests(llama.model, [job.prompt] * n, max_new_tokens=budget,
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             stop_ids=llama.tokenizer.stop_ids, logprobs=logprobs is not None,
                             prompt_logprobs=echo and logprobs is not None, banned_ids=banned, **sampling_options)
    return [Sequence(job=job, request=r, text=TextStream(job.decode, job.context, stops),
                     sink=lambda event, i=i: sink(i, event), echo=echo, top_logprobs=logprobs,
                     prompt_logprobs=echo and logprobs is not None, generate=max_tokens != 0,
                     until_context_end=until_end, shrink_max_tokens=shrink_max_tokens, cache_prompt=cache_prompt,
                     slot=slot, n_indent=n_indent,
                     # llama.cpp's default is -1: any value <= 0 means no limit.
                     t_max_predict_ms=t_max_predict_ms if t_max_predict_ms and t_max_predict_ms > 0 else None)
            for i, r in enumerate(requests)]


def _check_limits(*, slot, t_max_predict_ms, n_indent) -> None:
    if slot is not None and (not isinstance(slot, int) or isinstance(slot, bool) or slot < -1):
        raise CodeLlamaError(f"id_slot must be an integer >= -1 (-1: any free slot), got {slot!r}")
    if t_max_predict_ms is not None and (not isinstance(t_max_predict_ms, (int, float))
                                         or isinstance(t_max_predict_ms, bool)
                                         or not math.isfinite(t_max_predict_ms)):
        raise CodeLlamaError(f"t_max_predict_ms must be a number (<= 0: no limit), got {t_max_predict_ms!r}")
    if not isinstance(n_indent, int) or isinstance(n_indent, bool) or n_indent < 0:
        raise CodeLlamaError(f"n_indent must be an integer >= 0 (0: no limit), got {n_indent!r}")


def timings(seq: Sequence) -> dict[str, float]:
    """llama.cpp's ``timings`` object: prompt processing (the tokens evaluated, cached ones excluded) from the
    start of the prefill to the first token, generation from the first token to the end."""
    start = seq.prefill_started if seq.prefill_started is not None else seq.submitted
    first = seq.first_token_at if seq.first_token_at is not None else (seq.finished_at or start)
    end = seq.finished_at if seq.finished_at is not None else first
    prompt_n = len(seq.job.prompt) - seq.tokens_cached if seq.prefill_started is not None else 0
    prompt_ms, predicted_ms = (first - start) * 1000.0, max(0.0, end - first) * 1000.0

    def rates(n: int, ms: float) -> tuple[float, float]:
        # Zero rather than inf/NaN for an empty phase: the numbers go into JSON.
        return (ms / n if n else 0.0), (1000.0 * n / ms if n and ms > 0 else 0.0)
    prompt_per_token, prompt_per_second = rates(prompt_n, prompt_ms)
    predicted_per_token, predicted_per_second = rates(seq.n_decoded, predicted_ms)
    return {"prompt_n": prompt_n, "prompt_ms": prompt_ms, "prompt_per_token_ms": prompt_per_token,
            "prompt_per_second": prompt_per_second, "predicted_n": seq.n_decoded, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_per_token, "predicted_per_second": predicted_per_second}
