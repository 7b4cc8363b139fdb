"""Weight-only int8 / int4 quantization: quantizer error bounds, kernels against the exact fallback, logits within
stated tolerances of full precision, checkpoints round-tripping through safetensors, CLI and errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from codellama.api import load
from codellama.checkpoint import describe_checkpoint, save_checkpoint
from codellama.config import ModelConfig
from codellama.errors import CodeLlamaError
from codellama.model import Transformer
from codellama.quantize import (Int4Linear, Int8Linear, QuantLinear, dequantize_int4, dequantize_int8,
                                pack_int4, quantization_summary, quantize_int4, quantize_int8, quantize_model,
                                save_quantized, set_kernels, unpack_int4)

# Stated tolerances: relative RMS error of the logits of a random 2-layer model against full precision.
# Random Gaussian weights are the hard case for 4 bits (no outliers to spend the range on); measured
# 0.010 (int8), 0.115-0.118 (int4 g32), 0.133-0.136 (g64), 0.146-0.157 (g128) over seeds 0-2.
TOLERANCE = {("int8", 32): 0.02, ("int4", 32): 0.15, ("int4", 64): 0.17, ("int4", 128): 0.19}


@pytest.fixture
def model128() -> Transformer:
    """Rows of 128 and 384, so every group size applies to every layer."""
    config = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=128,
                         max_seq_len=256)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    return model.eval()


@pytest.fixture(autouse=True)
def _kernels_on():
    yield
    set_kernels(True)


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def test_int8_quantizer_error_bound():
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 64).unsqueeze(1)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    assert int(q.abs().max()) == 127
    err = (dequantize_int8(q, scales) - w).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_quantizer_error_bound_and_packing(group_size):
    torch.manual_seed(1)
    w = torch.randn(48, 256) * 0.05 + 0.01
    packed, scales, zeros = quantize_int4(w, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 128)
    assert scales.shape == zeros.shape == (48, 256 // group_size) and scales.dtype == torch.bfloat16
    q = unpack_int4(packed)
    assert int(q.max()) <= 15 and torch.equal(pack_int4(q), packed)
    err = (dequantize_int4(packed, scales, zeros) - w).abs().reshape(48, -1, group_size)
    step = scales.float().unsqueeze(-1)
    # Half a step of rounding, plus what the bfloat16 zero point moved the grid by (at most one step).
    assert bool((err <= step * 1.5 + 1e-6).all())
    assert float(err.mean()) < float(step.mean()) * 0.3  # typical error is a quarter step, as for uniform rounding


@pytest.mark.parametrize("mode,group_size", list(TOLERANCE))
def test_quantized_logits_within_tolerance(model128, mode, group_size):
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model128(tokens)
        q = quantize_model(copy.deepcopy(model128), mode, group_size)
        got = q(tokens)
    assert all(isinstance(m, (Int8Linear if mode == "int8" else Int4Linear)) for m in q.modules()
               if isinstance(m, QuantLinear))
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 7 * 2 + 1  # every linear, output included
    rel = _rel_rms(got, ref)
    assert 0 < rel < TOLERANCE[(mode, group_size)]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fallback_is_exactly_the_dequantized_model(model128, mode):
    """Without kernels a quantized model computes exactly what a float model holding the dequantized weights does."""
    q = quantize_model(copy.deepcopy(model128), mode, 32)
    dense = copy.deepcopy(model128)
    for name, module in q.named_modules():
        if isinstance(module, QuantLinear):
            dense.get_submodule(name).weight.data.copy_(module.dequantize(torch.float32))
    tokens = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    set_kernels(False)
    with torch.no_grad():
        torch.testing.assert_close(q(tokens), dense(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("length", [8, 80])  # decode-shaped (packed kernel) and prefill-shaped (bf16 GEMM)
def test_packed_kernels_agree_with_fallback(model128, mode, length):
    q = quantize_model(copy.deepcopy(model128), mode, 32)
    tokens = torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = q(tokens)
        used = [m.uses_kernel("cpu") for m in q.modules() if isinstance(m, QuantLinear)]
        set_kernels(False)
        slow = q(tokens)
    # On CPU PyTorch ships both kernels; the only difference is bfloat16 activations.
    assert all(used)
    assert _rel_rms(fast, slow) < 0.01


def test_misaligned_input_is_safe():
    """PyTorch's CPU int8 kernel segfaults on operands not 64-byte aligned; views with an offset must work."""
    layer = Int8Linear.from_linear(nn.Linear(128, 64, bias=False))
    buf = torch.randn(15 * 128 + 4).bfloat16()
    x = buf[4:].view(15, 128)
    assert x.data_ptr() % 64 != 0
    with torch.no_grad():
        torch.testing.assert_close(layer(x).float(), layer(x.clone()).float())


def test_int4_falls_back_to_int8_where_group_does_not_divide(tiny_model):
    # tiny_config's FFN width is 224: g64 does not divide it, so w2 (rows of 224) is int8, the rest int4.
    q = quantize_model(copy.deepcopy(tiny_model), "int4", 64)
    layers = quantization_summary(q)["layers"]
    assert layers["layers.0.feed_forward.w2"] == "int8"
    assert layers["layers.0.feed_forward.w1"] == "int4/g64"


def test_cast_keeps_quantization_parameters(model128):
    q = quantize_model(copy.deepcopy(model128), "int4", 32)
    scales = q.layers[0].attention.wq.scales.clone()
    q8 = quantize_model(copy.deepcopy(model128), "int8")
    s8 = q8.output.scales.clone()
    q.to(torch.bfloat16)
    q8.to(torch.float16)
    assert q.layers[0].attention.wq.scales.dtype == torch.bfloat16 and torch.equal(q.layers[0].attention.wq.scales, scales)
    assert q8.output.scales.dtype == torch.float32 and torch.equal(q8.output.scales, s8)
    assert q.output.weight.dtype == torch.bfloat16  # the dtype carrier follows the model
    with torch.no_grad():
        assert q(torch.tensor([[1, 2, 3]])).shape == (1, 3, 512)


@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int4", 32), ("int4", 128)])
def test_save_load_round_trip(tmp_path, model128, tiny_tokenizer_path, mode, group_size):
    src = save_checkpoint(model128, tmp_path / "src", tokenizer=tiny_tokenizer_path)
    llama = load(src, device="cpu", quantize=mode, group_size=group_size or 32)
    out = save_quantized(llama.model, tmp_path / "q", tokenizer=tiny_tokenizer_path, mode=mode, group_size=group_size)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "params.json", "quantization.json",
                                                     "tokenizer.model"]
    info = json.loads((out / "quantization.json").read_text())
    assert info["mode"] == mode and info["group_size"] == group_size
    again = load(out, device="cpu")
    tokens = llama.tokenizer.encode("def add(a, b):\n    return a + b\n", bos=True)
    assert torch.equal(again.logits(tokens), llama.logits(tokens))
    assert again.complete("def add(a, b):", max_new_tokens=8).tokens == \
        llama.complete("def add(a, b):", max_new_tokens=8).tokens
    assert describe_checkpoint(out)["format"] == f"quantized {mode}" + (f"/g{group_size}" if group_size else "")
    # Stored sizes: int8 ~1 byte per linear weight, int4 ~0.5 + bfloat16 scale and zero per group.
    full = (src / "model.safetensors").stat().st_size
    size = (out / "model.safetensors").stat().st_size
    assert size < full * (0.45 if mode == "int8" else 0.35)


def test_cli_quantize(tmp_path, model128, tiny_tokenizer_path):
    src = save_checkpoint(model128, tmp_path / "src", tokenizer=tiny_tokenizer_path)
    r = subprocess.run([sys.executable, "-m", "codellama", "quantize", str(src), str(tmp_path / "q4"), "--int4",
                        "--group-size", "64"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "15 int4/g64 layers" in r.stdout
    assert load(tmp_path / "q4", device="cpu").model.layers[1].feed_forward.w2.group_size == 64
    r = subprocess.run([sys.executable, "-m", "codellama", "quantize", str(src), str(tmp_path / "q4o"), "--int4",
                        "--output", "int8"], capture_output=True, text=True)
    assert r.returncode == 0 and "14 int4/g32, 1 int8 layers" in r.stdout, r.stderr


def test_cli_quantize_errors_are_one_line(tmp_path, model128, tiny_tokenizer_path):
    src = save_checkpoint(model128, tmp_path / "src", tokenizer=tiny_tokenizer_path)
    for args, message in ((["--int4", "--group-size", "48"], "invalid choice: 48"),
                          ([], "one of the arguments --int8 --int4 is required"),
                          (["--int8", "--dtype", "float8"], "unknown dtype 'float8'")):
        r = subprocess.run([sys.executable, "-m", "codellama", "quantize", str(src), str(tmp_path / "q"), *args],
                           capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_api_errors(tmp_path, model128, tiny_tokenizer_path):
    src = save_checkpoint(model128, tmp_path / "src", tokenizer=tiny_tokenizer_path)
    with pytest.raises(CodeLlamaError, match=r"unknown quantization 'int2' \(use int8, int4\)"):
        load(src, device="cpu", quantize="int2")
    with pytest.raises(CodeLlamaError, match=r"int4 group size must be one of 32, 64, 128, 256, got 16"):
        load(src, device="cpu", quantize="int4", group_size=16)
    q = save_quantized(load(src, device="cpu", quantize="int8").model, tmp_path / "q")
    with pytest.raises(CodeLlamaError, match=r"already quantized"):
        load(q, device="cpu", quantize="int8")
    with pytest.raises(CodeLlamaError, match=r"not quantized"):
        save_quantized(model128, tmp_path / "nope")
    (q / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CodeLlamaError, match=r"model.safetensors is not a valid safetensors file: header length 8"):
        load(q, device="cpu", tokenizer=tiny_tokenizer_path)


def test_bias_is_refused():
    with pytest.raises(CodeLlamaError, match="has a bias"):
        quantize_model(nn.Sequential(nn.Linear(32, 8)), "int8")


def test_output_layer_override(tmp_path, model128, tiny_tokenizer_path):
    q = quantize_model(copy.deepcopy(model128), "int4", 32, output="int8")
    layers = quantization_summary(q)["layers"]
    assert layers["output"] == "int8" and layers["layers.1.attention.wo"] == "int4/g32"
    kept = quantize_model(copy.deepcopy(model128), "int8", output="none")
    assert type(kept.output) is nn.Linear and torch.equal(kept.output.weight, model128.output.weight)
    out = save_quantized(kept, tmp_path / "q", tokenizer=tiny_tokenizer_path)
    again = load(out, device="cpu")
    assert type(again.model.output) is nn.Linear
    with torch.no_grad():
        assert torch.equal(again.model(torch.tensor([[1, 5, 9]])), kept(torch.tensor([[1, 5, 9]])))
    with pytest.raises(CodeLlamaError, match="unknown output-layer quantization 'fp8'"):
        quantize_model(copy.deepcopy(model128), "int8", output="fp8")


def test_int8_decode_row_runs_fbgemm_and_agrees_with_the_fallback(monkeypatch):
    """One row of activations (a batch-1 decode step) through fbgemm's dynamic int8 linear: within the kernels'
    check of the fallback (activations quantized to int8 per row: ~1% of the output's scale); greedy decoding
    of a quantized model is unchanged by it; CODELLAMA_INT8_DECODE_KERNEL=0 turns it off."""
    from codellama.generation import generate

    torch.manual_seed(0)
    layer = Int8Linear.from_weight(torch.randn(96, 64) * 0.1)
    if layer._decode_kernel() is None:
        pytest.skip("no x86/fbgemm quantized engine in this torch")
    x = torch.randn(1, 1, 64)
    want = layer._fallback(x)
    got = layer(x)
    assert got.shape == want.shape and float((got - want).abs().max() / want.abs().max()) < 0.02
    fresh = Int8Linear.from_weight(torch.randn(96, 64) * 0.1)
    monkeypatch.setenv("CODELLAMA_INT8_DECODE_KERNEL", "0")
    assert fresh._decode_kernel() is None
    monkeypatch.delenv("CODELLAMA_INT8_DECODE_KERNEL")
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=128)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(std=0.3)
    quantize_model(model, "int8")
    prompt = [1, 17, 200, 42, 9]
    from codellama.generation_forward import _int8_layer
    assert _int8_layer(model.layers[0]) is not None  # decode rows run q|k|v and w1|w3 as one product each
    fast = generate(model, [prompt], max_new_tokens=16)[0].tokens
    set_kernels(False)
    try:
        assert generate(model, [prompt], max_new_tokens=16)[0].tokens == fast
    finally:
        set_kernels(True)
