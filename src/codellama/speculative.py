"""Speculative decoding: a small draft model proposes ``k`` tokens, the target scores all of them in one
forward of ``k + 1`` positions over its KV cache, and the longest acceptable prefix plus one token of the
target's own is kept (Leviathan et al. 2023, Chen et al. 2023; what gpt-fast and vLLM call speculative
decoding with a draft model).

Exactness. Greedy: a proposal is kept only when it is the target's argmax at its position, and the first
disagreement is replaced by the target's argmax, so the output is the target's greedy output (up to float
rounding: the target scores ``k + 1`` positions in one product instead of one at a time). Sampling: proposal
``x ~ q`` is kept with probability ``min(1, p(x) / q(x))``; on rejection the token is drawn from
``norm(max(0, p - q))``; when all ``k`` are kept a bonus token is drawn from ``p``. Every emitted token is then
distributed exactly as ``p``, the target's distribution after the request's own sampling transforms
(penalties over the history so far, banned ids, temperature, top-k, top-p, min-p, llama.cpp's sampler order),
computed with sampling.py's functions, so it is the distribution plain ``generation.run`` samples from. The
rule holds for any ``q``, which is what makes the vocabulary handling below safe.

Vocabulary. Code Llama 7B/13B/70B checkpoints have 32016 ids (the FIM pieces), 34B has 32000. The draft's
distribution covers only the first ``min(V_draft, V_target)`` ids: a target id the draft lacks has ``q = 0``
(the residual ``max(0, p - q)`` is then ``p`` there, so the target can still emit it, e.g. ``EOT`` while
infilling with a 34B-style draft), and draft ids beyond the target's vocabulary are never proposed. A prompt
id the draft lacks (an FIM sentinel) reaches the draft as ``<unk>``: that only lowers acceptance. The two
tokenizers must agree on every common id (``check_draft``).

Batches run request by request (each with batch-1 caches): verifying different accepted lengths per row would
need per-row cache lengths, which ``KVCache`` does not have. Rolling back a rejected suffix is setting
``KVCache.length`` back: later writes overwrite the stale slots and no query ever attends past ``length``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import Tensor

from .errors import CodeLlamaError
from .generation import (DEFAULT_PREFILL_CHUNK, GenerationResult, Request, _gather_prompt_logprobs,
                         accept_token, check_request, decoder_for, forward_step, make_requests,
                         resolve_kv_cache_dtype, will_pack)
from .model import KVCache, Transformer, rope_angles
from .sampling import SamplingParams, adjust_logits, filtered_probs, min_p_filter, ordered_probs, token_logprobs

if TYPE_CHECKING:
    from .api import CodeLlama

DEFAULT_K = 4
UNK_ID = 0  # what the draft sees in place of a prompt id outside its vocabulary (SentencePiece's <unk>)


@dataclass
class SpeculativeStats:
    """What speculation did for one request. ``target_forwards`` counts the target's verify forwards (one
    per round; the prompt's prefill is not counted), ``draft_forwards`` the draft's decode forwards."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    tokens: int = 0  # tokens emitted (accepted proposals + the target's own, stop tokens included)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"proposed": self.proposed, "accepted": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4), "rounds": self.rounds,
                "target_forwards": self.target_forwards, "draft_forwards": self.draft_forwards,
                "tokens_per_round": round(self.tokens / self.rounds, 3) if self.rounds else 0.0}

    def add(self, other: "SpeculativeStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


# ==== checks =========================================================================================
def check_k(k: Any) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise CodeLlamaError(f"speculative_k must be an integer >= 1, got {k!r}")
    return k


def check_draft(target: "CodeLlama", draft: "CodeLlama") -> None:
    """Refuse a draft whose tokenizer differs from the target's on any id both have (the piece strings are
    compared, so bos/eos and byte pieces are covered; extra trailing ids such as FIM pieces are allowed)."""
    tt, td = target.tokenizer, draft.tokenizer
    common = min(tt.n_words, td.n_words)
    for i in range(common):
        a, b = tt.id_to_piece(i), td.id_to_piece(i)
        if a != b:
            raise CodeLlamaError(f"the draft's tokenizer differs from the target's (id {i} is {b!r} in the draft, "
                                 f"{a!r} in the target): a draft must share the target's tokenizer")
    if draft.device != target.device:
        raise CodeLlamaError(f"the draft is on {draft.device} but the target on {target.device}; load both on one device")


# ==== distributions ==================================================================================
def _distribution(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution ``sampling.sample_row`` draws from, for already adjusted logits [V]."""
    if params.samplers is not None:
        return ordered_probs(logits, params)
    probs = filtered_probs(logits, params.temperature, params.top_k, params.top_p)
    return min_p_filter(probs, params.min_p) if params.min_p > 0.0 else probs


def _adjusted(logits: Tensor, request: Request, params: SamplingParams, extra: list[int]) -> Tensor:
    """``logits`` [V] after banned ids and penalties, the history being the request's tokens plus ``extra``
    (the proposals before this position), exactly as a plain step at that position would see it."""
    if not params.adjusts_logits:
        return logits
    window = dataclasses.replace(request, tokens=request.tokens + extra).penalty_window() if params.penalized else ()
    return adjust_logits(logits, window, params)


# ==== one request ===================================================================================
@dataclass
class _Model:
    """One side (target or draft) of a request: its model, decoder, cache and RoPE table."""

    model: Transformer
    dec: Any
    cache: KVCache
    rope: tuple[Tensor, Tensor]

    @classmethod
    def start(cls, model: Transformer, size: int, pack: bool | None, kv_dtype: torch.dtype | None) -> "_Model":
        device, dtype = model.output.weight.device, model.output.weight.dtype
        cache = KVCache.for_model(model, 1, size, device=device, dtype=kv_dtype or dtype)
        cos, sin = rope_angles(torch.arange(size, device=device).unsqueeze(0), model.config.head_dim,
                               model.config.rope_theta)
        return cls(model, decoder_for(model, will_pack(model, pack, cache.nbytes())), cache, (cos[0], sin[0]))

    def forward(self, ids: list[int], last_only: bool = True) -> Tensor:
        """Feed ``ids`` at the next cache slots; logits [T or 1, V] (float32)."""
        device = self.cache.k.device
        start = self.cache.length
        tokens = torch.tensor([ids], device=device)
        positions = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
        return forward_step(self.model, self.dec, tokens, positions, self.cache, self.rope, False,
                            last_only=last_only, decode=len(ids) == 1)[0]


def _speculate(index: int, r: Request, target: _Model, draft: _Model, k: int, prefill_chunk: int,
               stats: SpeculativeStats) -> Iterator[list[tuple[int, int]]]:
    """Generate for one request; yields ``[(index, token)]`` once per appended token, so a caller that
    finishes the request between two yields (stop strings) stops it exactly where plain ``run`` would."""
    device = target.cache.k.device
    v_target, v_draft = target.model.config.vocab_size, draft.model.config.vocab_size
    common = min(v_target, v_draft)
    params = r.sampling
    # The draft's copy of the transforms: banned ids it cannot index are simply absent from its vocabulary.
    draft_params = dataclasses.replace(params, banned_ids=tuple(i for i in params.banned_ids if i < common))
    seq = list(r.prompt)  # prompt + emitted; the last one is always "pending" (not yet in the target's cache)

    def to_draft(ids: Sequence[int]) -> list[int]:
        return [t if t < v_draft else UNK_ID for t in ids]

    # Prefill everything but the last prompt token: a round starts by feeding the pending token. Its logits
    # score prompt tokens 1..P-1, every prompt logprob plain prefill reports.
    r.prompt_token_logprobs = [0.0] if r.prompt_logprobs else []
    prompt = torch.tensor([r.prompt], device=device)
    for start in range(0, len(seq) - 1, prefill_chunk):
        end = min(start + prefill_chunk, len(seq) - 1)
        logits = target.forward(seq[start:end], last_only=not r.prompt_logprobs)
        if r.prompt_logprobs:
            _gather_prompt_logprobs([r], logits.unsqueeze(0), prompt, start, end, len(seq))
        draft.forward(to_draft(seq[start:end]))
    while not r.finished:
        room = r.max_new_tokens - len(r.tokens)
        k_round = min(k, room - 1)  # never propose past the budget: the caches hold exactly the budget
        # ---- draft: k proposals, one forward each (the first one also feeds what the draft has not seen)
        proposals: list[int] = []
        q_rows: list[Tensor] = []
        if k_round > 0:
            ids = to_draft(seq[draft.cache.length:])
            for j in range(k_round):
                row = draft.forward(ids)[-1][:common].to(device)
                stats.draft_forwards += 1
                row = _adjusted(row, r, draft_params, proposals)
                if params.greedy:
                    tok = int(torch.argmax(row).item())
                else:
                    q = _distribution(row, draft_params)
                    tok = int(torch.multinomial(q, 1, generator=r.generator).item())
                    q_rows.append(q)
                proposals.append(tok)
                ids = [tok]
        # ---- target: one forward over the pending token and the proposals
        logits = target.forward([seq[-1]] + proposals, last_only=False)
        stats.rounds += 1
        stats.target_forwards += 1
        stats.proposed += k_round
        emitted = _verify(r, params, logits, proposals, q_rows, v_target)
        accepted = len(emitted) - 1
        stats.accepted += accepted
        # ---- roll both caches back to the kept prefix: the pending token and the accepted proposals
        base = len(seq) - 1
        target.cache.length = base + 1 + accepted
        draft.cache.length = min(draft.cache.length, base + 1 + accepted)
        seq.extend(emitted)
        lps = token_logprobs(logits[:len(emitted)], emitted) if r.logprobs else [None] * len(emitted)
        for tok, lp in zip(emitted, lps):
            if r.finished:  # finished by the caller (a stop string) between two tokens
                return
            stats.tokens += 1
            if accept_token(r, tok, lp):
                yield [(index, tok)]


def _verify(r: Request, params: SamplingParams, logits: Tensor, proposals: list[int], q_rows: list[Tensor],
            vocab: int) -> list[int]:
    """The accepted proposals plus one token of the target's (the correction or the bonus token)."""
    if params.greedy and not params.penalized:
        # Banned ids do not depend on the position: one masked argmax over every row, one host transfer.
        rows = logits[:len(proposals) + 1]
        if params.banned_ids:
            rows = rows.clone()
            rows[:, list(params.banned_ids)] = float("-inf")
        best = rows.argmax(dim=-1).tolist()
        n = next((j for j, x in enumerate(proposals) if best[j] != x), len(proposals))
        return proposals[:n] + [best[n]]
    kept: list[int] = []
    for j, x in enumerate(proposals):
        row = _adjusted(logits[j], r, params, proposals[:j])
        if params.greedy:
            best = int(torch.argmax(row).item())
            if best != x:
                return kept + [best]
        else:
            p = _distribution(row, params)
            q = torch.zeros(vocab, device=p.device)
            q[:q_rows[j].shape[0]] = q_rows[j]
            u = torch.rand((), generator=r.generator, device=p.device)
            if u * q[x] >= p[x]:  # rejected: u >= p(x)/q(x) (never divides by q; p(x) = 0 always rejects)
                residual = (p - q).clamp_(min=0)
                if float(residual.sum()) <= 0.0:  # p == q up to rounding: the residual is p itself
                    residual = p
                return kept + [int(torch.multinomial(residual, 1, generator=r.generator).item())]
        kept.append(x)
    row = _adjusted(logits[len(proposals)], r, params, proposals)
    if params.greedy:
        return kept + [int(torch.argmax(row).item())]
    return kept + [int(torch.multinomial(_distribution(row, params), 1, generator=r.generator).item())]


# ==== the engine =====================================================================================
def run(target: Transformer, draft: Transformer, requests: list[Request], *, k: int = DEFAULT_K,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK, pack: bool | None = None,
        kv_cache_dtype: str | torch.dtype | None = None, draft_kv_cache_dtype: str | torch.dtype | None = None,
        ) -> tuple[Iterator[list[tuple[int, int]]], list[SpeculativeStats]]:
    """Speculative counterpart of ``generation.run``: the steps iterator (each yield appends one token to one
    request, requests one after another) and each request's ``SpeculativeStats``, filled as it runs. The
    target's admission checks (context, memory, ``max_new_tokens`` capped to the context) run here, before
    anything is allocated."""
    check_k(k)
    t_kv = resolve_kv_cache_dtype(kv_cache_dtype, target.output.weight.dtype)
    d_kv = resolve_kv_cache_dtype(draft_kv_cache_dtype, draft.output.weight.dtype)
    budgets, pack = check_request(target, [r.prompt for r in requests], max(r.max_new_tokens for r in requests),
                                  prefill_chunk, pack, any(r.prompt_logprobs for r in requests), t_kv)
    for r, b in zip(requests, budgets):
        r.max_new_tokens = min(r.max_new_tokens, b)
    stats = [SpeculativeStats() for _ in requests]
    return _run(target, draft, requests, k, prefill_chunk, pack, t_kv, d_kv, stats), stats


@torch.inference_mode()
def _run(target: Transformer, draft: Transformer, requests: list[Request], k: int, prefill_chunk: int,
         pack: bool, t_kv: torch.dtype | None, d_kv: torch.dtype | None,
         stats: list[SpeculativeStats]) -> Iterator[list[tuple[int, int]]]:
    for i, r in enumerate(requests):
        # The plain engine's cache size: the last emitted token is never fed (see k_round in _speculate).
        size = len(r.prompt) + r.max_new_tokens - 1
        t = _Model.start(target, size, pack, t_kv)
        d = _Model.start(draft, size, None, d_kv)
        yield from _speculate(i, r, t, d, k, prefill_chunk, stats[i])
        r.finish("length")


def generate(target: Transformer, draft: Transformer, prompts: list[list[int]], *, k: int = DEFAULT_K,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop_ids: Sequence[int] = (), logprobs: bool = False,
             prompt_logprobs: bool = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
             kv_cache_dtype: str | torch.dtype | None = None, **sampling_options: Any,
             ) -> tuple[list[GenerationResult], list[SpeculativeStats]]:
    """``generation.generate`` with a draft: the same results (greedy: the same tokens; sampling: the same
    distribution, with ``seed + i`` seeding prompt ``i``'s stream) and each prompt's stats."""
    requests = make_requests(target, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, seed=seed, stop_ids=stop_ids, logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs, **sampling_options)
    steps, stats = run(target, draft, requests, k=k, prefill_chunk=prefill_chunk, kv_cache_dtype=kv_cache_dtype)
    for _ in steps:
        pass
    return [r.result() for r in requests], stats
