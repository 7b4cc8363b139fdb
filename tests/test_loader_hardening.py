"""Hostile checkpoints (issue 12): every broken, absurd or malicious file the loaders can be handed gives one short
``CodeLlamaError`` line, in bounded time and memory, and never reads files outside the checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from codellama.checkpoint import describe_checkpoint, load_model, load_tokenizer, save_checkpoint
from codellama.cli import main
from codellama.config import ModelConfig
from codellama.errors import CodeLlamaError
from codellama.model import Transformer

TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=32, max_seq_len=64)


def _model(config: ModelConfig = TINY) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(0.1)
    return model.eval()


def _refused(fn, pattern: str, *, seconds: float = 5.0, max_python_bytes: int = 50 * 2**20) -> str:
    """``fn()`` must raise a one-line CodeLlamaError matching ``pattern``, quickly and without piling up memory."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CodeLlamaError, match=pattern) as e:
            fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    assert elapsed < seconds, f"took {elapsed:.1f}s"
    assert peak < max_python_bytes, f"allocated {peak / 2**20:.0f} MiB"
    return message


def _info(capsys, path) -> tuple[int, str]:
    code = main(["info", str(path)])
    out, err = capsys.readouterr()
    return code, err


# ---- 6: only files inside the checkpoint are read -----------------------------------------------------------
@pytest.fixture
def sharded_hf(tmp_path, monkeypatch) -> Path:
    import codellama.checkpoint as checkpoint
    monkeypatch.setattr(checkpoint, "HF_MAX_SHARD_BYTES", 20_000)
    out = save_checkpoint(_model(), tmp_path / "hf", format="hf")
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.mark.parametrize("entry", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                   "..", "C:\\evil.safetensors"])
def test_index_entries_outside_the_checkpoint_are_refused(sharded_hf, entry):
    # A valid weights file sits outside, so the old loader would have opened and used it.
    index = json.loads((sharded_hf / "model.safetensors.index.json").read_text())
    first, shard = next(iter(index["weight_map"].items()))
    (sharded_hf.parent / "outside.safetensors").write_bytes((sharded_hf / shard).read_bytes())
    index["weight_map"][first] = entry
    (sharded_hf / "model.safetensors.index.json").write_text(json.dumps(index))
    for fn in (lambda: load_model(sharded_hf), lambda: describe_checkpoint(sharded_hf)):
        _refused(fn, "is not a plain file name inside the checkpoint")


def test_symlinks_pointing_outside_are_refused(tmp_path, tiny_tokenizer_path):
    out = save_checkpoint(_model(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=512, multiple_of=32)),
                          tmp_path / "native", tokenizer=tiny_tokenizer_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("model.safetensors", "tokenizer.model", "params.json"):
        (out / name).rename(elsewhere / name)
        (out / name).symlink_to(elsewhere / name)
    _refused(lambda: load_tokenizer(out), r"tokenizer tokenizer\.model in .* points outside the checkpoint")
    _refused(lambda: load_model(out), r"params\.json in .* points outside the checkpoint directory")
    (out / "params.json").unlink()
    (elsewhere / "params.json").rename(out / "params.json")
    _refused(lambda: load_model(out), r"model\.safetensors in .* points outside the checkpoint directory")
    # Symlinks within the directory are fine.
    (out / "model.safetensors").unlink()
    (elsewhere / "model.safetensors").rename(out / "real.bin")
    (out / "model.safetensors").symlink_to("real.bin")
    assert load_model(out).config.dim == 32


def test_hub_cache_snapshot_symlinks_still_load(tmp_path):
    """huggingface_hub's cache keeps files in blobs/ and symlinks snapshots/<rev>/<name> to them."""
    src = save_checkpoint(_model(), tmp_path / "src", format="hf")
    repo = tmp_path / "models--codellama--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        f.rename(blob)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    assert load_model(snapshot).config.n_layers == 2
    assert describe_checkpoint(snapshot)["format"] == "hf"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_in_place_of_weights_does_not_hang(tmp_path):
    out = save_checkpoint(_model(), tmp_path / "native")
    (out / "model.safetensors").unlink()
    os.mkfifo(out / "model.safetensors")
    _refused(lambda: load_model(out), r"model\.safetensors in .* is not a regular file", seconds=2)


# ---- 7: sizes are checked against limits and against the files before anything is allocated --------------------
@pytest.mark.parametrize("fmt", ["native", "meta", "hf"])
def test_a_billion_layers_is_refused_at_once(tmp_path, capsys, fmt):
    out = save_checkpoint(_model(), tmp_path / fmt, format=fmt)
    if fmt == "hf":
        config = json.loads((out / "config.json").read_text()) | {"num_hidden_layers": 10**9}
        (out / "config.json").write_text(json.dumps(config))
        pattern = r"config\.json: num_hidden_layers = 1000000000 is out of range \(1\.\.1024\)"
    else:
        params = json.loads((out / "params.json").read_text()) | {"n_layers": 10**9}
        (out / "params.json").write_text(json.dumps(params))
        pattern = r"params\.json: n_layers = 1000000000 is out of range \(1\.\.1024\)"
    _refused(lambda: load_model(out), pattern)
    _refused(lambda: describe_checkpoint(out), pattern)
    code, err = _info(capsys, out)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "TiB" not in err


def test_a_config_within_limits_must_still_match_the_files(tmp_path):
    out = save_checkpoint(_model(), tmp_path / "native")
    params = json.loads((out / "params.json").read_text()) | {"n_layers": 1000}
    (out / "params.json").write_text(json.dumps(params))
    message = _refused(lambda: load_model(out), r"is missing tensors: layers\.2\.attention\.wq\.weight, .*"
                                                r"\(8982 in all\)", seconds=3)
    assert len(message) < 400


@pytest.mark.parametrize("values,pattern", [
    ({"dim": 65536 * 2}, r"dim = 131072 is out of range \(1\.\.65536\)"),
    ({"vocab_size": 2**21}, r"vocab_size = 2097152 is out of range"),
    ({"dim": 65536, "n_heads": 512, "n_layers": 1024}, r"implies 5\d,\d{3},.* parameters, more than the limit"),
    ({"ffn_dim_multiplier": 1e9}, r"ffn_dim_multiplier = 1000000000\.0 is out of range"),
    ({"max_seq_len": 2**40}, r"max_seq_len = 1099511627776 is out of range"),
])
def test_absurd_sizes_are_refused(values, pattern):
    base = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 64, "multiple_of": 32}
    _refused(lambda: ModelConfig.from_params(base | values), pattern)


def test_released_models_still_describe(capsys):
    code = main(["info", "CodeLlama-70b", "--context", "100000"])
    out, _ = capsys.readouterr()
    assert code == 0 and "68.977B" in out


# ---- 10: wrong types and ranges, malformed headers, truncated data, pickles -----------------------------------
@pytest.mark.parametrize("values,pattern", [
    ({"dim": "4096"}, r"dim must be an integer, got '4096'"),
    ({"n_heads": 0}, r"n_heads = 0 is out of range"),
    ({"dim": -64}, r"dim = -64 is out of range"),
    ({"n_layers": True}, r"n_layers must be an integer, got True"),
    ({"n_layers": 2.0}, r"n_layers must be an integer, got 2\.0"),
    ({"n_kv_heads": 3}, r"n_heads 4 is not divisible by n_kv_heads 3"),
    ({"dim": 24, "n_heads": 8}, r"head size dim / n_heads = 3 must be even"),
    ({"rope_theta": "1e6"}, r"rope_theta must be a number, got '1e6'"),
    ({"rope_theta": float("nan")}, r"rope_theta = nan is out of range"),
    ({"norm_eps": 0}, r"norm_eps = 0\.0 is out of range"),
    ({"norm_eps": [1e-5]}, r"norm_eps must be a number, got \[1e-05\]"),
    ({"multiple_of": 0}, r"multiple_of = 0 is out of range"),
    ({"vocab_size": "x" * 3000}, r"vocab_size must be an integer, got 'xxxxx"),
])
def test_wrong_config_values_give_one_short_line(tmp_path, values, pattern):
    base = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64, "multiple_of": 32}
    _refused(lambda: ModelConfig.from_params(base | values), pattern)
    out = save_checkpoint(_model(), tmp_path / "native")
    (out / "params.json").write_text(json.dumps(base | values, allow_nan=True))
    message = _refused(lambda: load_model(out), "params.json: " + pattern)
    assert len(message) < 300


@pytest.mark.parametrize("config,pattern", [
    ([1, 2], r"config\.json must hold a JSON object, not a list"),
    ({"rope_scaling": "linear"}, r"rope_scaling must be an object or null, got 'linear'"),
    ({"rope_scaling": {"type": "linear", "factor": 4.0}}, r"RoPE scaling 'linear' \(rope_scaling\) is not supported"),
    ({"num_attention_heads": "4"}, r"num_attention_heads must be an integer, got '4'"),
    ({"num_key_value_heads": 0}, r"num_key_value_heads = 0 is out of range"),
    ({"intermediate_size": -1}, r"intermediate_size = -1 is out of range"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ({"hidden_size": None}, r"not a Llama config\.json: it lacks 'hidden_size'"),
    ({"model_type": ["llama"]}, r"unsupported HF model_type \['llama'\]"),
    ({"head_dim": 3}, r"head_dim 3 != hidden_size / num_attention_heads \(8\)"),
])
def test_wrong_hf_config_values(tmp_path, config, pattern):
    out = save_checkpoint(_model(), tmp_path / "hf", format="hf")
    good = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config if isinstance(config, list) else good | config))
    _refused(lambda: load_model(out), pattern)
    _refused(lambda: describe_checkpoint(out), pattern)


def _safetensors_bytes(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


MALFORMED_HEADERS = {
    "list": ([1, 2, 3], b"", r"the header must be a JSON object, not a list"),
    "int-entry": ({"w": 5}, b"", r"tensor 'w' must be an object, got 5"),
    "no-shape": ({"w": {"dtype": "F32", "data_offsets": [0, 16]}}, bytes(16), r"tensor 'w' has an invalid shape None"),
    "negative-dim": ({"w": {**F32_2x2, "shape": [2, -2]}}, bytes(16), r"invalid shape \[2, -2\]"),
    "string-shape": ({"w": {**F32_2x2, "shape": "2x2"}}, bytes(16), r"invalid shape '2x2'"),
    "unknown-dtype": ({"w": {**F32_2x2, "dtype": "F31"}}, bytes(16), r"unsupported dtype 'F31'"),
    "one-offset": ({"w": {**F32_2x2, "data_offsets": [0]}}, bytes(16), r"invalid data_offsets \[0\]"),
    "size-mismatch": ({"w": {**F32_2x2, "data_offsets": [0, 12]}}, bytes(12),
                      r"needs 16 bytes but its data_offsets span 12"),
    "truncated": ({"w": F32_2x2}, bytes(8), r"describes 16 bytes of tensor data but the file holds 8 \(truncated\)"),
    "overlap": ({"w": F32_2x2, "v": {**F32_2x2, "data_offsets": [8, 24]}}, bytes(24), r"overlaps the previous tensor"),
    "bad-metadata": ({"w": F32_2x2, "__metadata__": {"format": 1}}, bytes(16),
                     r"__metadata__ must map strings to strings"),
    "deep-nesting": (b"[" * 100_000 + b"]" * 100_000, b"", r"the header is not JSON \(RecursionError\)"),
    "not-json": (b"{not json", b"", r"the header is not JSON"),
    "not-utf8": (b"\xff\xfe{}", b"", r"the header is not JSON"),
}


@pytest.mark.parametrize("case", MALFORMED_HEADERS)
def test_malformed_safetensors_headers(tmp_path, case):
    from codellama.safetensors_io import read_safetensors_header
    header, data, pattern = MALFORMED_HEADERS[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(_safetensors_bytes(header, data))
    _refused(lambda: read_safetensors_header(path), pattern)
    (tmp_path / "params.json").write_text(json.dumps(TINY.to_params()))
    _refused(lambda: load_model(tmp_path), pattern)


def test_header_length_beyond_the_file(tmp_path):
    from codellama.safetensors_io import read_safetensors_header
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    _refused(lambda: read_safetensors_header(path), r"header length 4611686018427387904 does not fit the file")


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_info_fails_on_truncated_tensor_data(tmp_path, capsys, fmt):
    out = save_checkpoint(_model(), tmp_path / fmt, format=fmt)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, err = _info(capsys, out)
    assert code == 2 and err.startswith("error: ") and "(truncated)" in err and err.count("\n") == 1, err
    _refused(lambda: load_model(out), r"truncated")


def test_info_fails_on_tensors_inconsistent_with_the_config(tmp_path, capsys):
    out = save_checkpoint(_model(), tmp_path / "native")
    state = load_file(out / "model.safetensors")
    state["layers.1.feed_forward.w2.weight"] = torch.zeros(32, 7)
    save_file(state, out / "model.safetensors")
    code, err = _info(capsys, out)
    assert code == 2 and "layers.1.feed_forward.w2.weight in model.safetensors has shape (32, 7)" in err, err


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.parametrize("payload,name", [(_RunsCode(), "posix.system"), (Path("/"), "pathlib.PosixPath")])
def test_pickle_refusal_names_the_refused_global(tmp_path, monkeypatch, payload, name):
    if os.name != "posix":
        pytest.skip("global names are those of a POSIX system")
    out = save_checkpoint(_model(), tmp_path / "meta", format="meta")
    torch.save({**torch.load(out / "consolidated.00.pth", weights_only=True), "evil": payload},
               out / "consolidated.00.pth")
    monkeypatch.chdir(tmp_path)
    pattern = rf"refusing to load .*consolidated\.00\.pth: it holds more than tensors \(a pickled {name};"
    _refused(lambda: load_model(out), pattern)
    assert not (tmp_path / "pwned.txt").exists()
    # The global is asked of torch's scanner, not read out of the error text: any wording still names it.
    real_load = torch.load

    def reworded(*args, **kwargs):
        try:
            return real_load(*args, **kwargs)
        except pickle.UnpicklingError:
            raise pickle.UnpicklingError("weights-only load refused this file") from None

    monkeypatch.setattr(torch, "load", reworded)
    _refused(lambda: load_model(out), pattern)


# ---- 11: silently accepted before --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.int32, torch.uint8])
@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_non_float_weights_are_refused(tmp_path, fmt, dtype):
    out = save_checkpoint(_model(), tmp_path / fmt, format=fmt)
    state = load_file(out / "model.safetensors")
    name = next(k for k in state if "k_proj" in k or "attention.wk" in k)
    state[name] = state[name].to(dtype)
    save_file(state, out / "model.safetensors")
    stored = str(dtype).removeprefix("torch.")
    pattern = rf"tensor {name} in model\.safetensors is stored as {stored}; float weights must be float32"
    _refused(lambda: load_model(out), pattern)
    _refused(lambda: describe_checkpoint(out), pattern)


def test_non_float_weights_in_meta_shards_are_refused(tmp_path):
    out = save_checkpoint(_model(), tmp_path / "meta", format="meta")
    sd = torch.load(out / "consolidated.00.pth", weights_only=True)
    sd["norm.weight"] = sd["norm.weight"].to(torch.int8)
    torch.save(sd, out / "consolidated.00.pth")
    _refused(lambda: load_model(out), r"tensor norm\.weight in consolidated\.00\.pth is stored as int8")


def test_quantized_folders_keep_their_integer_codes_but_refuse_wrong_ones(tmp_path):
    from codellama.quantize import quantize_model, save_quantized
    model = quantize_model(_model(ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=64, multiple_of=32)),
                           "int8")
    out = save_quantized(model, tmp_path / "q")
    assert load_model(out).layers[0].attention.wq.weight_int8.dtype == torch.int8
    state = load_file(out / "model.safetensors")
    state["layers.0.attention.wq.weight_int8"] = state["layers.0.attention.wq.weight_int8"].float()
    save_file(state, out / "model.safetensors")
    _refused(lambda: load_model(out), r"tensor layers\.0\.attention\.wq\.weight_int8 is stored as float32, "
                                      r"expected int8")
    _refused(lambda: describe_checkpoint(out), r"stored as float32, expected int8")
    record = json.loads((out / "quantization.json").read_text())
    (out / "quantization.json").write_text(json.dumps(record | {"dtype": "load"}))
    _refused(lambda: load_model(out), r"quantization\.json: dtype 'load' is not one of float32")
    (out / "quantization.json").write_text(json.dumps(record | {"layers": {"layers.0.attention.wq": "int4/gX"}}))
    _refused(lambda: load_model(out), r"unknown quantization 'int4/gX' for layer layers\.0\.attention\.wq")
    (out / "quantization.json").write_text(json.dumps(record))
    params = json.loads((out / "params.json").read_text()) | {"n_layers": 10**9}
    (out / "params.json").write_text(json.dumps(params))
    _refused(lambda: load_model(out), r"n_layers = 1000000000 is out of range")


# ---- GGUF: 7, 10, 11 ----------------------------------------------------------------------------------------------
gguf = pytest.importorskip("gguf")  # the writer (our reader needs nothing beyond numpy)


@pytest.fixture
def gguf_file(tmp_path, tiny_tokenizer_path) -> Path:
    from codellama.gguf import save_gguf
    from codellama.tokenizer import Tokenizer
    config = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=64)
    return save_gguf(_model(config), Tokenizer(tiny_tokenizer_path), tmp_path / "m.gguf", outtype="f16")


def _value_at(data: bytes | bytearray, key: str) -> int:
    """Offset of the u32 value type that follows metadata ``key`` (u64 length + UTF-8 name)."""
    name = key.encode()
    return data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)


def _patch(path: Path, key: str, value: int, *, fmt: str = "<I", value_type: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = _value_at(data, key)
    if value_type is not None:
        data[at:at + 4] = struct.pack("<I", value_type)
    struct.pack_into(fmt, data, at + 4, value)
    path.write_bytes(bytes(data))


def _patch_array_count(path: Path, key: str, count: int) -> None:
    data = bytearray(path.read_bytes())
    at = _value_at(data, key)
    assert struct.unpack_from("<I", data, at)[0] == 9  # ARRAY: item type u32, count u64
    struct.pack_into("<Q", data, at + 8, count)
    path.write_bytes(bytes(data))


def _patch_tensor(path: Path, name: str, *, type_id: int | None = None, offset: int | None = None) -> None:
    """Rewrite a tensor info: name, n_dims u32, dims u64 x n_dims, type u32, offset u64."""
    data = bytearray(path.read_bytes())
    encoded = name.encode()
    at = data.rindex(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)
    n_dims = struct.unpack_from("<I", data, at)[0]
    at += 4 + 8 * n_dims
    if type_id is not None:
        struct.pack_into("<I", data, at, type_id)
    if offset is not None:
        struct.pack_into("<Q", data, at + 4, offset)
    path.write_bytes(bytes(data))


def test_gguf_block_count_of_a_billion_is_refused(gguf_file, capsys):
    _patch(gguf_file, "llama.block_count", 10**9)
    pattern = r"m\.gguf: llama\.block_count = 1000000000 is out of range \(1\.\.1024\)"
    _refused(lambda: load_model(gguf_file), pattern)
    code, err = _info(capsys, gguf_file)
    assert code == 2 and err.startswith("error: ") and "llama.block_count" in err and "TiB" not in err


@pytest.mark.parametrize("key", ["tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.tokens"])
@pytest.mark.parametrize("count", [10**7, 2**40, 2**64 - 1])
def test_gguf_arrays_longer_than_the_file_are_refused(gguf_file, key, count):
    from codellama.gguf import load_gguf_tokenizer
    _patch_array_count(gguf_file, key, count)
    for fn in (lambda: load_gguf_tokenizer(gguf_file), lambda: load_model(gguf_file)):
        _refused(fn, r"truncated GGUF file: the header runs past the end of the file", seconds=2,
                 max_python_bytes=20 * 2**20)


def test_gguf_header_counts_beyond_limits_are_refused(gguf_file):
    data = bytearray(gguf_file.read_bytes())
    struct.pack_into("<Q", data, 16, 2**60)  # the key/value count
    gguf_file.write_bytes(bytes(data))
    _refused(lambda: load_model(gguf_file), r"GGUF header claims \d+ tensors and 1152921504606846976 metadata keys")


def test_gguf_tensor_offset_near_2_64_is_refused(gguf_file):
    _patch_tensor(gguf_file, "token_embd.weight", offset=2**64 - 32)
    _refused(lambda: load_model(gguf_file), r"truncated GGUF file: tensor token_embd\.weight \(F16, 32768 bytes at "
                                            r"offset 18446744073709551584\) ends at byte")


def test_gguf_tensor_whose_type_disagrees_with_its_size_is_refused(gguf_file):
    _patch_tensor(gguf_file, "token_embd.weight", type_id=0)  # F16 data declared F32: twice the bytes
    _refused(lambda: load_model(gguf_file), r"tensor token_embd\.weight \(F32, 65536 bytes\) overlaps tensor "
                                            r"blk\.0\.")
    _patch_tensor(gguf_file, "token_embd.weight", type_id=8)  # Q8_0: 512 rows of one 34-byte block, too few
    _refused(lambda: load_model(gguf_file), r"\d+ unaccounted bytes between tensor token_embd\.weight \(Q8_0, "
                                            r"17408 bytes\) and tensor blk\.0\.")


@pytest.mark.parametrize("key,value,fmt,value_type,pattern", [
    ("llama.attention.head_count", 0, "<I", None, r"llama\.attention\.head_count = 0 is out of range"),
    ("llama.block_count", 0, "<I", None, r"llama\.block_count = 0 is out of range"),
    ("llama.attention.head_count_kv", -1, "<i", 5, r"llama\.attention\.head_count_kv = -1 is out of range"),
    ("llama.embedding_length", 32.0, "<f", 6, r"llama\.embedding_length must be an integer, got 32\.0"),
    ("llama.rope.freq_base", float("inf"), "<f", None, r"llama\.rope\.freq_base = inf is out of range"),
    ("llama.attention.head_count", 5, "<I", None, r"dim 32 is not divisible by n_heads 5"),
])
def test_gguf_bad_hyper_parameters(gguf_file, key, value, fmt, value_type, pattern):
    _patch(gguf_file, key, value, fmt=fmt, value_type=value_type)
    _refused(lambda: load_model(gguf_file), pattern)
    _refused(lambda: describe_checkpoint(gguf_file), pattern)


def test_gguf_out_of_range_token_ids_and_types(gguf_file):
    from codellama.gguf import load_gguf_tokenizer
    original = gguf_file.read_bytes()
    _patch(gguf_file, "tokenizer.ggml.bos_token_id", 10**6)
    _refused(lambda: load_gguf_tokenizer(gguf_file), r"'tokenizer\.ggml\.bos_token_id' = 1000000 is not a token id "
                                                     r"\(0\.\.511\)")
    gguf_file.write_bytes(original)
    _patch(gguf_file, "tokenizer.ggml.unknown_token_id", -5, fmt="<i", value_type=5)
    _refused(lambda: load_gguf_tokenizer(gguf_file), r"unknown_token_id' = -5 is not a token id")
    data = bytearray(original)
    at = _value_at(data, "tokenizer.ggml.token_type")
    assert struct.unpack_from("<I", data, at + 4)[0] == 5  # an INT32 array
    struct.pack_into("<i", data, at + 16, 99)  # the first element
    gguf_file.write_bytes(bytes(data))
    _refused(lambda: load_gguf_tokenizer(gguf_file), r"GGUF token type 99 is not one of 1\.\.6")


def test_info_on_a_truncated_gguf_fails(gguf_file, capsys):
    gguf_file.write_bytes(gguf_file.read_bytes()[:-64])
    code, err = _info(capsys, gguf_file)
    assert code == 2 and err.startswith("error: ") and "truncated GGUF file" in err and err.count("\n") == 1


def test_ggml_type_table_matches_llamacpp():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from codellama.gguf_reader import GGML_TYPES
    for type_id, (name, block, nbytes) in GGML_TYPES.items():
        assert GGMLQuantizationType(type_id).name == name
        assert GGML_QUANT_SIZES[GGMLQuantizationType(type_id)] == (block, nbytes), name


def test_convert_does_not_copy_a_tokenizer_symlinked_from_elsewhere(tmp_path):
    out = save_checkpoint(_model(), tmp_path / "native")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the converted checkpoint")
    (out / "tokenizer.model").symlink_to(secret)
    from codellama.checkpoint import convert
    _refused(lambda: convert(out, tmp_path / "hf", to="hf"), r"tokenizer tokenizer\.model in .* points outside")
    assert not (tmp_path / "hf" / "tokenizer.model").exists()


def test_an_oversized_tokenizer_is_not_read_whole(tmp_path):
    out = save_checkpoint(_model(), tmp_path / "native")
    with open(out / "tokenizer.model", "wb") as f:
        f.truncate(65 * 2**20)  # sparse: costs no disk
    _refused(lambda: load_tokenizer(out), r"tokenizer\.model is larger than 64 MiB: not a tokenizer model",
             max_python_bytes=2**20)
