"""The inference performance model (issue 16, item 3): byte counts against quantize.py's real layout and the
released shapes, the roofline formulas, GPU counts worked out by hand, and the local hardware probe."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from codellama.bench import hardware
from codellama.bench.hardware import PROFILES, HardwareProfile, get_profile, probe_local
from codellama.bench.perf_model import (
    ALLREDUCE_LATENCY_S,
    KV_INT8_SCALE_BYTES,
    Prediction,
    kv_bytes,
    min_gpus,
    predict,
    prefill_attention_pairs,
    prefill_flops,
    weight_bytes,
)
from codellama.config import ModelConfig
from codellama.errors import CodeLlamaError
from codellama.model import Transformer
from codellama.quantize import quantization_summary, quantize_model

C7, C34, C70 = (ModelConfig.from_name(f"CodeLlama-{s}") for s in ("7b", "34b", "70b"))
H100_MEMORY = 81559 * 2 ** 20  # 85,520,809,984 bytes


def _state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---- weights and KV cache ------------------------------------------------------------------------------
def test_float_weight_bytes_are_params_times_itemsize():
    assert weight_bytes(C7, "bf16") == 2 * C7.num_params() == 13_477_093_376
    assert weight_bytes(C7, "fp16") == 2 * C7.num_params()
    assert weight_bytes(C7, "fp32") == 4 * C7.num_params()
    assert weight_bytes(C34, "bf16") == 67_487_940_608  # SPEC: 67.5 GB
    assert weight_bytes(C70, "bf16") == 137_953_820_672  # SPEC: 138 GB
    assert weight_bytes(C7, "bfloat16") == weight_bytes(C7, "torch.bfloat16") == weight_bytes(C7, "bf16")


@pytest.mark.parametrize("mode,group", [("int8", 32), ("int4", 32), ("int4", 64)])
def test_quantized_weight_bytes_match_quantize_model(mode, group):
    # hidden 176: w2's rows (176) are not a multiple of 32 or 64, so int4 stores that layer as int8, as
    # quantize_model does; every other row length (64) takes the groups.
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=176,
                         max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(config).to(torch.bfloat16)
    quantize_model(model, mode, group)
    real = _state_bytes(model)
    assert real == quantization_summary(model)["weight_bytes"]
    assert weight_bytes(config, mode, group_size=group) == real
    # In float32 activations the embedding and norms are stored in float32.
    model32 = quantize_model(Transformer(config), mode, group)
    assert weight_bytes(config, mode, group_size=group, activation_dtype="fp32") == _state_bytes(model32)


def test_quantized_weight_bytes_of_released_shapes():
    # The same formula at the 7B shape: every linear (output head included) int8 plus a float32 scale per row;
    # tok_embeddings and the norms in bf16.
    d, L, V, h = 4096, 32, 32016, 11008
    linear = C7.num_params() - V * d - (2 * L + 1) * d
    rows = L * (4 * d + 2 * h + d) + V
    assert weight_bytes(C7, "int8") == linear + 4 * rows + 2 * (V * d + (2 * L + 1) * d)
    # int4 g32: half a byte per weight plus bf16 scale + zero per 32 weights (every row length divides by 32).
    assert weight_bytes(C7, "int4") == linear // 2 + 2 * 2 * linear // 32 + 2 * (V * d + (2 * L + 1) * d)
    assert 0.50 < weight_bytes(C70, "int8") / weight_bytes(C70, "bf16") < 0.51


def test_kv_bytes():
    # SPEC: 34B keeps 192 KiB per token in bf16, 19.7 GB at 100k; 70B 320 KiB, 32.8 GB.
    assert kv_bytes(C34, 100_000, 1, "bf16") == 2 * 48 * 8 * 128 * 100_000 * 2 == 19_660_800_000
    assert kv_bytes(C34, 1, 1, "bf16") == 192 * 1024
    assert kv_bytes(C70, 100_000, 1, "bf16") == 32_768_000_000
    assert kv_bytes(C34, 100_000, 3, "fp32") == 6 * 19_660_800_000
    assert kv_bytes(C34, 100_000, 1, "bfloat16") == C34.kv_cache_bytes(100_000)
    # int8: one byte per value plus a bf16 scale per (layer, k|v, sequence, head, token): 130 / 256 of bf16.
    int8 = kv_bytes(C34, 100_000, 1, "int8")
    assert int8 == 2 * 48 * 8 * (128 + 2) * 100_000 == 9_984_000_000
    assert 0.5 < int8 / kv_bytes(C34, 100_000, 1, "bf16") < 0.51
    assert kv_bytes(C34, 0, 1, "bf16") == 0


def test_int8_kv_scale_matches_the_cache_implementation():
    from codellama import model

    if not hasattr(model, "KV_SCALE_BYTES"):
        pytest.skip("the int8 KV cache is not in this tree")
    assert KV_INT8_SCALE_BYTES == model.KV_SCALE_BYTES
    small = ModelConfig(dim=256, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64)
    cache = model.KVCache.allocate(small, batch=2, size=10, dtype=torch.int8)
    assert cache.nbytes() == kv_bytes(small, 10, 2, "int8")


# ---- memory and GPU counts -------------------------------------------------------------------------------
def test_min_gpus_34b_vs_70b_at_100k_on_h100():
    # H100-SXM holds 81559 MiB = 85.52e9 B; a rank needs (weights + KV)/tp x 1.10.
    # 70B bf16: 137.95e9 + 32.77e9 = 170.72e9 -> tp=2: 85.36e9 x 1.1 = 93.9e9 (no); tp=4: 46.9e9 (yes) -> 4.
    assert min_gpus(C70, 100_000, 1, "bf16", None, "H100-SXM") == 4
    # 34B bf16: 67.49e9 + 19.66e9 = 87.15e9 -> tp=1: 95.9e9 (no); tp=2: 47.9e9 (yes) -> 2.
    assert min_gpus(C34, 100_000, 1, "bf16", None, "H100-SXM") == 2
    # At 4k: 70B 139.3e9 -> tp=2 (76.6e9); 34B 68.3e9 x 1.1 = 75.1e9 fits one.
    assert min_gpus(C70, 4096, 1, "bf16", "bf16", "H100-SXM") == 2
    assert min_gpus(C34, 4096, 1, "bf16", "bf16", "H100-SXM") == 1
    p = predict(C70, 100_000, hardware="H100-SXM")
    assert p.memory_bytes == 170_721_820_672 and p.min_gpus == 4 and not p.fits
    assert p.per_rank_memory_bytes == p.memory_bytes
    p4 = predict(C70, 100_000, hardware="H100-SXM", tp=4)
    assert p4.fits and p4.per_rank_memory_bytes == 170_721_820_672 // 4


def test_70b_int8_fits_one_h200_at_4k():
    # int8 weights 69.27e9 + bf16 KV 4096 x 327,680 = 1.34e9 -> 70.6e9 x 1.1 = 77.7e9 <= 150.75e9 (143771 MiB).
    assert min_gpus(C70, 4096, 1, "int8", None, "H200") == 1
    assert predict(C70, 4096, dtype="int8", hardware="H200").fits
    # In bf16 it does not: 139.3e9 x 1.1 = 153.2e9 > 150.75e9.
    assert min_gpus(C70, 4096, 1, "bf16", None, "H200") == 2
    # 34B bf16 at 100k fits one H200: 87.15e9 x 1.1 = 95.9e9.
    assert min_gpus(C34, 100_000, 1, "bf16", None, "H200") == 1


def test_min_gpus_monotonic_in_context():
    for config in (C34, C70):
        for hw in PROFILES:
            counts = [min_gpus(config, n, 1, "bf16", None, hw) for n in (1024, 16384, 32768, 65536, 100_000)]
            assert all(c is not None for c in counts)
            assert counts == sorted(counts), (config.name, hw, counts)
    # 34B on one H100 up to (85.52e9 / 1.1 - 67.49e9) / 196,608 B = 52.2k tokens.
    assert min_gpus(C34, 52_000, 1, "bf16", None, "H100-SXM") == 1
    assert min_gpus(C34, 52_500, 1, "bf16", None, "H100-SXM") == 2


def test_tp_must_divide_kv_heads():
    # 70B has 8 KV heads, so TP stops at 8: batch 16 at 100k needs (137.95e9 + 16 x 32.77e9)/8 x 1.1 = 91.1e9.
    assert min_gpus(C70, 100_000, 16, "bf16", None, "H100-SXM") is None
    with pytest.raises(CodeLlamaError, match="KV heads"):
        predict(C70, 1024, hardware="H100-SXM", tp=16)
    with pytest.raises(CodeLlamaError, match="KV heads"):
        predict(C34, 1024, hardware="H100-SXM", tp=3)
    # 7B has 32 KV heads: batch 128 at 16k (1113e9 B) takes 16 GPUs (69.6e9 x 1.1 = 76.5e9 each).
    assert min_gpus(C7, 16384, 128, "bf16", None, "H100-SXM") == 16
    assert predict(C7, 16384, batch=128, hardware="H100-SXM", tp=16).fits


# ---- times ----------------------------------------------------------------------------------------------
def test_decode_is_weight_and_kv_bytes_over_bandwidth():
    p = predict(C7, 1024, hardware="H100-SXM")
    bw = 3.35e12 * 0.8
    streamed = weight_bytes(C7, "bf16") - C7.vocab_size * C7.dim * 2  # the embedding table is gathered, not read
    assert p.decode_s_per_token == pytest.approx((streamed + kv_bytes(C7, 1024, 1, "bf16")) / bw, rel=1e-12)
    assert 1.0 < p.decode_s_per_token / (weight_bytes(C7, "bf16") / bw) < 1.05
    assert p.decode_bound == "memory" and p.allreduce_s_per_token == 0
    # int8 weights halve the bytes; an int8 KV cache halves the cache's share.
    q = predict(C7, 1024, dtype="int8", hardware="H100-SXM")
    assert 0.5 < q.decode_s_per_token / p.decode_s_per_token < 0.55
    long_bf16 = predict(C34, 100_000, hardware="H200")
    long_int8 = predict(C34, 100_000, hardware="H200", kv_dtype="int8")
    saved = (long_bf16.decode_s_per_token - long_int8.decode_s_per_token) * 4.8e12 * 0.8
    assert saved == pytest.approx(kv_bytes(C34, 100_000, 1, "bf16") - kv_bytes(C34, 100_000, 1, "int8"))


def test_decode_compute_floor_at_large_batch():
    # 70B at a short context (GQA keeps the batch's KV cache small): 512 tokens per step cost 2 x 68.45e9 x 512 =
    # 7.0e16 FLOPs = 118 ms at 60% of 989 TFLOP/s, against 159e9 B = 59 ms of weights and KV cache.
    small, big = (predict(C70, 128, batch=b, hardware="H100-SXM") for b in (1, 512))
    # The products turn compute-bound; attention stays bound by the KV bytes (8 FLOPs per byte with 8 KV heads).
    assert big.decode_bound == "mixed" and small.decode_bound == "memory"
    products = 2 * 512 * (C70.num_params() - C70.vocab_size * C70.dim - (2 * 80 + 1) * 8192) / (989e12 * 0.6)
    kv = kv_bytes(C70, 128, 512, "bf16") / (3.35e12 * 0.8)
    assert big.decode_s_per_token == pytest.approx(products + kv, rel=1e-12)
    assert big.decode_tokens_per_s > 50 * small.decode_tokens_per_s


def test_prefill_flops_and_superlinear_growth():
    T, L, H, hd = 4096, 32, 32, 128
    matmul = C7.num_params() - 2 * C7.vocab_size * C7.dim - (2 * L + 1) * C7.dim  # layer linears only
    expected = 2 * matmul * T + 2 * C7.vocab_size * C7.dim + 2 * 2 * L * H * hd * T * (T + 1) / 2
    assert prefill_flops(C7, T, 1) == pytest.approx(expected, rel=1e-12)
    assert prefill_flops(C7, T, 3) == pytest.approx(3 * expected, rel=1e-12)
    times = [predict(C34, n, hardware="H100-SXM").prefill_s for n in (4096, 16384, 65536)]
    assert times[1] / times[0] > 4.3 and times[2] / times[1] > 4.8  # the attention term is quadratic
    p = predict(C34, 16384, hardware="H100-SXM")
    assert p.prefill_bound == "compute"
    # The kernels compute more pairs than causal attention needs (each later chunk's own triangle in full).
    per_pair = 4 * 48 * 64 * 128
    computed = p.prefill_flops + per_pair * (prefill_attention_pairs(16384) - 16384 * 16385 / 2)
    assert p.prefill_s == pytest.approx(computed / (989e12 * 0.6), rel=1e-12)


def test_tensor_parallel_halves_rank_time_and_adds_allreduce():
    one = predict(C34, 16384, hardware="H100-SXM")
    two = predict(C34, 16384, hardware="H100-SXM", tp=2)
    # One all-reduce of one token's activations: 5 us + 2(tp-1)/tp x 8192 x 2 B over NVLink at 50% of 900 GB/s.
    per = ALLREDUCE_LATENCY_S + 2 * (2 - 1) / 2 * 8192 * 2 / (900e9 * 0.5)
    assert two.allreduce_s_per_token == pytest.approx(2 * 48 * per, rel=1e-12)
    assert two.decode_s_per_token - two.allreduce_s_per_token == pytest.approx(one.decode_s_per_token / 2,
                                                                                rel=1e-12)
    prefill_comm = 2 * 48 * (ALLREDUCE_LATENCY_S + 16384 * 8192 * 2 / (900e9 * 0.5))
    assert two.prefill_s == pytest.approx(one.prefill_s / 2 + prefill_comm, rel=1e-12)
    assert two.per_rank_memory_bytes == one.memory_bytes // 2


def test_total_time_and_json():
    p = predict("CodeLlama-70b", 16384, hardware="H200", tp=2, output_tokens=101)
    first, last = (predict(C70, n, hardware="H200", tp=2).decode_s_per_token for n in (16385, 16484))
    assert p.total_s == pytest.approx(p.prefill_s + 100 * (first + last) / 2, rel=1e-9)
    assert p.kv_bytes == kv_bytes(C70, 16384 + 100, 1, "bf16")
    out = json.loads(json.dumps(p.to_json()))
    assert {"prefill_s", "decode_s_per_token", "memory_bytes", "min_gpus"} <= set(out)
    assert out["model"] == "codellama-70b" and out["hardware"] == "H200" and out["tp"] == 2
    assert isinstance(p, Prediction) and p.memory_bytes == p.weight_bytes + p.kv_bytes


def test_bad_input_is_one_line_errors():
    for kwargs, message in [(dict(hardware="B200"), "known: A100-80GB, H100-SXM, H200, local"),
                            (dict(dtype="int2"), "unknown dtype"), (dict(kv_dtype="int4"), "KV cache dtype"),
                            (dict(batch=0), "batch"), (dict(tp=0), "tp"), (dict(output_tokens=0), "output_tokens")]:
        with pytest.raises(CodeLlamaError, match=message):
            predict(C7, 1024, **kwargs)
    with pytest.raises(CodeLlamaError, match="context"):
        predict(C7, 0)
    with pytest.raises(CodeLlamaError, match="unknown model name"):
        predict("CodeLlama-8b", 1024)
    with pytest.raises(CodeLlamaError, match="ModelConfig"):
        predict(42, 1024)


def test_profiles_are_the_data_sheet_figures():
    h100 = get_profile("h100-sxm")
    assert (h100.bandwidth_bytes_s, h100.flops["bf16"], h100.interconnect_bytes_s) == (3.35e12, 989e12, 900e9)
    assert h100.memory_bytes == H100_MEMORY and h100.flops["int8"] == h100.flops["bf16"]
    assert PROFILES["A100-80GB"].bandwidth_bytes_s == 2.039e12 and PROFILES["A100-80GB"].flops["bf16"] == 312e12
    assert PROFILES["H200"].bandwidth_bytes_s == 4.8e12 and PROFILES["H200"].memory_bytes > 141e9
    h100.efficiency["bandwidth"] = 0.1  # a caller calibrating its copy leaves the table alone
    assert PROFILES["H100-SXM"].efficiency["bandwidth"] == 0.8


# ---- the local probe --------------------------------------------------------------------------------------
def test_probe_local_is_plausible_and_cached():
    hardware._LOCAL.clear()
    start = time.perf_counter()
    local = probe_local(threads=1, seconds=1.0)
    # The timed budget plus the operands' set-up (see probe_local); generous: a loaded 2-core CI runner took 7.2 s,
    # and what this guards against is a probe that ignores its budget (minutes), not seconds of set-up.
    assert time.perf_counter() - start < 1.0 + 29.0
    assert local.name == "local-cpu" and local.kind == "cpu" and local.interconnect_bytes_s is None
    assert 1e9 <= local.bandwidth_bytes_s <= 1e12
    assert 1e9 <= local.flops["fp32"] <= 1e13 and local.flops["bf16"] > 1e8
    assert local.flops["int8"] == local.flops["bf16"]
    assert 1e8 < local.memory_bytes < 1e14
    assert all(0 < v < 5 for v in local.efficiency.values())
    start = time.perf_counter()
    again = probe_local(threads=1)
    assert time.perf_counter() - start < 0.01 and again == local
    assert get_profile("local") == local  # the suite runs torch on one thread, so this is the same probe
    small = ModelConfig(dim=256, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64)
    p = predict(small, 128, dtype="fp32", hardware=local)
    assert p.hardware == "local-cpu" and p.min_gpus is None and p.fits
    # Measured kernel rates: a small fp32 model runs generation's packed products; CPU decode attention has its own.
    eff, bw, fp32 = local.efficiency, local.bandwidth_bytes_s, local.flops["fp32"]
    streamed = weight_bytes(small, "fp32") - 64 * 256 * 4
    matmul = small.num_params() - 64 * 256 - 5 * 256
    attention = 2 * 2 * 2 * 2 * 128 * 128
    can_pack = "_packed" if "bandwidth_fp32_packed" in eff else ""  # oneDNN can pack on this machine
    for packed, suffix in ((None, can_pack), (True, can_pack), (False, "")):
        products = max(streamed / (bw * eff["bandwidth_fp32" + suffix]),
                       2 * matmul / (fp32 * eff.get("flops_fp32" + suffix, 1.0)))
        attend = max(kv_bytes(small, 128, 1, "fp32") / (bw * eff["bandwidth"]),
                     attention / (fp32 * eff["attention_fp32"]))
        got = predict(small, 128, dtype="fp32", hardware=local, packed=packed).decode_s_per_token
        assert got == pytest.approx(products + attend + 2 * local.overhead_s_per_layer, rel=1e-12)
    assert 0 <= local.overhead_s_per_layer < 0.05
    with pytest.raises(CodeLlamaError, match="interconnect"):
        predict(small, 128, hardware=local, tp=2)
    fake = HardwareProfile("tiny-gpu", 2 ** 30, 1e11, {"bf16": 1e13})
    assert min_gpus(C7, 128, 1, "bf16", None, fake) is None  # no interconnect: no TP to spread 13.5 GB over
    assert min_gpus(small, 128, 1, "bf16", None, fake) == 1


def test_prefill_attention_pairs_follow_the_chunked_engine():
    from codellama.bench.perf_model import FLASH_KEY_BLOCK, PREFILL_CHUNK
    from codellama.generation import DEFAULT_PREFILL_CHUNK

    assert PREFILL_CHUNK == DEFAULT_PREFILL_CHUNK and FLASH_KEY_BLOCK == 512
    # One causal chunk: T(T+1)/2 plus half a 512-key block per query on the diagonal.
    assert prefill_attention_pairs(1000) == 1000 * 1001 / 2 + 1000 * 511 / 2 == 756_000
    assert prefill_attention_pairs(100) == 100 * 101 / 2 + 100 * 99 / 2
    # 4000 tokens: a causal chunk of 2048, then 1952 rows dense over all 4000 keys.
    assert prefill_attention_pairs(4000) == 2048 * 2049 / 2 + 2048 * 511 / 2 + 1952 * 4000 == 10_429_440
    assert prefill_attention_pairs(100_000) / (100_000 * 100_001 / 2) == pytest.approx(1.0201, abs=1e-4)
    # The local profile rates those pairs with the masked-chunk kernel it measured.
    cpu = HardwareProfile("toy-cpu", 2 ** 34, 1e10, {"fp32": 1e11, "bf16": 1e11, "int8": 1e11}, kind="cpu",
                          efficiency={"bandwidth": 1.0, "flops": 1.0, "prefill_attention_fp32": 0.25})
    p = predict(C7, 4000, dtype="fp32", hardware=cpu)
    useful = 4 * 32 * 32 * 128 * 4000 * 4001 / 2
    computed = 4 * 32 * 32 * 128 * 10_429_440
    assert p.prefill_flops == pytest.approx(prefill_flops(C7, 4000, 1))
    assert p.prefill_s == pytest.approx((p.prefill_flops - useful) / 1e11 + computed / 0.25e11, rel=1e-12)


def test_probe_rejects_bad_arguments():
    with pytest.raises(CodeLlamaError, match="threads"):
        probe_local(threads=0)
    with pytest.raises(CodeLlamaError, match="seconds"):
        probe_local(seconds=-1)


def test_importing_the_model_does_not_import_torch():
    code = ("import sys; import codellama.bench.perf_model, codellama.bench.hardware; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
