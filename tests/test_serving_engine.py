"""The continuous-batching engine on its own: results equal solo runs while sequences join and leave the
batch, cancellation frees rows, the bounded queue refuses work, prompt scoring (max_tokens=0)."""

from __future__ import annotations

import threading

import pytest
import torch

from codellama.api import CodeLlama
from codellama.errors import CodeLlamaError
from codellama.serving.scheduler import Engine, QueueFull, QueueSink, build_job, make_sequences
from codellama.tokenizer import Tokenizer
from conftest import peaked_model

PROMPTS = ["def foo(x):", "import os\n", "class A:\n    def", "x = [1, 2,", "for i in range(",
           "# hello world", "while True:\n    ", "print("]


@pytest.fixture(scope="module")
def llama(tiny_tokenizer_path) -> CodeLlama:
    return CodeLlama(peaked_model(128), Tokenizer(tiny_tokenizer_path), name="tiny")



def _run(engine: Engine, llama, prompt: str, **kwargs) -> list:
    sink = QueueSink()
    engine.submit(make_sequences(llama, build_job(llama, "complete", prompt=prompt), sink=lambda i, e: sink(e),
                                 **kwargs))
    return sink


def test_concurrent_sequences_equal_solo_runs_while_joining_and_leaving(llama):
    # Three rows for eight sequences of different lengths: rows are reused and compacted many times.
    lengths = [5, 40, 17, 33, 9, 60, 24, 12]
    solo = [llama.complete(p, max_new_tokens=n) for p, n in zip(PROMPTS, lengths)]
    sampled_solo = llama.complete(PROMPTS[0], max_new_tokens=30, temperature=0.9, top_p=0.9, seed=7)
    engine = Engine(llama, max_batch_size=3, threads=1).start()
    try:
        sinks = [_run(engine, llama, p, max_tokens=n) for p, n in zip(PROMPTS, lengths)]
        sampled = _run(engine, llama, PROMPTS[0], max_tokens=30, temperature=0.9, top_p=0.9, seed=7)
        for sink, want in zip(sinks + [sampled], solo + [sampled_solo]):
            events = list(sink)
            final = events[-1].completion
            assert final.text == want.text and final.tokens == want.tokens
            assert "".join(e.text for e in events) == want.text  # streamed deltas add up to the text
            assert final.finish_reason == want.finish_reason
        assert engine.stats.batch_rows_sum > 2 * engine.stats.steps  # mostly 3 rows per step
        assert engine.active == 0 and engine.queue_depth == 0
    finally:
        engine.stop()


def test_stop_strings_and_logprobs_match_the_library(llama):
    want = llama.complete(PROMPTS[1], max_new_tokens=40, stop=["e"], logprobs=True)
    engine = Engine(llama, max_batch_size=2, threads=1).start()
    try:
        events = list(_run(engine, llama, PROMPTS[1], max_tokens=40, stop=["e"], logprobs=2))
    finally:
        engine.stop()
    final = events[-1]
    assert final.completion.text == want.text and final.completion.finish_reason == "stop"
    assert final.stop_kind == "word"
    got = [lp for e in events for lp in e.logprobs]
    assert got == pytest.approx(want.logprobs, abs=1e-5)
    # The top-2 alternatives are sorted and the greedy choice is the first of them.
    tops = [t for e in events for t in e.top]
    assert all(len(t) == 2 and t[0][1] >= t[1][1] for t in tops)
    assert [t[0][0] for t in tops] == [tok for e in events for tok in e.tokens]


def test_cancel_frees_the_row_and_the_next_sequence_is_unaffected(llama):
    engine = Engine(llama, max_batch_size=1, threads=1).start()
    try:
        seen, sink = [], QueueSink()

        def cancelling(i, event):
            seen.append(event)
            if len(seen) == 3:
                seqs[0].cancel()  # from the engine thread, mid-generation
            sink(event)
        seqs = make_sequences(llama, build_job(llama, "complete", prompt=PROMPTS[2]), max_tokens=100, sink=cancelling)
        engine.submit(seqs)
        events = list(sink)
        assert events[-1].stop_kind == "cancelled" and len(seqs[0].request.tokens) <= 4
        assert engine.active == 0 and engine.stats.cancelled == 1
        after = list(_run(engine, llama, PROMPTS[3], max_tokens=20))[-1].completion
        assert after.text == llama.complete(PROMPTS[3], max_new_tokens=20).text
    finally:
        engine.stop()


def test_full_queue_refuses_and_a_cancelled_waiter_never_runs(llama):
    engine = Engine(llama, max_batch_size=1, max_queue=2, threads=1).start()
    release = threading.Event()
    try:
        blocked = QueueSink()

        entered = threading.Event()

        def hold(i, event):  # blocks the engine thread inside its first step
            entered.set()
            release.wait(10)
            blocked(event)
        engine.submit(make_sequences(llama, build_job(llama, "complete", prompt=PROMPTS[0]), max_tokens=5, sink=hold))
        assert entered.wait(10)  # the first sequence holds the only row
        waiting = _run(engine, llama, PROMPTS[1], max_tokens=5)
        given_up = QueueSink()
        [gone] = make_sequences(llama, build_job(llama, "complete", prompt=PROMPTS[2]), max_tokens=5,
                                sink=lambda i, e: given_up(e))
        engine.submit([gone])
        with pytest.raises(QueueFull, match="busy"):
            _run(engine, llama, PROMPTS[3], max_tokens=5)
        assert engine.queue_depth == 2
        gone.cancel()
        release.set()
        assert list(blocked)[-1].completion.text == llama.complete(PROMPTS[0], max_new_tokens=5).text
        assert list(waiting)[-1].completion.text == llama.complete(PROMPTS[1], max_new_tokens=5).text
        assert list(given_up)[-1].stop_kind == "cancelled" and gone.request.tokens == []
        assert engine.stats.prefills == 2 and engine.queue_depth == 0
    finally:
        release.set()
        engine.stop()


def test_prompt_scoring_and_context_limits(llama):
    want = llama.complete(PROMPTS[4], max_new_tokens=1, logprobs=True, echo=True)
    engine = Engine(llama, max_batch_size=2, context=64, threads=1).start()
    try:
        sink = QueueSink()
        job = build_job(llama, "complete", prompt=PROMPTS[4], echo=True)
        [seq] = make_sequences(llama, job, max_tokens=0, logprobs=0, echo=True, sink=lambda i, e: sink(e))
        engine.submit([seq])
        final = list(sink)[-1]
        assert final.completion.tokens == job.prompt and final.completion.finish_reason == "length"
        assert seq.request.prompt_token_logprobs == pytest.approx(want.logprobs[:len(job.prompt)], abs=1e-5)
        with pytest.raises(CodeLlamaError, match="context is 64 tokens"):
            _run(engine, llama, "x " * 80, max_tokens=1)
        # A budget beyond the context is refused, naming the numbers (as vLLM and OpenAI do) ...
        long = "a b " * 25
        n = len(llama.tokenizer.encode(long, bos=True))
        with pytest.raises(CodeLlamaError, match=f"the prompt is {n} tokens and max_tokens is 100: "
                                                 f"{n + 100} tokens, more than the context of 64 tokens"):
            _run(engine, llama, long, max_tokens=100)
        # ... unless asked to shrink it to what is left (finish_reason "length"); None is "up to the end".
        for options in ({"max_tokens": 100, "shrink_max_tokens": True}, {"max_tokens": None}):
            final = list(_run(engine, llama, long, **options))[-1].completion
            assert len(final.tokens) == 64 - n and final.finish_reason == "length"
        assert len(list(_run(engine, llama, long, max_tokens=64 - n))[-1].completion.tokens) == 64 - n
    finally:
        engine.stop()
    with pytest.raises(CodeLlamaError, match="max_batch_size"):
        Engine(llama, max_batch_size=0)


def test_a_failing_step_fails_its_sequences_and_the_engine_keeps_serving(llama):
    engine = Engine(llama, max_batch_size=2, threads=1).start()
    decode, calls = engine._decode, []

    def broken_once(dec):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated out of memory")
        decode(dec)
    engine._decode = broken_once
    try:
        final = list(_run(engine, llama, PROMPTS[0], max_tokens=10))[-1]
        assert final.done and final.error == "generation failed: RuntimeError: simulated out of memory"
        assert final.completion is None and engine.active == 0 and engine.stats.errors == 1
        after = list(_run(engine, llama, PROMPTS[0], max_tokens=10))[-1].completion
        assert after.text == llama.complete(PROMPTS[0], max_new_tokens=10).text
    finally:
        engine.stop()


def test_engine_arguments_are_checked(llama):
    for kwargs, match in [({"max_queue": -1}, "max_queue"), ({"prefill_chunk": 100}, "multiple of 32"),
                          ({"context": 1}, "at least 2"), ({"max_batch_size": 10**8, "context": 128}, "lower")]:
        with pytest.raises(CodeLlamaError, match=match):
            Engine(llama, **kwargs)


# ---- one request's trouble stays its own (issue 12) -------------------------------------------------------
def _events(sink: QueueSink, timeout: float = 30.0) -> list:
    """All events up to the final one; fails instead of hanging if the final event never comes."""
    events = []
    while not (events and events[-1].done):
        events.append(sink._q.get(timeout=timeout))  # raises queue.Empty: a sequence left without an answer
    return events


def test_a_tiny_temperature_in_the_batch_fails_nobody(llama):
    # Tiny temperatures used to overflow logits / temperature to inf (NaN after the softmax) in the batched
    # sampling step, and the engine failed every running row.
    kwargs = [dict(max_tokens=30), dict(max_tokens=30, temperature=3e-38, seed=3),
              dict(max_tokens=30, temperature=0.9, top_p=0.9, seed=7), dict(max_tokens=30, temperature=1e-40)]
    solo = [llama.complete(PROMPTS[0], max_new_tokens=30), llama.complete(PROMPTS[1], max_new_tokens=30),
            llama.complete(PROMPTS[2], max_new_tokens=30, temperature=0.9, top_p=0.9, seed=7),
            llama.complete(PROMPTS[3], max_new_tokens=30)]
    engine = Engine(llama, max_batch_size=4, threads=1).start()
    try:
        sinks = [QueueSink() for _ in kwargs]
        engine.submit([seq for i, kw in enumerate(kwargs) for seq in make_sequences(
            llama, build_job(llama, "complete", prompt=PROMPTS[i]), sink=lambda _, e, s=sinks[i]: s(e), **kw)])
        finals = [_events(sink)[-1] for sink in sinks]
        assert [f.error for f in finals] == [None] * 4 and engine.stats.errors == 0
        # Below MIN_TEMPERATURE sampling is greedy: the tiny-temperature rows are their greedy solo runs.
        assert [f.completion.tokens for f in finals] == [w.tokens for w in solo]
    finally:
        engine.stop()


@pytest.mark.parametrize("where", ["sampling", "text", "finishing"])
def test_a_row_that_raises_fails_alone_and_the_others_equal_their_solo_runs(llama, monkeypatch, where):
    from codellama.serving import scheduler

    poison = build_job(llama, "complete", prompt=PROMPTS[3])
    calls = []

    def fail_on_fifth_call() -> None:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("poisoned row")
    if where == "sampling":  # the poisoned row samples with seed 666; its fifth draw raises
        real = scheduler.sample_row

        def sample_row(logits, params, generator):
            if params.seed == 666:
                fail_on_fifth_call()
            return real(logits, params, generator)
        monkeypatch.setattr(scheduler, "sample_row", sample_row)
    elif where == "text":  # decoding its text raises part-way
        decode = poison.decode

        def flaky(ids):
            fail_on_fifth_call()
            return decode(ids)
        poison.decode = flaky
    else:  # building its final completion raises
        real_completion = scheduler._completion

        def completion(job, *args):
            if job is poison:
                raise RuntimeError("poisoned row")
            return real_completion(job, *args)
        monkeypatch.setattr(scheduler, "_completion", completion)

    solo = [llama.complete(PROMPTS[0], max_new_tokens=25),
            llama.complete(PROMPTS[1], max_new_tokens=40, temperature=0.9, top_p=0.9, seed=7)]
    engine = Engine(llama, max_batch_size=3, threads=1).start()
    try:
        sinks = [QueueSink() for _ in range(3)]
        seqs = (make_sequences(llama, build_job(llama, "complete", prompt=PROMPTS[0]), max_tokens=25,
                               sink=lambda _, e: sinks[0](e))
                + make_sequences(llama, build_job(llama, "complete", prompt=PROMPTS[1]), max_tokens=40,
                                 temperature=0.9, top_p=0.9, seed=7, sink=lambda _, e: sinks[1](e))
                + make_sequences(llama, poison, max_tokens=10, temperature=0.5 if where == "sampling" else 0.0,
                                 seed=666, sink=lambda _, e: sinks[2](e)))
        engine.submit(seqs)  # one submit: all three share the batch from the first step
        events = [_events(sink) for sink in sinks]
        failed = events[2]
        assert [e.done for e in failed].count(True) == 1 and failed[-1].done  # exactly one final event
        assert failed[-1].error == "generation failed: RuntimeError: poisoned row" and failed[-1].completion is None
        for got, want in zip(events[:2], solo):
            final = got[-1].completion
            assert got[-1].error is None and final.tokens == want.tokens and final.text == want.text
            assert "".join(e.text for e in got) == want.text
        assert engine.stats.errors == 1 and engine.active == 0
        after = _events(_run(engine, llama, PROMPTS[4], max_tokens=12))[-1].completion
        assert after.text == llama.complete(PROMPTS[4], max_new_tokens=12).text
    finally:
        engine.stop()


def test_penalties_and_banned_ids_in_the_engine_equal_the_library(llama):
    # Several concurrent greedy rows with repetition penalties (one also with OpenAI's presence/frequency
    # penalties, one with none) must give exactly what CodeLlama.complete gives alone.
    options = [{"repetition_penalty": 1.2}, {"repetition_penalty": 1.2, "penalty_last_n": -1},
               {"repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": 1.5, "penalty_last_n": 8},
               {}]
    prompts = PROMPTS[:4]
    solo = [llama.complete(p, max_new_tokens=30, **o) for p, o in zip(prompts, options)]
    plain = [llama.complete(p, max_new_tokens=30) for p in prompts]
    assert any(s.tokens != p.tokens for s, p in zip(solo[:3], plain))  # the penalties change something here
    engine = Engine(llama, max_batch_size=4, threads=1).start()
    try:
        sinks = [_run(engine, llama, p, max_tokens=30, **o) for p, o in zip(prompts, options)]
        got = [list(s)[-1].completion for s in sinks]
        # A banned id is never chosen: ban what the model picks first and it picks something else.
        first = plain[0].tokens[0]
        banned = list(_run(engine, llama, prompts[0], max_tokens=3, banned_ids=(first,)))[-1].completion
    finally:
        engine.stop()
    assert [c.tokens for c in got] == [s.tokens for s in solo]
    assert [c.text for c in got] == [s.text for s in solo]
    assert first not in banned.tokens
    # Plain completion never writes the FIM sentinels (the job carries them as banned ids).
    from codellama.formats import banned_ids
    job = build_job(llama, "complete", prompt="x")
    assert job.banned == banned_ids(llama.tokenizer, "complete") and len(job.banned) == 4
    [seq] = make_sequences(llama, job, sink=lambda i, e: None)
    assert set(job.banned) <= set(seq.request.sampling.banned_ids)


def test_bfloat16_engine_decodes_like_the_library(tiny_tokenizer_path):
    """bf16 on CPU: the engine's batched step and the library's both attend with ``one_query_attention``; rows of
    different lengths joining and leaving still give each prompt its solo greedy text."""
    model = peaked_model(128).to(torch.bfloat16)
    llama = CodeLlama(model, Tokenizer(tiny_tokenizer_path), name="tiny-bf16")
    lengths = [12, 30, 7, 20]
    solo = [llama.complete(p, max_new_tokens=n) for p, n in zip(PROMPTS, lengths)]
    engine = Engine(llama, max_batch_size=2, threads=1).start()
    try:
        sinks = [_run(engine, llama, p, max_tokens=n) for p, n in zip(PROMPTS, lengths)]
        for sink, want in zip(sinks, solo):
            final = list(sink)[-1].completion
            assert final.tokens == want.tokens and final.text == want.text
    finally:
        engine.stop()
