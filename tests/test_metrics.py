"""pass@k against brute force, edit similarity, exact match."""

from __future__ import annotations

import itertools
import math

import pytest

from codellama.errors import CodeLlamaError
from codellama.evaluation.metrics import (edit_similarity, exact_match, levenshtein, mean_pass_at_k, pass_at_k)


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c correct) that contain at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_known_values_and_stability():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    # n = 200 (the paper's pass@100 setting): binomials of this size overflow floats; the product form does not.
    exact = 1 - math.comb(200 - 7, 100) / math.comb(200, 100)
    assert pass_at_k(200, 7, 100) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(CodeLlamaError, match="at least 10 samples"):
        pass_at_k(5, 1, 10)
    with pytest.raises(CodeLlamaError, match="cannot exceed"):
        pass_at_k(3, 4, 1)
    with pytest.raises(CodeLlamaError, match="k must be"):
        pass_at_k(3, 1, 0)


def test_mean_pass_at_k_skips_k_larger_than_samples():
    out = mean_pass_at_k([(2, 1), (2, 0), (2, 2)], [1, 2, 10])
    assert out == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx((1 + 0 + 1) / 3)}


def test_levenshtein_and_edit_similarity():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("", "abcd") == 0.0
    assert edit_similarity("    return x", "    return y") == pytest.approx(1 - 1 / 12)


def test_exact_match_ignores_only_trailing_whitespace_and_line_endings():
    assert exact_match("    return x  \r\n", "    return x")
    assert not exact_match("   return x", "    return x")  # indentation is code
    assert not exact_match("return x", "return y")
