"""The engine's llama.cpp features: prefix caching (cache_prompt, id_slot, tokens_cached), the FIM limits
(t_max_predict_ms, n_indent), timings, and the /slots and /props views."""

from __future__ import annotations

import pytest

import codellama
from codellama.api import CodeLlama
from codellama.errors import CodeLlamaError
from codellama.serving.prefix_cache import common_prefix
from codellama.serving.scheduler import Engine, QueueSink, build_job, make_sequences
from codellama.tokenizer import Tokenizer
from conftest import peaked_model

LONG = "def handler(request, response):\n    data = request.json()\n    for key, value in data.items():\n"
OTHER = "import os\nimport sys\n\nclass Config:\n    name = 'x'\n    size = 3\n"
TIMING_KEYS = {"prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n", "predicted_ms",
               "predicted_per_token_ms", "predicted_per_second"}


@pytest.fixture(scope="module")
def llama(tiny_tokenizer_path) -> CodeLlama:
    return CodeLlama(peaked_model(256), Tokenizer(tiny_tokenizer_path), name="tiny")


@pytest.fixture(scope="module")
def embedded() -> CodeLlama:
    return codellama.load()  # writes Python-shaped text with newlines and indentation


def _final(engine: Engine, llama, prompt: str, kind: str = "complete", suffix: str = "", **kwargs):
    sink = QueueSink()
    job = build_job(llama, kind, prompt=prompt, suffix=suffix)
    engine.submit(make_sequences(llama, job, sink=lambda i, e: sink(e), **kwargs))
    events = list(sink)
    assert events[-1].error is None, events[-1].error
    return job, events


def test_a_cached_prefix_is_reused_and_gives_the_same_greedy_output(llama):
    engine = Engine(llama, max_batch_size=3, threads=1).start()
    try:
        job1, ev1 = _final(engine, llama, LONG, max_tokens=12, cache_prompt=True)
        first = ev1[-1]
        assert first.tokens_cached == 0 and first.timings["prompt_n"] == len(job1.prompt)
        # The same prompt again: everything but the last prompt token comes from the cache.
        job2, ev2 = _final(engine, llama, LONG, max_tokens=12, cache_prompt=True)
        again = ev2[-1]
        assert again.tokens_cached == len(job1.prompt) - 1 and again.timings["prompt_n"] == 1
        assert again.id_slot == first.id_slot
        assert again.completion.tokens == first.completion.tokens
        # A longer prompt sharing the prefix evaluates only the new tokens, and equals an uncached run.
        longer = LONG + "        print(key)\n"
        job3, ev3 = _final(engine, llama, longer, max_tokens=12, cache_prompt=True)
        kept = job2.prompt + again.completion.tokens[:-1]  # the last sampled token is never fed back
        want = min(common_prefix(kept, job3.prompt), len(job3.prompt) - 1)
        assert ev3[-1].tokens_cached == want and ev3[-1].timings["prompt_n"] == len(job3.prompt) - want
        assert want > len(job1.prompt) - 3
        solo = llama.complete(longer, max_new_tokens=12)
        assert ev3[-1].completion.tokens == solo.tokens and "".join(e.text for e in ev3) == solo.text
        # Without cache_prompt nothing is reused.
        _, ev4 = _final(engine, llama, LONG, max_tokens=12)
        assert ev4[-1].tokens_cached == 0 and ev4[-1].completion.tokens == first.completion.tokens
        assert set(first.timings) == TIMING_KEYS
    finally:
        engine.stop()


def test_the_row_with_the_longest_common_prefix_wins_and_id_slot_is_obeyed(llama):
    engine = Engine(llama, max_batch_size=3, threads=1).start()
    try:
        _, a = _final(engine, llama, LONG, max_tokens=4, cache_prompt=True)
        _, b = _final(engine, llama, OTHER, max_tokens=4, cache_prompt=True)
        slot_a, slot_b = a[-1].id_slot, b[-1].id_slot
        assert slot_a != slot_b
        _, c = _final(engine, llama, OTHER + "    depth = 2\n", max_tokens=4, cache_prompt=True)
        assert c[-1].id_slot == slot_b and c[-1].tokens_cached > 10
        # id_slot names the row even when another would share more (llama.cpp's id_slot).
        job, d = _final(engine, llama, LONG, max_tokens=4, cache_prompt=True, slot=slot_b)
        assert d[-1].id_slot == slot_b and d[-1].tokens_cached < 5
        plain = llama.complete(LONG, max_new_tokens=4)
        assert d[-1].completion.tokens == plain.tokens
        slots = engine.slots()
        assert [s["id"] for s in slots] == [0, 1, 2] and not any(s["is_processing"] for s in slots)
        assert slots[slot_b]["n_prompt_tokens_cached"] == len(job.prompt) + 3
        assert slots[0]["n_ctx"] == 256 and slots[0]["params"]["repeat_penalty"] == 1.0
        props = engine.props()
        assert props["total_slots"] == 3 and props["default_generation_settings"]["n_ctx"] == 256
        with pytest.raises(CodeLlamaError, match="id_slot"):
            _final(engine, llama, LONG, max_tokens=4, slot=3)
        with pytest.raises(CodeLlamaError, match="id_slot"):
            make_sequences(llama, job, slot=-2, sink=lambda i, e: None)
    finally:
        engine.stop()


def test_t_max_predict_ms_stops_a_long_generation_on_time(embedded):
    engine = Engine(embedded, max_batch_size=2, threads=1).start()
    try:
        deadline = 150
        # max_tokens=None: up to the end of the 1,024-token context (~3 s here) unless the deadline stops it.
        _, events = _final(engine, embedded, "def fibonacci(n):", max_tokens=None, t_max_predict_ms=deadline)
    finally:
        engine.stop()
    final = events[-1]
    t = final.timings
    step_ms = t["predicted_ms"] / t["predicted_n"]
    assert final.stop_kind == "time" and final.completion.finish_reason == "length"
    assert deadline <= t["predicted_ms"] <= deadline + 2 * step_ms + 150  # slack: 2 shared CPU cores
    assert t["predicted_n"] < 1024 - 8  # it did not run to the end of the context
    assert "\n" in final.completion.text
    assert "".join(e.text for e in events) == final.completion.text


def _expected_indent_cut(text: str, n_indent: int) -> str | None:
    # llama.cpp: lines after the first generated newline; spaces and tabs count; a blank line is indent 0.
    lines = text.split("\n")
    for k in range(1, len(lines) - 1):  # the last line may be incomplete
        line = lines[k]
        if len(line) - len(line.lstrip(" \t")) < n_indent:
            return "\n".join(lines[:k]) + "\n"
    return None


def test_n_indent_ends_at_the_first_line_indented_less(embedded):
    prompt = "class Stack:\n    def push(self, x):\n"
    full = embedded.complete(prompt, max_new_tokens=120)  # a method body, a blank line, the next method ...
    engine = Engine(embedded, max_batch_size=2, threads=1).start()
    try:
        for n_indent in (4, 8):
            want = _expected_indent_cut(full.text, n_indent)
            assert want is not None  # the toy model dedents within 120 tokens on this prompt
            _, events = _final(engine, embedded, prompt, max_tokens=120, n_indent=n_indent)
            final = events[-1]
            assert final.completion.text == want and final.stop_kind == "indent"
            assert final.completion.finish_reason == "length"
            # The dedented line was held back while its indentation was unknown: never streamed.
            assert "".join(e.text for e in events) == want
        # n_indent=0 is off: the whole budget.
        _, events = _final(engine, embedded, prompt, max_tokens=120, n_indent=0, t_max_predict_ms=-1)
        assert events[-1].completion.text == full.text
    finally:
        engine.stop()


def test_n_indent_holds_back_a_new_lines_whitespace_and_cuts_a_dedented_line():
    # Characters as tokens: exact control over where lines and indentation fall.
    from codellama.generation import Request, TextStream, _Job
    from codellama.serving.sequences import Sequence

    def decode(ids):
        return "".join(chr(i) for i in ids)

    def run(text: str, n_indent: int) -> tuple[list[str], Sequence]:
        seq = Sequence(job=_Job(prompt=[1], decode=decode, context=[], echo_text=""),
                       request=Request(prompt=[1], max_new_tokens=1000), text=TextStream(decode),
                       sink=lambda e: None, n_indent=n_indent)
        sent = []
        for ch in text:
            sent.append(seq.deliver(seq.text.push(ord(ch)), 0.0))
            if seq.request.finished:
                break
        else:
            sent.append(seq.deliver(seq.text.flush(), 0.0, final=True))
        return sent, seq

    sent, seq = run("x = 1\n    y\n  z\nw\n", 4)
    assert "".join(sent) == "x = 1\n    y\n" == seq.text.text and seq.stop_kind == "indent"
    assert sent[-3:] == ["", "", ""]  # "\n", " ", " " of the dedented line were held, then dropped
    assert seq.request.finish_reason == "length"
    sent, seq = run("  a\n\tb\n    c\n", 1)  # a tab counts as one character of indentation
    assert "".join(sent) == "  a\n\tb\n    c\n" and seq.stop_kind is None


def test_cached_rows_survive_rows_joining_and_leaving_around_them(llama):
    # Three rows, many requests of different lengths, half with cache_prompt: finished rows are swapped to the
    # free end, cached ones are brought back to the active end; every result equals its solo run.
    prompts = [LONG, OTHER, LONG + "        x = 1\n", OTHER + "    y = 2\n", "print(", LONG]
    lengths = [9, 30, 4, 17, 25, 6]
    solo = [llama.complete(p, max_new_tokens=n) for p, n in zip(prompts, lengths)]
    engine = Engine(llama, max_batch_size=3, threads=1).start()
    cached = []
    try:
        for wave in range(3):
            sinks = []
            for k, (p, n) in enumerate(zip(prompts, lengths)):
                sink = QueueSink()
                engine.submit(make_sequences(llama, build_job(llama, "complete", prompt=p), max_tokens=n,
                                             cache_prompt=k % 2 == 0 or wave > 0, sink=lambda i, e, s=sink: s(e)))
                sinks.append(sink)
            finals = [list(s)[-1] for s in sinks]
            assert [f.completion.tokens for f in finals] == [s.tokens for s in solo]
            cached += [f.tokens_cached for f in finals]
        assert engine.stats.prompt_tokens_cached == sum(cached) > 30
    finally:
        engine.stop()


def test_a_request_for_a_busy_slot_waits_for_it_and_others_go_ahead(llama):
    engine = Engine(llama, max_batch_size=2, threads=1).start()
    try:
        sinks, seqs = [], []
        for prompt, n, slot in ((LONG, 60, 0), (OTHER, 5, 0), ("print(", 5, None)):
            sink = QueueSink()
            seqs += make_sequences(llama, build_job(llama, "complete", prompt=prompt), max_tokens=n, slot=slot,
                                   cache_prompt=True, sink=lambda i, e, s=sink: s(e))
            sinks.append(sink)
        engine.submit(seqs)
        finals = [list(s)[-1] for s in sinks]
    finally:
        engine.stop()
    first, waiter, other = seqs
    assert finals[0].id_slot == finals[1].id_slot == 0 and finals[2].id_slot == 1
    assert waiter.prefill_started >= first.finished_at  # slot 0 was busy: it waited
    assert other.prefill_started < first.finished_at  # the request for any slot did not wait behind it
    assert finals[1].completion.tokens == llama.complete(OTHER, max_new_tokens=5).tokens
