"""Choosing the next token: greedy, temperature, top-k and top-p (nucleus) sampling, seeded per sequence.

Everything here works on one decode step's logits and knows nothing about the batch it came from, so a
scheduler that adds and removes sequences between steps (continuous batching) can reuse it unchanged."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import CodeLlamaError


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens. ``temperature == 0`` is greedy (argmax); ``top_k == 0`` and
    ``top_p == 1`` disable those filters. ``seed`` makes sampling reproducible (``None``: drawn from torch's
    global generator, so ``torch.manual_seed`` still makes a run repeatable)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        validate_sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_sampling(*, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                      max_new_tokens: int | None = None) -> None:
    """Raise a one-line ``CodeLlamaError`` for any out-of-range sampling argument."""
    if not _is_number(temperature) or temperature < 0:
        raise CodeLlamaError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
        raise CodeLlamaError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise CodeLlamaError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise CodeLlamaError(f"seed must be a non-negative integer, got {seed!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool)
                                       or max_new_tokens < 1):
        raise CodeLlamaError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def make_generator(params: SamplingParams, device: torch.device | str = "cpu",
                   offset: int = 0) -> torch.Generator | None:
    """The random stream of one sequence (``None`` for greedy, which needs none).

    Sequence ``i`` of a batch gets ``seed + i``, so it samples exactly what it would alone with that seed,
    whatever else shares the batch."""
    if params.greedy:
        return None
    seed = params.seed
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    g = torch.Generator(device=device)
    g.manual_seed(seed + offset)
    return g


def filtered_probs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Probabilities [..., V] after temperature, then top-k, then top-p (float32)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
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


def sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for one sequence from its logits [V]."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    probs = filtered_probs(logits, params.temperature, params.top_k, params.top_p)
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
