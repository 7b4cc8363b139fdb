"""KV-cache generation: token-level engine (batched, left-padded, chunked prefill) and the text layer
(exact incremental detokenisation, stop strings, streaming) behind ``CodeLlama.complete/infill/chat``.

The engine is a loop over small functions — ``adjust_logits`` and ``sample`` (sampling.py: banned ids and
repetition penalties, then greedy or sampling), ``accept_token`` and the per-request ``Request`` state — and a
generator, ``run``, that yields after every decode step. A caller may finish a request between two steps
(``request.finish("stop")``), which is how stop strings work here and how a server scheduler would drop or
swap requests without touching the loop. Admission checks (generation_admission.py), the cached forward
(generation_forward.py) and the text stream (text_stream.py) live next door; their names are re-exported."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .errors import CodeLlamaError
from .formats import banned_ids, chat_tokens, infilling_tokens, require_infilling
# Admission, the generation forward and the text stream live in their own modules; their names stay
# importable from here, where callers (server, evaluation, tests) have always found them.
from .generation_admission import (KV_CACHE_DTYPES, MEMORY_HEADROOM, _cgroup_available,  # noqa: F401
                                   _host_available, available_memory, check_request, request_memory,
                                   resolve_kv_cache_dtype)
from .generation_forward import (ATTENTION_MASK_ENTRIES, PACK_LIMIT_BYTES, PACKED_ROW_BUCKET,  # noqa: F401
                                 Decoder, _attention_blocks, _block_mask, _packed_linear, _packing_works,
                                 can_pack, decoder_for, forward_step, pack_bytes, packed_now, will_pack)
from .model import KVCache, Transformer, rope_angles
from .sampling import (SamplingParams, adjust_logits, make_generator, sample, token_logprobs,
                       validate_sampling)
from .text_stream import TextStream, _held_back  # noqa: F401

if TYPE_CHECKING:
    from .api import CodeLlama

DEFAULT_PREFILL_CHUNK = 2048


# ==== results =======================================================================================
@dataclass
class Completion:
    """One generated text. ``tokens`` are the generated ids (prompt ids first when ``echo``), without the
    eos / EOT / ``<step>`` that ended it; ``logprobs`` (when asked) are the model's log-probabilities of
    those tokens (temperature 1, before penalties, banned ids and top-k/top-p/min-p; 0.0 for the first
    prompt token, which is given);
    ``finish_reason`` is ``"stop"`` (stop token or stop string) or ``"length"`` (max_new_tokens or the
    model's context)."""

    text: str
    tokens: list[int]
    logprobs: list[float] | None
    finish_reason: str
    prompt_tokens: int
    speculative: dict | None = None  # with a draft model: ``SpeculativeStats.as_dict()`` (acceptance rate, ...)


@dataclass
class GenerationResult:
    """Token-level result for one prompt."""

    tokens: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    prompt_logprobs: list[float] | None = None


# ==== per-request state =============================================================================
@dataclass
class Request:
    """One sequence being generated: its prompt, limits and sampling, and what it has produced so far."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    logprobs: bool = False
    prompt_logprobs: bool = False
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    prompt_token_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason

    def penalty_window(self) -> list[int]:
        """The tokens the repetition penalties look at: the last ``penalty_last_n`` of prompt + completion (all
        of them for -1), taken without copying a long prompt at every step."""
        n, prompt, tokens = self.sampling.penalty_last_n, self.prompt, self.tokens
        if n < 0:
            return prompt + tokens
        if n <= len(tokens):
            return tokens[len(tokens) - n:]
        return prompt[max(0, len(prompt) - (n - len(tokens))):] + tokens

    def result(self) -> GenerationResult:
        return GenerationResult(tokens=list(self.tokens), finish_reason=self.finish_reason or "length",
                                logprobs=list(self.token_logprobs) if self.logprobs else None,
                                prompt_logprobs=list(self.prompt_token_logprobs) if self.prompt_logprobs else None)


def accept_token(request: Request, token: int, logprob: float | None = None) -> bool:
    """Record a sampled token; True if it was appended (a stop token ends the request without being kept)."""
    if token in request.stop_ids:
        request.finish("stop")
        return False
    request.tokens.append(token)
    if logprob is not None:
        request.token_logprobs.append(logprob)
    if len(request.tokens) >= request.max_new_tokens:
        request.finish("length")
    return True


# ==== the engine ====================================================================================
def run(model: Transformer, requests: list[Request], *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        pack: bool | None = None, kv_cache_dtype: str | torch.dtype | None = None) -> Iterator[list[tuple[int, int]]]:
    """Generate for ``requests`` together; yields after each step the ``(index, token)`` pairs appended.

    Prompts are left-padded to a common length so every row's next token is in the same slot; per-row
    positions give each prompt the RoPE positions it would have alone and the cache's ``valid`` mask hides
    the padding, so each row's result equals running it alone. The KV cache holds exactly
    ``longest prompt + max_new_tokens - 1`` slots per row. Checks (context, memory) run before the first
    ``next()`` returns anything and before allocating. Requests finished by the caller between steps stop
    producing tokens. ``pack`` chooses oneDNN-packed weights on CPU (see ``will_pack``). ``kv_cache_dtype="int8"``
    stores the cache as int8 with a scale per token and head (``model.quantize_kv``); None keeps the model's dtype."""
    kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, model.output.weight.dtype)
    for r in requests:
        validate_sampling(max_new_tokens=r.max_new_tokens)
    budgets, pack = check_request(model, [r.prompt for r in requests],
                                  max(r.max_new_tokens for r in requests), prefill_chunk, pack,
                                  any(r.prompt_logprobs for r in requests), kv_dtype)
    for r, b in zip(requests, budgets):
        r.max_new_tokens = min(r.max_new_tokens, b)
    return _run(model, requests, prefill_chunk, pack, kv_dtype)


@torch.inference_mode()
def _run(model: Transformer, requests: list[Request], prefill_chunk: int,
         pack: bool, kv_dtype: torch.dtype | None = None) -> Iterator[list[tuple[int, int]]]:
    device, dtype = model.output.weight.device, model.output.weight.dtype
    B = len(requests)
    P = max(len(r.prompt) for r in requests)
    cache = KVCache.for_model(model, B, P + max(r.max_new_tokens for r in requests) - 1,
                              device=device, dtype=kv_dtype or dtype)
    pads = torch.tensor([P - len(r.prompt) for r in requests], device=device)
    tokens = torch.zeros(B, P, dtype=torch.long, device=device)
    for i, r in enumerate(requests):
        tokens[i, P - len(r.prompt):] = torch.tensor(r.prompt, device=device)
        cache.valid[i, :P - len(r.prompt)] = False
    slots = torch.arange(P, device=device)
    positions = (slots.unsqueeze(0) - pads.unsqueeze(1)).clamp(min=0)
    padded = bool(pads.any())

    want_prompt_logprobs = any(r.prompt_logprobs for r in requests)
    for r in requests:
        r.prompt_token_logprobs = [0.0] if r.prompt_logprobs else []
    dec = decoder_for(model, pack)
    cos, sin = rope_angles(torch.arange(cache.size, device=device).unsqueeze(0), model.config.head_dim,
                           model.config.rope_theta)
    rope = (cos[0], sin[0])
    logits = None
    for start in range(0, P, prefill_chunk):
        end = min(start + prefill_chunk, P)
        logits = forward_step(model, dec, tokens[:, start:end], positions[:, start:end], cache, rope, padded,
                              last_only=not want_prompt_logprobs, decode=False)
        if want_prompt_logprobs:
            _gather_prompt_logprobs(requests, logits, tokens, start, end, P)
            logits = logits[:, -1:]
    last = logits[:, -1]
    step_positions = (P - pads).view(B, 1)
    for step in range(cache.size - P + 1):
        active = [i for i, r in enumerate(requests) if not r.finished]
        if not active:
            return
        params = [requests[i].sampling for i in active]
        rows = last if len(active) == B else last[active]
        picked_from = _adjusted_rows(rows, [requests[i] for i in active]) if any(
            p.adjusts_logits for p in params) else rows
        chosen = sample(picked_from, params, [requests[i].generator for i in active])
        need_lp = [requests[i].logprobs for i in active]
        lps = token_logprobs(rows, chosen) if any(need_lp) else [None] * len(active)
        appended = []
        next_tokens = [0] * B
        for i, tok, lp, want in zip(active, chosen, lps, need_lp):
            next_tokens[i] = tok
            if accept_token(requests[i], tok, lp if want else None):
                appended.append((i, tok))
        yield appended
        if all(r.finished for r in requests) or step == cache.size - P:
            for r in requests:
                r.finish("length")
            return
        inp = torch.tensor(next_tokens, device=device).view(B, 1)
        logits = forward_step(model, dec, inp, step_positions + step, cache, rope, padded)
        last = logits[:, -1]


def _adjusted_rows(rows: Tensor, requests: list[Request]) -> Tensor:
    """Each row's logits after its banned ids and repetition penalties (``sampling.adjust_logits``), as a new
    tensor; logprobs are still reported from the model's own ``rows``. Rows that only ban ids (every text
    request: the FIM sentinels) are masked in one indexing op rather than row by row."""
    out = rows.float().clone()
    banned_rows: list[int] = []
    banned_cols: list[int] = []
    for j, r in enumerate(requests):
        p = r.sampling
        if p.penalized:
            out[j] = adjust_logits(rows[j], r.penalty_window(), p)  # the left padding lives only in the batch
        elif p.banned_ids:
            banned_rows += [j] * len(p.banned_ids)
            banned_cols += p.banned_ids
    if banned_rows:
        out[banned_rows, banned_cols] = float("-inf")
    return out


def _gather_prompt_logprobs(requests: list[Request], logits: Tensor, tokens: Tensor, start: int, end: int,
                            P: int) -> None:
    # logits[:, t] scores the token in slot start + t + 1; slots before a row's first real token are padding.
    targets = tokens[:, start + 1:end + 1]
    n = targets.shape[1]
    if n == 0:
        return
    logp = torch.log_softmax(logits[:, :n].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    for i, r in enumerate(requests):
        if not r.prompt_logprobs:
            continue
        first = P - len(r.prompt) + 1  # slot of the row's second prompt token
        lo = max(first, start + 1)
        if lo <= end:
            r.prompt_token_logprobs.extend(logp[i, lo - start - 1:].tolist())


def generate(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop_ids: Sequence[int] = (), logprobs: bool = False, prompt_logprobs: bool = False,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK, pack: bool | None = None,
             kv_cache_dtype: str | torch.dtype | None = None, **sampling_options: Any) -> list[GenerationResult]:
    """Generate for each token-id prompt (include the bos yourself); one result per prompt, in order.

    Greedy by default. With sampling, prompt ``i`` uses the random stream ``seed + i``, so its result does
    not depend on what else is in the batch. ``sampling_options`` are further ``SamplingParams`` fields
    (penalties, ``banned_ids``). At this token level ``max_new_tokens`` is capped to what is left of the
    context (finish_reason "length"), as in Meta's reference; the text API refuses such a request instead.
    ``kv_cache_dtype="int8"`` keeps the KV cache in int8 (about half of bfloat16's bytes; see ``run``)."""
    requests = make_requests(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, seed=seed, stop_ids=stop_ids, logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs, **sampling_options)
    for _ in run(model, requests, prefill_chunk=prefill_chunk, pack=pack, kv_cache_dtype=kv_cache_dtype):
        pass
    return [r.result() for r in requests]


def make_requests(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                  stop_ids: Sequence[int] = (), logprobs: bool = False, prompt_logprobs: bool = False,
                  **sampling_options: Any) -> list[Request]:
    """One ``Request`` per token-id prompt. ``sampling_options`` are further ``SamplingParams`` fields
    (``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``penalty_last_n``, ``banned_ids``,
    ...), shared by every prompt."""
    validate_sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_new_tokens=max_new_tokens)
    if isinstance(prompts, (str, bytes)) or not all(isinstance(p, (list, tuple)) for p in prompts):
        raise CodeLlamaError("prompts must be a list of token-id lists")
    unknown = set(sampling_options) - _SAMPLING_FIELDS
    if unknown:
        raise CodeLlamaError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    if "banned_ids" in sampling_options:
        sampling_options["banned_ids"] = tuple(int(i) for i in sampling_options["banned_ids"] or ())
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, **sampling_options)
    device = model.output.weight.device
    if seed is None and not params.greedy:
        # One draw from torch's global generator for the whole batch keeps rows independent but repeatable.
        params = dataclasses.replace(params, seed=int(torch.randint(0, 2**62, ()).item()))
    return [Request(prompt=[int(t) for t in p], max_new_tokens=max_new_tokens, sampling=params,
                    stop_ids=frozenset(stop_ids), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                    generator=make_generator(params, device, offset=i))
            for i, p in enumerate(prompts)]


# The SamplingParams fields that ``make_requests`` takes as extra keywords (the named ones it takes itself).
_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) - {"temperature", "top_p",
                                                                                      "top_k", "seed"}


# ==== text: prompts, stop strings, streaming and the three user-facing tasks ==============
@dataclass
class _Job:
    """A prompt at the text level: its ids, how to decode its continuation, and its echo text."""

    prompt: list[int]
    decode: Callable[[list[int]], str]
    context: list[int]
    echo_text: str  # shown before the generated text when echo=True
    echo_suffix: str = ""  # shown after it (infilling: the suffix, so echo gives the whole document)
    banned: tuple[int, ...] = ()  # ids this job must never sample (``formats.banned_ids`` of its kind)


def _normalise_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if not all(isinstance(s, str) for s in stop):
        raise CodeLlamaError("stop must be a string or a list of strings")
    return tuple(stop)


def _generate_text(llama: "CodeLlama", jobs: list[_Job], *, batch: bool, max_new_tokens: int | None = 256,
                   temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                   stop: str | Sequence[str] | None = None, logprobs: bool = False, echo: bool = False,
                   stream: bool = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                   shrink_max_new_tokens: bool = False, **sampling_options: Any,
                   ) -> Completion | list[Completion] | Iterator[str]:
    stops = _normalise_stop(stop)
    if stream and (batch or len(jobs) != 1):
        raise CodeLlamaError("stream=True takes a single prompt, not a list")
    validate_sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)  # before the budget's errors
    max_new_tokens = _token_budget(llama, jobs, max_new_tokens, shrink_max_new_tokens)
    requests = make_requests(llama.model, [j.prompt for j in jobs], max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             stop_ids=llama.tokenizer.stop_ids, logprobs=logprobs,
                             prompt_logprobs=logprobs and echo, **sampling_options)
    for job, r in zip(jobs, requests):
        if job.banned:
            r.sampling = dataclasses.replace(r.sampling, banned_ids=tuple(sorted(set(r.sampling.banned_ids)
                                                                                 | set(job.banned))))
    spec = None
    if getattr(llama, "draft", None) is not None:  # speculative decoding: the same tokens, fewer target steps
        from .speculative import run as speculative_run
        steps, spec = speculative_run(llama.model, llama.draft.model, requests, k=llama.speculative_k,
                                      prefill_chunk=prefill_chunk, kv_cache_dtype=llama.kv_cache_dtype,
                                      draft_kv_cache_dtype=llama.draft.kv_cache_dtype)
    else:
        steps = run(llama.model, requests, prefill_chunk=prefill_chunk,
                    kv_cache_dtype=getattr(llama, "kv_cache_dtype", None))
    texts = [TextStream(j.decode, j.context, stops) for j in jobs]
    if stream:
        return _stream(jobs[0], requests[0], texts[0], steps, echo, spec[0] if spec else None)
    for appended in steps:
        for i, tok in appended:
            texts[i].push(tok)
            if texts[i].stopped:
                requests[i].finish("stop")
    completions = []
    for i, (job, r, t) in enumerate(zip(jobs, requests, texts)):
        t.flush()
        completions.append(_completion(job, r, t, echo, spec[i] if spec else None))
    return completions if batch else completions[0]


def _token_budget(llama: "CodeLlama", jobs: list[_Job], max_new_tokens: int | None, shrink: bool) -> int:
    """``max_new_tokens`` checked against the context. ``None`` means up to the end of the context (each
    prompt then stops there, finish_reason "length"); a number that does not fit after some prompt is an
    error, as in vLLM and OpenAI, unless ``shrink`` asks for the old cut to what is left of the context."""
    context = llama.model.config.max_seq_len
    if max_new_tokens is None:
        return context  # run() caps each prompt to its own room
    validate_sampling(max_new_tokens=max_new_tokens)
    if shrink:
        return max_new_tokens
    for i, job in enumerate(jobs):
        room = context - len(job.prompt)
        if 0 < room < max_new_tokens:  # no room at all: run() names the over-long prompt
            which = "the prompt" if len(jobs) == 1 else f"prompt {i}"
            raise CodeLlamaError(
                f"{which} is {len(job.prompt)} tokens and max_new_tokens is {max_new_tokens}, more than the "
                f"model's context of {context} tokens; use max_new_tokens <= {room}, max_new_tokens=None "
                "(up to the end of the context) or shrink_max_new_tokens=True")
    return max_new_tokens


def _stream(job: _Job, request: Request, text: TextStream, steps: Iterator[list[tuple[int, int]]],
            echo: bool, spec: Any = None) -> Iterator[str]:
    """Text deltas as they are decoded; the generator's return value (``StopIteration.value``, or
    ``completion = yield from ...``) is the final ``Completion``, whose text is the deltas joined."""
    if echo and job.echo_text:
        yield job.echo_text
    for appended in steps:
        for _, tok in appended:
            delta = text.push(tok)
            if text.stopped:
                request.finish("stop")
            if delta:
                yield delta
    tail = text.flush()
    if tail:
        yield tail
    if echo and job.echo_suffix:
        yield job.echo_suffix
    return _completion(job, request, text, echo, spec)


def _completion(job: _Job, r: Request, text: TextStream, echo: bool, spec: Any = None) -> Completion:
    lps = list(r.token_logprobs) if r.logprobs else None
    stats = spec.as_dict() if spec is not None else None  # speculative.SpeculativeStats, when a draft ran
    if echo:
        return Completion(text=job.echo_text + text.text + job.echo_suffix, tokens=job.prompt + r.tokens,
                          logprobs=(r.prompt_token_logprobs + lps) if lps is not None else None,
                          finish_reason=r.finish_reason or "length", prompt_tokens=len(job.prompt),
                          speculative=stats)
    return Completion(text=text.text, tokens=list(r.tokens), logprobs=lps,
                      finish_reason=r.finish_reason or "length", prompt_tokens=len(job.prompt), speculative=stats)


def _context(prompt: list[int], n: int = 4) -> list[int]:
    # A few prompt tokens before the continuation are enough for SentencePiece's space handling.
    return prompt[-n:]


# ---- the three user-facing tasks --------------------------------------------------------------------
def complete(llama: "CodeLlama", prompt: str | Sequence[str], **kwargs: Any):
    """Continue ``prompt`` (or each of a list of prompts); see ``CodeLlama.complete``."""
    tok = llama.tokenizer
    batch = not isinstance(prompt, str)
    prompts = list(prompt) if batch else [prompt]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise CodeLlamaError("prompt must be a string or a non-empty list of strings")
    jobs = []
    for i, p in enumerate(prompts):
        if not p:
            which = "prompt" if not batch else f"prompt {i}"
            raise CodeLlamaError(f"{which} is empty: give at least one character to continue")
        ids = tok.encode(p, bos=True)
        jobs.append(_Job(prompt=ids, decode=tok.decode, context=_context(ids), echo_text=p,
                         banned=banned_ids(tok, "complete")))
    return _generate_text(llama, jobs, batch=batch, **kwargs)


def infill(llama: "CodeLlama", prefix: str | Sequence[str], suffix: str | Sequence[str], *,
           suffix_first: bool = False, **kwargs: Any):
    """Fill the middle between ``prefix`` and ``suffix`` (PSM, or SPM with ``suffix_first``)."""
    tok = llama.tokenizer
    require_infilling(tok, llama.name)
    batch = not isinstance(prefix, str)
    if batch != (not isinstance(suffix, str)):
        raise CodeLlamaError("prefix and suffix must both be strings or both be lists")
    prefixes, suffixes = (list(prefix), list(suffix)) if batch else ([prefix], [suffix])
    if len(prefixes) != len(suffixes) or not prefixes:
        raise CodeLlamaError(f"got {len(prefixes)} prefixes and {len(suffixes)} suffixes; need the same, >= 1")
    if not all(isinstance(s, str) for s in prefixes + suffixes):
        raise CodeLlamaError("prefix and suffix must be strings")
    jobs = []
    for p, s in zip(prefixes, suffixes):
        ids = infilling_tokens(tok, p, s, suffix_first=suffix_first, model_name=llama.name)
        # The middle continues mid-line: decode it without SentencePiece's implicit leading space.
        # Echo gives the whole document: prefix + middle + suffix.
        jobs.append(_Job(prompt=ids, decode=tok.decode_infilling, context=[], echo_text=p, echo_suffix=s,
                         banned=banned_ids(tok, "infill")))
    return _generate_text(llama, jobs, batch=batch, **kwargs)


def _is_dialog(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(m, Mapping) for m in x)


def chat(llama: "CodeLlama", messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
         **kwargs: Any):
    """The assistant's reply to a dialog (or to each of a list of dialogs); stops at eos or ``<step>``."""
    tok = llama.tokenizer
    if _is_dialog(messages) and messages:
        dialogs, batch = [messages], False
    elif isinstance(messages, (list, tuple)) and messages and all(_is_dialog(d) for d in messages):
        dialogs, batch = list(messages), True
    else:
        raise CodeLlamaError("chat takes a list of {'role': ..., 'content': ...} messages or a list of such dialogs")
    echo = bool(kwargs.get("echo"))
    jobs = []
    for d in dialogs:
        ids = chat_tokens(tok, d)
        # The reply alone is decoded like Meta's reference (no leading space); with echo it continues the
        # decoded prompt exactly, so the text is decode(prompt + reply).
        jobs.append(_Job(prompt=ids, decode=tok.decode, context=_context(ids) if echo else [],
                         echo_text=tok.decode(ids) if echo else "", banned=banned_ids(tok, "chat")))
    return _generate_text(llama, jobs, batch=batch, **kwargs)
