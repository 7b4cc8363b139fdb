"""The decoder itself: RoPE as Meta computes it, GQA, the KV-cache path against the full forward, padding,
and low-precision dtypes."""

from __future__ import annotations

import pytest
import torch

from codellama.config import ModelConfig
from codellama.model import KVCache, Transformer, apply_rope, rope_angles


def test_rope_matches_metas_complex_formulation():
    """Meta rotates (x[2i], x[2i+1]) as the complex number x[2i] + i x[2i+1] by e^{i p θ^(-2i/d)}."""
    torch.manual_seed(0)
    B, T, H, D, theta = 2, 7, 3, 16, 1_000_000.0
    x = torch.randn(B, T, H, D)
    positions = torch.arange(T).expand(B, T) + torch.tensor([[0], [5]])
    cos, sin = rope_angles(positions, D, theta)
    ours = apply_rope(x, cos, sin)

    freqs = 1.0 / theta ** (torch.arange(0, D, 2)[: D // 2].double() / D)
    angles = positions.double()[..., None] * freqs  # [B, T, D/2]
    rotation = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]
    reference = torch.view_as_real(torch.view_as_complex(x.double().reshape(B, T, H, D // 2, 2)) * rotation)
    assert torch.allclose(ours.double(), reference.reshape(B, T, H, D), atol=1e-5)
    # Relative positions only: shifting every position leaves q·k unchanged.
    q, k = x[:1, :, :1], x[1:, :, :1]
    c0, s0 = rope_angles(torch.arange(T)[None], D, theta)
    c9, s9 = rope_angles(torch.arange(T)[None] + 9, D, theta)
    dots0 = (apply_rope(q, c0, s0) * apply_rope(k, c0, s0)).sum(-1)
    dots9 = (apply_rope(q, c9, s9) * apply_rope(k, c9, s9)).sum(-1)
    assert torch.allclose(dots0, dots9, atol=1e-4)


def test_shapes_parameter_count_and_ffn(tiny_model, tiny_config):
    assert tiny_config.ffn_hidden == 224  # int(1.3 * int(8 * 64 / 3)) = 221, rounded up to a multiple of 32
    assert tiny_model.layers[0].feed_forward.w1.weight.shape == (224, 64)
    assert tiny_model.layers[0].attention.wk.weight.shape == (32, 64)  # 2 kv heads x head_dim 16
    assert sum(p.numel() for p in tiny_model.parameters()) == tiny_config.num_params()
    assert not any(name.endswith("bias") for name, _ in tiny_model.named_parameters())
    tokens = torch.randint(0, 512, (3, 11))
    logits = tiny_model(tokens)
    assert logits.shape == (3, 11, 512) and logits.dtype == torch.float32


def test_gqa_equals_attention_with_repeated_kv_heads(tiny_model, tiny_config):
    """Grouped-query attention must equal full multi-head attention with each kv head repeated."""
    full_config = ModelConfig(**{**tiny_config._fields(), "n_kv_heads": tiny_config.n_heads})
    full = Transformer(full_config).eval()
    state = tiny_model.state_dict()
    repeat = tiny_config.n_heads // tiny_config.n_kv_heads
    hd = tiny_config.head_dim
    for name in list(state):
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            heads = state[name].view(tiny_config.n_kv_heads, hd, -1)
            state[name] = heads.repeat_interleave(repeat, dim=0).reshape(tiny_config.n_heads * hd, -1)
    full.load_state_dict(state)
    tokens = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.allclose(tiny_model(tokens), full(tokens), atol=1e-5)


def test_causality(tiny_model):
    tokens = torch.randint(0, 512, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 512
    with torch.no_grad():
        a, b = tiny_model(tokens), tiny_model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


@torch.no_grad()
def test_kv_cache_prefill_and_decode_equal_the_full_forward(tiny_model, tiny_config):
    torch.manual_seed(1)
    tokens = torch.randint(0, 512, (2, 24))
    full = tiny_model(tokens)
    cache = KVCache.allocate(tiny_config, batch=2, size=32)
    pieces = [tiny_model(tokens[:, :9], cache=cache),  # prefill
              tiny_model(tokens[:, 9:15], cache=cache)]  # a second prefill chunk attends to the first
    pieces += [tiny_model(tokens[:, t:t + 1], cache=cache) for t in range(15, 24)]  # decode token by token
    cached = torch.cat(pieces, dim=1)
    assert cache.length == 24
    assert (cached - full).abs().max().item() < 1e-5
    last = tiny_model(tokens[:, :24], last_only=True)
    assert last.shape == (2, 1, 512) and torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
    with pytest.raises(ValueError, match="KV cache holds 32 tokens; 33 requested"):
        tiny_model(torch.zeros(2, 9, dtype=torch.long), cache=cache)


@torch.no_grad()
def test_left_padding_does_not_change_real_tokens(tiny_model, tiny_config):
    torch.manual_seed(2)
    short, long = torch.randint(0, 512, (1, 6)), torch.randint(0, 512, (1, 10))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, :4] = False
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    padded = tiny_model(batch, positions=positions, valid=valid)
    assert torch.allclose(padded[0, 4:], tiny_model(short)[0], atol=1e-5)
    assert torch.allclose(padded[1], tiny_model(long)[0], atol=1e-5)
    # The same through the cache, then one decode step.
    cache = KVCache.allocate(tiny_config, batch=2, size=12)
    cache.valid[:, :10] = valid
    tiny_model(batch, positions=positions, cache=cache)
    step = tiny_model(torch.tensor([[7], [7]]), positions=positions[:, -1:] + 1, cache=cache)
    assert torch.allclose(step[0, 0], tiny_model(torch.cat([short, torch.tensor([[7]])], 1))[0, -1], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision_forward(tiny_model, tiny_config, dtype):
    tokens = torch.randint(0, 512, (2, 16))
    reference = tiny_model(tokens)
    model = Transformer(tiny_config).to(dtype)
    model.load_state_dict(tiny_model.state_dict())
    logits = model(tokens)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (logits - reference).abs().max().item() < 0.05 * reference.abs().max().item()
    cache = KVCache.allocate(tiny_config, 2, 16, dtype=dtype)
    cached = torch.cat([model(tokens[:, :10], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache)
                                                                for t in range(10, 16)], 1)
    assert (cached - logits).abs().max().item() < 0.05 * reference.abs().max().item()


def test_built_on_meta_device_uses_no_memory():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name("CodeLlama-7b"))
    assert model.output.weight.is_meta
    assert sum(p.numel() for p in model.parameters()) == 6_738_546_688
