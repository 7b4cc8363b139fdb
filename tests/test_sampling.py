"""Sampling: argument validation, nucleus semantics (Meta's), top-k, seeding, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from codellama.errors import CodeLlamaError
from codellama.sampling import (SamplingParams, filtered_probs, make_generator, nucleus, sample, sample_row,
                                token_logprobs, validate_sampling)




@pytest.mark.parametrize("kwargs, word", [
    (dict(top_p=1.5), "top_p"), (dict(top_p=0.0), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(seed=-3), "seed"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=True), "max_new_tokens"),
])
def test_bad_values_are_one_line_errors(kwargs, word):
    with pytest.raises(CodeLlamaError, match=word) as e:
        validate_sampling(**kwargs)
    assert "\n" not in str(e.value)


def test_params_validate_on_construction():
    with pytest.raises(CodeLlamaError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=1.5)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy


def test_nucleus_keeps_the_token_that_crosses_the_threshold():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    # sorted: 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95
    assert torch.allclose(nucleus(probs, 0.7), torch.tensor([0.0, 0.625, 0.0, 0.375]))
    # mass before 0.3 is exactly 0.5, not more than top_p, so it stays (Meta's "> p" test)
    assert torch.allclose(nucleus(probs, 0.5), torch.tensor([0.0, 0.625, 0.0, 0.375]))
    assert torch.allclose(nucleus(probs, 0.4), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(nucleus(probs, 0.81), torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95)


def test_nucleus_matches_sort_cumsum_reference_on_random_rows():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(16, 100) * 3, dim=-1)
    for p in (0.1, 0.5, 0.9, 0.95):
        ours = nucleus(probs, p)
        for row, got in zip(probs, ours):
            values, order = row.sort(descending=True)
            keep = (values.cumsum(0) - values) <= p
            expected = torch.zeros_like(row)
            expected[order[keep]] = values[keep] / values[keep].sum()
            assert torch.allclose(got, expected, atol=1e-6)


def test_top_k_then_temperature():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    probs = filtered_probs(logits, temperature=1.0, top_k=2)
    expected = torch.softmax(torch.tensor([3.0, 2.0]), dim=0)
    assert torch.allclose(probs, torch.tensor([0.0, expected[0], expected[1], 0.0]))
    cold = filtered_probs(logits, temperature=0.5)
    assert torch.allclose(cold, torch.softmax(logits * 2, dim=0))


def test_greedy_is_argmax_and_needs_no_generator():
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 0.0, 4.9]])
    params = [SamplingParams(), SamplingParams()]
    assert make_generator(params[0]) is None
    assert sample(logits, params, [None, None]) == [1, 0]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    torch.manual_seed(1)
    logits = torch.randn(50)
    p = SamplingParams(temperature=1.0, seed=7)

    def draw(params, offset=0):
        g = make_generator(params, offset=offset)
        return [sample_row(logits, params, g) for _ in range(30)]

    assert draw(p) == draw(p)
    assert draw(p) != draw(SamplingParams(temperature=1.0, seed=8))
    # offset i is the stream of batch row i: the same as seeding with seed + i alone
    assert draw(p, offset=3) == draw(SamplingParams(temperature=1.0, seed=10))


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    g = make_generator(params)
    counts = torch.zeros(4)
    for _ in range(2000):
        counts[sample_row(logits, params, g)] += 1
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0] / 2000 - 0.625) < 0.04


def test_mixed_batch_rows_use_their_own_parameters():
    logits = torch.tensor([[0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1, seed=0)]
    assert sample(logits, params, [None, make_generator(params[1])]) == [1, 2]


def test_token_logprobs_are_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lp = token_logprobs(logits, [2, 1])
    assert lp[0] == pytest.approx(3.0 - math.log(math.e + math.e**2 + math.e**3), abs=1e-6)
    assert lp[1] == pytest.approx(-math.log(3.0), abs=1e-6)
