"""Choosing the next token: repetition penalties and banned ids, then greedy, or temperature, top-k, top-p
(nucleus) and min-p sampling in Meta's / HF's order or llama.cpp's ``samplers`` order, seeded per sequence.

Everything here works on one decode step's logits and knows nothing about the batch it came from, so a
scheduler that adds and removes sequences between steps (continuous batching) can reuse it unchanged.

The maths is safe for every value ``validate_sampling`` accepts and for any logits, ``±inf`` and NaN
included: it runs in float32 with the maximum subtracted before dividing by the temperature (so the most
likely token scores exactly 0 and the probabilities sum to at least 1 before normalising), temperatures
below ``MIN_TEMPERATURE`` are greedy (dividing by 3e-38 would overflow), NaN logits count as impossible and
``top_k`` beyond the vocabulary is no filter. One sequence's odd parameters therefore cannot raise in the
middle of a batched step and fail the other sequences."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .errors import CodeLlamaError

# Below this a temperature is greedy: the distribution is a point mass on the argmax for any logits that a
# float32 model produces, and dividing by it would overflow.
MIN_TEMPERATURE = 1e-5
# Seeds are what a torch.Generator takes unsigned: [0, 2**64). Batch row i uses (seed + i) mod 2**64.
SEED_LIMIT = 2**64
_FLOAT32_MAX = torch.finfo(torch.float32).max
# Sampler names ``SamplingParams.samplers`` takes (llama.cpp's, for the samplers implemented here).
SAMPLERS = ("penalties", "top_k", "top_p", "min_p", "temperature")


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens. ``temperature == 0`` (or below ``MIN_TEMPERATURE``) is greedy
    (argmax); ``top_k == 0`` and ``top_p == 1`` disable those filters. ``seed`` (an integer in
    ``[0, 2**64)``) makes sampling reproducible (``None``: drawn from torch's global generator, so
    ``torch.manual_seed`` still makes a run repeatable)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    # Repetition control. ``repetition_penalty`` (HF / llama.cpp ``repeat_penalty``; 1 = off) divides positive
    # and multiplies negative logits of tokens seen in the window; ``presence_penalty`` / ``frequency_penalty``
    # (OpenAI; 0 = off) subtract a constant / ``count * penalty``. The window is the last ``penalty_last_n``
    # tokens of prompt + completion, as in llama.cpp (0: no penalties, -1: the whole sequence, as in HF).
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    # Token ids that are never chosen (the FIM sentinels in plain completion and chat).
    banned_ids: tuple[int, ...] = ()
    # llama.cpp's min_p: drop tokens less likely than ``min_p`` times the most likely one (0 = off).
    min_p: float = 0.0
    # llama.cpp's sampler order, names from ``SAMPLERS``. None: temperature, top_k, top_p, min_p (HF's order;
    # Meta's for the first three). Given, the filters run in that order and one left out does not run, as in
    # llama.cpp (so without "temperature" the distribution is the model's own, and without "penalties" no
    # penalty applies); "penalties" always runs first, on the raw logits, wherever it is listed. A
    # temperature of 0 is greedy whatever the order.
    samplers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        validate_sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)
        validate_penalties(repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                           frequency_penalty=self.frequency_penalty, penalty_last_n=self.penalty_last_n)
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise CodeLlamaError(f"min_p must be in [0, 1] (0 disables it), got {self.min_p!r}")
        if self.samplers is not None:
            if isinstance(self.samplers, str) or not isinstance(self.samplers, (list, tuple)):
                raise CodeLlamaError(f"samplers must be a list of names from {', '.join(SAMPLERS)}, "
                                     f"got {self.samplers!r}")
            unknown = [n for n in self.samplers if n not in SAMPLERS]
            if unknown:
                raise CodeLlamaError(f"unknown sampler {unknown[0]!r} (use {', '.join(SAMPLERS)})")
            object.__setattr__(self, "samplers", tuple(self.samplers))  # frozen: a list becomes hashable

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        if self.samplers is not None and "penalties" not in self.samplers:
            return False
        return self.penalty_last_n != 0 and (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                                             or self.frequency_penalty != 0.0)

    @property
    def adjusts_logits(self) -> bool:
        """Whether ``adjust_logits`` changes anything (if not, callers may skip it and batch the argmax)."""
        return self.penalized or bool(self.banned_ids)


def _is_number(x) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:  # an int beyond float's range
        return False


def validate_sampling(*, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                      max_new_tokens: int | None = None) -> None:
    """Raise a one-line ``CodeLlamaError`` for any out-of-range sampling argument."""
    if not _is_number(temperature) or temperature < 0:
        raise CodeLlamaError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
        raise CodeLlamaError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise CodeLlamaError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT):
        shown = seed if not isinstance(seed, int) or abs(seed) < 10**30 else f"an integer of {len(str(seed))} digits"
        raise CodeLlamaError(f"seed must be an integer in [0, 2**64), got {shown!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool)
                                       or max_new_tokens < 1):
        raise CodeLlamaError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def validate_penalties(*, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                       frequency_penalty: float = 0.0, penalty_last_n: int = 64) -> None:
    """Raise a one-line ``CodeLlamaError`` for an out-of-range penalty (OpenAI's range for presence/frequency)."""
    if not _is_number(repetition_penalty) or not 0.0 < repetition_penalty <= 100.0:
        raise CodeLlamaError(f"repetition_penalty must be in (0, 100] (1 disables it), got {repetition_penalty!r}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not _is_number(value) or not -2.0 <= value <= 2.0:
            raise CodeLlamaError(f"{name} must be in [-2, 2] (0 disables it), got {value!r}")
    if not isinstance(penalty_last_n, int) or isinstance(penalty_last_n, bool) or penalty_last_n < -1:
        raise CodeLlamaError(f"penalty_last_n must be an integer >= -1 (0 disables penalties, -1 means the whole "
                             f"sequence), got {penalty_last_n!r}")


def adjust_logits(logits: Tensor, history: Sequence[int] | Tensor, params: SamplingParams) -> Tensor:
    """One sequence's next-token logits [V] (float32) after its banned ids and repetition penalties.

    ``history`` is the sequence so far (prompt and completion), whole or already cut to its window
    (``Request.penalty_window``); the penalties look at its last ``penalty_last_n`` tokens. Returns ``logits``
    itself when there is nothing to do, else a new tensor."""
    if not params.adjusts_logits:
        return logits
    out = logits.float().clone()
    if params.penalized and len(history):
        window = torch.as_tensor(history, dtype=torch.long, device=out.device)
        if params.penalty_last_n > 0:
            window = window[-params.penalty_last_n:]
        window = window[(window >= 0) & (window < out.shape[-1])]
        ids, counts = torch.unique(window, return_counts=True)
        seen = out[ids]
        if params.repetition_penalty != 1.0:
            seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        seen = seen - counts.to(seen.dtype) * params.frequency_penalty - params.presence_penalty
        out[ids] = seen
    if params.banned_ids:
        out[list(params.banned_ids)] = float("-inf")
    return out


def make_generator(params: SamplingParams, device: torch.device | str = "cpu",
                   offset: int = 0) -> torch.Generator | None:
    """The random stream of one sequence (``None`` for greedy, which needs none).

    Sequence ``i`` of a batch gets ``seed + i`` (mod 2**64), so it samples exactly what it would alone with
    that seed, whatever else shares the batch."""
    if params.greedy:
        return None
    seed = params.seed
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    g = torch.Generator(device=device)
    g.manual_seed((seed + offset) % SEED_LIMIT)
    return g


def filtered_probs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Probabilities [..., V] after temperature, then top-k, then top-p (float32, finite, each row sums to 1).

    NaN logits are impossible tokens and ``+inf`` the largest float; a row with no finite logit at all is
    uniform (there is nothing to prefer). ``temperature`` must be > 0 (callers send greedy rows to argmax)."""
    x = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=_FLOAT32_MAX, neginf=float("-inf"))
    top = x.amax(dim=-1, keepdim=True)
    # Subtracting the maximum first keeps every scaled logit <= 0 with the best exactly 0: exp never
    # overflows and the softmax denominator is >= 1, for any temperature.
    shifted = torch.where(top == float("-inf"), torch.zeros_like(x), x - top)
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(shifted, top_k, dim=-1).values[..., -1:]
        shifted = shifted.masked_fill(shifted < kth, float("-inf"))
    # A temperature beyond float32's range would be inf, and -inf / inf is NaN; it is uniform long before.
    scaled = shifted / min(max(float(temperature), MIN_TEMPERATURE), _FLOAT32_MAX)
    scaled = scaled.masked_fill(shifted == float("-inf"), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        probs = nucleus(probs, max(float(top_p), 0.0))
    return probs


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``, renormalised.

    Meta's semantics: a token stays if the mass of the tokens strictly more likely than it is <= top_p,
    so the token that crosses the threshold is kept and the most likely token always is."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before > top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def min_p_filter(probs: Tensor, min_p: float) -> Tensor:
    """Keep tokens at least ``min_p`` times as likely as the most likely one, renormalised (llama.cpp, HF)."""
    kept = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def ordered_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Probabilities [..., V] after ``params.samplers`` in their order, each acting on what the previous left:
    temperature scales the logits; top_k, top_p and min_p remove tokens (top_p and min_p judge the
    distribution at the current temperature, so a top_p listed before temperature sees the model's own)."""
    x = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=_FLOAT32_MAX, neginf=float("-inf"))
    top = x.amax(dim=-1, keepdim=True)
    x = torch.where(top == float("-inf"), torch.zeros_like(x), x - top)  # best is 0, as in filtered_probs
    impossible = x == float("-inf")
    for name in params.samplers or ():
        if name == "temperature":
            x = x / min(max(float(params.temperature), MIN_TEMPERATURE), _FLOAT32_MAX)
        elif name == "top_k" and 0 < params.top_k < x.shape[-1]:
            kth = torch.topk(x.masked_fill(impossible, float("-inf")), params.top_k, dim=-1).values[..., -1:]
            impossible = impossible | (x < kth)
        elif name in ("top_p", "min_p"):
            probs = torch.softmax(x.masked_fill(impossible, float("-inf")), dim=-1)
            if name == "top_p" and params.top_p < 1.0:
                impossible = impossible | (nucleus(probs, float(params.top_p)) == 0)
            elif name == "min_p" and params.min_p > 0.0:
                impossible = impossible | (min_p_filter(probs, float(params.min_p)) == 0)
    return torch.softmax(x.masked_fill(impossible, float("-inf")), dim=-1)


def sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for one sequence from its logits [V]."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    if params.samplers is not None:
        probs = ordered_probs(logits, params)
    else:
        probs = filtered_probs(logits, params.temperature, params.top_k, params.top_p)
        if params.min_p > 0.0:
            probs = min_p_filter(probs, params.min_p)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample(logits: Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """Next tokens for a batch of logits [B, V]; each row has its own parameters and random stream."""
    if all(p.greedy for p in params):
        # One batched argmax and one host transfer: the common (evaluation, benchmark) case.
        return logits.argmax(dim=-1).tolist()
    return [sample_row(logits[i], p, g) for i, (p, g) in enumerate(zip(params, generators))]


def token_logprobs(logits: Tensor, tokens: list[int]) -> list[float]:
    """log p(token) under the model's own distribution (temperature 1, unfiltered), one per row of [B, V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    index = torch.as_tensor(tokens, device=logits.device).view(-1, 1)
    return logp.gather(-1, index).view(-1).tolist()
