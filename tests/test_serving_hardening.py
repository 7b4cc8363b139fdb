"""Hostile input against the HTTP server (issue 12): lone surrogates, deep nesting, huge seeds, odd
``stream_options``, non-JSON numbers all get a 400 error object naming the problem, never a 500; one request's
sampling parameters cannot fail the batch; a body that trickles in gets a 408, a client that hangs up mid-body
is one short log line, connections are capped; an unexpected bug is one generic 500 and one traceback."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import socket
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from codellama import cli  # noqa: E402
from codellama.api import CodeLlama  # noqa: E402
from codellama.checkpoint import save_checkpoint  # noqa: E402
from codellama.errors import CodeLlamaError  # noqa: E402
from codellama.serving import app as app_module  # noqa: E402
from codellama.serving import core as core_module  # noqa: E402
from codellama.serving import openai_api as openai_module  # noqa: E402
from codellama.serving.app import ServerConfig, create_app, running_server  # noqa: E402
from codellama.serving.scheduler import Engine  # noqa: E402
from codellama.serving.server import _uvicorn_config  # noqa: E402
from codellama.tokenizer import Tokenizer  # noqa: E402
from conftest import peaked_model  # noqa: E402

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llama(tiny_tokenizer_path) -> CodeLlama:
    return CodeLlama(peaked_model(128), Tokenizer(tiny_tokenizer_path), name="tiny")


@pytest.fixture(scope="module")
def server(llama):
    engine = Engine(llama, max_batch_size=4, max_queue=8, threads=1)
    config = ServerConfig(model_name="tiny", max_tokens_cap=32, body_timeout_s=0.6, max_connections=6)
    with running_server(create_app(llama, engine=engine, config=config)) as url:
        yield url, engine


def _post_raw(url: str, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=30)


def _error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in r.text
    return err


# ---- bad text and structure: 400 naming the field, never 500 ----------------------------------------------------
# Each body is raw JSON text in which the escape \ud800 (a lone surrogate) sits in one text field.
SURROGATES = [
    ("/v1/completions", '{"prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"]}', "prompt[1]"),
    ("/v1/completions", '{"prompt": "x", "suffix": "\\ud800"}', "suffix"),
    ("/v1/completions", '{"prompt": "x", "stop": "\\ud800"}', "stop"),
    ("/v1/completions", '{"prompt": "x", "stop": ["a", "\\udbff"]}', "stop[1]"),
    ("/v1/completions", '{"prompt": "x", "user": "\\ud800"}', "user"),
    (CHAT, '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    (CHAT, '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages[0].content[0].text"),
    (CHAT, '{"messages": [{"role": "\\ud800", "content": "hi"}]}', "messages[0].role"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}', "stop"),
    ("/infill", '{"input_prefix": "\\ud800"}', "input_prefix"),
    ("/infill", '{"input_suffix": "\\ud800"}', "input_suffix"),
    ("/infill", '{"input_prefix": "a", "prompt": "\\ud800"}', "prompt"),
    ("/infill", '{"input_extra": [{"filename": "\\ud800", "text": "x"}]}', "input_extra[0].filename"),
    ("/infill", '{"input_extra": [{"filename": "f", "text": "\\ud800"}]}', "input_extra[0].text"),
    ("/completion", '{"prompt": "a\\ud800b"}', "prompt"),
    ("/completion", '{"prompt": [1, "\\udfff"]}', "prompt[1]"),
    ("/tokenize", '{"content": "\\ud800"}', "content"),
    ("/completions", '{"prompt": "x", "suffix": "\\ud800"}', "suffix"),
    ("/v1/completions", '{"prompt": "x", "\\ud800": 1}', "body (a key)"),
]


@pytest.mark.parametrize("path,raw,param", SURROGATES, ids=[s[2] + s[0] for s in SURROGATES])
def test_a_lone_surrogate_in_any_text_field_is_a_400_naming_it(server, path, raw, param):
    url, engine = server
    err = _error(_post_raw(url, path, raw.encode()))
    assert err["param"] == param and err["code"] == "invalid_value" and "surrogate" in err["message"]
    assert engine.active == 0 and engine.queue_depth == 0


def test_a_valid_surrogate_pair_is_ordinary_text(server, llama):
    url, _ = server
    # "\ud83d\ude00" is one character (an emoji), not a lone surrogate.
    r = _post_raw(url, "/v1/completions", b'{"prompt": "# \\ud83d\\ude00", "max_tokens": 4, "temperature": 0}')
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == llama.complete("# \U0001F600",
                                                                                     max_new_tokens=4).text


@pytest.mark.parametrize("raw,code,words", [
    (b'{"prompt": "x", "deep": ' + b"[" * 1000 + b"]" * 1000 + b"}", "invalid_json", "nested"),
    (b'{"prompt": "x", "deep": ' + b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"}", "invalid_json", "nested"),
    (b"[" * 200_000 + b"]" * 200_000, "invalid_json", "nested"),
    (b'{"prompt": "x", "temperature": NaN}', "invalid_json", "NaN"),
    (b'{"prompt": "x", "junk": -Infinity}', "invalid_json", "Infinity"),
    (b'{"prompt": "x", "temperature": 1e999}', "invalid_value", "temperature"),
    (b'{"prompt": "x", "max_tokens": 1e999}', "invalid_value", "max_tokens"),
    (b'{"prompt": "x", "n": ' + b"9" * 4000 + b"}", "invalid_value", "n must be in"),
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "invalid_json", "JSON"),
    (b'{"prompt": "\xed\xa0\x80"}', "invalid_value", "surrogate"),  # json decodes such bytes with surrogatepass
], ids=["list-1000", "object-1000", "list-200000", "NaN", "-Infinity", "1e999-temperature", "1e999-max_tokens",
        "4000-digit-n", "5000-digit-int", "utf8-surrogate"])
def test_deep_nesting_non_json_numbers_and_huge_integers_are_400s(server, raw, code, words):
    url, _ = server
    err = _error(_post_raw(url, "/v1/completions", raw))
    assert err["code"] == code and words in err["message"] and len(err["message"]) < 300


@pytest.mark.parametrize("path,extra", [("/v1/completions", {"prompt": "x"}), (CHAT, {"messages": USER}),
                                        ("/infill", {"input_prefix": "x"})])
def test_seed_range_and_stream_options(server, llama, path, extra):
    url, _ = server
    for seed in (2**64, 10**30, -2):
        err = _error(httpx.post(url + path, json=extra | {"seed": seed, "temperature": 0.8}))
        assert err["param"] == "seed" and "[0, 2**64)" in err["message"]
    for seed in (2**64 - 1, -1, 0):  # -1: random (llama.cpp)
        r = httpx.post(url + path, json=extra | {"seed": seed, "temperature": 0.8, "max_tokens": 3, "n_predict": 3})
        assert r.status_code == 200, r.text
    if path == "/infill":
        return
    for options in (3, "yes", [1], {"include_usage": "yes"}):
        for stream in (True, False):
            err = _error(httpx.post(url + path, json=extra | {"stream": stream, "stream_options": options}))
            assert err["param"] in ("stream_options", "include_usage")


def test_wrapped_seeds_match_the_library(server, llama):
    # n=2 from the top seed: choice 1 samples with (2**64 - 1 + 1) mod 2**64 = 0, as the library's batch does.
    url, _ = server
    r = httpx.post(url + "/v1/completions", json={"prompt": "def", "n": 2, "max_tokens": 8, "temperature": 0.9,
                                                  "seed": 2**64 - 1})
    want = llama.complete(["def", "def"], max_new_tokens=8, temperature=0.9, seed=2**64 - 1)
    assert [c["text"] for c in r.json()["choices"]] == [w.text for w in want]


def test_a_huge_list_of_prompts_is_refused_before_it_is_tokenized(server):
    url, _ = server
    start = time.perf_counter()
    err = _error(httpx.post(url + "/v1/completions", json={"prompt": ["x"] * 300_000, "max_tokens": 1}))
    assert err["param"] == "prompt" and "sequences" in err["message"] and time.perf_counter() - start < 5


# ---- one request's parameters only fail that request ---------------------------------------------------------
def test_a_tiny_temperature_does_not_take_down_the_running_batch(server, llama):
    url, engine = server
    bodies = [{"prompt": "def foo(x):", "max_tokens": 24, "temperature": 0},
              {"prompt": "import os\n", "max_tokens": 24, "temperature": 3e-38},
              {"prompt": "class A:", "max_tokens": 24, "temperature": 1e-300, "top_p": 1e-300, "top_k": 10**30},
              {"prompt": "for i in", "max_tokens": 24, "temperature": 1e-40},
              {"prompt": "x = [1,", "max_tokens": 24, "temperature": 2.0, "top_p": 1.0, "seed": 5}]
    errors_before = engine.stats.errors
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: httpx.post(url + "/v1/completions", json=b, timeout=60), bodies))
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    assert engine.stats.errors == errors_before
    # Temperatures below the greedy threshold are greedy: the same text as the library's greedy run.
    for body, r in zip(bodies[:4], responses):
        assert r.json()["choices"][0]["text"] == llama.complete(body["prompt"], max_new_tokens=24).text
    want = llama.complete(bodies[4]["prompt"], max_new_tokens=24, temperature=2.0, seed=5)
    assert responses[4].json()["choices"][0]["text"] == want.text


# ---- the one place where exceptions become responses ----------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(logging.Formatter().format(r) for r in self.records)


@pytest.fixture
def records():
    """Everything the server logs (uvicorn's own loggers do not propagate to the root)."""
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "uvicorn.access", "codellama")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
    logging.getLogger("codellama").setLevel(logging.DEBUG)
    yield handler
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def test_an_unexpected_bug_is_one_generic_500_and_one_traceback(llama, monkeypatch, records):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")
    monkeypatch.setattr(core_module, "make_sequences", broken)
    with running_server(create_app(llama, max_batch_size=1, threads=1)) as url:
        for name in ("uvicorn", "uvicorn.error"):  # the server's start reconfigures uvicorn's loggers
            logging.getLogger(name).addHandler(records)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        err = _error(r, 500)
        assert err == {"message": "internal server error", "type": "server_error", "param": None,
                       "code": "internal_error"}
        assert "secret" not in r.text
        metrics = httpx.get(url + "/metrics").text
        assert 'codellama_requests_total{endpoint="/v1/completions",status="500"} 1' in metrics
    with_traceback = [rec for rec in records.records if rec.exc_info]
    assert len(with_traceback) == 1 and records.text().count("Traceback") == 1
    assert "secret internal detail" in records.text()


def test_library_errors_from_anywhere_are_400s(server, monkeypatch):
    url, _ = server

    def refuse(*args, **kwargs):
        raise CodeLlamaError("no chatting today")
    monkeypatch.setattr(openai_module, "openai_sampling", refuse)
    err = _error(httpx.post(url + CHAT, json={"messages": USER}))
    assert err["message"] == "no chatting today" and err["type"] == "invalid_request_error"


# ---- slow, vanishing and too many clients (real sockets against a real uvicorn) -------------------------------
def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _headers(length: int) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\n\r\n")


def test_a_trickling_body_gets_408_within_the_timeout(server):
    url, _ = server
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as s:
        s.sendall(_headers(1000) + b'{"prompt": ')
        start, answer = time.monotonic(), b""
        s.setblocking(False)
        while time.monotonic() - start < 5 and not answer.endswith(b"}"):
            try:
                s.send(b" ")  # a byte every 50 ms: never idle, never done
            except OSError:
                pass  # the server closed its side after answering
            try:
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
            except BlockingIOError:
                pass
            time.sleep(0.05)
        elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert 0.5 < elapsed < 3.0  # the configured 0.6 s, not for ever
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout" and body["error"]["type"] == "invalid_request_error"
    assert b"connection: close" in answer.lower()


def test_a_client_dropping_mid_body_logs_no_traceback_and_the_server_goes_on(server, llama, records):
    url, engine = server
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as s:
            s.sendall(_headers(500) + b'{"prompt": "half a bo')
            time.sleep(0.05)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len([r for r in records.records if "disconnected" in r.getMessage()]) < 3:
        time.sleep(0.02)
    text = records.text()
    assert "Traceback" not in text and not any(r.exc_info for r in records.records)
    gone = [r for r in records.records if "disconnected" in r.getMessage()]
    assert len(gone) == 3 and all("\n" not in r.getMessage() and r.levelno <= logging.INFO for r in gone)
    r = httpx.post(url + "/v1/completions", json={"prompt": "def", "max_tokens": 5, "temperature": 0})
    assert r.json()["choices"][0]["text"] == llama.complete("def", max_new_tokens=5).text
    assert engine.active == 0


def test_connections_beyond_the_cap_get_503_and_the_server_recovers(server):
    url, _ = server
    held = [socket.create_connection(("127.0.0.1", _port(url)), timeout=10) for _ in range(6)]
    try:
        time.sleep(0.1)  # let the server register them
        assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 503
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while True:
        status = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200


# ---- the serve command's flags ---------------------------------------------------------------------------------
def test_serve_flags_reach_uvicorn_and_bad_values_are_one_line_errors(llama, tiny_tokenizer_path, tmp_path,
                                                                      monkeypatch, capsys):
    for flags, message in [(["--body-timeout", "0"], "error: --body-timeout must be > 0 seconds, got 0.0"),
                           (["--body-timeout", "nan"], "error: --body-timeout must be > 0 seconds, got nan"),
                           (["--max-connections", "0"], "error: --max-connections must be >= 1, got 0")]:
        assert cli.main(["serve", *flags]) == 2
        assert capsys.readouterr().err == message + "\n"
    checkpoint = save_checkpoint(peaked_model(128), tmp_path / "tiny", tokenizer=tiny_tokenizer_path)
    served = []
    monkeypatch.setattr(app_module, "serve", lambda app, *args, **kwargs: served.append(app))
    assert cli.main(["serve", "--model", str(checkpoint), "--body-timeout", "2.5", "--max-connections", "7",
                     "--threads", "1"]) == 0
    config = served[0].state.config
    assert (config.body_timeout_s, config.max_connections) == (2.5, 7)
    assert _uvicorn_config(served[0], "warning", 1).limit_concurrency == 7
    assert (ServerConfig().body_timeout_s, ServerConfig().max_connections) == (30.0, 512)  # the defaults
    engines = []
    monkeypatch.setattr(app_module, "create_app", lambda llama, engine, config: engines.append(engine) or "app")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli, "default_threads", lambda: 3)
    assert cli.main(["serve", "--model", str(checkpoint)]) == 0
    assert engines[-1].threads == 3  # serve's default is the other commands' (half the CPUs, at most 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cli.main(["serve", "--model", str(checkpoint)]) == 0
    assert engines[-1].threads is None  # $OMP_NUM_THREADS: left to torch
    with pytest.raises(CodeLlamaError):
        ServerConfig(body_timeout_s=-1)


def test_tokenizing_a_huge_prompt_does_not_stall_other_requests(llama):
    """Tokenizing a 4 MiB body takes most of a second; it runs off the event loop (sentencepiece releases the
    GIL), so another client's requests are answered meanwhile instead of waiting for it."""
    text = "def f(x):\n    return [x * i for i in range(10)]  # a comment\n" * 60_000  # ~3.7 MiB
    body = json.dumps({"content": text}).encode()
    with running_server(create_app(llama, engine=Engine(llama, max_batch_size=1, threads=1))) as url:
        latencies: list[float] = []

        def poll(until: float) -> None:
            while time.perf_counter() < until:
                t = time.perf_counter()
                httpx.get(url + "/health", timeout=30)
                latencies.append(time.perf_counter() - t)
                time.sleep(0.01)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            start = time.perf_counter()
            tokenized = _post_raw(url, "/tokenize", body)
            took = time.perf_counter() - start
            # Poll during a second tokenize of the same size, now that we know how long one takes.
            poller = pool.submit(poll, time.perf_counter() + took)
            again = _post_raw(url, "/tokenize", body)
            poller.result()
    assert tokenized.status_code == again.status_code == 200 and len(tokenized.json()["tokens"]) > 100_000
    if took < 0.3:
        pytest.skip(f"tokenizing took only {took:.2f} s here: too short to tell a blocked loop from a free one")
    assert latencies and max(latencies) < took / 2, (took, max(latencies))
