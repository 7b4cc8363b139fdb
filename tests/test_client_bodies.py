"""The exact bodies that editor plugins and tools send (``tests/fixtures/clients/*.json``: llama.vscode FIM and
chat edit, llama.vim FIM and cache warm-up, Continue's and Tabby's Code Llama templates through llama.cpp's
``/completion``, Tabby's OpenAI backend with and without ``suffix``), posted to a server running the embedded
model: each gets a 200 with the reply shape its client reads, and the semantics it relies on hold:
``t_max_predict_ms`` ends generation on time, ``n_indent`` at a dedented line, ``cache_prompt`` reuses the
KV cache for a shared prefix, and a hand-written ``<PRE> … <MID>`` prompt may end its middle with <EOT>."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import codellama  # noqa: E402
from codellama.formats import banned_ids  # noqa: E402
from codellama.serving.app import ServerConfig, create_app, running_server  # noqa: E402
from codellama.serving.core import hand_made_fim  # noqa: E402
from codellama.serving.scheduler import Engine  # noqa: E402
from codellama.serving.sequences import build_job  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "clients"
CLIENT_BODIES = {p.stem: json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))}


@pytest.fixture(scope="module")
def llama():
    return codellama.load()  # the embedded model: writes Python-shaped text, newlines included


def _serve(llama, step_delay_s: float = 0.0):
    engine = Engine(llama, max_batch_size=2, max_queue=8, threads=1)
    if step_delay_s:
        decode = engine._decode

        def slow(dec):  # slow decode steps: a time limit is then reached in a known number of steps
            time.sleep(step_delay_s)
            decode(dec)
        engine._decode = slow
    return running_server(create_app(llama, engine=engine, config=ServerConfig(model_name="codellama")))


@pytest.fixture(scope="module")
def url(llama):
    with _serve(llama) as base:
        yield base


def _data_lines(response) -> list:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize("name", sorted(CLIENT_BODIES))
def test_each_client_body_gets_the_reply_its_client_reads(url, name):
    fixture = CLIENT_BODIES[name]
    expect, body = fixture["expect"], fixture["body"]
    if fixture.get("stream"):
        with httpx.stream(fixture["method"], url + fixture["path"], json=body, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = _data_lines(r)
        if "chunk_fields" in expect:  # OpenAI SSE
            assert lines[-1] == "[DONE]"
            chunks = [json.loads(line) for line in lines[:-1]]
            assert all(set(expect["chunk_fields"]) <= set(c) for c in chunks)
            assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        else:  # llama.cpp: content deltas, then the final object with stop: true
            events = [json.loads(line) for line in lines]
            assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
            assert set(expect["final_fields"]) <= set(events[-1])
            assert events[-1]["tokens_predicted"] <= body["n_predict"]
        return
    r = httpx.request(fixture["method"], url + fixture["path"], json=body, timeout=60)
    assert r.status_code == 200, r.text
    reply = r.json()
    if "exact_fields" in expect:  # response_fields: those and only those
        assert set(reply) == set(expect["exact_fields"])
        if "tokens_cached" in reply:
            assert isinstance(reply["tokens_cached"], int) and isinstance(reply["timings/prompt_n"], int)
    else:
        assert set(expect["fields"]) <= set(reply)
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")


def test_cache_prompt_reuses_the_shared_prefix(url):
    """llama.vscode after a keystroke: the same request with one more character in the prefix evaluates only
    the tokens after the shared part of the prompt."""
    body = dict(CLIENT_BODIES["llama_vscode_fim"]["body"], n_predict=4)
    first = httpx.post(url + "/infill", json=body, timeout=60).json()
    again = httpx.post(url + "/infill", json=body | {"input_prefix": body["input_prefix"] + "x"}, timeout=60).json()
    assert again["tokens_cached"] > 0
    assert again["timings/prompt_n"] < first["timings/prompt_n"]
    assert again["timings/prompt_n"] + again["tokens_cached"] >= first["timings/prompt_n"]
    metrics = httpx.get(url + "/metrics", timeout=60).text
    cached = float(re.search(r"^codellama_engine_prompt_tokens_cached_total (\S+)$", metrics, re.M)[1])
    assert cached >= again["tokens_cached"]


def test_cache_prompt_false_evaluates_the_whole_prompt(url):
    body = dict(CLIENT_BODIES["llama_vscode_fim"]["body"], n_predict=2, cache_prompt=False)
    httpx.post(url + "/infill", json=body, timeout=60)
    r = httpx.post(url + "/infill", json=body, timeout=60).json()
    assert r["tokens_cached"] == 0


def test_t_max_predict_ms_ends_generation_on_time(llama):
    """A time limit of 150 ms with 20 ms decode steps: the answer comes after a handful of tokens (once a
    newline was written, as llama.cpp requires), not after the 100 asked for."""
    body = dict(CLIENT_BODIES["llama_vscode_fim"]["body"], n_predict=100, n_indent=0, t_max_predict_ms=150,
                response_fields=None, cache_prompt=False)
    with _serve(llama, step_delay_s=0.02) as base:
        start = time.perf_counter()
        r = httpx.post(base + "/infill", json=body, timeout=60).json()
        elapsed = time.perf_counter() - start
    assert r["stop_type"] == "limit" and r["tokens_predicted"] < 40 and "\n" in r["content"]
    assert elapsed < 100 * 0.02  # well before 100 slow steps
    assert r["timings"]["predicted_ms"] >= 150


def test_n_indent_stops_at_a_less_indented_line(url):
    body = dict(CLIENT_BODIES["llama_vscode_fim"]["body"], n_predict=100, t_max_predict_ms=-1,
                response_fields=None, temperature=0, input_extra=[])
    free = httpx.post(url + "/infill", json=body | {"n_indent": 0}, timeout=60).json()
    cut = httpx.post(url + "/infill", json=body | {"n_indent": 4}, timeout=60).json()
    assert "\nif " in free["content"]  # the embedded model dedents to module level
    assert "\nif " not in cut["content"] and free["content"].startswith(cut["content"])
    assert cut["stop_type"] == "limit" and cut["tokens_predicted"] < free["tokens_predicted"]


def test_a_hand_made_fim_prompt_may_end_its_middle(llama):
    """Continue and Tabby send the Code Llama template as plain text to /completion: it encodes to the FIM
    pieces, so it is banned only what infilling is banned (PRE, SUF, MID) and may end the middle with <EOT>;
    a plain prompt keeps plain completion's bans (all four FIM pieces)."""
    tok = llama.tokenizer
    template = CLIENT_BODIES["tabby_llamacpp"]["body"]["prompt"]
    fim = hand_made_fim(build_job(llama, "complete", prompt=template), tok)
    assert tok.middle_id in fim.prompt and set(fim.banned) == set(banned_ids(tok, "infill"))
    assert tok.eot_id not in fim.banned
    plain = hand_made_fim(build_job(llama, "complete", prompt="def add(a, b):"), tok)
    assert set(plain.banned) == set(banned_ids(tok, "complete"))
