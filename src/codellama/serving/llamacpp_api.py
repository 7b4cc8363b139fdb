"""llama.cpp's native protocol, for the clients built on it (llama.vscode, llama.vim, Tabby's llama.cpp backend,
Continue's llama.cpp provider): ``POST /completion``, ``/infill``, ``/tokenize``, ``/detokenize``, ``GET /props``,
``/slots``, and the probes ``/health``, ``/v1/health`` and ``/metrics``.

Bodies and defaults are llama.cpp's (``models.py``: temperature 0.8, top_k 40, top_p 0.95, ``n_predict: -1`` =
up to the end of the context, ``cache_prompt`` on); replies carry llama.cpp's fields (``content``, ``stop``,
``tokens_predicted``, ``tokens_evaluated``, ``tokens_cached``, ``timings``, ``generation_settings``,
``stop_type``, ``truncated``...), streamed as ``data: {...}`` lines whose last one has ``stop: true``.

Where llama.cpp's semantics are followed rather than OpenAI's:
- an over-long request is fitted, not refused: ``/completion`` shrinks ``n_predict`` to what is left of the
  context (a prompt that fills the context is still a 400); ``/infill`` keeps the end of the prefix and the
  start of the suffix (``truncated: true``);
- ``samplers`` selects which samplers apply (a sampler not named is off: no ``top_k`` in it means top-k off,
  no ``temperature`` means temperature 1 unless greedy, no ``penalties`` means no penalties); the order is
  the engine's own; ``infill``, ``dry``, ``xtc``, ``typ_p``, ``top_n_sigma`` are accepted and have no effect;
- ``response_fields`` keeps only the named fields of a non-streamed reply; ``a/b`` (or ``a.b``) takes ``b``
  out of ``a`` and puts it at the top level under the name ``"a/b"``; a missing field is left out;
- ``t_max_predict_ms`` stops generation once that long has passed since the first token and a newline has been
  written; ``n_indent`` stops at a line indented less than that (both done by the engine);
  ``t_max_prompt_ms`` is accepted and reported but not enforced (llama.cpp does not enforce it either);
- ``repeat_last_n`` (or Tabby's ``penalty_last_n``) is the penalty window over prompt + completion."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..errors import CodeLlamaError
from ..formats import banned_ids
from ..generation import _context, _Job
from ..sampling import SAMPLERS as ENGINE_SAMPLERS
from .core import Serving, hand_made_fim, off_loop, penalty_options, sse, stream_response
from .errors import APIError
from .metrics import CONTENT_TYPE
from .models import CompletionBody, DetokenizeBody, InfillBody, LlamaCppSampling, Timings, TokenizeBody, parse
from .schema import SamplingRequest, bad
from .sequences import Event, build_job, token_text, truncated_infill_job

# llama.cpp's stop_type for each of the engine's stop kinds.
_STOP_TYPES = {"eos": "eos", "word": "word", "length": "limit", "time": "limit", "indent": "limit"}


def llamacpp_router(serving: Serving) -> APIRouter:
    router = APIRouter()
    tok, config, engine = serving.tokenizer, serving.config, serving.engine

    def n_predict(b: LlamaCppSampling, job: _Job, param: str = "n_predict") -> int:
        """llama.cpp's ``n_predict`` fitted to the context: -1 is all that is left, more than is left shrinks."""
        if b.n_predict > serving.cap:
            raise APIError(400, f"n_predict is too large: {b.n_predict}; this server generates at most "
                           f"{serving.cap} tokens per request", param="n_predict", code="max_tokens_exceeded")
        serving.check_context(job, param)
        room = min(serving.room(job), serving.cap)
        return room if b.n_predict == -1 else min(b.n_predict, room)

    def sampling(b: LlamaCppSampling, max_tokens: int) -> tuple[SamplingRequest, dict[str, Any]]:
        """The engine's sampling and the extra engine options for a llama.cpp body (see the module docstring)."""
        on = set(b.samplers) if b.samplers is not None else None

        def uses(name: str) -> bool:
            return on is None or name in on
        temperature = b.temperature if uses("temperature") or b.temperature == 0 else 1.0
        s = SamplingRequest(max_tokens=max_tokens, temperature=temperature,
                            top_p=b.top_p if uses("top_p") else 1.0, top_k=max(0, b.top_k) if uses("top_k") else 0,
                            seed=b.seed, stop=list(b.stop), n=1)
        options = penalty_options(repetition_penalty=b.repeat_penalty if uses("penalties") else 1.0,
                                  presence_penalty=b.presence_penalty if uses("penalties") else 0.0,
                                  frequency_penalty=b.frequency_penalty if uses("penalties") else 0.0,
                                  penalty_last_n=b.last_n, min_p=b.min_p if uses("min_p") else None)
        if on is not None:  # and in the client's order (llama.cpp-only samplers are accepted no-ops)
            options["samplers"] = tuple(n for n in b.samplers if n in ENGINE_SAMPLERS)
        if b.id_slot != -1 and b.id_slot >= engine.max_batch_size:
            raise bad("id_slot", f"id_slot must be -1 (any) or in [0, {engine.max_batch_size}), got {b.id_slot}")
        options.update(cache_prompt=b.cache_prompt, slot=None if b.id_slot == -1 else b.id_slot,
                       t_max_predict_ms=b.t_max_predict_ms if b.t_max_predict_ms > 0 else None,
                       n_indent=b.n_indent or None,
                       t_max_prompt_ms=b.t_max_prompt_ms if b.t_max_prompt_ms > 0 else None)
        return s, options

    def settings(b: LlamaCppSampling, s: SamplingRequest) -> dict:
        return {"n_ctx": engine.context, "n_predict": s.max_tokens, "seed": -1 if b.seed is None else b.seed,
                "temperature": b.temperature, "top_k": b.top_k, "top_p": b.top_p, "min_p": b.min_p or 0.0,
                "repeat_penalty": b.repeat_penalty, "repeat_last_n": b.last_n, "presence_penalty": b.presence_penalty,
                "frequency_penalty": b.frequency_penalty, "stop": list(b.stop), "stream": b.stream,
                "cache_prompt": b.cache_prompt, "samplers": list(b.samplers) if b.samplers is not None else
                ["penalties", "top_k", "top_p", "min_p", "temperature"], "n_indent": b.n_indent,
                "t_max_prompt_ms": b.t_max_prompt_ms, "t_max_predict_ms": b.t_max_predict_ms}

    def timings(seq, e: Event, started: float) -> dict:
        """The engine's timings when it gives them; else measured here from the sequence's timestamps."""
        given = getattr(e, "timings", None)
        if given:
            return Timings(**given).model_dump()
        now = time.perf_counter()
        first = seq.first_token_at or now
        prompt_n, prompt_ms = len(seq.job.prompt), max((first - started) * 1e3, 1e-6)
        n_gen, gen_ms = len(seq.request.tokens), max((now - first) * 1e3, 1e-6)
        return Timings(prompt_n=prompt_n, prompt_ms=round(prompt_ms, 3),
                       prompt_per_token_ms=round(prompt_ms / max(prompt_n, 1), 3),
                       prompt_per_second=round(prompt_n / prompt_ms * 1e3, 3), predicted_n=n_gen,
                       predicted_ms=round(gen_ms, 3), predicted_per_token_ms=round(gen_ms / max(n_gen, 1), 3),
                       predicted_per_second=round(n_gen / gen_ms * 1e3, 3) if n_gen else 0.0).model_dump()

    def result(seq, e: Event, content: str, b: LlamaCppSampling, s: SamplingRequest, started: float,
               truncated: bool, prompt_text: str) -> dict:
        stop_type = _STOP_TYPES.get(e.stop_kind or "", "none")
        text = e.completion.text if e.completion is not None else ""
        return {"index": 0, "content": content, "tokens": [], "id_slot": slot_of(seq, e),
                "stop": True, "model": config.model_name, "tokens_predicted": len(seq.request.tokens),
                "tokens_evaluated": len(seq.job.prompt), "tokens_cached": getattr(e, "tokens_cached", 0) or 0,
                "generation_settings": settings(b, s), "prompt": prompt_text, "has_new_line": "\n" in text,
                "truncated": truncated, "stop_type": stop_type, "stopping_word": "",
                "stopped_eos": stop_type == "eos", "stopped_word": stop_type == "word",
                "stopped_limit": stop_type == "limit", "timings": timings(seq, e, started)}

    async def answer(request: Request, job: _Job, b: LlamaCppSampling, started: float, truncated: bool,
                     prompt_text: str, param: str) -> Response:
        s, options = sampling(b, n_predict(b, job, param))
        seqs, events = serving.submit([job], s, **options)
        seq = seqs[0]
        if not b.stream:
            final = (await serving.collect(request, seqs, events, started))[0]
            reply = result(seq, final, final.completion.text, b, s, started, truncated, prompt_text)
            return JSONResponse(select_fields(reply, b.response_fields) if b.response_fields else reply)

        async def gen() -> AsyncIterator[str]:
            async for _, e in serving.events_of(request, seqs, events, started, watch_disconnect=False):
                if e.error:
                    yield sse(APIError(500, e.error, type="server_error", code="generation_failed").body())
                    continue
                if e.text:
                    yield sse({"index": 0, "content": e.text, "tokens": list(e.tokens), "stop": False,
                               "id_slot": slot_of(seq, e)})
                if e.done:
                    yield sse(result(seq, e, "", b, s, started, truncated, prompt_text))
        return stream_response(gen())

    # ---- POST /completion ------------------------------------------------------------------------------
    @router.post("/completion")
    async def completion(request: Request):
        started = time.perf_counter()
        b = parse(CompletionBody, await serving.body(request))
        job = hand_made_fim(await off_loop(completion_job, serving, b.prompt), tok)
        return await answer(request, job, b, started, False, b.prompt if isinstance(b.prompt, str) else "", "prompt")

    # ---- POST /infill ----------------------------------------------------------------------------------
    @router.post("/infill")
    async def infill(request: Request):
        started = time.perf_counter()
        body = await serving.body(request)
        if not tok.supports_infilling:
            raise APIError(400, f"model {config.model_name!r} cannot infill: its tokenizer has no FIM pieces",
                           code="infilling_unsupported")
        b = parse(InfillBody, body)
        # Other files as context: prepended to the prefix (Code Llama's format has no repository tokens).
        context = "".join(f"--- {c.filename or 'snippet'} ---\n{c.text}\n" for c in b.input_extra)
        # Text already typed after the cursor's prefix (``prompt``): the middle goes on from it.
        typed = tok.encode_infilling(b.prompt) if b.prompt else []
        wanted = serving.cap if b.n_predict == -1 else b.n_predict
        budget = engine.context - max(1, min(wanted, engine.context // 4)) - len(typed)
        try:
            job, truncated = await off_loop(truncated_infill_job, serving.llama, context + b.input_prefix,
                                            b.input_suffix, budget)
        except CodeLlamaError as e:
            raise APIError(400, str(e), param="input_prefix") from None
        if typed:
            job = _Job(prompt=job.prompt + typed, decode=tok.decode_infilling, context=typed,
                       echo_text=job.echo_text, echo_suffix=job.echo_suffix, banned=job.banned)
        return await answer(request, job, b, started, truncated, "", "input_prefix")

    # ---- tokens ------------------------------------------------------------------------------------------
    @router.post("/tokenize")
    async def tokenize(request: Request):
        b = parse(TokenizeBody, await serving.body(request))
        ids = await off_loop(tok.encode, b.content, bos=b.add_special)
        # A JSONResponse, not a dict: FastAPI would walk a returned dict with jsonable_encoder, which takes a
        # second for the million ids of a 4 MiB body and blocks every other request meanwhile.
        if not b.with_pieces:
            return JSONResponse({"tokens": ids})
        return JSONResponse({"tokens": [{"id": i, "piece": piece_of(tok, i)} for i in ids]})

    @router.post("/detokenize")
    async def detokenize(request: Request):
        b = parse(DetokenizeBody, await serving.body(request))
        vocab = serving.llama.config.vocab_size
        if any(not 0 <= t < vocab for t in b.tokens):
            raise bad("tokens", f"token ids must be in [0, {vocab})")
        return {"content": tok.decode(b.tokens)}

    # ---- server state ------------------------------------------------------------------------------------
    @router.get("/props")
    async def props():
        # The engine's context, slots and default settings, and what this server adds about the model.
        return engine.props() | {"model_alias": config.model_name, "chat_template": "",
                                 "infill": tok.supports_infilling, "modalities": {"vision": False, "audio": False},
                                 "build_info": "codellama"}

    @router.get("/slots")
    async def slots():
        return engine.slots()

    @router.get("/metrics")
    async def prometheus():
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE)

    return router


def probes_router(serving: Serving) -> APIRouter:
    """Health probes: no API key needed (a load balancer has none)."""
    router = APIRouter()

    @router.get("/health")
    @router.get("/v1/health")
    async def health():
        engine = serving.engine
        ok = engine.running
        body = {"status": "ok" if ok else "unavailable", "slots_idle": engine.max_batch_size - engine.active,
                "slots_processing": engine.active, "queue_depth": engine.queue_depth}
        return JSONResponse(body, status_code=200 if ok else 503)

    return router


def completion_job(serving: Serving, prompt: str | list[int | str]) -> _Job:
    """``/completion``'s prompt: text (BOS first, as ``CodeLlama.complete``) or token ids, possibly mixed with
    text pieces (llama.cpp's form; BOS only when it starts with text)."""
    llama, tok = serving.llama, serving.tokenizer
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "prompt is empty: give the text to continue")
        try:
            return build_job(llama, "complete", prompt=prompt)
        except CodeLlamaError as e:
            raise APIError(400, str(e), param="prompt") from None
    ids: list[int] = [tok.bos_id] if prompt and isinstance(prompt[0], str) else []
    for part in prompt:
        ids += tok.encode(part) if isinstance(part, str) else [part]
    vocab = llama.config.vocab_size
    if not ids:
        raise bad("prompt", "prompt is empty: give the text or token ids to continue")
    if any(not 0 <= t < vocab for t in ids):
        raise bad("prompt", f"prompt token ids must be in [0, {vocab})")
    return _Job(prompt=ids, decode=tok.decode, context=_context(ids), echo_text=tok.decode(ids),
                banned=banned_ids(tok, "complete"))


def slot_of(seq, e: Event) -> int:
    """The slot (KV-cache row) running ``seq``: the engine names it on the final event; the row before that."""
    slot = getattr(e, "id_slot", None)
    return slot if slot is not None else (seq._row if seq._row is not None else -1)


def piece_of(tok, token: int) -> str | list[int]:
    """A token's text for ``/tokenize`` ``with_pieces``: a byte piece that is not a whole character is its
    byte list, as llama.cpp gives invalid UTF-8."""
    text = token_text(tok, token)
    if text.startswith("bytes:\\x"):
        return [int(text[-2:], 16)]
    return text


def select_fields(reply: dict, fields: list[str]) -> dict:
    """llama.cpp's ``response_fields``: the named fields only; a path ``a/b`` (or ``a.b``) is looked up
    inside ``a`` and kept at the top level under its full path; missing ones are left out."""
    out: dict[str, Any] = {}
    for path in fields:
        value: Any = reply
        for key in path.replace(".", "/").split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            out[path] = value
    return out
