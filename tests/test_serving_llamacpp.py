"""llama.cpp's native endpoints and the OpenAI paths without ``/v1`` (issue 13, items 1-5, HTTP side):
``/completion`` (plain and streamed, llama.cpp's reply fields, ``n_predict`` -1 and shrinking, penalties,
``samplers``, ``response_fields``), ``/tokenize``, ``/detokenize``, ``/props``, ``/slots``, ``/v1/health``,
``max_tokens: -1``, penalties and model names on the OpenAI endpoints, and prometheus_client's /metrics."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from codellama.api import CodeLlama  # noqa: E402
from codellama.serving.app import ServerConfig, create_app, running_server  # noqa: E402
from codellama.serving.llamacpp_api import select_fields  # noqa: E402
from codellama.serving.scheduler import Engine  # noqa: E402
from codellama.tokenizer import Tokenizer  # noqa: E402
from conftest import peaked_model  # noqa: E402

CONTEXT = 128
TIMING_KEYS = {"prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n", "predicted_ms",
               "predicted_per_token_ms", "predicted_per_second"}


@pytest.fixture(scope="module")
def llama(tiny_tokenizer_path) -> CodeLlama:
    return CodeLlama(peaked_model(CONTEXT), Tokenizer(tiny_tokenizer_path), name="tiny-ckpt")


@pytest.fixture(scope="module")
def url(llama):
    engine = Engine(llama, max_batch_size=2, max_queue=8, threads=1)
    config = ServerConfig(model_name="tiny", max_tokens_cap=100)
    with running_server(create_app(llama, engine=engine, config=config)) as base:
        yield base


def _post(url: str, path: str, body: dict) -> dict:
    r = httpx.post(url + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(url: str, path: str, body: dict) -> list:
    with httpx.stream("POST", url + path, json=body | {"stream": True}, timeout=30) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]


# ---- /completion -------------------------------------------------------------------------------------------
def test_completion_equals_the_library_with_llamacpp_reply_fields(url, llama):
    want = llama.complete("def foo(x):", max_new_tokens=8)
    r = _post(url, "/completion", {"prompt": "def foo(x):", "n_predict": 8, "temperature": 0})
    assert r["content"] == want.text and r["stop"] is True and r["tokens_predicted"] == 8
    assert r["tokens_evaluated"] == want.prompt_tokens and r["stop_type"] == "limit" and r["truncated"] is False
    assert set(r["timings"]) == TIMING_KEYS and r["timings"]["predicted_n"] == 8
    assert r["generation_settings"]["n_predict"] == 8 and r["generation_settings"]["n_ctx"] == CONTEXT
    assert r["model"] == "tiny" and "tokens_cached" in r and isinstance(r["id_slot"], int)
    # Token ids as the prompt: the same ids, the same text.
    ids = llama.tokenizer.encode("def foo(x):", bos=True)
    assert _post(url, "/completion", {"prompt": ids, "n_predict": 8, "temperature": 0})["content"] == want.text


def test_completion_streams_llamacpp_data_lines(url, llama):
    want = llama.complete("import os\n", max_new_tokens=10)
    events = _stream(url, "/completion", {"prompt": "import os\n", "n_predict": 10, "temperature": 0})
    assert "".join(e["content"] for e in events) == want.text
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1]["tokens_predicted"] == 10 and set(events[-1]["timings"]) == TIMING_KEYS


def test_n_predict_minus_one_runs_to_the_end_of_the_context_and_too_many_shrinks(url, llama):
    r = _post(url, "/completion", {"prompt": "x = [1, 2,", "n_predict": -1, "temperature": 0})
    assert r["tokens_evaluated"] + r["tokens_predicted"] <= CONTEXT
    assert r["stop_type"] == "eos" or r["tokens_predicted"] == min(100, CONTEXT - r["tokens_evaluated"])
    # llama.cpp fits n_predict to the context rather than refusing (the OpenAI endpoints refuse).
    long_prompt = "x = 1\n" * 20
    r = _post(url, "/completion", {"prompt": long_prompt, "n_predict": 100, "temperature": 0})
    assert r["tokens_evaluated"] + r["tokens_predicted"] <= CONTEXT and r["tokens_evaluated"] > 28
    err = httpx.post(url + "/v1/completions", json={"prompt": long_prompt, "max_tokens": 100}).json()["error"]
    assert err["code"] == "context_length_exceeded"


def test_repeat_penalty_reaches_the_sampler_and_equals_the_library(url, llama):
    plain = llama.complete("def foo(x):", max_new_tokens=16)
    want = llama.complete("def foo(x):", max_new_tokens=16, repetition_penalty=1.5, penalty_last_n=64)
    assert want.text != plain.text  # the penalty changes this greedy output
    r = _post(url, "/completion", {"prompt": "def foo(x):", "n_predict": 16, "temperature": 0,
                                   "repeat_penalty": 1.5, "repeat_last_n": 64})
    assert r["content"] == want.text
    tabby = _post(url, "/completion", {"prompt": "def foo(x):", "n_predict": 16, "temperature": 0,
                                       "presence_penalty": 0.5, "penalty_last_n": 32})
    assert tabby["content"] == llama.complete("def foo(x):", max_new_tokens=16, presence_penalty=0.5,
                                              penalty_last_n=32).text
    # "penalties" left out of samplers: no penalties (llama.cpp applies only the samplers named).
    off = _post(url, "/completion", {"prompt": "def foo(x):", "n_predict": 16, "temperature": 0,
                                     "repeat_penalty": 1.5, "samplers": ["top_k", "top_p"]})
    assert off["content"] == plain.text


def test_openai_penalties_and_max_tokens_minus_one(url, llama):
    want = llama.complete("def foo(x):", max_new_tokens=12, repetition_penalty=1.3, presence_penalty=0.5,
                          frequency_penalty=0.2, penalty_last_n=-1)
    body = {"prompt": "def foo(x):", "max_tokens": 12, "temperature": 0, "repetition_penalty": 1.3,
            "presence_penalty": 0.5, "frequency_penalty": 0.2}
    assert _post(url, "/v1/completions", body)["choices"][0]["text"] == want.text
    # max_tokens -1 (llama.vscode's chat edit): no limit but the context.
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1, "temperature": 0}
    r = _post(url, "/v1/chat/completions", chat)
    assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] <= CONTEXT
    assert r["choices"][0]["finish_reason"] in ("stop", "length")


def test_samplers_select_which_samplers_apply(url):
    # Without "temperature" and "top_p" in samplers, sampling is at temperature 1 with top-k only.
    body = {"prompt": "def foo(x):", "n_predict": 12, "seed": 7}
    chosen = _post(url, "/completion", body | {"samplers": ["top_k"], "temperature": 0.5, "top_p": 0.5})
    same = _post(url, "/completion", body | {"temperature": 1.0, "top_p": 1.0, "top_k": 40})
    assert chosen["content"] == same["content"]


def test_response_fields_keep_only_the_named_fields(url):
    fields = ["content", "timings/prompt_n", "generation_settings.n_predict", "tokens_cached", "no/such"]
    r = _post(url, "/completion", {"prompt": "def", "n_predict": 3, "temperature": 0, "response_fields": fields})
    assert set(r) == {"content", "timings/prompt_n", "generation_settings.n_predict", "tokens_cached"}
    assert r["generation_settings.n_predict"] == 3 and isinstance(r["timings/prompt_n"], int)
    assert select_fields({"a": {"b": 1}, "c": 2}, ["a/b", "a/x", "c"]) == {"a/b": 1, "c": 2}


# ---- tokens, server state ------------------------------------------------------------------------------------
def test_tokenize_and_detokenize(url, llama):
    tok = llama.tokenizer
    text = "def add(a, b):\n    return a + b"
    ids = _post(url, "/tokenize", {"content": text})["tokens"]
    assert ids == tok.encode(text)
    assert _post(url, "/tokenize", {"content": text, "add_special": True})["tokens"] == [tok.bos_id] + ids
    pieces = _post(url, "/tokenize", {"content": text, "with_pieces": True})["tokens"]
    assert [p["id"] for p in pieces] == ids and all(isinstance(p["piece"], (str, list)) for p in pieces)
    assert _post(url, "/detokenize", {"tokens": ids}) == {"content": text}


def test_props_slots_health_and_metrics(url):
    props = httpx.get(url + "/props").json()
    assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == CONTEXT
    slots = httpx.get(url + "/slots").json()
    assert [s["id"] for s in slots] == [0, 1] and all(s["n_ctx"] == CONTEXT for s in slots)
    assert {"id_task", "is_processing", "params"} <= set(slots[0])
    for path in ("/health", "/v1/health"):
        assert httpx.get(url + path).json()["status"] == "ok"
    _post(url, "/completion", {"prompt": "x", "n_predict": 2})
    metrics = httpx.get(url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'codellama_requests_total{endpoint="/completion",status="200"}' in metrics.text
    # The exposition is Prometheus' own format (prometheus_client), with the engine's counters read at scrape.
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    assert families["codellama_requests"].type == "counter"
    assert families["codellama_engine_steps"].samples[0].value > 0
    assert families["codellama_time_to_first_token_seconds"].type == "histogram"


def test_each_app_has_its_own_metrics_registry(llama):
    one, two = (create_app(llama, engine=Engine(llama, max_batch_size=1, threads=1)) for _ in range(2))
    one.state.metrics.request_done("/completion", 200, 0.1)
    assert b'endpoint="/completion"' in one.state.metrics.render()
    assert b'endpoint="/completion"' not in two.state.metrics.render()


# ---- OpenAI paths without /v1, model names -------------------------------------------------------------------
def test_openai_paths_without_v1_and_model_names(url, llama):
    want = llama.complete("def foo(x):", max_new_tokens=6).text
    for path in ("/v1/completions", "/completions"):
        for model in ("tiny", "tiny-ckpt", None, ""):  # served name, checkpoint name, or none at all
            body = {"prompt": "def foo(x):", "max_tokens": 6, "temperature": 0, "model": model}
            assert _post(url, path, body)["choices"][0]["text"] == want
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    assert _post(url, "/chat/completions", chat)["choices"][0]["message"]["role"] == "assistant"
    assert httpx.get(url + "/models").json()["data"][0]["id"] == "tiny"
    r = httpx.post(url + "/v1/chat/completions", json=chat | {"model": "gpt-4o"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
