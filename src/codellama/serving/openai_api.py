"""The OpenAI protocol: ``/v1/completions`` (``suffix`` = infilling), ``/v1/chat/completions``, ``/v1/models``
and ``/v1/models/{id}``, also without the ``/v1`` prefix (llama.cpp serves both).

Semantics where OpenAI, vLLM and llama.cpp differ, chosen as vLLM does:
- ``model``: absent, null or empty is the served model; a name other than the served name (``--name``, else
  the checkpoint's name) is a 404 ``model_not_found``;
- a prompt for which prompt + ``max_tokens`` exceeds the context is a 400 ``context_length_exceeded``, with or
  without ``suffix`` (the output is never cut silently); without ``max_tokens`` the completion is at most the
  default (16 for completions, the rest of the context for chat) and stops at the end of the context;
- ``max_tokens: -1`` is "no limit" (llama.cpp's convention): up to the end of the context;
- ``presence_penalty`` / ``frequency_penalty`` (OpenAI, [-2, 2]) and ``repetition_penalty`` (vLLM, HF's
  multiplicative penalty) count the whole sequence, prompt included (``penalty_last_n = -1``), and ``min_p``."""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..errors import CodeLlamaError
from ..formats import banned_ids
from ..generation import _context, _Job
from .core import Serving, hand_made_fim, off_loop, penalty_options, sse, stream_response
from .errors import APIError
from .models import parse
from .openai_models import (AssistantMessage, ChatChoice, ChatCompletionResponse, ChatRequest, CompletionChoice,
                            CompletionRequest, CompletionResponse, OpenAISampling)
from .openai_models import sampling as openai_sampling
from .schema import SamplingRequest, bad, refuse_unsupported
from .sequences import Event, build_job, token_text


def openai_router(serving: Serving) -> APIRouter:
    router = APIRouter()
    tok, config = serving.tokenizer, serving.config

    def request_of(model: type[OpenAISampling], body: dict) -> Any:
        # Refused rather than ignored (logit_bias, tools...) before the fields are checked.
        refuse_unsupported(body)
        req = parse(model, body)
        if req.model and req.model not in serving.model_names:
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
        return req

    def sampling(req: OpenAISampling, **kwargs: Any) -> SamplingRequest:
        return openai_sampling(req, cap=serving.cap, max_n=config.max_n, **kwargs)

    def lengths(jobs: list[_Job], s: SamplingRequest, param: str) -> list[int]:
        """Each job's completion length: as asked (400 if it does not fit), else as much as fits."""
        out = []
        for job in jobs:
            serving.check_context(job, param, s.max_tokens if s.max_tokens_given else 0)
            out.append(s.max_tokens if s.max_tokens_given else s.max_tokens_for(serving.room(job)))
        return out

    def options(s: SamplingRequest) -> dict[str, Any]:
        return penalty_options(repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
                               frequency_penalty=s.frequency_penalty, penalty_last_n=-1, min_p=s.min_p)

    def usage(seqs, n: int) -> dict:
        # The prompt is counted once per prompt, not once per choice (as OpenAI does).
        prompt = sum(len(seqs[i].job.prompt) for i in range(0, len(seqs), n))
        completion = sum(len(seqs[i].request.tokens) for i in range(len(seqs)))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- completion logprobs (OpenAI legacy format) ------------------------------------------------------
    def completion_logprobs(tokens: list[int], lps: list[float], tops: list[list[tuple[int, float]]],
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
            return completion_logprobs(seq.job.prompt + r.tokens, r.prompt_token_logprobs + r.token_logprobs,
                                       seq.prompt_top + seq.generated_top, 0, first_is_prompt_start=True)
        return completion_logprobs(r.tokens, r.token_logprobs, seq.generated_top, 0)

    # ---- POST /v1/completions ------------------------------------------------------------------------
    @router.post("/v1/completions")
    @router.post("/completions")
    async def completions(request: Request):
        started = time.perf_counter()
        req = request_of(CompletionRequest, await serving.body(request))
        s = sampling(req, max_tokens=req.max_tokens, max_tokens_default=16)
        echo, stream, logprobs, suffix = req.echo, req.stream, req.logprobs, req.suffix
        usage_chunk = req.include_usage
        prompts = req.prompt
        serving.check_sequences(len(prompts) * s.n, "prompt")
        jobs = []
        for p in prompts:
            try:
                if isinstance(p, str):
                    jobs.append(await off_loop(build_job, serving.llama, "infill" if suffix is not None
                                               else "complete", prompt=p, suffix=suffix or "", echo=echo))
                else:
                    if suffix is not None:
                        raise APIError(400, "suffix needs a text prompt, not token ids", param="suffix")
                    if min(p) < 0 or max(p) >= serving.llama.config.vocab_size:
                        raise bad("prompt", f"prompt token ids must be in [0, {serving.llama.config.vocab_size})")
                    jobs.append(_Job(prompt=list(p), decode=tok.decode, context=_context(list(p)),
                                     echo_text=tok.decode(list(p)), banned=banned_ids(tok, "complete")))
            except CodeLlamaError as e:
                raise APIError(400, str(e), param="suffix" if suffix is not None else "prompt") from None
            if suffix is None:
                jobs[-1] = hand_made_fim(jobs[-1], tok)
        seqs, events = serving.submit(jobs, s, max_tokens=lengths(jobs, s, "prompt"), logprobs=logprobs,
                                      echo=echo, **options(s))
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": config.model_name,
                    "choices": choices, **extra}

        if not stream:
            finals = await serving.collect(request, seqs, events, started)
            choices = [CompletionChoice(text=f.completion.text, index=i, logprobs=final_completion_logprobs(seqs[i]),
                                        finish_reason=f.completion.finish_reason) for i, f in enumerate(finals)]
            reply = CompletionResponse(id=cid, created=created, model=config.model_name, choices=choices,
                                       usage=usage(seqs, s.n))
            return JSONResponse(reply.model_dump())

        async def gen() -> AsyncIterator[str]:
            text_len = [0] * len(seqs)
            echoed = [not echo] * len(seqs)
            finals: list[Event | None] = [None] * len(seqs)
            async for i, e in serving.events_of(request, seqs, events, started, watch_disconnect=False):
                if not echoed[i]:
                    # The prompt goes first, once the prefill has scored it (its first event comes after).
                    echoed[i], seq = True, seqs[i]
                    lp = None
                    if logprobs is not None:
                        lp = completion_logprobs(seq.job.prompt, seq.request.prompt_token_logprobs,
                                                 seq.prompt_top, 0, first_is_prompt_start=True)
                    text_len[i] = len(seq.job.echo_text)
                    yield sse(chunk([{"text": seq.job.echo_text, "index": i, "logprobs": lp, "finish_reason": None}]))
                if e.error:
                    yield sse(APIError(500, e.error, type="server_error", code="generation_failed").body())
                    continue
                lp = None
                if logprobs is not None and e.tokens:
                    lp = completion_logprobs(e.tokens, e.logprobs, e.top, text_len[i])
                text = e.text + (seqs[i].job.echo_suffix if e.done and echo else "")
                text_len[i] += len(text)
                if e.done:
                    finals[i] = e
                if text or lp or e.done:
                    yield sse(chunk([{"text": text, "index": i, "logprobs": lp,
                                      "finish_reason": e.completion.finish_reason if e.done else None}]))
            if usage_chunk and all(f is not None and f.completion for f in finals):
                yield sse(chunk([], usage=usage(seqs, s.n)))
            yield "data: [DONE]\n\n"
        return stream_response(gen())

    # ---- POST /v1/chat/completions -------------------------------------------------------------------
    @router.post("/v1/chat/completions")
    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        req = request_of(ChatRequest, await serving.body(request))
        given = req.max_completion_tokens is not None
        s = sampling(req, max_tokens=req.max_completion_tokens if given else req.max_tokens, max_tokens_default=None,
                     max_tokens_name="max_completion_tokens" if given else "max_tokens")
        stream, want_lp, top_n = req.stream, req.logprobs, req.top_logprobs
        if top_n is not None and not want_lp:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        usage_chunk = req.include_usage
        try:
            job = await off_loop(build_job, serving.llama, "chat", messages=req.chat_messages())
        except CodeLlamaError as e:
            raise APIError(400, str(e), param="messages") from None
        seqs, events = serving.submit([job], s, max_tokens=lengths([job], s, "messages"),
                                      logprobs=(top_n or 0) if want_lp else None, **options(s))
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": cid, "object": "chat.completion.chunk" if stream else "chat.completion",
                    "created": created, "model": config.model_name, "choices": choices, **extra}

        def chat_logprobs(tokens, lps, tops) -> dict:
            def entry(t: int, lp: float) -> dict:
                return {"token": token_text(tok, t), "logprob": lp, "bytes": list(_token_bytes(tok, t))}
            return {"content": [entry(t, lp) | {"top_logprobs": [entry(i, v) for i, v in alts]}
                                for t, lp, alts in zip(tokens, lps, tops)]}

        if not stream:
            finals = await serving.collect(request, seqs, events, started)
            choices = []
            for i, f in enumerate(finals):
                r = seqs[i].request
                lp = chat_logprobs(r.tokens, r.token_logprobs, seqs[i].generated_top) if want_lp else None
                choices.append(ChatChoice(index=i, message=AssistantMessage(content=f.completion.text), logprobs=lp,
                                          finish_reason=f.completion.finish_reason))
            reply = ChatCompletionResponse(id=cid, created=created, model=config.model_name, choices=choices,
                                           usage=usage(seqs, s.n))
            return JSONResponse(reply.model_dump())

        async def gen() -> AsyncIterator[str]:
            for i in range(len(seqs)):
                yield sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]))
            finals: list[Event | None] = [None] * len(seqs)
            async for i, e in serving.events_of(request, seqs, events, started, watch_disconnect=False):
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
                yield sse(chunk([], usage=usage(seqs, s.n)))
            yield "data: [DONE]\n\n"
        return stream_response(gen())

    # ---- models ----------------------------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": serving.started_at, "owned_by": "codellama",
                "context_length": serving.engine.context, "infilling": tok.supports_infilling}

    @router.get("/v1/models")
    @router.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{model_id:path}")
    @router.get("/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in serving.model_names:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    return router


def _token_bytes(tok, token: int) -> bytes:
    piece = tok.id_to_piece(token)
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")
