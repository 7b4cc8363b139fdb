"""GGUF import/export: dequantizers against llama.cpp's reference decoder, exporter round trips, greedy parity,
the tokenizer rebuilt from metadata, and one-line errors for files we cannot run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import quants as ref_quants  # noqa: E402

from codellama import gguf as cg  # noqa: E402
from codellama.api import load  # noqa: E402
from codellama.checkpoint import convert, describe_checkpoint, save_checkpoint  # noqa: E402
from codellama.config import ModelConfig  # noqa: E402
from codellama.errors import CodeLlamaError  # noqa: E402
from codellama.model import Transformer  # noqa: E402
from codellama.tokenizer import Tokenizer  # noqa: E402

PROMPT = "def fibonacci(n):\n    "


def _random_blocks(type_name: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes for ``n_blocks`` blocks, with the float16 scale fields set to sane values (random bytes
    there would be NaN/inf half the time and prove nothing)."""
    rng = np.random.default_rng(seed)
    _, nbytes, _ = cg.DEQUANTIZERS[type_name]
    b = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    offsets = {"Q8_0": [0], "Q4_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[type_name]
    for off in offsets:
        b[:, off:off + 2] = rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantizers_match_llamacpp_reference(type_name):
    block, nbytes, _ = cg.DEQUANTIZERS[type_name]
    rows, cols = 6, 512
    raw = _random_blocks(type_name, rows * cols // block).reshape(rows, -1)
    ours = cg.dequantize(raw, type_name, (rows, cols)).numpy()
    ref = ref_quants.dequantize(raw, QT[type_name])
    assert ref.shape == (rows, cols)
    np.testing.assert_array_equal(ours, ref)  # bit-exact, not merely close


def test_bf16_dequantizer_is_exact():
    w = torch.randn(4, 64).bfloat16()
    raw = w.view(torch.uint8).numpy()
    assert torch.equal(cg.dequantize(raw, "BF16", (4, 64)), w.float())


def test_q8_0_quantizer_matches_reference():
    w = torch.randn(16, 256) * torch.logspace(-3, 1, 16).unsqueeze(1)
    w[3] = 0.0  # an all-zero block must give d = 0, not NaN
    ours = cg.quantize_q8_0(w)
    np.testing.assert_array_equal(ours, ref_quants.quantize(w.numpy(), QT.Q8_0))


def test_unsupported_type_is_named():
    with pytest.raises(CodeLlamaError, match=r"unsupported GGUF tensor type Q4_1 .*supported: F32, F16, Q8_0"):
        cg.dequantize(np.zeros((1, 20), np.uint8), "Q4_1", (1, 32))


# ---- export -----------------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path, tiny_config, tiny_model, tiny_tokenizer_path) -> Path:
    """A native checkpoint stored in float16, so an f16 GGUF of it holds exactly the same numbers."""
    return save_checkpoint(tiny_model, tmp_path / "src", tokenizer=tiny_tokenizer_path, dtype=torch.float16)


def _reader_tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_export_round_trips_bit_exactly(tmp_path, tiny_model, tiny_tokenizer_path, outtype):
    path = cg.save_gguf(tiny_model, Tokenizer(tiny_tokenizer_path), tmp_path / f"m.{outtype}.gguf", outtype=outtype)
    tensors = _reader_tensors(path)
    state = tiny_model.state_dict()
    assert len(tensors) == len(state) == 3 + 9 * tiny_model.config.n_layers
    for name, value in state.items():
        t = tensors[cg.to_gguf_name(name)]
        want = value.numpy() if value.dim() == 1 or outtype == "f32" else value.half().numpy()
        assert t.data.dtype == want.dtype and tuple(t.data.shape) == want.shape, name
        np.testing.assert_array_equal(np.asarray(t.data), want)
        # llama.cpp lists dimensions fastest first: ne = [in_features, out_features]
        assert [int(d) for d in t.shape] == list(reversed(value.shape))


def test_export_q8_0_within_format_error(tmp_path, tiny_model, tiny_tokenizer_path):
    path = cg.save_gguf(tiny_model, Tokenizer(tiny_tokenizer_path), tmp_path / "m.q8_0.gguf", outtype="q8_0")
    tensors = _reader_tensors(path)
    for name, value in tiny_model.state_dict().items():
        t = tensors[cg.to_gguf_name(name)]
        if value.dim() == 1:
            assert t.tensor_type == QT.F32
            continue
        assert t.tensor_type == QT.Q8_0
        got = torch.from_numpy(ref_quants.dequantize(np.asarray(t.data), QT.Q8_0))
        blocks = value.reshape(-1, 32)
        # Rounding to the nearest step d = max|x|/127 errs by at most d/2 (+ the float16 rounding of d).
        bound = blocks.abs().amax(1, keepdim=True) / 127 * (0.5 + 127 * 2**-11) + 1e-12
        assert bool(((got.reshape(-1, 32) - blocks).abs() <= bound).all()), name


def test_export_q4_0_is_the_reference_quantizer_and_loads(tmp_path, tiny_model, tiny_tokenizer_path):
    path = cg.save_gguf(tiny_model, Tokenizer(tiny_tokenizer_path), tmp_path / "m.q4_0.gguf", outtype="q4_0")
    tensors = _reader_tensors(path)
    for name, value in tiny_model.state_dict().items():
        t = tensors[cg.to_gguf_name(name)]
        if value.dim() == 1:
            continue
        assert t.tensor_type == QT.Q4_0
        np.testing.assert_array_equal(np.asarray(t.data), ref_quants.quantize(value.float().numpy(), QT.Q4_0))
        got = torch.from_numpy(ref_quants.dequantize(np.asarray(t.data), QT.Q4_0)).reshape(-1, 32)
        # Step d = max|x|/8 from the extreme value's side: rounding errs by d/2, and values on the other side
        # near -extreme clamp to level 15, one step short at most.
        bound = value.reshape(-1, 32).abs().amax(1, keepdim=True) / 8 * (1 + 2**-9) + 1e-12
        assert bool(((got - value.reshape(-1, 32)).abs() <= bound).all()), name
    # Our reader decodes the same values (Q4_0 is one of its supported types).
    loaded = cg.load_gguf_model(path, device="cpu", dtype=torch.float32)
    w = loaded.state_dict()["layers.0.feed_forward.w1.weight"]
    t = tensors[cg.to_gguf_name("layers.0.feed_forward.w1.weight")]
    want = torch.from_numpy(ref_quants.dequantize(np.asarray(t.data), QT.Q4_0)).reshape(w.shape)
    torch.testing.assert_close(w, want)


def test_export_metadata_is_what_llamacpp_reads(tmp_path, tiny_config, tiny_model, tiny_tokenizer_path):
    path = cg.save_gguf(tiny_model, Tokenizer(tiny_tokenizer_path), tmp_path / "m.gguf", outtype="f16")
    f = cg.read_gguf(path)
    c = tiny_config
    expected = {
        "general.architecture": "llama", "general.file_type": 1, "llama.vocab_size": c.vocab_size,
        "llama.context_length": c.max_seq_len, "llama.embedding_length": c.dim, "llama.block_count": c.n_layers,
        "llama.feed_forward_length": c.ffn_hidden, "llama.rope.dimension_count": c.head_dim,
        "llama.attention.head_count": c.n_heads, "llama.attention.head_count_kv": c.n_kv_heads,
        "llama.rope.freq_base": 1_000_000.0, "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True,
    }
    for key, value in expected.items():
        assert f.get(key) == value, key
    assert f.get("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert len(f.get("tokenizer.ggml.tokens")) == c.vocab_size
    config = cg.config_from_gguf(f)
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.ffn_hidden, config.vocab_size,
            config.rope_theta) == (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_hidden, c.vocab_size, 1e6)
    assert describe_checkpoint(path)["dtype"] == "F16"


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_greedy_from_gguf_equals_source_checkpoint(tmp_path, checkpoint, outtype):
    out = convert(checkpoint, tmp_path / f"m.{outtype}.gguf", to="gguf", outtype=outtype)
    ours = load(checkpoint, device="cpu", dtype="float32")
    theirs = load(out, device="cpu", dtype="float32")  # tokenizer rebuilt from the GGUF metadata
    tokens = ours.tokenizer.encode(PROMPT, bos=True)
    assert theirs.tokenizer.encode(PROMPT, bos=True) == tokens
    assert torch.equal(ours.logits(tokens), theirs.logits(tokens))
    a = ours.complete(PROMPT, max_new_tokens=24)
    b = theirs.complete(PROMPT, max_new_tokens=24)
    assert a.tokens == b.tokens and len(a.tokens) > 0


def test_gguf_converts_back_to_a_directory(tmp_path, checkpoint):
    gguf_path = convert(checkpoint, tmp_path / "m.gguf", to="gguf", outtype="f32")
    back = convert(gguf_path, tmp_path / "back", to="native")
    a, b = load(checkpoint, device="cpu"), load(back, device="cpu")
    tokens = a.tokenizer.encode(PROMPT, bos=True)
    assert torch.equal(a.logits(tokens), b.logits(tokens))


# ---- tokenizer rebuilt from metadata ------------------------------------------------------------------
def _texts() -> list[str]:
    import sysconfig
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace")[:6000] for p in sorted(stdlib.glob("*.py"))[60:90]]
    return texts + ["    return x  \n\n\t\tfoo  bar", "注释 コメント émoji 😀 ünïcödé 12345 3.14159",
                    "▁<PRE> not a sentinel <SUF>", " leading space", "trailing   "]


def _assert_same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    assert b.n_words == a.n_words
    assert (b.bos_id, b.eos_id, b.prefix_id, b.suffix_id, b.middle_id, b.eot_id) == \
        (a.bos_id, a.eos_id, a.prefix_id, a.suffix_id, a.middle_id, a.eot_id)
    for text in _texts():
        ids = a.encode(text, bos=True)
        assert b.encode(text, bos=True) == ids
        assert b.encode_infilling(text) == a.encode_infilling(text)
        assert b.decode(ids) == a.decode(ids)


def test_tokenizer_rebuilt_from_gguf_test_vocabulary(tmp_path, tiny_model, tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    path = cg.save_gguf(tiny_model, tok, tmp_path / "m.gguf", outtype="f16")
    _assert_same_tokenizer(tok, cg.load_gguf_tokenizer(path))


def test_tokenizer_rebuilt_from_gguf_real_vocabulary(tmp_path, real_tokenizer_path):
    tok = Tokenizer(real_tokenizer_path)
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=32016, multiple_of=32, max_seq_len=64)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu")
    path = cg.save_gguf(model, tok, tmp_path / "real.gguf", outtype="f16")
    rebuilt = cg.load_gguf_tokenizer(path)
    _assert_same_tokenizer(tok, rebuilt)
    assert rebuilt.prefix_id == 32007 and rebuilt.eot_id == 32010
    assert rebuilt.encode_infilling("    return x")[:1] == tok.encode_infilling("    return x")[:1]


# ---- files written by llama.cpp-style tools -------------------------------------------------------------
def _write_gguf(path: Path, config: ModelConfig, tok: Tokenizer, tensors: dict[str, tuple[np.ndarray, QT | None]],
                arch: str = "llama") -> Path:
    w = gguf.GGUFWriter(path, arch)
    a = arch
    w.add_uint32(f"{a}.context_length", config.max_seq_len)
    w.add_uint32(f"{a}.embedding_length", config.dim)
    w.add_uint32(f"{a}.block_count", config.n_layers)
    w.add_uint32(f"{a}.feed_forward_length", config.ffn_hidden)
    w.add_uint32(f"{a}.attention.head_count", config.n_heads)
    w.add_uint32(f"{a}.attention.head_count_kv", config.n_kv_heads)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", config.norm_eps)
    w.add_float32(f"{a}.rope.freq_base", config.rope_theta)
    cg._add_tokenizer(w, gguf, tok, config.vocab_size)
    for name, (data, raw_dtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q4_0"])
def test_loads_k_quant_files(tmp_path, tiny_tokenizer_path, type_name):
    """A file like ``codellama-7b.Q4_K_M.gguf``: quantized matrices, f32 norms, no output matrix (tied)."""
    config = ModelConfig(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=512,
                         max_seq_len=128, rope_theta=1e6)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    block, nbytes, _ = cg.DEQUANTIZERS[type_name]
    tensors, expected = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        if name == "output.weight":
            continue
        if len(shape) == 1:
            data = np.random.default_rng(i).normal(1, 0.1, shape).astype(np.float32)
            tensors[cg.to_gguf_name(name)] = (data, None)
            expected[name] = data
        else:
            raw = _random_blocks(type_name, shape[0] * shape[1] // block, seed=i).reshape(shape[0], -1)
            tensors[cg.to_gguf_name(name)] = (raw, QT[type_name])
            expected[name] = ref_quants.dequantize(raw, QT[type_name])
    path = _write_gguf(tmp_path / "k.gguf", config, Tokenizer(tiny_tokenizer_path), tensors)
    model = cg.load_gguf_model(path)
    assert model.config.rope_theta == 1e6 and model.config.ffn_hidden == 512
    state = model.state_dict()
    for name, want in expected.items():
        np.testing.assert_array_equal(state[name].numpy(), want)
    np.testing.assert_array_equal(state["output.weight"].numpy(), expected["tok_embeddings.weight"])
    assert describe_checkpoint(path)["dtype"] == type_name


# ---- errors -----------------------------------------------------------------------------------------------
def test_error_other_architecture(tmp_path, tiny_config, tiny_tokenizer_path):
    path = _write_gguf(tmp_path / "q.gguf", tiny_config, Tokenizer(tiny_tokenizer_path),
                       {"token_embd.weight": (np.zeros((512, 64), np.float32), None)}, arch="qwen2")
    with pytest.raises(CodeLlamaError, match=r"architecture 'qwen2' is not supported; only 'llama'"):
        load(path, device="cpu")


def _tensor_type_offset(path: Path, name: str) -> int:
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    # tensor info: name length (u64), name, n_dims (u32), dims (u64 each), type (u32), offset (u64)
    return t.field.offset + 8 + len(name.encode()) + 4 + 8 * len(t.shape)


def test_error_unknown_tensor_type(tmp_path, tiny_model, tiny_tokenizer_path):
    path = cg.save_gguf(tiny_model, Tokenizer(tiny_tokenizer_path), tmp_path / "m.gguf", outtype="f32")
    data = bytearray(path.read_bytes())
    off = _tensor_type_offset(path, "blk.0.attn_q.weight")
    assert int.from_bytes(data[off:off + 4], "little") == 0  # F32
    data[off:off + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CodeLlamaError, match=r"unknown GGUF tensor type id 99"):
        load(path, device="cpu")


def test_error_known_but_unsupported_type(tmp_path, tiny_config, tiny_tokenizer_path):
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(tiny_config).state_dict().items()}
    tensors = {cg.to_gguf_name(k): (np.zeros(s, np.float32), None) for k, s in shapes.items()}
    rows, cols = shapes["layers.0.attention.wq.weight"]
    tensors["blk.0.attn_q.weight"] = (np.zeros((rows, cols // 32 * 20), np.uint8), QT.Q4_1)
    path = _write_gguf(tmp_path / "q41.gguf", tiny_config, Tokenizer(tiny_tokenizer_path), tensors)
    with pytest.raises(CodeLlamaError, match=r"unsupported GGUF tensor type Q4_1"):
        load(path, device="cpu")


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_error_truncated_file(tmp_path, tiny_model, tiny_tokenizer_path, keep):
    path = cg.save_gguf(tiny_model, Tokenizer(tiny_tokenizer_path), tmp_path / "m.gguf", outtype="f16")
    data = path.read_bytes()
    path.write_bytes(data[:max(8, int(len(data) * keep))])
    with pytest.raises(CodeLlamaError, match=r"truncated") as e:
        load(path, device="cpu")
    assert "\n" not in str(e.value)


def test_error_not_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file at all")
    with pytest.raises(CodeLlamaError, match=r"not a GGUF file"):
        load(path, device="cpu")
    with pytest.raises(CodeLlamaError, match=r"GGUF file not found"):
        load(tmp_path / "missing.gguf", device="cpu")


def test_cli_errors_are_one_line(tmp_path, tiny_model, tiny_tokenizer_path):
    path = cg.save_gguf(tiny_model, Tokenizer(tiny_tokenizer_path), tmp_path / "m.gguf", outtype="f16")
    path.write_bytes(path.read_bytes()[:-100])
    r = subprocess.run([sys.executable, "-m", "codellama", "complete", "--model", str(path), "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "truncated GGUF file" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_cli_convert_to_gguf(tmp_path, checkpoint):
    r = subprocess.run([sys.executable, "-m", "codellama", "convert", str(checkpoint), str(tmp_path / "m.gguf"),
                        "--to", "gguf", "--outtype", "q8_0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Q8_0" in r.stdout
    assert cg.read_gguf(tmp_path / "m.gguf").type_name("blk.0.ffn_down.weight") == "Q8_0"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gguf_quantized_on_load_equals_quantized_after(tmp_path, checkpoint, mode):
    """``load(x.gguf, quantize=...)`` re-quantizes tensor by tensor; same result as quantizing the float model."""
    from codellama.quantize import QuantLinear, quantize_model

    path = convert(checkpoint, tmp_path / "m.gguf", to="gguf", outtype="q8_0")
    streamed = load(path, device="cpu", quantize=mode)
    full = load(path, device="cpu")
    quantize_model(full.model, mode, 32)
    assert sum(isinstance(m, QuantLinear) for m in streamed.model.modules()) == 15
    tokens = full.tokenizer.encode(PROMPT, bos=True)
    assert torch.equal(streamed.logits(tokens), full.logits(tokens))


def test_llamacpp_runs_our_export_greedy_equal(tmp_path, checkpoint):
    """llama.cpp itself loads the exported file and its greedy tokens equal ours (where llama-cpp-python is
    installed: pip install llama-cpp-python)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = convert(checkpoint, tmp_path / "m.gguf", to="gguf", outtype="f32")
    ours = load(checkpoint, device="cpu", dtype="float32")
    prompt = ours.tokenizer.encode(PROMPT, bos=True)
    want = ours.complete(PROMPT, max_new_tokens=16).tokens
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, logits_all=False, verbose=False)
    assert llm.tokenize(PROMPT.encode(), add_bos=True) == prompt  # its tokenizer, from our metadata
    llm.eval(prompt)
    got = []
    for _ in range(len(want)):
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
        got.append(tok)
        llm.eval([tok])
    assert got == want
