"""Hardware profiles for the performance model: vendor data-sheet figures for the GPUs the question is about, and
a short measured probe of the local CPU (which the bench compares its own timings against).

A profile holds peaks (what the data sheet or the probe says) and separately the fraction of them that inference
kernels achieve (``efficiency``), so the two can be argued about, and calibrated, independently.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

from ..errors import CodeLlamaError

# Achieved fraction of peak on a GPU, used where nothing was measured:
# - "bandwidth" 0.8: decode streams every weight once per token; well-tuned GEMV/attention kernels (vLLM,
#   TensorRT-LLM, gpt-fast) reach ~75-90% of HBM peak, and a plain device-to-device copy ~90%.
# - "flops" 0.6: large bf16 GEMMs reach ~70-80% of dense tensor-core peak on A100 and ~60-70% on H100 (which is
#   harder to feed at 989 TFLOP/s); prefill also runs attention, norms and RoPE below GEMM efficiency.
# - "interconnect" 0.5: the NVLink figures are bidirectional aggregates (600/900 GB/s = 300/450 GB/s each way);
#   NCCL all-reduce bus bandwidth on 8-GPU DGX A100/H100 measures roughly 40-55% of the aggregate figure.
GPU_EFFICIENCY = {"bandwidth": 0.8, "flops": 0.6, "interconnect": 0.5}
# The local profile is measured with the operations inference runs, so its rates are achieved ones already.
LOCAL_EFFICIENCY = {"bandwidth": 1.0, "flops": 1.0, "interconnect": 1.0}

_MiB = 1 << 20


@dataclass
class HardwareProfile:
    name: str
    memory_bytes: int  # what one device can hold (per GPU; RAM for the cpu)
    bandwidth_bytes_s: float  # peak memory bandwidth per device
    # Peak FLOP/s per matmul dtype: "bf16", "fp16", "fp32", "int8". "int8" means our weight-only int8 (and int4):
    # the weights are dequantized into bf16 matmuls, so it runs at the bf16 peak, not the int8 tensor-core one.
    flops: dict[str, float]
    interconnect_bytes_s: float | None = None  # NVLink per-GPU bandwidth for all-reduce; None for the cpu
    # Achieved fraction of peak: "bandwidth" (decode), "flops" (prefill), "interconnect" (all-reduce). The local
    # probe measures the kernels generation runs and adds, as ratios: "bandwidth_<d>" (weight bytes/s of a
    # one-row product, d in fp32/bf16/int8/int4, to bandwidth_bytes_s), "bandwidth_<d>_packed" and
    # "flops_<d>_packed" (generation's oneDNN-packed weights, to bandwidth / flops[d]), "attention_<d>" (a decode
    # step's attention FLOP/s, to flops[d]), "prefill_attention_<d>" (a masked prefill chunk's attention FLOP/s
    # over the pairs it computes, to flops[d]). The predictor falls back to the plain keys where one is absent.
    efficiency: dict[str, float] = field(default_factory=lambda: dict(GPU_EFFICIENCY))
    kind: str = "gpu"  # "gpu" or "cpu": min_gpus is only answered for GPUs
    # Fixed host-side cost of one layer in a decode step (dispatching its ~40 small ops), whatever the shape;
    # measured on the local CPU (~0.5 ms a layer on a 2-core EPYC: it dominates small shapes). 0 for the GPU
    # profiles: the roofline assumes launches hidden behind the kernels (CUDA graphs); eager PyTorch adds ~0.1 ms.
    overhead_s_per_layer: float = 0.0

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "memory_bytes": self.memory_bytes,
                "bandwidth_bytes_s": self.bandwidth_bytes_s, "flops": dict(self.flops),
                "interconnect_bytes_s": self.interconnect_bytes_s, "efficiency": dict(self.efficiency),
                "overhead_s_per_layer": self.overhead_s_per_layer}


def _gpu(name: str, memory_mib: int, bandwidth: float, bf16: float, fp32: float, nvlink: float) -> HardwareProfile:
    # fp16 dense tensor-core peak equals bf16 on these parts; fp32 is the non-tensor-core figure because PyTorch
    # leaves TF32 matmuls off by default (torch.backends.cuda.matmul.allow_tf32 = False).
    return HardwareProfile(name=name, memory_bytes=memory_mib * _MiB, bandwidth_bytes_s=bandwidth,
                           flops={"bf16": bf16, "fp16": bf16, "fp32": fp32, "int8": bf16},
                           interconnect_bytes_s=nvlink)


# Vendor data sheets (dense, i.e. without the 2:4 sparsity factor). Memory is what the driver reports as the
# device total (nvidia-smi), slightly under the nominal GB figure on the box.
PROFILES: dict[str, HardwareProfile] = {
    # A100 80GB SXM: 2,039 GB/s HBM2e, 312 TFLOP/s bf16 dense, 19.5 TFLOP/s fp32, 80 GB (81920 MiB), NVLink 600 GB/s.
    "A100-80GB": _gpu("A100-80GB", 81920, 2.039e12, 312e12, 19.5e12, 600e9),
    # H100 SXM5: 3.35 TB/s HBM3, 989 TFLOP/s bf16 dense, 67 TFLOP/s fp32, 80 GB (81559 MiB), NVLink 4 900 GB/s.
    "H100-SXM": _gpu("H100-SXM", 81559, 3.35e12, 989e12, 67e12, 900e9),
    # H200 SXM: 4.8 TB/s HBM3e, 989 TFLOP/s bf16 dense (same die as H100), 67 TFLOP/s fp32, 141 GB (143771 MiB),
    # NVLink 4 900 GB/s.
    "H200": _gpu("H200", 143771, 4.8e12, 989e12, 67e12, 900e9),
}

_LOCAL: dict[int, HardwareProfile] = {}  # probe results per thread count, for the life of the process


def get_profile(name: str) -> HardwareProfile:
    """A profile by name (case-insensitive); ``"local"`` (or ``"local-cpu"``) probes this machine once."""
    if not isinstance(name, str):
        raise CodeLlamaError(f"hardware must be a profile name, got {type(name).__name__}")
    key = name.strip().lower()
    if key in ("local", "local-cpu", "cpu"):
        return probe_local()
    for known, profile in PROFILES.items():
        if known.lower() == key:
            return _copy(profile)
    raise CodeLlamaError(f"unknown hardware {name!r}; known: {', '.join([*PROFILES, 'local'])}")


def _copy(profile: HardwareProfile) -> HardwareProfile:
    # Callers may calibrate a profile (replace its efficiency); the shared table must not change under them.
    return replace(profile, flops=dict(profile.flops), efficiency=dict(profile.efficiency))


def probe_local(threads: int | None = None, seconds: float = 2.0) -> HardwareProfile:
    """The local CPU measured in about ``seconds`` of timed calls: read bandwidth of a large tensor, matmul FLOP/s
    in fp32 and bf16, and the weight-streaming rate of a matrix-vector product (decode's kernel) per dtype, all with
    ``threads`` torch threads (default: torch's current setting). Cached per thread count. Building the operands
    adds a fixed ~1.5-3 s on a 2-core machine (64 MiB int8/int4 layers with their one-time kernel checks, past the
    last-level cache so that they measure memory, not cache)."""
    import torch  # lazily: the predictor itself must stay cheap to import

    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise CodeLlamaError(f"threads must be a positive integer, got {threads!r}")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds <= 60:
        raise CodeLlamaError(f"seconds must be in (0, 60], got {seconds!r}")
    n = threads or torch.get_num_threads()
    if n in _LOCAL:
        return _copy(_LOCAL[n])
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        profile = _measure(torch, n, seconds / 24)  # 16 measurements share the time with their set-up
    finally:
        torch.set_num_threads(previous)
    _LOCAL[n] = profile
    return _copy(profile)


def _measure(torch, threads: int, budget: float) -> HardwareProfile:
    # Reading a tensor well past the last-level cache (tens of MiB on server CPUs) gives DRAM bandwidth; a sum
    # reads without writing, like decode streaming the weights.
    big = torch.ones(64 * _MiB, dtype=torch.float32)  # 256 MiB
    read_bw = big.numel() * 4 / _best_time(big.sum, budget)
    del big

    floats = (("fp32", torch.float32), ("bf16", torch.bfloat16))
    flops = {name: _matmul_flops(torch, dtype, budget) for name, dtype in floats}
    # Weight-only int8/int4 prefill dequantizes into bf16 GEMMs (quantize.py), so it runs at the bf16 rate.
    flops["int8"] = flops["bf16"]

    # The rest are rates of the kernels generation runs, as ratios to the peaks above (see HardwareProfile).
    efficiency = dict(LOCAL_EFFICIENCY)
    packed = _packed_linear_factory()
    for name, dtype in floats:
        efficiency[f"bandwidth_{name}"] = _gemv_bandwidth(torch, dtype, budget) / read_bw
        efficiency[f"attention_{name}"] = _decode_attention_flops(torch, dtype, budget) / flops[name]
        efficiency[f"prefill_attention_{name}"] = _prefill_attention_flops(torch, dtype, budget) / flops[name]
        if packed is not None:
            efficiency[f"bandwidth_{name}_packed"] = _gemv_bandwidth(torch, dtype, budget, packed) / read_bw
            efficiency[f"flops_{name}_packed"] = _matmul_flops(torch, dtype, budget, packed) / flops[name]
    for mode in ("int8", "int4"):
        efficiency[f"bandwidth_{mode}"] = _quantized_gemv_bandwidth(torch, mode, budget) / read_bw
    efficiency["bandwidth"] = efficiency["bandwidth_bf16"]  # anything else (e.g. KV reads): the bf16 GEMV rate
    overhead = _layer_overhead(torch, budget)

    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return HardwareProfile(name="local-cpu", memory_bytes=int(pages * page_size), bandwidth_bytes_s=read_bw,
                           flops=flops, interconnect_bytes_s=None, efficiency=efficiency, kind="cpu",
                           overhead_s_per_layer=overhead)


def _layer_overhead(torch, budget: float) -> float:
    """Seconds per layer of a decode step of a model so small that only the ops' dispatch costs: generation's own
    decode loop (what the bench times) at 5 layers against 1, over 4."""
    from ..config import ModelConfig
    from ..generation import make_requests, run
    from ..model import Transformer

    per_step = {}
    for layers in (1, 5):
        config = ModelConfig(dim=64, n_layers=layers, n_heads=2, vocab_size=64, max_seq_len=256)
        torch.manual_seed(0)
        model = Transformer(config).eval()
        steps = 24

        def generate(model=model, layers=layers, steps=steps) -> None:
            marks = []
            for _ in run(model, make_requests(model, [[1, 5, 9, 13]], max_new_tokens=steps)):
                marks.append(time.perf_counter())
            if len(marks) >= 3:  # a random model may stop early at eos; two steps still time a step
                per_step[layers] = min(per_step.get(layers, 1.0), (marks[-1] - marks[0]) / (len(marks) - 1))

        _best_time(generate, budget / 2)
    if len(per_step) < 2:
        return 0.0
    return max(0.0, (per_step[5] - per_step[1]) / 4)


def _packed_linear_factory():
    """Generation's oneDNN-packed linear (weight -> callable), or None where this torch cannot pack."""
    try:
        import torch

        from ..generation_forward import _packed_linear

        w = torch.ones(32, 64)
        _packed_linear(w)(torch.ones(2, 64))
        return _packed_linear
    except (ImportError, AttributeError, RuntimeError, NotImplementedError):
        return None


def _best_time(fn: Callable[[], object], budget: float) -> float:
    """Fastest of repeated calls within ``budget`` seconds (the fastest is the least disturbed by other load on a
    shared machine); the first call is a warm-up unless it alone used half the budget."""
    times: list[float] = []
    spent = 0.0
    while True:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
        if spent >= budget and len(times) >= 2 or spent >= 2 * budget:
            break
    return min(times[1:]) if len(times) > 1 else times[0]


def _matmul_flops(torch, dtype, budget: float, packed=None) -> float:
    # A prefill-shaped product, as the model runs it (x @ W.T): token rows through a 4096 x 4096 weight; square or
    # small products misstate the rate of the real ones by 10-20% on oneDNN. The rows double from 128 up to 1024
    # while a call stays within a tenth of the budget, so a slow dtype or a single thread keeps to the budget.
    k = n = 4096
    w = torch.full((n, k), 0.5, dtype=dtype)
    op = partial(torch.nn.functional.linear, weight=w) if packed is None else packed(w)
    m = 128
    while True:
        x = torch.full((m, k), 0.5, dtype=dtype)
        start = time.perf_counter()
        op(x)  # oneDNN picks (and for packed weights compiles) its kernel per row count on first use
        if m >= 1024 or time.perf_counter() - start > budget / 10:
            break
        m *= 2
    return 2 * m * k * n / _best_time(partial(op, x), budget)


def _prefill_attention_flops(torch, dtype, budget: float) -> float:
    # A later prefill chunk: queries against twice as many cached keys under a causal bool mask, 8 query heads
    # sharing one KV head (GQA). Masked SDPA computes every query-key pair, so its rate is counted over all of them;
    # the first, unmasked chunk runs the causal flash kernel at the same rate on the pairs it computes (the
    # predictor counts those: perf_model.prefill_attention_pairs). CPU attention runs at a fifth of the matmul
    # rate. The queries double from 128 up to 1024 while a call stays within a tenth of the budget.
    heads, hd = 8, 128
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = 128
    with torch.inference_mode():
        while True:
            keys = 2 * rows
            q = torch.full((1, heads, rows, hd), 0.01, dtype=dtype)
            kv = torch.full((1, 1, keys, hd), 0.01, dtype=dtype)
            slots = torch.arange(keys)
            call = partial(sdpa, q, kv, kv, attn_mask=slots.unsqueeze(0) <= slots[keys - rows:].unsqueeze(1),
                           enable_gqa=True)
            start = time.perf_counter()
            call()
            if rows >= 1024 or time.perf_counter() - start > budget / 10:
                break
            rows *= 2
        return 4 * hd * heads * rows * keys / _best_time(call, budget)


def _gemv_bandwidth(torch, dtype, budget: float, packed=None) -> float:
    # One token through a 64 MiB weight matrix (past the cache): bytes of weight streamed per second by the
    # decode kernel. Filled, not random: the values do not change the time, and drawing 128 MiB of normals would
    # cost more than the measurement.
    k = 4096
    w = torch.full((64 * _MiB // (k * torch.empty((), dtype=dtype).element_size()), k), 0.5, dtype=dtype)
    x = torch.full((1, k), 0.5, dtype=dtype)
    nbytes = w.numel() * w.element_size()
    if packed is not None:
        op = packed(w)
        del w
        op(x)  # oneDNN compiles a kernel per shape on first use
        return nbytes / _best_time(lambda: op(x), budget)
    linear = torch.nn.functional.linear
    return nbytes / _best_time(lambda: linear(x, w), budget)


def _quantized_gemv_bandwidth(torch, mode: str, budget: float) -> float:
    # quantize.py's own layers at one row (bf16 activations), built directly (the values do not change the time):
    # the packed int8/int4 kernels, or the dequantizing fallback where a kernel is missing.
    from ..quantize import Int4Linear, Int8Linear

    k = 4096
    n = 64 * _MiB // k  # 64 MiB of int8, 32 MiB of int4
    layer = Int8Linear(k, n, torch.bfloat16) if mode == "int8" else Int4Linear(k, n, 32, torch.bfloat16)
    nbytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    x = torch.full((1, k), 0.5, dtype=torch.bfloat16)
    with torch.inference_mode():
        layer(x)  # first use packs the weights and checks the kernel against the fallback: not a decode step
        return nbytes / _best_time(lambda: layer(x), budget)


def _decode_attention_flops(torch, dtype, budget: float) -> float:
    # One query per head against 4096 cached keys (16-32 MiB of cache, mostly past the last-level cache), as a
    # decode step calls SDPA on a slice of the cache. CPU attention at one query runs far below the matmul peak
    # (bf16 on CPUs without native bf16 vector math: ~1% of it), so it needs its own rate.
    heads, keys, hd = 8, 4096, 128
    cache = torch.full((2, 1, heads, keys + 64, hd), 0.01, dtype=dtype)
    q = torch.full((1, heads, 1, hd), 0.01, dtype=dtype)
    k, v = cache[0, :, :, :keys], cache[1, :, :, :keys]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode():
        return 4 * hd * heads * keys / _best_time(lambda: sdpa(q, k, v), budget)


__all__ = ["GPU_EFFICIENCY", "LOCAL_EFFICIENCY", "PROFILES", "HardwareProfile", "get_profile", "probe_local"]
