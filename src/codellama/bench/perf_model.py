"""A roofline performance model of Code Llama inference: prefill time, decode time per token, memory and the fewest
GPUs that hold a model and its KV cache, for a released shape (or any ``ModelConfig``) on a hardware profile.

The model, per tensor-parallel rank (every weight matrix, the embedding and the output head split ``tp`` ways as
in Megatron-style TP; the KV cache split by KV head):

- prefill (time to first token) = max(FLOPs / (peak x eff_flops), bytes / (bandwidth x eff_bandwidth)) + all-reduce.
  FLOPs = 2 x (matmul parameters of the layers) x T x B + 2 x vocab x dim x B (the output head runs on the last
  position only, as our generation does) + attention 2 x 2 x n_layers x n_heads x head_dim x T(T+1)/2 x B (QK^T and
  PV, causal: each query sees the keys up to itself). The time counts the attention pairs the kernels compute
  (``prefill_attention_pairs``: generation prefills in 2048-token chunks, later chunks dense under a mask), at the
  profile's attention rate. Bytes = the weights streamed once + the KV cache written.
- decode (one step: one new token for each of the B sequences, after a cache of ``context`` tokens)
  = max(bytes / (bandwidth x eff_bandwidth), FLOPs / (peak x eff_flops)) + all-reduce, bytes = the weights
  streamed once (all but the embedding table, of which only B rows are read) + the KV cache read at that
  context, FLOPs = 2 x (all matmul parameters) x B + attention 2 x 2 x n_layers x n_heads x head_dim x context x B.
  At batch 1 the bytes term wins by two orders of magnitude; the FLOPs term is the floor that large batches hit.
  The layers' products and attention are two rooflines one after the other (their max each, summed); on the
  data-sheet GPUs attention at one query is bandwidth-bound, so this is (weights + KV bytes) / bandwidth. A profile
  may add a fixed per-layer cost (op dispatch; measured on the CPU, 0 for the GPUs).
- measured kernel rates: the local profile carries the rates of the kernels generation runs (one-row products
  per weight dtype, oneDNN-packed ones, decode attention), which replace peak x efficiency where present.
- all-reduce: two per layer (after the attention output projection and after the FFN), each of B x T x dim
  activations; ring all-reduce time = latency + 2(tp-1)/tp x bytes / (NVLink x eff_interconnect), not overlapped
  with compute (an upper bound; vocab-parallel embedding/head collectives, one each, are left out).
- memory = weights + KV cache of context + output_tokens - 1 tokens per sequence (the last generated token is never
  fed back); a rank holds 1/tp of it and must keep a 10% reserve on top for activations, the CUDA context and
  allocator fragmentation (``MEMORY_RESERVE``; chunked prefill keeps activations within it at long context).

Importing this module does not import torch: a prediction is arithmetic on the config's shape.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CodeLlamaError
from .hardware import HardwareProfile, get_profile

if TYPE_CHECKING:
    from ..config import ModelConfig

WEIGHT_DTYPES = ("bf16", "fp16", "fp32", "int8", "int4")
KV_DTYPES = ("bf16", "fp16", "fp32", "int8")
TP_CHOICES = (1, 2, 4, 8, 16)
_FLOAT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}

# quantize.py's stored layout (weight-only; every nn.Linear including the output head, unless told otherwise;
# tok_embeddings and the RMSNorm weights stay in the activation dtype):
INT8_SCALE_BYTES = 4  # Int8Linear: int8 [N, K] + float32 scale per output row [N]
INT4_PARAM_BYTES = 2  # Int4Linear: uint8 [N, K/2] + bfloat16 scale and zero per group [N, K/G] each
INT4_GROUP_SIZE = 32  # quantize_model's default; rows that the group size does not divide are stored as int8
# The int8 KV cache (model.py, KV_SCALE_BYTES): head_dim int8 values plus a bfloat16 scale per (layer, k|v,
# sequence, kv head, token) — 130 bytes per head-token against bf16's 256, i.e. 50.8%.
KV_INT8_SCALE_BYTES = 2

# Prefill runs in chunks (generation.DEFAULT_PREFILL_CHUNK): the first chunk through the causal flash kernel, each
# later one against all the keys before it under a mask (SDPA then computes every query-key pair of the chunk).
PREFILL_CHUNK = 2048
# The causal flash kernel computes whole key blocks on the diagonal: PyTorch's CPU kernel splits keys by 512, so
# each query pays for ~256 keys past itself on average. GPU kernels use 64-128 key blocks; at the long contexts
# where attention matters there this is under 1% of the pairs, so one count serves both.
FLASH_KEY_BLOCK = 512
ALLREDUCE_LATENCY_S = 5e-6  # per all-reduce on NVLink: ~5 us for decode-sized messages with CUDA graphs
MEMORY_RESERVE = 0.10  # per-rank headroom above weights + KV cache (activations, CUDA context, fragmentation)


@dataclass
class Prediction:
    model: str
    context: int
    batch: int
    dtype: str
    kv_dtype: str
    hardware: str
    tp: int
    prefill_s: float  # time to first token: the whole context through the model, batch B
    decode_s_per_token: float  # one decode step (B tokens, one per sequence) at a cache of ``context`` tokens
    weight_bytes: int  # all ranks together
    kv_bytes: int  # all ranks together: context + output_tokens - 1 tokens per sequence
    memory_bytes: int  # weight_bytes + kv_bytes
    per_rank_memory_bytes: int  # memory_bytes / tp, without the reserve
    min_gpus: int | None  # fewest GPUs (TP degree) that fit; None for the cpu or when even the largest TP fails
    fits: bool  # per_rank_memory_bytes plus the reserve fits one device of the profile at this tp
    output_tokens: int = 1
    total_s: float = 0.0  # end to end: prefill (gives the first token) + the remaining output_tokens - 1 steps
    decode_tokens_per_s: float = 0.0  # generated tokens per second over the batch, at ``context``
    prefill_flops: float = 0.0
    prefill_bound: str = ""  # "compute" or "memory": which roofline term set prefill
    decode_bound: str = ""
    allreduce_s_per_token: float = 0.0  # the all-reduce share of decode_s_per_token

    def to_json(self) -> dict:
        return asdict(self)


# ---- sizes ---------------------------------------------------------------------------------------------
def weight_bytes(config: ModelConfig, dtype: str, *, group_size: int = INT4_GROUP_SIZE,
                 activation_dtype: str = "bf16") -> int:
    """Bytes of the weights in ``dtype``: bf16/fp16 2 B and fp32 4 B per parameter; int8/int4 in quantize.py's
    layout (per-row or per-group scales) with the embedding and norms in ``activation_dtype``."""
    dtype = _weight_dtype(dtype)
    if dtype in _FLOAT_BYTES:
        return config.num_params() * _FLOAT_BYTES[dtype]
    act = _kv_dtype(activation_dtype, "activation dtype")
    if act not in _FLOAT_BYTES:
        raise CodeLlamaError(f"activation dtype must be bf16, fp16 or fp32, got {activation_dtype!r}")
    total = _unquantized_params(config) * _FLOAT_BYTES[act]
    for n, k, count in _linear_shapes(config):
        if dtype == "int4" and k % group_size == 0:
            total += count * (n * k // 2 + 2 * n * (k // group_size) * INT4_PARAM_BYTES)
        else:
            total += count * (n * k + n * INT8_SCALE_BYTES)
    return total


def kv_bytes(config: ModelConfig, context: int, batch: int, kv_dtype: str) -> int:
    """Bytes of a KV cache of ``context`` tokens for each of ``batch`` sequences:
    2 (k, v) x n_layers x n_kv_heads x head_dim x context x batch x bytes (int8: + one bf16 scale per head-token)."""
    _positive_int(context, "context", allow_zero=True)
    _positive_int(batch, "batch")
    return _kv_token_bytes(config, _kv_dtype(kv_dtype)) * context * batch


def prefill_flops(config: ModelConfig, context: int, batch: int) -> float:
    """FLOPs of one prefill of ``context`` tokens x ``batch`` (see the module docstring for the terms)."""
    _positive_int(context, "context")
    _positive_int(batch, "batch")
    layer_matmul = sum(n * k * count for n, k, count in _linear_shapes(config)[:-1])
    head = config.vocab_size * config.dim
    attention = 2 * 2 * config.n_layers * config.n_heads * config.head_dim * context * (context + 1) / 2
    return float(2 * layer_matmul * context * batch + 2 * head * batch + attention * batch)


def prefill_attention_pairs(context: int, chunk: int = PREFILL_CHUNK, key_block: int = FLASH_KEY_BLOCK) -> float:
    """Query-key pairs the attention kernels compute in a prefill of ``context`` tokens (per head and sequence):
    the first chunk causal with whole diagonal key blocks, every later chunk dense over the keys before its end.
    Above the T(T+1)/2 pairs causal attention needs: 25% at 2k context, 2.0% at 100k."""
    _positive_int(context, "context")
    first = min(context, chunk)
    pairs = first * (first + 1) / 2 + first * (min(key_block, first) - 1) / 2
    for start in range(first, context, chunk):
        rows = min(chunk, context - start)
        pairs += rows * (start + rows)
    return float(pairs)


def _decode_flops(config: ModelConfig, keys: float, batch: int) -> float:
    matmul = sum(n * k * count for n, k, count in _linear_shapes(config))
    attention = 2 * 2 * config.n_layers * config.n_heads * config.head_dim * keys
    return float((2 * matmul + attention) * batch)


def _linear_shapes(config: ModelConfig) -> list[tuple[int, int, int]]:
    """(out_features N, in_features K, how many) of every nn.Linear; the output head last."""
    d, hd, h, L = config.dim, config.head_dim, config.ffn_hidden, config.n_layers
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    return [(q, d, L), (kv, d, 2 * L), (d, q, L), (h, d, 2 * L), (d, h, L), (config.vocab_size, d, 1)]


def _unquantized_params(config: ModelConfig) -> int:
    # tok_embeddings (an nn.Embedding, which quantize_model leaves alone) and the 2 per layer + final RMSNorms.
    return config.vocab_size * config.dim + (2 * config.n_layers + 1) * config.dim


def _kv_token_bytes(config: ModelConfig, kv_dtype: str) -> int:
    per_head = config.head_dim + KV_INT8_SCALE_BYTES if kv_dtype == "int8" else \
        config.head_dim * _FLOAT_BYTES[kv_dtype]
    return 2 * config.n_layers * config.n_kv_heads * per_head


# ---- prediction ------------------------------------------------------------------------------------------
def predict(config: ModelConfig | str, context: int, batch: int = 1, dtype: str = "bf16",
            hardware: str | HardwareProfile = "H100-SXM", tp: int = 1, kv_dtype: str | None = None,
            output_tokens: int = 1, *, packed: bool | None = None) -> Prediction:
    """Predicted prefill and decode times and memory of ``config`` (or a released model's name) at ``context``
    tokens of prompt, ``batch`` sequences, weights in ``dtype``, KV cache in ``kv_dtype`` (default: the
    activation dtype, bf16 for int8/int4 weights), on ``tp`` devices of ``hardware``.

    ``packed`` (cpu profiles): whether generation runs oneDNN-packed weights; None decides as generation's
    ``will_pack`` does by default (float weights up to 2 GiB that outweigh the KV cache). A ``--layers`` slice is
    small enough to pack even where the whole model would not be: pass what the measured run did."""
    config = _config(config)
    _positive_int(context, "context")
    _positive_int(batch, "batch")
    _positive_int(output_tokens, "output_tokens")
    dtype = _weight_dtype(dtype)
    act = _activation(dtype)
    kv_dtype = act if kv_dtype is None else _kv_dtype(kv_dtype)
    hw = _hardware(hardware)
    _check_tp(config, tp, hw)

    act_bytes = _FLOAT_BYTES[act]
    weights = weight_bytes(config, dtype)
    embedding = config.vocab_size * config.dim * act_bytes  # gathered by token, never streamed whole
    per_token_kv = _kv_token_bytes(config, kv_dtype)
    cached = context + output_tokens - 1
    kv = per_token_kv * cached * batch
    rates = _rates(hw, dtype, kv_dtype, _packs(hw, dtype, weights, kv, packed))
    matmul = sum(n * k * count for n, k, count in _linear_shapes(config))
    attention_per_key = 2 * 2 * config.n_layers * config.n_heads * config.head_dim  # FLOPs per query-key pair

    # Prefill: FLOPs against peak, bytes against bandwidth; the larger wins (they overlap on real kernels).
    flops = prefill_flops(config, context, batch)
    useful_attention = attention_per_key * context * (context + 1) / 2 * batch
    attention = attention_per_key * prefill_attention_pairs(context) * batch  # what the kernels compute
    compute_s = ((flops - useful_attention) / rates["matmul"] + attention / rates["prefill_attention"]) / tp
    memory_s = (weights - embedding + per_token_kv * context * batch) / tp / rates["weights"]
    prefill_s = max(compute_s, memory_s) + _allreduce_s(config, hw, tp, batch * context * config.dim * act_bytes)
    prefill_bound = "compute" if compute_s >= memory_s else "memory"

    def decode_at(keys: float) -> tuple[float, str, float]:
        # The layers' products and attention run one after the other, each at its own roofline.
        weights_s = (weights - embedding) / tp / rates["weights"]
        products_s = 2 * matmul * batch / tp / rates["matmul"]
        kv_s = per_token_kv * keys * batch / tp / rates["kv"]
        attention_s = attention_per_key * keys * batch / tp / rates["decode_attention"]
        comm = _allreduce_s(config, hw, tp, batch * config.dim * act_bytes)
        memory = (weights_s >= products_s, kv_s >= attention_s)
        bound = "memory" if all(memory) else "compute" if not any(memory) else "mixed"
        overhead = config.n_layers * hw.overhead_s_per_layer
        return max(weights_s, products_s) + max(kv_s, attention_s) + comm + overhead, bound, comm

    decode_s, decode_bound, comm_s = decode_at(context)
    # Step j (1 .. n-1) attends to context + j keys and its time is affine in that, so the mean is at context + n/2.
    total_s = prefill_s + (output_tokens - 1) * decode_at(context + output_tokens / 2)[0]

    per_rank = math.ceil((weights + kv) / tp)
    return Prediction(
        model=getattr(config, "name", "") or "custom", context=context, batch=batch, dtype=dtype,
        kv_dtype=kv_dtype, hardware=hw.name, tp=tp, prefill_s=prefill_s, decode_s_per_token=decode_s,
        weight_bytes=weights, kv_bytes=kv, memory_bytes=weights + kv, per_rank_memory_bytes=per_rank,
        min_gpus=min_gpus(config, cached, batch, dtype, kv_dtype, hw), fits=_fits(per_rank, hw),
        output_tokens=output_tokens, total_s=total_s, decode_tokens_per_s=batch / decode_s, prefill_flops=flops,
        prefill_bound=prefill_bound, decode_bound=decode_bound, allreduce_s_per_token=comm_s)


def _packs(hw: HardwareProfile, dtype: str, weights: int, kv: int, packed: bool | None) -> bool:
    # generation_forward.will_pack's default: float weights of at most PACK_LIMIT_BYTES (2 GiB) that outweigh the
    # request's KV cache, on a CPU whose oneDNN can pack them (the probe measured the packed kernels).
    if hw.kind != "cpu" or f"bandwidth_{dtype}_packed" not in hw.efficiency:
        return False
    return bool(packed) if packed is not None else weights <= 2 * 2 ** 30 and kv <= weights


def _rates(hw: HardwareProfile, dtype: str, kv_dtype: str, packed: bool) -> dict[str, float]:
    """Achieved bytes/s and FLOP/s of each part of a step: the profile's measured kernel rates where it has
    them (the local probe), else peak x the generic efficiency (data-sheet GPUs)."""
    eff = hw.efficiency
    act = _activation(dtype)
    attn = kv_dtype if kv_dtype in _FLOAT_BYTES else act  # an int8 cache is dequantized to the activation dtype
    suffix = "_packed" if packed else ""
    peak = _peak_flops(hw, dtype)
    flops_eff = eff.get(f"flops_{act}{suffix}", eff["flops"]) if dtype in _FLOAT_BYTES else eff["flops"]
    attn_peak = hw.flops.get(attn, peak)
    return {
        "weights": hw.bandwidth_bytes_s * eff.get(f"bandwidth_{dtype}{suffix}",
                                                  eff.get(f"bandwidth_{dtype}", eff["bandwidth"])),
        "matmul": peak * flops_eff,
        "kv": hw.bandwidth_bytes_s * eff["bandwidth"],
        "decode_attention": attn_peak * eff.get(f"attention_{attn}", eff["flops"]),
        "prefill_attention": attn_peak * eff.get(f"prefill_attention_{attn}", eff["flops"]),
    }


def min_gpus(config: ModelConfig | str, context: int, batch: int, dtype: str, kv_dtype: str | None,
             hardware: str | HardwareProfile) -> int | None:
    """The fewest GPUs (tensor-parallel degree in 1, 2, 4, 8, 16) whose per-rank share of weights + KV cache
    (``context`` tokens x ``batch``), plus the reserve, fits one GPU; None for a cpu profile or when none does.
    TP splits the KV heads, so it must divide n_kv_heads: 34B and 70B (8 KV heads) stop at 8 GPUs."""
    config = _config(config)
    hw = _hardware(hardware)
    dtype = _weight_dtype(dtype)
    kv_dtype = _activation(dtype) if kv_dtype is None else _kv_dtype(kv_dtype)
    if hw.kind != "gpu":
        return None
    total = weight_bytes(config, dtype) + kv_bytes(config, context, batch, kv_dtype)
    # Without an interconnect (a single-GPU box) there is no tensor parallelism to fall back on.
    choices = TP_CHOICES if hw.interconnect_bytes_s is not None else (1,)
    for tp in choices:
        if config.n_kv_heads % tp == 0 and config.n_heads % tp == 0 and _fits(math.ceil(total / tp), hw):
            return tp
    return None


def _fits(per_rank: int, hw: HardwareProfile) -> bool:
    return per_rank * (1 + MEMORY_RESERVE) <= hw.memory_bytes


def _allreduce_s(config: ModelConfig, hw: HardwareProfile, tp: int, message_bytes: float) -> float:
    if tp == 1:
        return 0.0
    link = hw.interconnect_bytes_s * hw.efficiency.get("interconnect", 1.0)
    one = ALLREDUCE_LATENCY_S + 2 * (tp - 1) / tp * message_bytes / link
    return 2 * config.n_layers * one


# ---- arguments -------------------------------------------------------------------------------------------
def _config(config: Any) -> ModelConfig:
    if isinstance(config, str):
        from ..config import ModelConfig  # lazily: config.py imports torch

        return ModelConfig.from_name(config)
    for attr in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden", "head_dim", "num_params"):
        if not hasattr(config, attr):
            raise CodeLlamaError(f"expected a ModelConfig or a model name, got {type(config).__name__}")
    return config


def _hardware(hardware: Any) -> HardwareProfile:
    if isinstance(hardware, HardwareProfile):
        return hardware
    return get_profile(hardware)


def _check_tp(config: ModelConfig, tp: Any, hw: HardwareProfile) -> None:
    _positive_int(tp, "tp")
    if tp > 1 and hw.interconnect_bytes_s is None:
        raise CodeLlamaError(f"tensor parallelism needs an interconnect; {hw.name} has none (use tp=1)")
    if config.n_kv_heads % tp or config.n_heads % tp:
        raise CodeLlamaError(f"tp={tp} must divide the model's {config.n_kv_heads} KV heads "
                             f"(tensor parallelism splits attention by KV head)")


def _peak_flops(hw: HardwareProfile, dtype: str) -> float:
    key = "int8" if dtype in ("int8", "int4") else dtype  # weight-only quantization runs bf16 matmuls
    if key not in hw.flops:
        raise CodeLlamaError(f"{hw.name} has no FLOP/s figure for {dtype} (it has: {', '.join(hw.flops)})")
    return hw.flops[key]


def _activation(dtype: str) -> str:
    return dtype if dtype in _FLOAT_BYTES else "bf16"  # quantized weights run with bf16 activations


def _weight_dtype(dtype: Any) -> str:
    key = _ALIASES.get(str(dtype).lower().removeprefix("torch."), str(dtype).lower())
    if key not in WEIGHT_DTYPES:
        raise CodeLlamaError(f"unknown dtype {dtype!r} (use {', '.join(WEIGHT_DTYPES)})")
    return key


def _kv_dtype(dtype: Any, what: str = "KV cache dtype") -> str:
    key = _ALIASES.get(str(dtype).lower().removeprefix("torch."), str(dtype).lower())
    if key not in KV_DTYPES:
        raise CodeLlamaError(f"unknown {what} {dtype!r} (use {', '.join(KV_DTYPES)})")
    return key


def _positive_int(value: Any, name: str, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise CodeLlamaError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, "
                             f"got {value!r}")


__all__ = [
    "ALLREDUCE_LATENCY_S",
    "FLASH_KEY_BLOCK",
    "PREFILL_CHUNK",
    "KV_DTYPES",
    "KV_INT8_SCALE_BYTES",
    "MEMORY_RESERVE",
    "TP_CHOICES",
    "WEIGHT_DTYPES",
    "Prediction",
    "kv_bytes",
    "min_gpus",
    "predict",
    "prefill_attention_pairs",
    "prefill_flops",
    "weight_bytes",
]
