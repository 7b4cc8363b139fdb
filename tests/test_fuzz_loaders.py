"""Property-based fuzzing of the checkpoint loaders (issue 12): random configs, safetensors headers and GGUF files
(built field by field, or a valid file cut and overwritten at random bytes) give either a loaded model or one
short ``CodeLlamaError`` — never another exception, never more than a few seconds or a few hundred MB per
example, and nothing written outside the test's temporary directory.

Budgets are fixed and examples derandomized, so CI runs the same inputs every time (< 40 s in all)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import tempfile
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codellama.checkpoint import describe_checkpoint, load_model, save_checkpoint
from codellama.config import ModelConfig
from codellama.config_validation import LIMITS
from codellama.errors import CodeLlamaError
from codellama.model import Transformer

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.function_scoped_fixture])
SECONDS_PER_EXAMPLE = 5.0
PYTHON_BYTES_PER_EXAMPLE = 200 * 2**20
RSS_GROWTH_PER_TEST = 400 * 2**20


@contextmanager
def _bounded_run():
    """Each fuzz test: the process's peak RSS may not grow by more than ``RSS_GROWTH_PER_TEST`` and the working
    directory gains no files."""
    cwd_before = set(os.listdir(".")) - {".hypothesis"}  # hypothesis's own cache
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert rss_after - rss_before < RSS_GROWTH_PER_TEST, f"peak RSS grew by {(rss_after - rss_before) / 2**20:.0f} MiB"
    assert set(os.listdir(".")) - {".hypothesis"} == cwd_before, "a loader wrote into the working directory"


def _clean_outcome(fn: Callable[[], Any]) -> Any:
    """``fn()`` either succeeds or raises one short CodeLlamaError, in bounded time and Python memory."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        return fn()
    except CodeLlamaError as e:
        message = str(e)
        assert message and "\n" not in message and len(message) < 600, message
        return e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        elapsed = time.perf_counter() - start
        assert elapsed < SECONDS_PER_EXAMPLE, f"took {elapsed:.1f}s"
        assert peak < PYTHON_BYTES_PER_EXAMPLE, f"allocated {peak / 2**20:.0f} MiB"


@contextmanager
def _scratch():
    """A fresh directory per example (pytest's tmp_path is per test, hypothesis runs many examples in one)."""
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        yield root
    finally:
        shutil.rmtree(root)


def _assert_sane(config: ModelConfig) -> None:
    assert 1 <= config.n_layers <= LIMITS.max_layers and 1 <= config.dim <= LIMITS.max_dim
    assert config.n_heads * config.head_dim == config.dim and config.n_heads % config.n_kv_heads == 0
    assert 1 <= config.vocab_size <= LIMITS.max_vocab and 1 <= config.ffn_hidden <= LIMITS.max_ffn
    assert config.num_params() <= LIMITS.max_params and config.head_dim % 2 == 0


# ---- config dicts --------------------------------------------------------------------------------------------------
junk = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
plausible_int = st.sampled_from([0, 1, 2, 4, 8, 32, 64, 256, 1024, 2**20, 10**9, -1])
PARAMS_KEYS = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "max_seq_len", "hidden_dim", "name"]
HF_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
           "intermediate_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "model_type",
           "rope_scaling", "rope_parameters", "hidden_act", "head_dim", "tie_word_embeddings"]
VALID_PARAMS = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64, "multiple_of": 32}
VALID_HF = ModelConfig(**VALID_PARAMS).to_hf()


def _mutated(valid: dict[str, Any], keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid config with some keys replaced by junk or plausible-but-wrong numbers, some removed, some added."""
    changes = st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), junk | plausible_int, max_size=4)
    removed = st.sets(st.sampled_from(sorted(valid)), max_size=2)
    return st.builds(lambda c, r: {k: v for k, v in {**valid, **c}.items() if k not in r}, changes, removed)


@settings(max_examples=400, **FUZZ)
@given(params=_mutated(VALID_PARAMS, PARAMS_KEYS), hf=_mutated(VALID_HF, HF_KEYS))
def test_fuzz_config_dicts(params, hf):
    with _bounded_run():
        for build in (lambda: ModelConfig.from_params(params), lambda: ModelConfig.from_hf(hf)):
            outcome = _clean_outcome(build)
            if isinstance(outcome, ModelConfig):
                _assert_sane(outcome)


@pytest.fixture(scope="module")
def native_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**VALID_PARAMS))
    model.init_weights(0.1)
    out = save_checkpoint(model, tmp_path_factory.mktemp("fuzz-native") / "ckpt")
    load_model(out)  # first-use costs (lazy imports, torch's meta device) stay out of the per-example clock
    return out


@settings(max_examples=100, **FUZZ)
@given(params=_mutated(VALID_PARAMS, PARAMS_KEYS), raw=st.booleans(), data=st.binary(max_size=64))
def test_fuzz_params_json_through_the_loader(native_checkpoint, params, raw, data):
    with _bounded_run(), _scratch() as root:
        ckpt = root / "ckpt"
        shutil.copytree(native_checkpoint, ckpt)
        # Mostly JSON objects; sometimes raw bytes (binary junk, a list, a scalar) in place of params.json.
        text = json.dumps(params).encode() if not raw else (data or b"[]")
        (ckpt / "params.json").write_bytes(text)
        for fn in (lambda: load_model(ckpt), lambda: describe_checkpoint(ckpt)):
            outcome = _clean_outcome(fn)
            if not isinstance(outcome, CodeLlamaError):
                _assert_sane(outcome.config if isinstance(outcome, Transformer) else outcome["config"])
        assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "params.json"]


# ---- safetensors headers -------------------------------------------------------------------------------------------
from codellama.safetensors_io import DTYPES, read_safetensors_header  # noqa: E402

dims = st.integers(-2, 70) | st.sampled_from([2**40, 2**64])
entry = st.fixed_dictionaries(
    {"dtype": st.sampled_from(sorted(DTYPES)) | junk, "shape": st.lists(dims, max_size=3) | junk,
     "data_offsets": st.lists(st.integers(-4, 300), min_size=2, max_size=2) | junk},
    optional={"extra": junk})
header = st.dictionaries(st.sampled_from(["tok_embeddings.weight", "norm.weight", "output.weight", "__metadata__"])
                         | st.text(max_size=10), entry | junk, max_size=4) | junk


def _safetensors(header_value: Any, data: bytes) -> bytes:
    raw = json.dumps(header_value).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@settings(max_examples=400, **FUZZ)
@given(header_value=header, data=st.binary(max_size=300))
def test_fuzz_safetensors_headers(header_value, data):
    from safetensors import safe_open
    with _bounded_run(), _scratch() as root:
        path = root / "model.safetensors"
        path.write_bytes(_safetensors(header_value, data))
        infos = _clean_outcome(lambda: read_safetensors_header(path))
        if isinstance(infos, CodeLlamaError):
            return
        # Differential check: whatever our validator accepts, the safetensors library reads exactly as described.
        with safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == sorted(infos)
            for name, info in infos.items():
                if info.dtype in ("uint16", "uint32", "uint64") and not hasattr(torch, info.dtype):
                    continue
                t = f.get_tensor(name)
                assert tuple(t.shape) == info.shape and str(t.dtype) == "torch." + info.dtype


@settings(max_examples=120, **FUZZ)
@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6),
       truncate=st.booleans())
def test_fuzz_safetensors_byte_mutations(native_checkpoint, cut, flips, truncate):
    original = (native_checkpoint / "model.safetensors").read_bytes()
    data = bytearray(original[:min(cut, len(original))] if truncate else original)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    with _bounded_run(), _scratch() as root:
        ckpt = root / "ckpt"
        shutil.copytree(native_checkpoint, ckpt)
        (ckpt / "model.safetensors").write_bytes(bytes(data))
        for fn in (lambda: describe_checkpoint(ckpt), lambda: load_model(ckpt)):
            _clean_outcome(fn)


# ---- GGUF: files built field by field ------------------------------------------------------------------------------
from codellama.gguf import describe_gguf, load_gguf_model, load_gguf_tokenizer  # noqa: E402

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_FORMATS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
                  I64: "<q", F64: "<d"}
SCALAR_VALUES = {U8: st.integers(0, 255), I8: st.integers(-128, 127), U16: st.integers(0, 2**16 - 1),
                 I16: st.integers(-2**15, 2**15 - 1),
                 U32: st.integers(0, 2**32 - 1) | plausible_int.filter(lambda v: v >= 0),
                 I32: st.integers(-2**31, 2**31 - 1), F32: st.floats(width=32), BOOL: st.booleans(),
                 U64: st.integers(0, 2**64 - 1), I64: st.integers(-2**63, 2**63 - 1), F64: st.floats()}


def _string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _value(kind: int, value: Any) -> bytes:
    if kind not in SCALAR_FORMATS and kind not in (STRING, ARRAY):
        return bytes(4)  # an unknown value type: the reader must stop at it, whatever follows
    if kind == STRING:
        return _string(value)
    if kind == ARRAY:
        item_kind, items, declared = value
        return struct.pack("<IQ", item_kind, len(items) if declared is None else declared) + \
            b"".join(_value(item_kind, v) for v in items)
    return struct.pack(SCALAR_FORMATS[kind], value)


def gguf_bytes(kvs: list[tuple[str, int, Any]], tensors: list[tuple[str, list[int], int, int]], data: bytes,
               *, version: int = 3, alignment: int = 32) -> bytes:
    """A GGUF file from raw parts: (key, value type, value) pairs, (name, dims fastest-first, ggml type, offset)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)))
    for key, kind, value in kvs:
        out += _string(key) + struct.pack("<I", kind) + _value(kind, value)
    for name, shape, type_id, offset in tensors:
        out += _string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        out += struct.pack("<IQ", type_id, offset)
    out += bytes(-len(out) % alignment)
    return bytes(out) + data


TOKENS = ["<unk>", "<s>", "</s>", "▁a", "▁b", "a", "b", "▁"]
TINY_GGUF = ModelConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=len(TOKENS), hidden_dim=16,
                        max_seq_len=32)


def _valid_parts() -> tuple[list[tuple[str, int, Any]], list[tuple[str, list[int], int, int]], int]:
    c = TINY_GGUF
    kvs = [("general.architecture", STRING, "llama"), ("llama.embedding_length", U32, c.dim),
           ("llama.block_count", U32, c.n_layers), ("llama.attention.head_count", U32, c.n_heads),
           ("llama.attention.head_count_kv", U32, c.n_kv_heads), ("llama.feed_forward_length", U32, c.ffn_hidden),
           ("llama.context_length", U32, c.max_seq_len), ("llama.rope.freq_base", F32, 1e6),
           ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5), ("llama.rope.dimension_count", U32, c.head_dim),
           ("tokenizer.ggml.model", STRING, "llama"), ("tokenizer.ggml.tokens", ARRAY, (STRING, TOKENS, None)),
           ("tokenizer.ggml.scores", ARRAY, (F32, [0.0] * len(TOKENS), None)),
           ("tokenizer.ggml.token_type", ARRAY, (I32, [2, 3, 3, 1, 1, 1, 1, 1], None)),
           ("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2)]
    from codellama.checkpoint_files import expected_shapes
    from codellama.gguf import to_gguf_name
    tensors, offset = [], 0
    for name, shape in expected_shapes(c).items():
        tensors.append((to_gguf_name(name), list(reversed(shape)), 0, offset))
        n = 4
        for d in shape:
            n *= d
        offset += -(-n // 32) * 32
    return kvs, tensors, offset


def _typed_value() -> st.SearchStrategy[tuple[int, Any]]:
    scalar = st.sampled_from(sorted(SCALAR_VALUES)).flatmap(lambda k: st.tuples(st.just(k), SCALAR_VALUES[k]))
    string = st.tuples(st.just(STRING), st.text(max_size=8) | st.binary(max_size=8))
    array_items = st.sampled_from([U8, I8, I32, F32, F64, BOOL, STRING, U64]).flatmap(
        lambda k: st.tuples(st.just(k), st.lists(SCALAR_VALUES[k] if k != STRING else st.text(max_size=4), max_size=6),
                            st.none() | st.sampled_from([0, 7, 10**7, 2**40, 2**64 - 1])))
    array = st.tuples(st.just(ARRAY), array_items)
    odd = st.tuples(st.sampled_from([13, 99, 2**32 - 1]), st.just(0))  # unknown value types
    return scalar | string | array | odd


@st.composite
def gguf_files(draw) -> bytes:
    kvs, tensors, data_size = _valid_parts()
    kvs = list(kvs)
    for _ in range(draw(st.integers(0, 3))):  # replace, drop or add metadata
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "drop" and kvs:
            kvs.pop(draw(st.integers(0, len(kvs) - 1)))
        else:
            key = kvs[draw(st.integers(0, len(kvs) - 1))][0] if action == "replace" and kvs else \
                draw(st.sampled_from(["general.alignment", "llama.vocab_size", "tokenizer.ggml.padding_token_id",
                                      "llama.rope.scaling.type", "tokenizer.ggml.unknown_token_id"])
                     | st.text(max_size=8))
            kvs = [kv for kv in kvs if kv[0] != key] + [(key, *draw(_typed_value()))]
    for _ in range(draw(st.integers(0, 2))):  # corrupt a tensor info
        i = draw(st.integers(0, len(tensors) - 1))
        name, shape, type_id, offset = tensors[i]
        field = draw(st.sampled_from(["shape", "type", "offset", "name"]))
        if field == "shape":
            shape = draw(st.lists(st.integers(0, 64) | st.sampled_from([2**32, 2**63, 2**64 - 1]), min_size=0,
                                  max_size=5))
        elif field == "type":
            type_id = draw(st.sampled_from([1, 2, 3, 8, 12, 14, 24, 30, 31, 99, 2**32 - 1]))
        elif field == "offset":
            offset = draw(st.sampled_from([0, 32, 1, 2**63, 2**64 - 32]) | st.integers(0, 4096))
        else:
            name = draw(st.sampled_from(["blk.0.attn_q.weight", "blk.7.ffn_up.weight", "rope_freqs.weight"])
                        | st.text(max_size=6))
        tensors[i] = (name, shape, type_id, offset)
    data = bytes(data_size + draw(st.sampled_from([0, 0, 0, -16, 64])))  # sometimes short, sometimes long
    return gguf_bytes(kvs, tensors, data)


def _gguf_outcomes(path: Path) -> None:
    for fn in (lambda: describe_gguf(path), lambda: load_gguf_model(path), lambda: load_gguf_tokenizer(path)):
        outcome = _clean_outcome(fn)
        if isinstance(outcome, Transformer):
            _assert_sane(outcome.config)


def test_the_valid_gguf_parts_load():
    with _scratch() as root:
        kvs, tensors, size = _valid_parts()
        path = root / "ok.gguf"
        path.write_bytes(gguf_bytes(kvs, tensors, bytes(size)))
        assert load_gguf_model(path).config.n_kv_heads == 1
        assert load_gguf_tokenizer(path).n_words == len(TOKENS)


@settings(max_examples=400, **FUZZ)
@given(content=gguf_files())
def test_fuzz_gguf_fields(content):
    with _bounded_run(), _scratch() as root:
        path = root / "fuzz.gguf"
        path.write_bytes(content)
        _gguf_outcomes(path)


# ---- GGUF: a valid file cut and overwritten ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def valid_gguf() -> bytes:
    kvs, tensors, size = _valid_parts()
    return gguf_bytes(kvs, tensors, bytes(size))


@pytest.fixture(scope="module", autouse=True)
def _warm_loaders():
    """Lazy imports and first-use caches happen once here, not inside the first timed example."""
    with _scratch() as root:
        kvs, tensors, size = _valid_parts()
        (root / "w.gguf").write_bytes(gguf_bytes(kvs, tensors, bytes(size)))
        _gguf_outcomes(root / "w.gguf")
        from safetensors import safe_open  # noqa: F401


@settings(max_examples=400, **FUZZ)
@given(cut=st.integers(0, 4000), truncate=st.booleans(),
       writes=st.lists(st.tuples(st.integers(0, 1200), st.binary(min_size=1, max_size=8)), max_size=4))
def test_fuzz_gguf_byte_mutations(valid_gguf, cut, truncate, writes):
    data = bytearray(valid_gguf[:cut] if truncate else valid_gguf)
    for position, chunk in writes:  # mostly the header: that is where sizes, counts and offsets live
        data[position:position + len(chunk)] = chunk
    with _bounded_run(), _scratch() as root:
        path = root / "mutated.gguf"
        path.write_bytes(bytes(data))
        _gguf_outcomes(path)
