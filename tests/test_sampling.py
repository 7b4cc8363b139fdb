"""Sampling: argument validation, nucleus semantics (Meta's), top-k, seeding, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ---- hostile values (issue 12): no inf/nan, no exception, a valid token for everything we accept -------------
def test_seed_range_is_0_to_2_pow_64_and_batch_offsets_wrap():
    validate_sampling(seed=0)
    validate_sampling(seed=2**64 - 1)
    for seed in (2**64, -1, 10**400):
        with pytest.raises(CodeLlamaError, match=r"seed must be an integer in \[0, 2\*\*64\)") as e:
            validate_sampling(seed=seed)
        assert "\n" not in str(e.value) and len(str(e.value)) < 120  # a 400-digit seed is not echoed
    # Row i of a batch samples with (seed + i) mod 2**64: the top seed's next row is seed 0.
    top = make_generator(SamplingParams(temperature=1.0, seed=2**64 - 1), offset=1)
    assert top.initial_seed() == 0


def test_huge_integer_temperature_is_a_one_line_error_not_an_overflow():
    for kwargs in (dict(temperature=10**400), dict(top_p=10**400)):
        with pytest.raises(CodeLlamaError):
            validate_sampling(**kwargs)


def test_tiny_temperature_is_greedy_instead_of_overflowing():
    # 3e-38 made logits / temperature overflow to inf and the softmax NaN: multinomial raised mid-batch.
    logits = torch.tensor([[12.0, 40.0, -7.0, 39.5], [3.0, -1.0, 2.0, 8.0]])
    params = [SamplingParams(temperature=3e-38, seed=1), SamplingParams(temperature=1e-6, seed=2)]
    assert all(p.greedy for p in params) and make_generator(params[0]) is None
    assert sample(logits, params, [make_generator(p) for p in params]) == [1, 3]
    # Just above the greedy threshold the maths is still finite: a point mass on the argmax.
    probs = filtered_probs(logits, temperature=2e-5)
    assert torch.isfinite(probs).all() and probs.argmax(dim=-1).tolist() == [1, 3]
    assert torch.allclose(probs.sum(dim=-1), torch.ones(2))


def test_nan_and_infinite_logits_give_a_finite_distribution():
    nan, inf = float("nan"), float("inf")
    probs = filtered_probs(torch.tensor([nan, 1.0, -inf, 0.0]), temperature=1.0)
    assert probs[0] == 0 and probs[2] == 0 and torch.allclose(probs, torch.tensor([0, 0.7311, 0, 0.2689]), atol=1e-4)
    assert filtered_probs(torch.tensor([inf, 5.0, inf]), temperature=1.0).tolist() == [0.5, 0.0, 0.5]
    assert filtered_probs(torch.full((4,), nan), temperature=0.7).tolist() == [0.25] * 4  # nothing to prefer
    assert filtered_probs(torch.tensor([1.0, -inf]), temperature=1e300).tolist() == [1.0, 0.0]
    assert filtered_probs(torch.tensor([2.0, 1.0, 0.0]), temperature=1.0, top_k=10**30).sum() == pytest.approx(1)


_EXTREME_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                            st.sampled_from([0.0, -0.0, 3.4e38, -3.4e38, 1e-45, 88.7, -88.7, 1e4]))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(logits=st.lists(_EXTREME_FLOATS, min_size=1, max_size=12),
       temperature=st.one_of(st.floats(0.0, 1e308), st.sampled_from([0.0, 3e-38, 1e-5, 1.0000001e-5, 2.0])),
       top_p=st.one_of(st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([5e-324, 1e-300, 1.0])),
       top_k=st.one_of(st.integers(0, 20), st.integers(0, 2**70)),
       seed=st.integers(0, 2**64 - 1), batch_row=st.integers(0, 3))
def test_fuzz_sampling_always_returns_a_valid_token(logits, temperature, top_p, top_k, seed, batch_row):
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    row = torch.tensor(logits, dtype=torch.float32)
    token = sample_row(row, params, make_generator(params, offset=batch_row))
    assert isinstance(token, int) and 0 <= token < len(logits)
    if not params.greedy:
        probs = filtered_probs(row, temperature, top_k, top_p)
        assert torch.isfinite(probs).all() and (probs >= 0).all()
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-4)
        assert probs[token] > 0  # never a token the filters removed
    # The batched entry point agrees with the row one, next to a well-behaved row.
    batch = torch.stack([row, torch.zeros(len(logits))])
    other = SamplingParams()
    got = sample(batch, [params, other], [make_generator(params, offset=batch_row), None])
    assert got[0] == token and 0 <= got[1] < len(logits)


# ---- min_p and llama.cpp's sampler order --------------------------------------------------------------
def test_min_p_keeps_tokens_relative_to_the_most_likely():
    from codellama.sampling import min_p_filter
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert min_p_filter(probs, 0.2).tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])
    assert min_p_filter(probs, 1.0).tolist() == [1.0, 0.0, 0.0, 0.0]
    logits = torch.log(probs)
    g = torch.Generator().manual_seed(0)
    drawn = {sample_row(logits, SamplingParams(temperature=1.0, min_p=0.5), g) for _ in range(200)}
    assert drawn == {0, 1}  # 0.15 < 0.5 * 0.5: never drawn


def test_sampler_order_follows_llama_cpp():
    from codellama.sampling import ordered_probs
    logits = torch.tensor([3.0, 2.5, 2.0, 0.0, -1.0])
    meta = filtered_probs(logits, temperature=0.7, top_k=4, top_p=0.9)
    same = ordered_probs(logits, SamplingParams(temperature=0.7, top_k=4, top_p=0.9,
                                                samplers=["top_k", "temperature", "top_p"]))
    assert torch.allclose(meta, same, atol=1e-6)
    # top_p before a hot temperature judges the model's own (sharper) distribution: fewer tokens survive.
    hot = dict(temperature=5.0, top_p=0.6)
    first = ordered_probs(logits, SamplingParams(**hot, samplers=("top_p", "temperature")))
    last = ordered_probs(logits, SamplingParams(**hot, samplers=("temperature", "top_p")))
    assert int((first > 0).sum()) < int((last > 0).sum())
    # A sampler left out does not run: without "temperature" the distribution is the model's own.
    own = ordered_probs(logits, SamplingParams(temperature=5.0, top_k=2, samplers=("top_k",)))
    assert own.tolist() == pytest.approx(torch.softmax(torch.tensor([3.0, 2.5]), -1).tolist() + [0.0] * 3)
    only_min_p = ordered_probs(logits, SamplingParams(temperature=1.0, min_p=0.5, samplers=["min_p"]))
    assert only_min_p.tolist()[2:] == [0.0] * 3
    # Greedy stays greedy whatever the order.
    assert sample_row(logits, SamplingParams(samplers=("top_p",)), None) == 0


def test_samplers_and_min_p_are_validated_and_penalties_can_be_left_out():
    for bad, word in ((dict(min_p=1.5), "min_p"), (dict(min_p=float("nan")), "min_p"),
                      (dict(samplers=["top_k", "mirostat"]), "mirostat"), (dict(samplers="top_k"), "samplers")):
        with pytest.raises(CodeLlamaError, match=word):
            SamplingParams(**bad)
    assert SamplingParams(samplers=["top_k"]).samplers == ("top_k",)
    assert SamplingParams(repetition_penalty=1.2).penalized
    assert not SamplingParams(repetition_penalty=1.2, samplers=("top_k", "temperature")).penalized
    assert SamplingParams(repetition_penalty=1.2, samplers=("temperature", "penalties")).penalized


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(logits=st.lists(_EXTREME_FLOATS, min_size=1, max_size=12),
       temperature=st.one_of(st.floats(1e-5, 1e308), st.sampled_from([3e-38, 1.0000001e-5, 2.0])),
       top_p=st.one_of(st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([5e-324, 1.0])),
       top_k=st.integers(0, 20), min_p=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0])),
       samplers=st.one_of(st.none(), st.lists(st.sampled_from(["penalties", "top_k", "top_p", "min_p",
                                                                 "temperature"]), max_size=6)),
       seed=st.integers(0, 2**64 - 1))
def test_fuzz_ordered_sampling_and_min_p_always_return_a_valid_token(logits, temperature, top_p, top_k, min_p,
                                                                     samplers, seed):
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, samplers=samplers,
                            seed=seed)
    row = torch.tensor(logits, dtype=torch.float32)
    token = sample_row(row, params, make_generator(params))
    assert isinstance(token, int) and 0 <= token < len(logits)
    if samplers is not None and not params.greedy:
        from codellama.sampling import ordered_probs
        probs = ordered_probs(row, params)
        assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0, abs=1e-4)
        assert probs[token] > 0
