"""Property-based fuzzing of every POST endpoint (issue 12): random JSON bodies — random nesting and types,
unicode with lone surrogates and special tags, huge integers, ``NaN`` / ``Infinity`` / ``1e999`` as raw text,
field names from the real schema mixed with junk, and raw non-JSON bytes — never get a 5xx, every error body
is an OpenAI error object, streams carry no server error, and each request finishes in bounded time.

Bounded budget: a tiny random model, at most 4 tokens per sequence and 4 sequences per request (the server's
caps, so a random body cannot ask for more), a fixed number of derandomized examples per endpoint."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from codellama.api import CodeLlama  # noqa: E402
from codellama.config import ModelConfig  # noqa: E402
from codellama.model import Transformer  # noqa: E402
from codellama.serving.app import ServerConfig, create_app  # noqa: E402
from codellama.serving.scheduler import Engine  # noqa: E402
from codellama.tokenizer import Tokenizer  # noqa: E402

MAX_TOKENS = 4
SECONDS_PER_REQUEST = 10.0
EXAMPLES_PER_ENDPOINT = 250

# Sentinels replaced in the serialized text by what json.dumps cannot write.
_BIG = "\x00BIG\x00"
_DEEP = "\x00DEEP\x00"
_RAW = {json.dumps(_BIG): "1e999", json.dumps(_DEEP): "[" * 1000 + "]" * 1000}


@pytest.fixture(scope="module")
def client(tiny_tokenizer_path):
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=512, multiple_of=32,
                         max_seq_len=96)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(std=0.3)
    llama = CodeLlama(model.eval(), Tokenizer(tiny_tokenizer_path), name="tiny")
    engine = Engine(llama, max_batch_size=4, max_queue=4, threads=1)
    server_config = ServerConfig(model_name="tiny", max_tokens_cap=MAX_TOKENS, max_n=4, max_body_bytes=256 * 1024)
    with TestClient(create_app(llama, engine=engine, config=server_config), raise_server_exceptions=False) as c:
        c.engine = engine
        yield c


# ---- values ----------------------------------------------------------------------------------------------
_TAGS = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<step>", "<PRE>", "<SUF>", "<MID>", "<EOT>", "</s>", "<s>",
         "Source:", "\x00", "\n" * 5, "def f(x):\n    return", "user", "system", "text", "x " * 200, "\U0001F600"]
_PLAIN = st.text(st.characters(codec="utf-8"), max_size=30)
_CLEAN_TEXT = st.one_of(_PLAIN, _PLAIN, _PLAIN, st.sampled_from(_TAGS))
_TEXT = st.one_of(_CLEAN_TEXT, st.text(st.characters(codec=None), max_size=12),  # any code point, surrogates too
                  st.sampled_from(["\ud800", "a\udfffb", "\udbff\udc00\ud800"]))
_INT = st.one_of(st.integers(-3, 40), st.integers(), st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63 - 1,
                                                                      10**30, -(10**100), 10**4000]))
# NaN and ±Infinity are written as such (not JSON: the body is refused whole), so they are a few of many.
_FLOAT = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from([0.0, -0.0, 3e-38, 1e-40, 1e-300, 5e-324, 1e308, 2.0, 0.5, _BIG, _BIG,
                                    float("nan"), float("inf"), float("-inf")]))
_SCALAR = st.one_of(st.none(), st.booleans(), _INT, _FLOAT, _TEXT)
_JSON = st.recursive(_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(_TEXT, inner, max_size=3)), max_leaves=8)
_ANY = st.one_of(_JSON, st.just(_BIG))


def _mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A valid value of the field five times in six, anything at all otherwise."""
    return st.one_of(valid, valid, valid, valid, valid, _ANY)


# The values that broke the server before: in the mix often, not once in a million draws.
_TEMPERATURE = st.one_of(st.sampled_from([0.0, 3e-38, 1e-40, 1e-300, 5e-324, 1e-5, 1.0000001e-5, 2.0, 0.7]),
                         st.floats(0, 2))
_SEED = st.one_of(st.sampled_from([0, -1, 2**64 - 1, 2**64, 2**70, -2]), st.integers(-1, 2**64 - 1))
# A text field's value: usually clean, sometimes with a lone surrogate.
_FIELD_TEXT = st.one_of(_CLEAN_TEXT, _CLEAN_TEXT, _TEXT)
_SAMPLING = {
    "max_tokens": st.integers(-1, MAX_TOKENS), "temperature": _TEMPERATURE,
    "top_p": st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from([5e-324, 1e-300, 1.0])),
    "top_k": st.one_of(st.integers(-1, 600), st.sampled_from([10**30, 2**64])), "n": st.integers(1, 4),
    "seed": _SEED, "stop": st.one_of(_FIELD_TEXT, st.lists(_FIELD_TEXT, max_size=3)), "stream": st.booleans(),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}),
                                st.sampled_from([3, "yes", [], None, {"include_usage": 1}])),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.one_of(st.floats(0, 100, exclude_min=True), st.sampled_from([1.0, 1e-300, 100.0])),
    "logit_bias": st.just({}),
    "response_format": st.just({"type": "text"}), "user": _FIELD_TEXT,
    "model": st.one_of(st.sampled_from(["tiny", "", None]), _FIELD_TEXT),
}
# llama.cpp's options (/completion and /infill), as llama.vscode, llama.vim and Tabby send them.
_LLAMACPP = {
    "n_predict": st.integers(-1, MAX_TOKENS), "temperature": _TEMPERATURE,
    "top_p": _SAMPLING["top_p"], "top_k": _SAMPLING["top_k"], "seed": _SEED, "stop": _SAMPLING["stop"],
    "stream": st.booleans(), "min_p": st.floats(0, 1), "repeat_penalty": st.floats(0.5, 2),
    "repeat_last_n": st.integers(-1, 128), "penalty_last_n": st.integers(-1, 128),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2), "cache_prompt": st.booleans(),
    "id_slot": st.integers(-1, 3), "n_indent": st.integers(0, 8),
    "t_max_prompt_ms": st.sampled_from([-1, 0, 500]), "t_max_predict_ms": st.sampled_from([-1, 0, 1, 1000]),
    "samplers": st.one_of(st.lists(st.sampled_from(["top_k", "top_p", "infill", "min_p", "temperature",
                                                    "penalties"]), max_size=4), st.sampled_from(["top_k;top_p"])),
    "response_fields": st.lists(st.sampled_from(["content", "timings/prompt_n", "tokens_cached", "truncated",
                                                 "nothing/there", "generation_settings.n_predict"]), max_size=3),
}
_PROMPT = st.one_of(_FIELD_TEXT, st.lists(_FIELD_TEXT, min_size=1, max_size=2),
                    st.lists(st.integers(0, 511), min_size=1, max_size=20))
_DIALOG = st.one_of(
    st.tuples(_FIELD_TEXT).map(lambda t: [{"role": "user", "content": t[0]}]),
    st.tuples(_FIELD_TEXT, _FIELD_TEXT).map(lambda t: [{"role": "system", "content": t[0]},
                                                       {"role": "user", "content": [{"type": "text", "text": t[1]}]}]),
    st.tuples(_FIELD_TEXT, _FIELD_TEXT, _FIELD_TEXT).map(
        lambda t: [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]},
                   {"role": "developer", "content": t[2]}]),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
                                    "content": st.one_of(_TEXT, st.none())}), max_size=3))

REQUIRED = {"/v1/completions": {"prompt": _PROMPT}, "/v1/chat/completions": {"messages": _DIALOG},
            "/infill": {"input_prefix": _FIELD_TEXT},
            "/completion": {"prompt": st.one_of(_FIELD_TEXT, st.lists(st.one_of(st.integers(0, 511), _FIELD_TEXT),
                                                                      min_size=1, max_size=6))},
            "/tokenize": {"content": _FIELD_TEXT}, "/detokenize": {"tokens": st.lists(st.integers(0, 511))}}
OPTIONAL = {
    "/v1/completions": _SAMPLING | {"suffix": _FIELD_TEXT, "echo": st.booleans(), "logprobs": st.integers(0, 5)},
    "/v1/chat/completions": _SAMPLING | {"logprobs": st.booleans(), "top_logprobs": st.integers(0, 5),
                                         "max_completion_tokens": st.integers(0, MAX_TOKENS)},
    "/completion": _LLAMACPP,
    "/tokenize": {"add_special": st.booleans(), "with_pieces": st.booleans()},
    "/detokenize": {"parse_special": st.booleans()},  # llama.cpp options we ignore
    "/infill": _SAMPLING | _LLAMACPP | {"input_suffix": _FIELD_TEXT, "prompt": _FIELD_TEXT,
                            "input_extra": st.lists(st.fixed_dictionaries({"filename": _FIELD_TEXT,
                                                                           "text": _FIELD_TEXT}), max_size=2)},
}
_JUNK_KEYS = st.one_of(_PLAIN, _TEXT, st.sampled_from(["tools", "functions", "frequency_penalty", "best_of", "echo",
                                                        "n", "stream_options", "suffix", "messages", "prompt"]))


def _body(path: str) -> st.SearchStrategy:
    """Mostly bodies a client could send — the required field and a few optional ones, each value now and then
    hostile — and some bodies hostile through and through."""
    fields = REQUIRED[path] | OPTIONAL[path]
    optional = st.lists(st.sampled_from(sorted(OPTIONAL[path])), max_size=6, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({k: _mostly(OPTIONAL[path][k]) for k in names}))
    plausible = st.builds(lambda required, chosen, junk: junk | required | chosen,
                          st.fixed_dictionaries({k: _mostly(v) for k, v in REQUIRED[path].items()}), optional,
                          st.one_of(st.just({}), st.just({}), st.dictionaries(_JUNK_KEYS, _JSON, max_size=2)))
    hostile = st.fixed_dictionaries({}, optional={k: _ANY for k in fields})
    deep = st.builds(lambda body, where: body | {where: _DEEP}, plausible, st.sampled_from(sorted(fields)))
    # Drawn from a list rather than st.one_of, so the mix is what it says: 12 in 16 plausible.
    kinds = {"plausible": plausible, "hostile": hostile, "deep": deep, "any": _ANY}
    return st.sampled_from(["plausible"] * 12 + ["hostile"] * 2 + ["deep", "any"]).flatmap(kinds.__getitem__)


def _serialize(body) -> bytes:
    # ensure_ascii writes lone surrogates as \udXXX escapes; allow_nan writes NaN / Infinity as such.
    text = json.dumps(body, ensure_ascii=True, allow_nan=True)
    for sentinel, raw in _RAW.items():
        text = text.replace(sentinel, raw)
    return text.encode()


_RAW_BYTES = st.one_of(st.binary(max_size=60), st.sampled_from([b"", b"{", b'{"prompt": "x"', b"null", b"[]",
                                                               b'{"prompt": "x"}garbage', b"\xff\xfe{}",
                                                               b'\xef\xbb\xbf{"prompt": "x"}', b"1e999"]))


# ---- the property ---------------------------------------------------------------------------------------------
def _check(client, path: str, raw: bytes) -> None:
    start = time.perf_counter()
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS_PER_REQUEST, (path, raw[:200], elapsed)
    assert r.status_code < 500, (path, raw[:300], r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, r.text
        assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
        assert err["type"] == "invalid_request_error" and len(err["message"]) < 1000
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events, r.text
        for event in events:
            if event != "[DONE]":
                assert "error" not in json.loads(event), event
    else:
        answer = r.json()
        assert "error" not in answer
        for choice in answer.get("choices", []):
            assert choice["finish_reason"] in ("stop", "length")
        if "usage" in answer:
            assert answer["usage"]["completion_tokens"] <= MAX_TOKENS * len(answer["choices"])
    assert all(math.isfinite(v) for v in _numbers(r.json() if "json" in r.headers["content-type"] else None))


def _numbers(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


_SETTINGS = settings(max_examples=EXAMPLES_PER_ENDPOINT, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("path", list(REQUIRED))
def test_fuzz_random_bodies_never_get_a_5xx(client, path):
    @_SETTINGS
    @given(body=_body(path))
    def run(body):
        _check(client, path, _serialize(body))
    run()
    assert client.engine.stats.errors == 0


@pytest.mark.parametrize("path", list(REQUIRED))
def test_fuzz_raw_bytes_never_get_a_5xx(client, path):
    @settings(max_examples=25, deadline=None, derandomize=True, database=None)
    @given(raw=_RAW_BYTES)
    def run(raw):
        _check(client, path, raw)
    run()


def test_after_fuzzing_the_engine_is_idle_and_still_serves(client):
    deadline = time.monotonic() + 10
    while (client.engine.active or client.engine.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.engine.active == 0 and client.engine.queue_depth == 0 and client.engine.stats.errors == 0
    r = client.post("/v1/completions", json={"prompt": "def", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
