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


@dataclass
class KVCache:
    """Preallocated keys/values for a batch; slot ``j`` of every sequence holds the j-th token fed to it.

    ``valid[b, j]`` is False for padding slots (left-padded prompts), which no real token may attend to."""

    k: Tensor  # [n_layers, B, n_kv_heads, S, head_dim]
    v: Tensor
    valid: Tensor  # [B, S] bool
    length: int = 0

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, size: int, *, device=None,
                 dtype: torch.dtype = torch.float32) -> "KVCache":
        shape = (config.n_layers, batch, config.n_kv_heads, size, config.head_dim)
        return cls(k=torch.zeros(shape, device=device, dtype=dtype),
                   v=torch.zeros(shape, device=device, dtype=dtype),
                   valid=torch.ones(batch, size, device=device, dtype=torch.bool))

    @property
    def size(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
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
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1 and start == 0,
            enable_gqa=self.n_kv_heads != self.n_heads)
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
