"""The Llama 2 decoder as Code Llama uses it: RMSNorm, RoPE (interleaved pairs, as in Meta's checkpoints),
grouped-query attention, SwiGLU, untied output. One forward serves training, scoring and cached generation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 whatever the model dtype, as both references do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_angles(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of shape [B, T, head_dim/2] for integer positions [B, T]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float().unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x [B, T, H, D] — Meta's complex-number layout."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


# ---- int8 KV cache ----------------------------------------------------------------------------------
# With ``dtype=torch.int8`` each cached key/value vector (one layer, batch row, kv head, token) is stored as
# ``head_dim`` int8 values, symmetric absmax over head_dim (x ~= q * scale, scale = absmax / 127), followed by
# its scale as the 2 bytes of a bfloat16 in the same int8 row: the tensors are [..., S, head_dim + 2]. Keeping the
# scale in the row means every slice, copy or row swap of ``k``/``v`` (serving's per-row views, prefix-cache
# moves) carries the scales with it. bfloat16 rather than float32 halves the scale's bytes (2 / (head_dim + 2))
# at no cost in accuracy: the values are quantized with the stored (rounded) scale, so the error stays within
# the usual half-step of int8 rounding, and bfloat16 has float32's exponent range (no overflow/underflow).
#
# Keys carry a few outlier channels (RoPE's low-frequency pairs: rms 4-6 against ~1.3 on the embedded model),
# which set every token's absmax and leave the other channels ~40 levels. So an int8 cache stores keys and values
# in a rotated basis: x @ R with R the orthonormal (Sylvester) Hadamard matrix of head_dim (a power of two; other
# sizes are stored unrotated), which spreads the outliers over all channels before the absmax. Attention runs in
# that basis — q @ R against the stored keys (R orthonormal: q.k = qR.kR), output @ R back (R is its own inverse)
# — so reads cost nothing extra: only the chunk's new rows are rotated. Greedy agreement with the default cache
# on held-out code went from 75% to 88% of prompts (32 tokens) with it.
KV_SCALE_BYTES = 2
_ROTATIONS: dict[tuple[int, torch.device], Tensor | None] = {}


def kv_rotation(head_dim: int, device) -> Tensor | None:
    """The float32 orthonormal Hadamard matrix [head_dim, head_dim] of an int8 cache (None if head_dim is not a
    power of two). Symmetric and its own inverse."""
    key = (head_dim, torch.device(device))
    if key not in _ROTATIONS:
        rot = None
        if head_dim > 0 and head_dim & (head_dim - 1) == 0:
            rot = torch.ones(1, 1)
            while rot.shape[0] < head_dim:
                rot = torch.cat([torch.cat([rot, rot], 1), torch.cat([rot, -rot], 1)], 0)
            rot = (rot / math.sqrt(head_dim)).to(key[1])
        _ROTATIONS[key] = rot
    return _ROTATIONS[key]


def rotate_kv(x: Tensor, rotation: Tensor | None) -> Tensor:
    """x [..., head_dim] @ rotation, in float32, back in x's dtype (a no-op without a rotation)."""
    return x if rotation is None else (x.float() @ rotation).to(x.dtype)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in a cache of ``dtype`` (int8: values plus their scales)."""
    if dtype == torch.int8:
        per_head = config.head_dim + KV_SCALE_BYTES
    else:
        per_head = config.head_dim * torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layers * config.n_kv_heads * per_head


def quantize_kv(x: Tensor) -> Tensor:
    """x [..., head_dim] -> int8 [..., head_dim + 2]: absmax-scaled values, then the bfloat16 scale's bytes."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / 127.0).to(torch.bfloat16)
    sf = scale.float()
    q = (xf / torch.where(sf > 0, sf, torch.ones_like(sf))).round_().clamp_(-127, 127).to(torch.int8)
    return torch.cat([q, scale.view(torch.int8)], dim=-1)


def dequantize_kv(packed: Tensor, dtype: torch.dtype) -> Tensor:
    """int8 [..., head_dim + 2] (``quantize_kv``'s layout, any slice of a cache) -> [..., head_dim] in ``dtype``."""
    hd = packed.shape[-1] - KV_SCALE_BYTES
    scale = packed[..., hd:].view(torch.bfloat16)
    if dtype == torch.float16:  # bfloat16's range exceeds float16's: multiply in float32
        return (packed[..., :hd].float() * scale.float()).to(dtype)
    return packed[..., :hd].to(dtype) * scale.to(dtype)


def int8_chunk_kv(cache: Tensor, start: int, new: Tensor) -> Tensor:
    """Store a chunk's keys (or values) ``new`` [B, KV, T, hd] in slots [start, start + T) of the int8 ``cache``
    [B, KV, S, hd + 2], and return what the chunk attends to: the earlier slots dequantized, its own exact (as
    vLLM's prefill attends to the fresh keys; everything after it reads them back from the cache)."""
    cache[:, :, start:start + new.shape[2]] = quantize_kv(new)
    if start == 0:
        return new
    return torch.cat([dequantize_kv(cache[:, :, :start], new.dtype), new], dim=2)


@dataclass
class KVCache:
    """Preallocated keys/values for a batch; slot ``j`` of every sequence holds the j-th token fed to it.

    ``valid[b, j]`` is False for padding slots (left-padded prompts), which no real token may attend to.
    An int8 cache (``allocate(..., dtype=torch.int8)``) holds rotated (``kv_rotation``), quantized rows with their
    scales (``quantize_kv``); attention dequantizes the slots it reads to the compute dtype (``int8_chunk_kv``)."""

    k: Tensor  # [n_layers, B, n_kv_heads, S, head_dim] (int8: head_dim + KV_SCALE_BYTES)
    v: Tensor
    valid: Tensor  # [B, S] bool
    length: int = 0

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, size: int, *, device=None,
                 dtype: torch.dtype = torch.float32, n_kv_heads: int | None = None) -> "KVCache":
        """``n_kv_heads``: the heads this process holds, if not the config's (a tensor-parallel rank's share)."""
        last = config.head_dim + KV_SCALE_BYTES if dtype == torch.int8 else config.head_dim
        shape = (config.n_layers, batch, n_kv_heads or config.n_kv_heads, size, last)
        return cls(k=torch.zeros(shape, device=device, dtype=dtype),
                   v=torch.zeros(shape, device=device, dtype=dtype),
                   valid=torch.ones(batch, size, device=device, dtype=torch.bool))

    @classmethod
    def for_model(cls, model: "Transformer", batch: int, size: int, *, device=None,
                  dtype: torch.dtype = torch.float32) -> "KVCache":
        """A cache for the KV heads ``model`` computes in this process (a tensor-parallel rank holds its share)."""
        heads = model.layers[0].attention.n_kv_heads if len(model.layers) else None
        return cls.allocate(model.config, batch, size, device=device, dtype=dtype, n_kv_heads=heads)

    @property
    def size(self) -> int:
        return self.k.shape[3]

    @property
    def quantized(self) -> bool:
        return self.k.dtype == torch.int8

    def nbytes(self) -> int:
        """The bytes the keys and values hold (for int8: the values and their scales)."""
        return self.k.nbytes + self.v.nbytes


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        B, T, _ = x.shape
        rotation = None
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k_cache, v_cache = cache
            if k_cache.dtype == torch.int8:  # in the rotated basis; earlier slots are read back dequantized
                rotation = kv_rotation(self.head_dim, x.device)
                q = rotate_kv(q, rotation)
                k = int8_chunk_kv(k_cache, start, rotate_kv(k, rotation))
                v = int8_chunk_kv(v_cache, start, rotate_kv(v, rotation))
            else:
                k_cache[:, :, start:start + T] = k
                v_cache[:, :, start:start + T] = v
                k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1 and start == 0,
            enable_gqa=self.n_kv_heads != self.n_heads)
        if rotation is not None:
            out = rotate_kv(out, rotation)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Parameter names follow Meta's checkpoints (``layers.0.attention.wq.weight`` ...)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # Training switch: keep only each block's input and recompute the block in the backward pass, trading
        # ~1/3 more compute for activations that no longer grow with the number of layers.
        self.activation_checkpointing = False

    def init_weights(self, std: float = 0.02) -> None:
        """Fresh weights for training from scratch (GPT-2 style, residual projections scaled by depth)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                valid: Tensor | None = None, last_only: bool = False, segments: Tensor | None = None) -> Tensor:
        """Logits (float32) for tokens [B, T].

        Without ``cache`` this is the plain causal forward (``valid`` [B, T] marks real tokens of
        left-padded rows). With ``cache`` the tokens fill the next T slots and attend to every valid slot
        before them, so calling it chunk by chunk (prefill) and then token by token (decode) is exact.
        ``positions`` [B, T] are the RoPE positions; by default the slot indices.

        ``segments`` [B, T] (training on packed rows, no cache): tokens attend only to earlier tokens of their own
        segment, and positions restart at each segment, so every packed sequence computes what it would alone."""
        B, T = tokens.shape
        if segments is not None:
            if cache is not None or valid is not None:
                raise ValueError("segments are for packed training rows, without a cache or padding mask")
            return self._forward_segments(tokens, segments, positions, last_only)
        start = cache.length if cache is not None else 0
        end = start + T
        if cache is not None and end > cache.size:
            raise ValueError(f"KV cache holds {cache.size} tokens; {end} requested")
        if positions is None:
            positions = torch.arange(start, end, device=tokens.device).expand(B, T)
        cos, sin = rope_angles(positions, self.config.head_dim, self.config.rope_theta)

        key_valid = cache.valid[:, :end] if cache is not None else valid
        mask = None
        if key_valid is not None and not bool(key_valid.all()):
            slots = torch.arange(end, device=tokens.device)
            query_slots = slots[start:].unsqueeze(1)
            causal = slots.unsqueeze(0) <= query_slots  # [T, S]
            # A padding query may see itself, so no row is fully masked (that would make NaNs in the cache).
            mask = causal & (key_valid.unsqueeze(1) | (slots.unsqueeze(0) == query_slots))
            mask = mask.unsqueeze(1)  # [B, 1, T, S]
        elif cache is not None and T > 1 and start > 0:
            slots = torch.arange(end, device=tokens.device)
            mask = slots.unsqueeze(0) <= slots[start:].unsqueeze(1)

        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            layer_cache = (cache.k[i], cache.v[i]) if cache is not None else None
            if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, mask, None, start, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, layer_cache, start)
        if cache is not None:
            cache.length = end
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    def _forward_segments(self, tokens: Tensor, segments: Tensor, positions: Tensor | None,
                          last_only: bool) -> Tensor:
        T = tokens.shape[1]
        idx = torch.arange(T, device=tokens.device)
        if positions is None:
            # A segment starts where the id changes; a token's position is its distance from that start.
            starts = torch.ones_like(segments, dtype=torch.bool)
            starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
            positions = idx - torch.cummax(torch.where(starts, idx, 0), dim=1).values
        cos, sin = rope_angles(positions, self.config.head_dim, self.config.rope_theta)
        same = segments.unsqueeze(2) == segments.unsqueeze(1)  # [B, T, T]
        mask = (same & (idx.unsqueeze(0) <= idx.unsqueeze(1))).unsqueeze(1)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, mask, None, 0, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, None, 0)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()
