"""KV-cache generation: token-level engine (batched, left-padded, chunked prefill) and the text layer
(exact incremental detokenisation, stop strings, streaming) behind ``CodeLlama.complete/infill/chat``.

The engine is a loop over small functions — ``sample`` (sampling.py), ``accept_token`` and the per-request
``Request`` state — and a generator, ``run``, that yields after every decode step. A caller may finish a
request between two steps (``request.finish("stop")``), which is how stop strings work here and how a server
scheduler would drop or swap requests without touching the loop."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import CodeLlamaError
from .formats import chat_tokens, infilling_tokens, require_infilling
from .model import KVCache, Transformer, apply_rope, rope_angles
from .sampling import SamplingParams, make_generator, sample, token_logprobs, validate_sampling

if TYPE_CHECKING:
    from .api import CodeLlama

DEFAULT_PREFILL_CHUNK = 2048
# Slack for allocator fragmentation and the framework itself when checking a request against free memory.
MEMORY_HEADROOM = 256 * 2**20


# ==== results =======================================================================================
@dataclass
class Completion:
    """One generated text. ``tokens`` are the generated ids (prompt ids first when ``echo``), without the
    eos / EOT / ``<step>`` that ended it; ``logprobs`` (when asked) are the model's log-probabilities of
    those tokens (temperature 1, before top-k/top-p; 0.0 for the first prompt token, which is given);
    ``finish_reason`` is ``"stop"`` (stop token or stop string) or ``"length"`` (max_new_tokens or the
    model's context)."""

    text: str
    tokens: list[int]
    logprobs: list[float] | None
    finish_reason: str
    prompt_tokens: int


@dataclass
class GenerationResult:
    """Token-level result for one prompt."""

    tokens: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    prompt_logprobs: list[float] | None = None


# ==== per-request state =============================================================================
@dataclass
class Request:
    """One sequence being generated: its prompt, limits and sampling, and what it has produced so far."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    logprobs: bool = False
    prompt_logprobs: bool = False
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    prompt_token_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason

    def result(self) -> GenerationResult:
        return GenerationResult(tokens=list(self.tokens), finish_reason=self.finish_reason or "length",
                                logprobs=list(self.token_logprobs) if self.logprobs else None,
                                prompt_logprobs=list(self.prompt_token_logprobs) if self.prompt_logprobs else None)


def accept_token(request: Request, token: int, logprob: float | None = None) -> bool:
    """Record a sampled token; True if it was appended (a stop token ends the request without being kept)."""
    if token in request.stop_ids:
        request.finish("stop")
        return False
    request.tokens.append(token)
    if logprob is not None:
        request.token_logprobs.append(logprob)
    if len(request.tokens) >= request.max_new_tokens:
        request.finish("length")
    return True


# ==== admission: context and memory checks, before anything is allocated ============================
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
                   prefill_chunk: int, prompt_logprobs: bool = False) -> dict[str, int]:
    """Bytes a generation allocates beyond the weights: the KV cache and the largest prefill activations."""
    c, dtype = model.config, model.output.weight.dtype
    item = torch.empty((), dtype=dtype).element_size()
    kv = 2 * c.n_layers * batch * c.n_kv_heads * cache_len * c.head_dim * item
    t = max(1, min(prefill_chunk, prompt_len))
    # One layer's live tensors for a chunk: residual, normed input, q/k/v (+ float32 RoPE copies),
    # the SwiGLU hidden pair; plus one attention block's bool mask and SDPA's float32 copy of it
    # (see ATTENTION_MASK_ENTRIES), and the logits (every position's, and their log-softmax, when the
    # prompt's logprobs are wanted).
    hidden = batch * t * (6 * c.dim + 3 * c.ffn_hidden) * 4
    mask = 5 * min(batch * t * cache_len, ATTENTION_MASK_ENTRIES + batch * cache_len)
    logits = batch * (t if prompt_logprobs else 1) * c.vocab_size * 4 * 2
    return {"kv_cache": kv, "activations": hidden + mask + logits}


def check_request(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  prefill_chunk: int, pack: bool | None = None,
                  prompt_logprobs: bool = False) -> tuple[list[int], bool]:
    """Validate prompts against the model's context and free memory; returns each prompt's token budget
    and whether to use packed weights (``will_pack``).

    A prompt must leave room for one new token inside ``max_seq_len``; ``max_new_tokens`` is then capped to
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
    need = request_memory(model, len(prompts), longest, cache_len, prefill_chunk, prompt_logprobs)
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


# ==== the engine ====================================================================================
def run(model: Transformer, requests: list[Request], *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        pack: bool | None = None) -> Iterator[list[tuple[int, int]]]:
    """Generate for ``requests`` together; yields after each step the ``(index, token)`` pairs appended.

    Prompts are left-padded to a common length so every row's next token is in the same slot; per-row
    positions give each prompt the RoPE positions it would have alone and the cache's ``valid`` mask hides
    the padding, so each row's result equals running it alone. The KV cache holds exactly
    ``longest prompt + max_new_tokens - 1`` slots per row. Checks (context, memory) run before the first
    ``next()`` returns anything and before allocating. Requests finished by the caller between steps stop
    producing tokens. ``pack`` chooses oneDNN-packed weights on CPU (see ``will_pack``)."""
    for r in requests:
        validate_sampling(max_new_tokens=r.max_new_tokens)
    budgets, pack = check_request(model, [r.prompt for r in requests],
                                  max(r.max_new_tokens for r in requests), prefill_chunk, pack,
                                  any(r.prompt_logprobs for r in requests))
    for r, b in zip(requests, budgets):
        r.max_new_tokens = min(r.max_new_tokens, b)
    return _run(model, requests, prefill_chunk, pack)


@torch.inference_mode()
def _run(model: Transformer, requests: list[Request], prefill_chunk: int,
         pack: bool) -> Iterator[list[tuple[int, int]]]:
    device, dtype = model.output.weight.device, model.output.weight.dtype
    B = len(requests)
    P = max(len(r.prompt) for r in requests)
    cache = KVCache.allocate(model.config, B, P + max(r.max_new_tokens for r in requests) - 1,
                             device=device, dtype=dtype)
    pads = torch.tensor([P - len(r.prompt) for r in requests], device=device)
    tokens = torch.zeros(B, P, dtype=torch.long, device=device)
    for i, r in enumerate(requests):
        tokens[i, P - len(r.prompt):] = torch.tensor(r.prompt, device=device)
        cache.valid[i, :P - len(r.prompt)] = False
    slots = torch.arange(P, device=device)
    positions = (slots.unsqueeze(0) - pads.unsqueeze(1)).clamp(min=0)
    padded = bool(pads.any())

    want_prompt_logprobs = any(r.prompt_logprobs for r in requests)
    for r in requests:
        r.prompt_token_logprobs = [0.0] if r.prompt_logprobs else []
    dec = decoder_for(model, pack)
    cos, sin = rope_angles(torch.arange(cache.size, device=device).unsqueeze(0), model.config.head_dim,
                           model.config.rope_theta)
    rope = (cos[0], sin[0])
    logits = None
    for start in range(0, P, prefill_chunk):
        end = min(start + prefill_chunk, P)
        logits = forward_step(model, dec, tokens[:, start:end], positions[:, start:end], cache, rope, padded,
                              last_only=not want_prompt_logprobs, decode=False)
        if want_prompt_logprobs:
            _gather_prompt_logprobs(requests, logits, tokens, start, end, P)
            logits = logits[:, -1:]
    last = logits[:, -1]
    step_positions = (P - pads).view(B, 1)
    for step in range(cache.size - P + 1):
        active = [i for i, r in enumerate(requests) if not r.finished]
        if not active:
            return
        params = [requests[i].sampling for i in active]
        rows = last if len(active) == B else last[active]
        chosen = sample(rows, params, [requests[i].generator for i in active])
        need_lp = [requests[i].logprobs for i in active]
        lps = token_logprobs(rows, chosen) if any(need_lp) else [None] * len(active)
        appended = []
        next_tokens = [0] * B
        for i, tok, lp, want in zip(active, chosen, lps, need_lp):
            next_tokens[i] = tok
            if accept_token(requests[i], tok, lp if want else None):
                appended.append((i, tok))
        yield appended
        if all(r.finished for r in requests) or step == cache.size - P:
            for r in requests:
                r.finish("length")
            return
        inp = torch.tensor(next_tokens, device=device).view(B, 1)
        logits = forward_step(model, dec, inp, step_positions + step, cache, rope, padded)
        last = logits[:, -1]


# ==== the forward used for generation =================================================================
# ``forward_step`` computes what ``Transformer.forward`` computes with a cache, minus per-call work that
# does not change between steps (RoPE angles come from a table built once per run; a decode step's padding
# mask is a view of ``cache.valid``; no host sync), and on CPU it can run the products on weights
# pre-packed for oneDNN: its GEMV uses every core (MKL's uses one) and its GEMM avoids MKL's slow
# non-Intel code path. Measured on a 2-core AMD EPYC, float32: decode ~1.9x, prefill ~2.5x. The packed
# copy doubles the linear weights' memory, so by default it is made only for models up to
# ``PACK_LIMIT_BYTES`` and requests whose KV cache is smaller than the weights (``will_pack``).
PACK_LIMIT_BYTES = 2 * 2**30


# oneDNN keeps a compiled kernel per input row count (~60 KiB each, per weight shape): prompts of many
# different lengths grew RSS ~3 MiB per length on the 134M config. Row counts above this are padded to a
# multiple of it, so a process sees at most a few dozen shapes (decode steps, with few rows, stay exact).
PACKED_ROW_BUCKET = 64


def _packed_linear(weight: Tensor) -> Callable[[Tensor], Tensor]:
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)

    def linear(x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        bucket = -(-rows // PACKED_ROW_BUCKET) * PACKED_ROW_BUCKET
        if rows <= 16 or bucket == rows:
            return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        flat = x.reshape(rows, x.shape[-1])
        flat = torch.cat([flat, flat.new_zeros(bucket - rows, x.shape[-1])])
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, None, "none", [], "")
        return out[:rows].view(*x.shape[:-1], out.shape[-1])
    return linear


_KERNEL_WORKS: dict[torch.dtype, bool] = {}


def _packing_works(dtype: torch.dtype) -> bool:
    """A private op: check once per dtype that it exists and agrees with F.linear before trusting it."""
    if dtype not in _KERNEL_WORKS:
        try:
            with torch.no_grad():
                w = (torch.arange(16 * 32, dtype=torch.float32).view(16, 32).sin()).to(dtype)
                x = (torch.arange(2 * 32, dtype=torch.float32).view(2, 1, 32).cos()).to(dtype)
                got = _packed_linear(w)(x).float()
                want = F.linear(x, w).float()
            _KERNEL_WORKS[dtype] = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))
        except (RuntimeError, AttributeError, NotImplementedError):
            _KERNEL_WORKS[dtype] = False
    return _KERNEL_WORKS[dtype]


def can_pack(model: Transformer) -> bool:
    """oneDNN weight packing applies: CPU, float32/bfloat16, plain ``nn.Linear`` layers, kernel works."""
    w = model.output.weight
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    linears = [model.output] + [m for layer in model.layers for m in
                                (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.attention.wo,
                                 layer.feed_forward.w1, layer.feed_forward.w2, layer.feed_forward.w3)]
    if not all(type(m) is torch.nn.Linear for m in linears):
        return False  # e.g. quantized layers: they have their own kernels
    return _packing_works(w.dtype)


@dataclass
class _LayerOps:
    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    wo: Callable[[Tensor], Tensor]
    ffn: Callable[[Tensor], Tensor]


def _plain_layer(layer) -> _LayerOps:
    a, f = layer.attention, layer.feed_forward
    return _LayerOps(qkv=lambda x: (a.wq(x), a.wk(x), a.wv(x)), wo=a.wo, ffn=f)


def _packed_layer(layer) -> _LayerOps:
    a, f = layer.attention, layer.feed_forward
    # Fused q|k|v and w1|w3: one packed product each instead of three and two.
    qkv = _packed_linear(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]))
    sizes = [a.wq.weight.shape[0], a.wk.weight.shape[0], a.wv.weight.shape[0]]
    w13 = _packed_linear(torch.cat([f.w1.weight, f.w3.weight]))
    hidden = f.w1.weight.shape[0]
    w2 = _packed_linear(f.w2.weight)

    def ffn(x: Tensor) -> Tensor:
        gate, up = w13(x).split(hidden, dim=-1)
        return w2(torch.nn.functional.silu(gate) * up)
    return _LayerOps(qkv=lambda x: qkv(x).split(sizes, dim=-1), wo=_packed_linear(a.wo.weight), ffn=ffn)


@dataclass
class Decoder:
    """The per-model state of the decode step: how each layer's products run, and the weights' versions
    when it was built (in-place updates, e.g. training, make a packed copy stale: it is then rebuilt)."""

    layers: list[_LayerOps]
    output: Callable[[Tensor], Tensor]
    packed: bool
    versions: tuple[int, ...]


def _versions(model: Transformer) -> tuple:
    # In-place updates bump _version; .to() / load_state_dict(assign=True) move the data.
    return tuple((p._version, p.data_ptr(), p.dtype) for p in model.parameters())


# Decoders live beside their models (not on them: a model stays picklable and its state_dict untouched).
_DECODERS: "weakref.WeakKeyDictionary[Transformer, Decoder]" = weakref.WeakKeyDictionary()


def _cached_decoder(model: Transformer, pack: bool) -> Decoder | None:
    cached = _DECODERS.get(model)
    if cached is not None and cached.packed == pack and cached.versions == _versions(model):
        return cached
    return None


def will_pack(model: Transformer, pack: bool | None = None, kv_cache_bytes: int = 0) -> bool:
    """Whether generation uses packed weights. True packs whenever possible, False never; None (auto) uses
    a packed copy already made, and otherwise packs on CPU when the weights are at most
    ``PACK_LIMIT_BYTES`` and outweigh the request's KV cache: once the cache is the bigger read per step
    (long contexts), faster products gain little and the copy's memory is better left to the cache."""
    if pack is None:
        if packed_now(model):
            return True
        weights = _weight_bytes(model)
        pack = weights <= PACK_LIMIT_BYTES and kv_cache_bytes <= weights
    return bool(pack) and can_pack(model)


def _weight_bytes(model: Transformer) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def packed_now(model: Transformer) -> bool:
    """Whether an up-to-date packed copy of the model's weights exists."""
    return _cached_decoder(model, True) is not None


def pack_bytes(model: Transformer, pack: bool) -> int:
    """Bytes a packed copy would add now (0 if not packing or already packed)."""
    if not pack or _cached_decoder(model, pack) is not None:
        return 0
    return _weight_bytes(model) - model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()


def decoder_for(model: Transformer, pack: bool | None = None) -> Decoder:
    """The generation forward's per-model state (see ``will_pack``), cached beside the model and rebuilt
    when its weights change."""
    pack = will_pack(model, pack)
    cached = _cached_decoder(model, pack)
    if cached is not None:
        return cached
    versions = _versions(model)
    with torch.no_grad():
        if pack:
            dec = Decoder([_packed_layer(layer) for layer in model.layers], _packed_linear(model.output.weight),
                          True, versions)
        else:
            dec = Decoder([_plain_layer(layer) for layer in model.layers], model.output, False, versions)
    _DECODERS[model] = dec
    return dec


# Entries of one attention call's mask. SDPA's CPU flash kernel takes a mask but turns a bool one into a
# float32 bias, so a 2048-token chunk against 32k cached keys would hold 320 MiB of mask; above this budget
# the chunk's queries attend in row blocks (each seeing only the keys it may), ~40 MiB at most.
ATTENTION_MASK_ENTRIES = 2**23


@dataclass
class _AttentionBlock:
    rows: slice  # query rows of the chunk
    keys: int  # attend to cache slots [0, keys)
    mask: Tensor | None
    causal: bool = False
    lazy: bool = False  # build the mask when it is used (many blocks: keep one block's mask alive at a time)


def _block_mask(cache: KVCache, rows: slice, keys: int, padded: bool) -> Tensor:
    """Bool mask of the chunk's query rows ``rows`` (slots cache.length + row) over cache slots [0, keys)."""
    slots = torch.arange(keys, device=cache.valid.device)
    query_slots = slots[cache.length + rows.start:cache.length + rows.stop].unsqueeze(1)
    mask = slots.unsqueeze(0) <= query_slots  # [rows, keys] causal
    if padded:
        # A padding query may see itself, so no row is fully masked (that would put NaNs in the cache).
        mask = mask & (cache.valid[:, :keys].unsqueeze(1) | (slots.unsqueeze(0) == query_slots))
        mask = mask.unsqueeze(1)  # [B, 1, rows, keys]
    return mask


def _attention_blocks(cache: KVCache, B: int, T: int, padded: bool, decode: bool) -> list[_AttentionBlock]:
    start, end = cache.length, cache.length + T
    if T == 1 and decode:
        # Every slot up to the new one is causal for it; only padding is hidden (a view: nothing to build).
        return [_AttentionBlock(slice(0, 1), end, cache.valid[:, None, None, :end] if padded else None)]
    if not padded and start == 0:
        return [_AttentionBlock(slice(0, T), end, None, causal=True)]
    rows = max(1, min(T, ATTENTION_MASK_ENTRIES // (B * end)))
    if rows == T:
        return [_AttentionBlock(slice(0, T), end, _block_mask(cache, slice(0, T), end, padded))]
    # Later slots are in the future of every query in a block, so each block sees keys up to its last query.
    return [_AttentionBlock(slice(lo, min(lo + rows, T)), start + min(lo + rows, T), None, lazy=True)
            for lo in range(0, T, rows)]


def forward_step(model: Transformer, dec: Decoder, tokens: Tensor, positions: Tensor, cache: KVCache,
                 rope: tuple[Tensor, Tensor], padded: bool, last_only: bool = True, decode: bool = True) -> Tensor:
    """Logits (float32; [B, 1, V] with ``last_only``) for tokens [B, T] written to the next T cache slots.

    The same computation as ``Transformer.forward`` with a cache (bit for bit with unpacked weights, when
    the attention fits in one block). ``decode``: the tokens are generated ones, so none is padding."""
    B, T = tokens.shape
    c = model.config
    H, KV, hd = c.n_heads, c.n_kv_heads, c.head_dim
    start, end = cache.length, cache.length + T
    if end > cache.size:
        raise ValueError(f"KV cache holds {cache.size} tokens; {end} requested")
    cos, sin = rope[0][positions], rope[1][positions]  # [B, T, hd/2], from the table: no trig per step
    blocks = _attention_blocks(cache, B, T, padded, decode)
    h = model.tok_embeddings(tokens)
    for i, (layer, ops) in enumerate(zip(model.layers, dec.layers)):
        q, k, v = ops.qkv(layer.attention_norm(h))
        q = apply_rope(q.view(B, T, H, hd), cos, sin).transpose(1, 2)
        k = apply_rope(k.view(B, T, KV, hd), cos, sin).transpose(1, 2)
        k_cache, v_cache = cache.k[i], cache.v[i]
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v.view(B, T, KV, hd).transpose(1, 2)
        outs = [F.scaled_dot_product_attention(
            q[:, :, b.rows], k_cache[:, :, :b.keys], v_cache[:, :, :b.keys], is_causal=b.causal,
            attn_mask=_block_mask(cache, b.rows, b.keys, padded) if b.lazy else b.mask, enable_gqa=KV != H)
            for b in blocks]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        h = h + ops.wo(out.transpose(1, 2).reshape(B, T, H * hd))
        h = h + ops.ffn(layer.ffn_norm(h))
    cache.length = end
    if last_only:
        h = h[:, -1:]
    return dec.output(model.norm(h)).float()


def _gather_prompt_logprobs(requests: list[Request], logits: Tensor, tokens: Tensor, start: int, end: int,
                            P: int) -> None:
    # logits[:, t] scores the token in slot start + t + 1; slots before a row's first real token are padding.
    targets = tokens[:, start + 1:end + 1]
    n = targets.shape[1]
    if n == 0:
        return
    logp = torch.log_softmax(logits[:, :n].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    for i, r in enumerate(requests):
        if not r.prompt_logprobs:
            continue
        first = P - len(r.prompt) + 1  # slot of the row's second prompt token
        lo = max(first, start + 1)
        if lo <= end:
            r.prompt_token_logprobs.extend(logp[i, lo - start - 1:].tolist())


def generate(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop_ids: Sequence[int] = (), logprobs: bool = False, prompt_logprobs: bool = False,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK, pack: bool | None = None) -> list[GenerationResult]:
    """Generate for each token-id prompt (include the bos yourself); one result per prompt, in order.

    Greedy by default. With sampling, prompt ``i`` uses the random stream ``seed + i``, so its result does
    not depend on what else is in the batch."""
    requests = make_requests(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, seed=seed, stop_ids=stop_ids, logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs)
    for _ in run(model, requests, prefill_chunk=prefill_chunk, pack=pack):
        pass
    return [r.result() for r in requests]


def make_requests(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                  stop_ids: Sequence[int] = (), logprobs: bool = False,
                  prompt_logprobs: bool = False) -> list[Request]:
    validate_sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_new_tokens=max_new_tokens)
    if isinstance(prompts, (str, bytes)) or not all(isinstance(p, (list, tuple)) for p in prompts):
        raise CodeLlamaError("prompts must be a list of token-id lists")
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    device = model.output.weight.device
    if seed is None and not params.greedy:
        # One draw from torch's global generator for the whole batch keeps rows independent but repeatable.
        params = SamplingParams(temperature, top_p, top_k, int(torch.randint(0, 2**62, ()).item()))
    return [Request(prompt=[int(t) for t in p], max_new_tokens=max_new_tokens, sampling=params,
                    stop_ids=frozenset(stop_ids), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                    generator=make_generator(params, device, offset=i))
            for i, p in enumerate(prompts)]


# ==== text: exact incremental detokenisation and stop strings ========================================
@dataclass
class TextStream:
    """Turns generated ids into text deltas whose concatenation is exactly the decoded continuation.

    SentencePiece drops the leading space of the first piece it decodes and byte-fallback pieces only make
    a character once all its bytes are there. So each step decodes a short window that starts a few tokens
    back (``context``: the end of the prompt, so a first ``▁return`` after ``x =`` yields `` return``) and
    hands out only what was added since the last step, holding back text that ends in an incomplete
    UTF-8 sequence (U+FFFD) or that could be the start of a stop string."""

    decode: Callable[[list[int]], str]
    context: list[int] = field(default_factory=list)
    stop: tuple[str, ...] = ()
    text: str = ""  # decoded continuation so far (trimmed at a stop string once one appears)
    stopped: bool = False
    _ids: list[int] = field(default_factory=list, repr=False)
    _prefix: int = 0
    _read: int = 0
    _emitted: int = 0

    def __post_init__(self) -> None:
        self._ids = list(self.context)
        self._read = len(self._ids)
        self.stop = tuple(s for s in self.stop if s)

    def push(self, token: int) -> str:
        """Add one generated token; returns the text that is now safe to show (maybe empty)."""
        if self.stopped:
            return ""
        self._ids.append(token)
        before = self.decode(self._ids[self._prefix:self._read])
        now = self.decode(self._ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""  # an incomplete character (or nothing visible yet): wait for more tokens
        self._prefix, self._read = self._read, len(self._ids)
        return self._add(now[len(before):], final=False)

    def flush(self) -> str:
        """The rest of the text at the end of generation (incomplete bytes become U+FFFD, as in decode)."""
        if self.stopped:
            return ""
        before = self.decode(self._ids[self._prefix:self._read])
        now = self.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return self._add(now[len(before):], final=True)

    def _add(self, delta: str, final: bool) -> str:
        old_len = len(self.text)
        self.text += delta
        safe = len(self.text)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            search_from = max(0, old_len - longest + 1)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                out = self.text[self._emitted:]
                self._emitted = len(self.text)
                return out
            if not final:
                safe -= _held_back(self.text, self.stop, self._emitted)
        out = self.text[self._emitted:safe]
        self._emitted = max(self._emitted, safe)
        return out


def _held_back(text: str, stops: tuple[str, ...], emitted: int) -> int:
    """Length of the longest end of ``text`` (not yet emitted) that begins some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - emitted), best, -1):
            if s.startswith(text[len(text) - k:]):
                best = k
                break
    return best


@dataclass
class _Job:
    """A prompt at the text level: its ids, how to decode its continuation, and its echo text."""

    prompt: list[int]
    decode: Callable[[list[int]], str]
    context: list[int]
    echo_text: str  # shown before the generated text when echo=True
    echo_suffix: str = ""  # shown after it (infilling: the suffix, so echo gives the whole document)


def _normalise_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if not all(isinstance(s, str) for s in stop):
        raise CodeLlamaError("stop must be a string or a list of strings")
    return tuple(stop)


def _generate_text(llama: "CodeLlama", jobs: list[_Job], *, batch: bool, max_new_tokens: int = 256,
                   temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                   stop: str | Sequence[str] | None = None, logprobs: bool = False, echo: bool = False,
                   stream: bool = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                   ) -> Completion | list[Completion] | Iterator[str]:
    stops = _normalise_stop(stop)
    requests = make_requests(llama.model, [j.prompt for j in jobs], max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             stop_ids=llama.tokenizer.stop_ids, logprobs=logprobs,
                             prompt_logprobs=logprobs and echo)
    steps = run(llama.model, requests, prefill_chunk=prefill_chunk)
    texts = [TextStream(j.decode, j.context, stops) for j in jobs]
    if stream:
        if batch or len(jobs) != 1:
            raise CodeLlamaError("stream=True takes a single prompt, not a list")
        return _stream(jobs[0], requests[0], texts[0], steps, echo)
    for appended in steps:
        for i, tok in appended:
            texts[i].push(tok)
            if texts[i].stopped:
                requests[i].finish("stop")
    completions = []
    for job, r, t in zip(jobs, requests, texts):
        t.flush()
        completions.append(_completion(job, r, t, echo))
    return completions if batch else completions[0]


def _stream(job: _Job, request: Request, text: TextStream, steps: Iterator[list[tuple[int, int]]],
            echo: bool) -> Iterator[str]:
    """Text deltas as they are decoded; the generator's return value (``StopIteration.value``, or
    ``completion = yield from ...``) is the final ``Completion``, whose text is the deltas joined."""
    if echo and job.echo_text:
        yield job.echo_text
    for appended in steps:
        for _, tok in appended:
            delta = text.push(tok)
            if text.stopped:
                request.finish("stop")
            if delta:
                yield delta
    tail = text.flush()
    if tail:
        yield tail
    if echo and job.echo_suffix:
        yield job.echo_suffix
    return _completion(job, request, text, echo)


def _completion(job: _Job, r: Request, text: TextStream, echo: bool) -> Completion:
    lps = list(r.token_logprobs) if r.logprobs else None
    if echo:
        return Completion(text=job.echo_text + text.text + job.echo_suffix, tokens=job.prompt + r.tokens,
                          logprobs=(r.prompt_token_logprobs + lps) if lps is not None else None,
                          finish_reason=r.finish_reason or "length", prompt_tokens=len(job.prompt))
    return Completion(text=text.text, tokens=list(r.tokens), logprobs=lps,
                      finish_reason=r.finish_reason or "length", prompt_tokens=len(job.prompt))


def _context(prompt: list[int], n: int = 4) -> list[int]:
    # A few prompt tokens before the continuation are enough for SentencePiece's space handling.
    return prompt[-n:]


# ---- the three user-facing tasks --------------------------------------------------------------------
def complete(llama: "CodeLlama", prompt: str | Sequence[str], **kwargs: Any):
    """Continue ``prompt`` (or each of a list of prompts); see ``CodeLlama.complete``."""
    tok = llama.tokenizer
    batch = not isinstance(prompt, str)
    prompts = list(prompt) if batch else [prompt]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise CodeLlamaError("prompt must be a string or a non-empty list of strings")
    jobs = []
    for p in prompts:
        ids = tok.encode(p, bos=True)
        jobs.append(_Job(prompt=ids, decode=tok.decode, context=_context(ids), echo_text=p))
    return _generate_text(llama, jobs, batch=batch, **kwargs)


def infill(llama: "CodeLlama", prefix: str | Sequence[str], suffix: str | Sequence[str], *,
           suffix_first: bool = False, **kwargs: Any):
    """Fill the middle between ``prefix`` and ``suffix`` (PSM, or SPM with ``suffix_first``)."""
    tok = llama.tokenizer
    require_infilling(tok, llama.name)
    batch = not isinstance(prefix, str)
    if batch != (not isinstance(suffix, str)):
        raise CodeLlamaError("prefix and suffix must both be strings or both be lists")
    prefixes, suffixes = (list(prefix), list(suffix)) if batch else ([prefix], [suffix])
    if len(prefixes) != len(suffixes) or not prefixes:
        raise CodeLlamaError(f"got {len(prefixes)} prefixes and {len(suffixes)} suffixes; need the same, >= 1")
    if not all(isinstance(s, str) for s in prefixes + suffixes):
        raise CodeLlamaError("prefix and suffix must be strings")
    jobs = []
    for p, s in zip(prefixes, suffixes):
        ids = infilling_tokens(tok, p, s, suffix_first=suffix_first, model_name=llama.name)
        # The middle continues mid-line: decode it without SentencePiece's implicit leading space.
        # Echo gives the whole document: prefix + middle + suffix.
        jobs.append(_Job(prompt=ids, decode=tok.decode_infilling, context=[], echo_text=p, echo_suffix=s))
    return _generate_text(llama, jobs, batch=batch, **kwargs)


def _is_dialog(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(m, Mapping) for m in x)


def chat(llama: "CodeLlama", messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
         **kwargs: Any):
    """The assistant's reply to a dialog (or to each of a list of dialogs); stops at eos or ``<step>``."""
    tok = llama.tokenizer
    if _is_dialog(messages) and messages:
        dialogs, batch = [messages], False
    elif isinstance(messages, (list, tuple)) and messages and all(_is_dialog(d) for d in messages):
        dialogs, batch = list(messages), True
    else:
        raise CodeLlamaError("chat takes a list of {'role': ..., 'content': ...} messages or a list of such dialogs")
    echo = bool(kwargs.get("echo"))
    jobs = []
    for d in dialogs:
        ids = chat_tokens(tok, d)
        # The reply alone is decoded like Meta's reference (no leading space); with echo it continues the
        # decoded prompt exactly, so the text is decode(prompt + reply).
        jobs.append(_Job(prompt=ids, decode=tok.decode, context=_context(ids) if echo else [],
                         echo_text=tok.decode(ids) if echo else ""))
    return _generate_text(llama, jobs, batch=batch, **kwargs)
