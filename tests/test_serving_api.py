"""The HTTP server through real clients on loopback: the official ``openai`` package gets the library's
greedy text (completions, chat, streaming, suffix infilling), concurrent requests get their solo output,
llama.cpp's /infill, every bad input's status and error object, API keys, a full queue, cancelled streams,
/health and /metrics, and ``codellama serve`` itself."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from codellama.api import CodeLlama  # noqa: E402
from codellama.checkpoint import save_checkpoint  # noqa: E402
from codellama.config import ModelConfig  # noqa: E402
from codellama.model import Transformer  # noqa: E402
from codellama.serving.app import ServerConfig, create_app, running_server  # noqa: E402
from codellama.serving.scheduler import Engine  # noqa: E402
from codellama.tokenizer import Tokenizer  # noqa: E402
from conftest import peaked_model, serving_url  # noqa: E402

CONTEXT = 128
PROMPTS = ["def foo(x):", "import os\n", "class A:\n    def", "x = [1, 2,", "for i in range(",
           "# hello world", "while True:\n    ", "print("]


@pytest.fixture(scope="module")
def checkpoint(tiny_tokenizer_path, tmp_path_factory):
    return save_checkpoint(peaked_model(CONTEXT), tmp_path_factory.mktemp("serve") / "tiny", tokenizer=tiny_tokenizer_path)


@pytest.fixture(scope="module")
def llama(tiny_tokenizer_path) -> CodeLlama:
    return CodeLlama(peaked_model(CONTEXT), Tokenizer(tiny_tokenizer_path), name="tiny")


@pytest.fixture(scope="module")
def server(llama):
    """One server for the read-only tests: batch of 4, short queue, small body limit and max_tokens cap."""
    engine = Engine(llama, max_batch_size=4, max_queue=8, threads=1)
    config = ServerConfig(model_name="tiny", max_body_bytes=64 * 1024, max_tokens_cap=100)
    app = create_app(llama, engine=engine, config=config)
    with running_server(app) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


# ---- the official client gets the library's text ---------------------------------------------------------
def test_openai_completions_streaming_and_infilling_equal_the_library(client, llama):
    want = llama.complete(PROMPTS[0], max_new_tokens=24)
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.model == "tiny" and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, 24)

    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 5 and "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-2].choices[0].finish_reason == "length"

    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    want = llama.infill(prefix, suffix, max_new_tokens=20)
    r = client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=20, temperature=0)
    assert r.choices[0].text == want.text
    chunks = client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=20, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want.text

    # A list of prompts gives one choice each, in order; token ids are a prompt as well.
    ids = llama.tokenizer.encode(PROMPTS[4], bos=True)
    r = client.completions.create(model="tiny", prompt=[PROMPTS[4], PROMPTS[5]], max_tokens=8, temperature=0)
    assert [c.text for c in r.choices] == [w.text for w in llama.complete(PROMPTS[4:6], max_new_tokens=8)]
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r2.choices[0].text == r.choices[0].text and r2.usage.prompt_tokens == len(ids)

    want = llama.complete(PROMPTS[1], max_new_tokens=40, stop=["e", "\n"])
    r = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=40, temperature=0, stop=["e", "\n"])
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason == "stop"


def test_openai_chat_and_chat_streaming_equal_the_library(client, llama):
    messages = [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": "Sort a list."}]
    want = llama.chat(messages, max_new_tokens=30)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == want.prompt_tokens and r.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].object == "chat.completion.chunk"


def test_sampled_choices_use_seed_plus_index_like_a_library_batch(client, llama):
    want = llama.complete([PROMPTS[2]] * 3, max_new_tokens=16, temperature=0.8, top_p=0.95, seed=11)
    r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0.8, top_p=0.95,
                                  seed=11, n=3)
    assert [c.text for c in r.choices] == [w.text for w in want] and [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1
    assert r.usage.prompt_tokens == want[0].prompt_tokens and r.usage.completion_tokens == 48


def test_echo_and_logprobs(client, llama):
    want = llama.complete(PROMPTS[3], max_new_tokens=5, logprobs=True, echo=True)
    r = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=5, temperature=0, logprobs=3,
                                  echo=True)
    c = r.choices[0]
    assert c.text == want.text and c.text.startswith(PROMPTS[3])
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want.logprobs[1:], abs=1e-5)
    assert len(lp.tokens) == len(want.tokens) and all(len(t) == 3 for t in lp.top_logprobs[1:])
    # Scoring a prompt: max_tokens=0 with echo returns the prompt and its logprobs only.
    r = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=0, logprobs=0, echo=True)
    assert r.choices[0].text == PROMPTS[3] and r.usage.completion_tokens == 0
    assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want.logprobs[1:-5], abs=1e-5)
    # Streaming with echo: the prompt (with its logprobs) comes first, then the generated text.
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=5, temperature=0,
                                            logprobs=1, echo=True, stream=True))
    assert chunks[0].choices[0].text == PROMPTS[3] and "".join(c.choices[0].text for c in chunks) == want.text
    streamed = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(want.logprobs[1:], abs=1e-5)
    # Chat logprobs (the newer format).
    messages = [{"role": "user", "content": "hi"}]
    want = llama.chat(messages, max_new_tokens=4, logprobs=True)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [t.logprob for t in content] == pytest.approx(want.logprobs, abs=1e-5)
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)


def test_eight_concurrent_requests_each_get_their_solo_output(server, client, llama):
    url, engine = server
    lengths = [30, 12, 45, 20, 8, 37, 25, 16]
    want = [llama.complete(p, max_new_tokens=n).text for p, n in zip(PROMPTS, lengths)]
    steps, rows = engine.stats.steps, engine.stats.batch_rows_sum

    def ask(i: int) -> str:
        if i % 2:  # half of them streaming
            return "".join(c.choices[0].text for c in client.completions.create(
                model="tiny", prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0, stream=True))
        return client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=lengths[i],
                                         temperature=0).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == want
    assert engine.stats.batch_rows_sum - rows > 1.5 * (engine.stats.steps - steps)  # they did share steps


# ---- llama.cpp /infill ---------------------------------------------------------------------------------
def test_llamacpp_infill(server, llama):
    url, _ = server
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    want = llama.infill(prefix, suffix, max_new_tokens=12)
    body = {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 12, "temperature": 0}
    r = httpx.post(url + "/infill", json=body).json()
    assert r["content"] == want.text and r["stop"] is True and r["tokens_predicted"] == 12
    assert r["stop_type"] == "limit" and r["stopped_limit"] and r["truncated"] is False
    with httpx.stream("POST", url + "/infill", json=body | {"stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert "".join(e["content"] for e in events) == want.text
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    # Other files as context lengthen the prompt; a prefix beyond the context is cut from the left.
    extra = [{"filename": "util.py", "text": "def helper():\n    pass\n"}]
    r2 = httpx.post(url + "/infill", json=body | {"input_extra": extra}).json()
    assert r2["tokens_evaluated"] > r["tokens_evaluated"]
    r3 = httpx.post(url + "/infill", json=body | {"input_prefix": "x = 1\n" * 200 + prefix}).json()
    assert r3["truncated"] is True and r3["tokens_evaluated"] <= CONTEXT - 12 and r3["tokens_predicted"] == 12


# ---- bad input: status and OpenAI-style error object -----------------------------------------------------
BAD = [
    ("/v1/completions", b'{"prompt": "x", ', 400, "invalid_json"),
    ("/v1/completions", b'["not", "an", "object"]', 400, "invalid_json"),
    ("/v1/completions", {"max_tokens": 5}, 400, "missing_required_parameter"),
    ("/v1/completions", {"prompt": 5}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 101}, 400, "max_tokens_exceeded"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -2}, 400, "invalid_value"),  # -1 is "no limit"
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "n": 17}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "stop": [1, 2]}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "seed": "s"}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model_not_found"),
    ("/completions", {"prompt": "x", "model": 3}, 400, "invalid_value"),
    # Prompt + max_tokens beyond the context: a 400 as in OpenAI and vLLM, with or without suffix.
    ("/v1/completions", {"prompt": "x " * 40, "max_tokens": 100}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x " * 40, "suffix": "y", "max_tokens": 100}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "unsupported_parameter"),
    ("/v1/completions", {"prompt": "x " * 300}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": [1, 2, 9999]}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x" * 70000}, 413, "body_too_large"),
    ("/v1/chat/completions", {"messages": []}, 400, "invalid_value"),
    ("/v1/chat/completions", {}, 400, "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "[INST] hi"}]}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 300}]}, 400,
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "unsupported_parameter"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "other"}, 404,
     "model_not_found"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x " * 40}], "max_tokens": 100}, 400,
     "context_length_exceeded"),
    ("/infill", {"input_prefix": 3}, 400, "invalid_value"),
    ("/infill", {"input_prefix": "a", "input_extra": "b"}, 400, "invalid_value"),
    ("/infill", {"input_prefix": "a", "n_predict": 1000}, 400, "max_tokens_exceeded"),
    ("/infill", {"input_prefix": "a", "samplers": ["top_k", "nucleus"]}, 400, "invalid_value"),
    ("/infill", {"input_prefix": "a", "id_slot": 4}, 400, "invalid_value"),
    ("/infill", {"input_prefix": "a", "n_indent": -1}, 400, "invalid_value"),
    ("/infill", {"input_prefix": "a", "cache_prompt": "yes"}, 400, "invalid_value"),
    ("/completion", {}, 400, "missing_required_parameter"),
    ("/completion", {"prompt": ""}, 400, "invalid_value"),
    ("/completion", {"prompt": [1, 9999]}, 400, "invalid_value"),
    ("/completion", {"prompt": "x", "n_predict": -2}, 400, "invalid_value"),
    ("/completion", {"prompt": "x", "repeat_penalty": 0}, 400, "invalid_value"),
    ("/completion", {"prompt": "x", "presence_penalty": 3}, 400, "invalid_value"),
    ("/completion", {"prompt": "x", "repeat_last_n": -2}, 400, "invalid_value"),
    ("/completion", {"prompt": "x", "temperature": "hot"}, 400, "invalid_value"),
    ("/completion", {"prompt": "x", "seed": 2**64}, 400, "invalid_value"),
    ("/completion", {"prompt": "x " * 300}, 400, "context_length_exceeded"),
    ("/tokenize", {"content": 3}, 400, "invalid_value"),
    ("/tokenize", {}, 400, "missing_required_parameter"),
    ("/detokenize", {"tokens": [1, 99999]}, 400, "invalid_value"),
    ("/detokenize", {"tokens": "abc"}, 400, "invalid_value"),
]


@pytest.mark.parametrize("path,body,status,code", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_documented_status_and_error_object(server, path, body, status, code):
    url, engine = server
    if isinstance(body, bytes):
        r = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "Traceback" not in r.text
    assert err["type"] == "invalid_request_error" and err["code"] == code
    assert engine.active == 0 and engine.queue_depth == 0  # nothing was queued for a bad request


def test_unknown_routes_methods_and_chunked_oversized_bodies(server):
    url, _ = server
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.get(url + "/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(100):
            yield b" " * 1024
    r = httpx.post(url + "/v1/completions", content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_model_without_fim_refuses_suffix(tiny_nofim_tokenizer_path):
    llama = CodeLlama(peaked_model(CONTEXT), Tokenizer(tiny_nofim_tokenizer_path), name="nofim")
    with running_server(create_app(llama, max_batch_size=1, threads=1)) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "a", "suffix": "b"})
        assert r.status_code == 400 and "cannot infill" in r.json()["error"]["message"]
        r = httpx.post(url + "/infill", json={"input_prefix": "a"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "infilling_unsupported"
        assert httpx.get(url + "/v1/models").json()["data"][0]["infilling"] is False


def test_api_key(llama):
    app = create_app(llama, config=ServerConfig(model_name="tiny", api_key="s3cret-key"), max_batch_size=1,
                     threads=1)
    with running_server(app) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
            r = httpx.get(url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-key", max_retries=0)
        r = good.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="x", max_tokens=2)


# ---- load: full queue, cancellation --------------------------------------------------------------------
def _slow(engine: Engine, seconds: float) -> None:
    # Slow decode steps so that streams are still running while the test acts on them.
    decode = engine._decode

    def slow(dec):
        time.sleep(seconds)
        decode(dec)
    engine._decode = slow


def test_full_queue_answers_503_with_retry_after_and_cancelled_streams_free_their_slots(llama):
    engine = Engine(llama, max_batch_size=1, max_queue=1, threads=1)
    _slow(engine, 0.02)
    with running_server(create_app(llama, engine=engine)) as url, httpx.Client(timeout=30) as http:
        body = {"prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0, "stream": True}
        with http.stream("POST", url + "/v1/completions", json=body) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # running in the only row
            with http.stream("POST", url + "/v1/completions", json=body) as second:  # waits in the queue
                assert second.status_code == 200
                r = http.post(url + "/v1/completions", json=body | {"stream": False})
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "overloaded" and r.json()["error"]["type"] == "server_error"
                assert engine.queue_depth == 1
            # Both clients hang up mid-stream: the running one frees its row, the waiting one leaves the queue.
        deadline = time.monotonic() + 10
        while (engine.active or engine.queue_depth) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.active == 0 and engine.queue_depth == 0 and engine.stats.cancelled == 2
        assert engine.stats.generated_tokens < 100  # stopped well before max_tokens
        metrics = http.get(url + "/metrics").text
        assert 'codellama_requests_total{endpoint="/v1/completions",status="503"} 1' in metrics
        assert "codellama_engine_cancelled_total 2" in metrics
        # A non-streaming client that gives up (timeout) has its generation cancelled too.
        with pytest.raises(httpx.ReadTimeout):
            http.post(url + "/v1/completions", json=body | {"stream": False}, timeout=0.3)
        deadline = time.monotonic() + 10
        while engine.stats.cancelled < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.stats.cancelled == 3 and engine.active == 0
        # The freed slot serves the next request with the right text.
        r = http.post(url + "/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0})
        assert r.json()["choices"][0]["text"] == llama.complete(PROMPTS[1], max_new_tokens=10).text


def test_health_models_and_metrics(server, client):
    url, engine = server
    client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
    assert httpx.get(url + "/health").json() == {"status": "ok", "slots_idle": 4, "slots_processing": 0,
                                                 "queue_depth": 0}
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    text = httpx.get(url + "/metrics").text
    n = int(re.search(r'codellama_requests_total\{endpoint="/v1/completions",status="200"\} (\d+)', text)[1])
    assert n >= 1
    assert re.search(r"codellama_time_to_first_token_seconds_count [1-9]", text)
    assert re.search(r'codellama_request_duration_seconds_bucket\{endpoint="/v1/completions",le="\+Inf"\} [1-9]',
                     text)
    assert "codellama_queue_depth 0" in text and "codellama_max_batch_size 4" in text
    assert int(re.search(r"codellama_completion_tokens_total (\d+)", text)[1]) >= 3


# ---- the command -------------------------------------------------------------------------------------------
def test_cli_serve_binds_loopback_and_serves(checkpoint):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "codellama", "serve", "--model", str(checkpoint), "--port", "0",
                             "--max-batch-size", "2", "--api-key", "k", "--log-level", "warning", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = serving_url(proc, proc.kill, 60, expect="(batch 2, context 128)")
        assert httpx.get(url + "/health").json()["status"] == "ok"
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 0},
                       headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        proc.wait(20)
    r = subprocess.run([sys.executable, "-m", "codellama", "serve", "--model", str(checkpoint),
                        "--max-batch-size", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "error: --max-batch-size must be >= 1, got 0"


def test_engine_failure_is_a_500_error_object_and_an_error_event(llama):
    engine = Engine(llama, max_batch_size=2, threads=1)

    def broken(dec):
        raise RuntimeError("simulated out of memory")
    engine._decode = broken
    with running_server(create_app(llama, engine=engine)) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 5})
        assert r.status_code == 500 and "Traceback" not in r.text
        assert r.json()["error"] == {"message": "generation failed: RuntimeError: simulated out of memory",
                                     "type": "server_error", "param": None, "code": "generation_failed"}
        with httpx.stream("POST", url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert json.loads(lines[-2][6:])["error"]["code"] == "generation_failed" and lines[-1] == "data: [DONE]"
        assert httpx.get(url + "/health").json()["status"] == "ok"


def test_real_vocabulary_infilling_and_chat_equal_the_library(real_tokenizer_path):
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32016, multiple_of=32,
                         max_seq_len=256)
    torch.manual_seed(1)
    model = Transformer(config)
    model.init_weights(std=0.3)
    llama = CodeLlama(model.eval(), Tokenizer(real_tokenizer_path), name="real-vocab")
    prefix, suffix = "def remove_non_ascii(s: str) -> str:\n    \"\"\" ", "\n    return result\n"
    messages = [{"role": "user", "content": "In Bash, how do I list all text files?"}]
    with running_server(create_app(llama, max_batch_size=2, threads=1)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="real-vocab", prompt=prefix, suffix=suffix, max_tokens=12, temperature=0)
        assert r.choices[0].text == llama.infill(prefix, suffix, max_new_tokens=12).text
        r = client.chat.completions.create(model="real-vocab", messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == llama.chat(messages, max_new_tokens=12).text
        body = {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 12, "temperature": 0}
        assert httpx.post(url + "/infill", json=body).json()["content"] == llama.infill(prefix, suffix,
                                                                                         max_new_tokens=12).text


def test_step_chat_format_equals_the_library(tiny_step_tokenizer_path):
    # A tokenizer with <step> means the 70B-Instruct format; the reply stops at <step>.
    llama = CodeLlama(peaked_model(CONTEXT), Tokenizer(tiny_step_tokenizer_path), name="step")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse a string."}]
    want = llama.chat(messages, max_new_tokens=16)
    with running_server(create_app(llama, max_batch_size=1, threads=1)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="step", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == want.prompt_tokens
