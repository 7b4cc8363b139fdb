"""The forward pass used for generation: ``forward_step`` (a cached forward with a RoPE table, per-row
positions and attention in row blocks) and the optional oneDNN-packed weights behind it (``decoder_for``).
Split out of generation.py, which re-exports every name here."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import KVCache, Transformer, apply_rope, int8_chunk_kv, kv_rotation, rotate_kv

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
    gemv = blas_gemv(weight)

    def linear(x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if rows == 1 and gemv is not None and torch.get_num_threads() == 1:
            return gemv(x)  # a batch-1 decode step on one thread: OpenBLAS streams float32 weights faster
        bucket = -(-rows // PACKED_ROW_BUCKET) * PACKED_ROW_BUCKET
        if rows <= 16 or bucket == rows:
            return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        flat = x.reshape(rows, x.shape[-1])
        flat = torch.cat([flat, flat.new_zeros(bucket - rows, x.shape[-1])])
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, None, "none", [], "")
        return out[:rows].view(*x.shape[:-1], out.shape[-1])
    return linear


def blas_gemv(weight: Tensor) -> Callable[[Tensor], Tensor] | None:
    """``x @ weight.T`` for a single float32 row through numpy's OpenBLAS (sgemv), sharing the weight's memory;
    None where that does not apply (not float32, not contiguous, not CPU, or numpy without OpenBLAS).

    Why: one row through a matrix is a pure weight stream, and on the development machine OpenBLAS's sgemv reads
    31 GB/s on one core where oneDNN's packed kernel reads 23 (llama.cpp's own f32 loop: 32). Used on one thread
    only: with two, torch's OpenMP workers spin between ops on the cores OpenBLAS's threads need (a 110M decode
    step took 105 ms against oneDNN's 19). Its threads follow torch's (``sync_blas_threads``)."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not weight.is_contiguous() or \
            not _openblas_threads():
        return None
    w = weight.detach().numpy()
    rows_out = weight.shape[0]

    def gemv(x: Tensor) -> Tensor:
        out = torch.from_numpy(w @ x.reshape(-1).numpy())
        return out.view(*x.shape[:-1], rows_out)
    return gemv


_BLAS: dict[str, Any] = {}


def _openblas_threads() -> bool:
    """numpy's BLAS is OpenBLAS and its thread count can be set: then keep it at torch's (a 1-thread torch run
    must not decode on every core)."""
    sync_blas_threads()
    return bool(_BLAS["controllers"])


def sync_blas_threads() -> None:
    """Give numpy's OpenBLAS torch's current intra-op thread count (two C calls when it already has it)."""
    if "controllers" not in _BLAS:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS["controllers"] = ThreadpoolController().select(internal_api="openblas").lib_controllers
        except ImportError:
            _BLAS["controllers"] = []
    n = torch.get_num_threads()
    for lib in _BLAS["controllers"]:
        if lib.get_num_threads() != n:
            lib.set_num_threads(n)


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
    fused_qkv: Callable[[Tensor], Tensor] | None = None  # packed: q|k|v in one product (rotated together)


def _plain_layer(layer) -> _LayerOps:
    a, f = layer.attention, layer.feed_forward
    return _LayerOps(qkv=lambda x: (a.wq(x), a.wk(x), a.wv(x)), wo=a.wo, ffn=f)


def _int8_layer(layer) -> _LayerOps | None:
    """int8 layers on CPU: a decode row runs q|k|v and w1|w3 as one fbgemm product each (``quantize.py``);
    longer inputs (prefill) go through the layers themselves. None where the fused kernels do not apply."""
    from .quantize import fused_int8_row_kernel

    a, f = layer.attention, layer.feed_forward
    qkv_row, w13_row = fused_int8_row_kernel([a.wq, a.wk, a.wv]), fused_int8_row_kernel([f.w1, f.w3])
    if qkv_row is None or w13_row is None:
        return None
    sizes = [a.wq.out_features, a.wk.out_features, a.wv.out_features]
    hidden = f.w1.out_features

    def row(kernel, x: Tensor) -> Tensor:
        return kernel(x.reshape(1, -1).float()).to(x.dtype).view(*x.shape[:-1], -1)

    def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.numel() != x.shape[-1]:
            return a.wq(x), a.wk(x), a.wv(x)
        return row(qkv_row, x).split(sizes, dim=-1)

    def ffn(x: Tensor) -> Tensor:
        if x.numel() != x.shape[-1]:
            return f(x)
        gate, up = row(w13_row, x).split(hidden, dim=-1)
        return f.w2(torch.nn.functional.silu(gate) * up)
    return _LayerOps(qkv=qkv, wo=a.wo, ffn=ffn)


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
    return _LayerOps(qkv=lambda x: qkv(x).split(sizes, dim=-1), wo=_packed_linear(a.wo.weight), ffn=ffn,
                     fused_qkv=qkv)


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
        if cached.packed and _BLAS.get("controllers"):
            sync_blas_threads()  # torch's thread count may have changed since the decoder was built
        return cached
    versions = _versions(model)
    with torch.no_grad():
        if pack:
            dec = Decoder([_packed_layer(layer) for layer in model.layers], _packed_linear(model.output.weight),
                          True, versions)
        else:
            dec = Decoder([_int8_layer(layer) or _plain_layer(layer) for layer in model.layers], model.output,
                          False, versions)
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


def _rms_norm(norm, x: Tensor) -> Tensor:
    # One fused op instead of RMSNorm.forward's seven (float32 inside, as the module computes it).
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


# Below this many cached key elements per sequence, one_query_attention works in float32 copies of the keys and
# values (the copy is cheaper than bf16 matmul kernels on such small products); above, in place in bf16.
SMALL_ATTENTION_ELEMENTS = 2**18


def one_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Attention of one new query per sequence (q [B, H, 1, hd]) over cached keys/values [B, KV, S, hd] (views
    of the cache) with ``mask`` [B, 1, 1, S] (or None); float32 softmax; the GQA groups are the columns of one
    product. Measured at one thread against SDPA's flash kernel in bfloat16: 12 heads x 160 keys 47 us vs 167 us;
    32/8 heads x 1000 keys 0.44 ms vs 6.1 ms."""
    B, H, _, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    groups = q.reshape(B, KV, H // KV, hd)
    if KV * S * hd <= SMALL_ATTENTION_ELEMENTS:
        scores = torch.matmul(groups.float(), k.float().transpose(-1, -2)) * hd ** -0.5  # [B, KV, G, S]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(v.dtype)
    else:
        # Keys as the left operand: the cache slice is read where it lies (k @ q^T needs no contiguous copy).
        scores = torch.matmul(k, groups.transpose(-1, -2)).float() * hd ** -0.5  # [B, KV, S, G]
        if mask is not None:
            scores = scores.masked_fill(~mask.transpose(-1, -2), float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-2).to(v.dtype).transpose(-1, -2), v)
    return out.view(B, H, 1, hd)


def local_heads(model: Transformer) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) this process computes: the config's, or one tensor-parallel rank's share."""
    if len(model.layers):
        a = model.layers[0].attention
        return a.n_heads, a.n_kv_heads, a.head_dim
    c = model.config
    return c.n_heads, c.n_kv_heads, c.head_dim


def forward_step(model: Transformer, dec: Decoder, tokens: Tensor, positions: Tensor, cache: KVCache,
                 rope: tuple[Tensor, Tensor], padded: bool, last_only: bool = True, decode: bool = True) -> Tensor:
    """Logits (float32; [B, 1, V] with ``last_only``) for tokens [B, T] written to the next T cache slots.

    The same computation as ``Transformer.forward`` with a cache (bit for bit with unpacked weights, when
    the attention fits in one block). ``decode``: the tokens are generated ones, so none is padding."""
    B, T = tokens.shape
    H, KV, hd = local_heads(model)
    start, end = cache.length, cache.length + T
    if end > cache.size:
        raise ValueError(f"KV cache holds {cache.size} tokens; {end} requested")
    cos, sin = rope[0][positions], rope[1][positions]  # [B, T, hd/2], from the table: no trig per step
    blocks = _attention_blocks(cache, B, T, padded, decode)
    quantized = cache.k.dtype == torch.int8
    rotation = kv_rotation(hd, tokens.device) if quantized else None
    h = model.tok_embeddings(tokens)
    # Reduced-precision decode on CPU: SDPA's flash kernel runs one query 3-10x slower than two small matmuls.
    small_attention = decode and T == 1 and h.device.type == "cpu" and h.dtype in (torch.bfloat16, torch.float16)
    for i, (layer, ops) in enumerate(zip(model.layers, dec.layers)):
        if ops.fused_qkv is not None:  # the fast path: fused norm, one product, q and k rotated in one go
            qkv = ops.fused_qkv(_rms_norm(layer.attention_norm, h))
            qk = apply_rope(qkv[..., :(H + KV) * hd].view(B, T, H + KV, hd), cos, sin).transpose(1, 2)
            q, k, v = qk[:, :H], qk[:, H:], qkv[..., (H + KV) * hd:]
        else:
            q, k, v = ops.qkv(layer.attention_norm(h))
            q = apply_rope(q.view(B, T, H, hd), cos, sin).transpose(1, 2)
            k = apply_rope(k.view(B, T, KV, hd), cos, sin).transpose(1, 2)
        k_cache, v_cache = cache.k[i], cache.v[i]
        if quantized:  # int8 cache (model.py): attention in the rotated basis, earlier slots dequantized
            q = rotate_kv(q, rotation)
            k_cache = int8_chunk_kv(k_cache, start, rotate_kv(k, rotation))
            v_cache = int8_chunk_kv(v_cache, start, rotate_kv(v.view(B, T, KV, hd).transpose(1, 2), rotation))
        else:
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v.view(B, T, KV, hd).transpose(1, 2)
        if small_attention:
            b = blocks[0]
            out = one_query_attention(q, k_cache[:, :, :b.keys], v_cache[:, :, :b.keys], b.mask)
        else:
            outs = [F.scaled_dot_product_attention(
                q[:, :, b.rows], k_cache[:, :, :b.keys], v_cache[:, :, :b.keys], is_causal=b.causal,
                attn_mask=_block_mask(cache, b.rows, b.keys, padded) if b.lazy else b.mask, enable_gqa=KV != H)
                for b in blocks]
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        if rotation is not None:
            out = rotate_kv(out, rotation)
        h = h + ops.wo(out.transpose(1, 2).reshape(B, T, H * hd))
        h = h + ops.ffn(_rms_norm(layer.ffn_norm, h) if ops.fused_qkv is not None else layer.ffn_norm(h))
    cache.length = end
    if last_only:
        h = h[:, -1:]
    return dec.output(model.norm(h)).float()
