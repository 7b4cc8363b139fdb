"""Admission of a generation request: the context and free-memory checks that run before anything is
allocated. Split out of generation.py, which re-exports every name here."""

from __future__ import annotations

from typing import Sequence

import torch

from .errors import CodeLlamaError
from .generation_forward import ATTENTION_MASK_ENTRIES, pack_bytes, will_pack
from .model import Transformer, kv_bytes_per_token

# Values of ``kv_cache_dtype`` (load / generate / serve): None or "auto" keeps the model's dtype (as always).
KV_CACHE_DTYPES = {"int8": torch.int8}

# Slack for allocator fragmentation and the framework itself when checking a request against free memory.
MEMORY_HEADROOM = 256 * 2**20


def resolve_kv_cache_dtype(kv_cache_dtype: str | torch.dtype | None, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's storage dtype for ``kv_cache_dtype``: the model's dtype for None/"auto", int8 for "int8"."""
    if kv_cache_dtype is None or kv_cache_dtype == "auto" or kv_cache_dtype == model_dtype:
        return model_dtype
    if kv_cache_dtype == torch.int8:
        return torch.int8
    if isinstance(kv_cache_dtype, str) and kv_cache_dtype in KV_CACHE_DTYPES:
        return KV_CACHE_DTYPES[kv_cache_dtype]
    raise CodeLlamaError(f"unknown kv_cache_dtype {kv_cache_dtype!r} (use 'int8', or None/'auto' for the "
                         "model's dtype)")


def available_memory(device: torch.device) -> int | None:
    """Bytes that a new allocation can still get on ``device`` (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks the caching allocator holds but does not use are free for us too.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        free = _host_available()
        limited = _cgroup_available()  # a container's limit is often far below the host's free memory
        if free is None or limited is None:
            return free if limited is None else limited
        return min(free, limited)
    return None


def _host_available() -> int | None:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_available() -> int | None:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            return max(0, int(limit) - usage)
    return None


def request_memory(model: Transformer, batch: int, prompt_len: int, cache_len: int,
                   prefill_chunk: int, prompt_logprobs: bool = False,
                   kv_cache_dtype: str | torch.dtype | None = None) -> dict[str, int]:
    """Bytes a generation allocates beyond the weights: the KV cache (in ``kv_cache_dtype``: int8 counts its
    values and scales) and the largest prefill activations."""
    c, dtype = model.config, model.output.weight.dtype
    item = torch.empty((), dtype=dtype).element_size()
    kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, dtype)
    kv = batch * cache_len * kv_bytes_per_token(c, kv_dtype)
    t = max(1, min(prefill_chunk, prompt_len))
    # One layer's live tensors for a chunk: residual, normed input, q/k/v (+ float32 RoPE copies),
    # the SwiGLU hidden pair; plus one attention block's bool mask and SDPA's float32 copy of it
    # (see ATTENTION_MASK_ENTRIES), and the logits (every position's, and their log-softmax, when the
    # prompt's logprobs are wanted).
    hidden = batch * t * (6 * c.dim + 3 * c.ffn_hidden) * 4
    mask = 5 * min(batch * t * cache_len, ATTENTION_MASK_ENTRIES + batch * cache_len)
    logits = batch * (t if prompt_logprobs else 1) * c.vocab_size * 4 * 2
    # An int8 cache is read back dequantized: one layer's keys and values up to the cache's length at a time.
    dequant = 2 * batch * c.n_kv_heads * cache_len * c.head_dim * item if kv_dtype == torch.int8 else 0
    return {"kv_cache": kv, "activations": hidden + mask + logits + dequant}


def check_request(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  prefill_chunk: int, pack: bool | None = None,
                  prompt_logprobs: bool = False,
                  kv_cache_dtype: str | torch.dtype | None = None) -> tuple[list[int], bool]:
    """Validate prompts against the model's context and free memory; returns each prompt's token budget
    and whether to use packed weights (``will_pack``).

    ``kv_cache_dtype`` ("int8") sizes the KV cache as stored. A prompt must leave room for one new token inside
    ``max_seq_len``; ``max_new_tokens`` is then capped to
    what is left of the context (finish_reason "length"), as Meta's reference does."""
    if not prompts:
        raise CodeLlamaError("no prompts given")
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise CodeLlamaError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
    c = model.config
    budgets = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise CodeLlamaError(f"prompt {i} is empty (it needs at least a bos token)")
        if len(p) >= c.max_seq_len:
            which = "prompt" if len(prompts) == 1 else f"prompt {i}"
            raise CodeLlamaError(f"{which} is {len(p)} tokens but the model's context is {c.max_seq_len} tokens "
                                 "(raise max_seq_len at load time if the model supports it)")
        if min(p) < 0 or max(p) >= c.vocab_size:
            raise CodeLlamaError(f"prompt {i} has token ids outside the vocabulary [0, {c.vocab_size})")
        budgets.append(min(max_new_tokens, c.max_seq_len - len(p)))
    longest = max(len(p) for p in prompts)
    cache_len = longest + max(budgets) - 1  # the last sampled token is never fed back
    need = request_memory(model, len(prompts), longest, cache_len, prefill_chunk, prompt_logprobs, kv_cache_dtype)
    free = available_memory(model.output.weight.device)
    pack = will_pack(model, pack, need["kv_cache"])
    total = need["kv_cache"] + need["activations"] + pack_bytes(model, pack)
    if free is not None and total + MEMORY_HEADROOM > free:
        gib = 2**30
        raise CodeLlamaError(
            f"request needs about {total / gib:.2f} GiB (KV cache {need['kv_cache'] / gib:.2f} GiB for "
            f"{len(prompts)} x {cache_len} tokens) but only {free / gib:.2f} GiB is free on "
            f"{model.output.weight.device}; use a shorter prompt, fewer new tokens or a smaller batch")
    return budgets, pack
