"""LoRA adapters (training/lora.py): freezing, exact identity at init, merge parity, int8/int4 bases, export."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codellama.checkpoint import load_model, save_checkpoint
from codellama.errors import CodeLlamaError
from codellama.quantize import Int4Linear, Int8Linear, quantize_model, set_kernels
from codellama.training.lora import (
    LoRALinear,
    apply_lora,
    has_lora,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
    trainable_report,
    trainable_report_line,
)

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _batch(vocab: int, batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)


def _loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _train(model: nn.Module, tokens: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = _loss(model, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_wraps_every_target_and_freezes_the_rest(tiny_model):
    model = apply_lora(tiny_model, TARGETS, rank=4, alpha=8.0)
    for block in model.layers:
        for name in ("wq", "wk", "wv", "wo"):
            assert isinstance(getattr(block.attention, name), LoRALinear)
        for name in ("w1", "w2", "w3"):
            assert isinstance(getattr(block.feed_forward, name), LoRALinear)
    assert type(model.output) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * 7 * model.config.n_layers
    layer = model.layers[0].attention.wq
    assert layer.scaling == 2.0 and torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A)


def test_only_adapters_receive_gradients(tiny_model):
    model = apply_lora(tiny_model, ("wq", "wv", "w2"), rank=4, alpha=16.0, dropout=0.1).train()
    _loss(model, _batch(model.config.vocab_size)).backward()
    for name, p in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # B starts at zero, so its gradient is what moves first; it must be nonzero everywhere it is used.
    assert all(torch.count_nonzero(block.attention.wq.lora_B.grad) for block in model.layers)


def test_logits_identical_at_init(tiny_model):
    tokens = _batch(tiny_model.config.vocab_size)
    with torch.no_grad():
        want = tiny_model(tokens)
        got = apply_lora(copy.deepcopy(tiny_model), TARGETS, rank=8, alpha=32.0).eval()(tokens)
    assert torch.equal(got, want)


def test_merged_equals_unmerged_after_training(tiny_model):
    torch.manual_seed(0)
    model = apply_lora(tiny_model, TARGETS, rank=4, alpha=16.0)
    tokens = _batch(model.config.vocab_size)
    _train(model, tokens, steps=5)
    model.eval()
    with torch.no_grad():
        unmerged = model(tokens)
        adapters = lora_state_dict(model)
        merged = merge_lora(model)
        assert not has_lora(merged)
        assert all(type(b.attention.wq) is nn.Linear for b in merged.layers)
        got = merged(tokens)
    assert adapters and all(k.endswith((".lora_A", ".lora_B")) for k in adapters)
    assert any(torch.count_nonzero(v) for k, v in adapters.items() if k.endswith("lora_B"))
    assert (got - unmerged).abs().max().item() <= 1e-5
    # Back to the plain Transformer's parameter names: what checkpoints expect.
    assert set(merged.state_dict()) == set(type(merged)(merged.config).state_dict())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_over_quantized_base_trains(tiny_model, mode):
    model = quantize_model(copy.deepcopy(tiny_model), mode, group_size=32)
    base_cls = Int8Linear if mode == "int8" else Int4Linear
    assert isinstance(model.layers[0].attention.wq, base_cls)
    torch.manual_seed(0)
    apply_lora(model, TARGETS, rank=8, alpha=16.0)
    trainable, total = trainable_report(model)
    assert 0 < trainable < total and "trainable parameters" in trainable_report_line(model)
    tokens = _batch(model.config.vocab_size, length=24)
    losses = _train(model, tokens, steps=30)
    assert losses[-1] < losses[0] - 0.5, losses
    # Merging dequantizes: float32 weights that reproduce the adapted quantized model. Compared on the
    # float32 dequantizing path; the packed kernels would add their bfloat16 activation rounding.
    model.eval()
    set_kernels(False)
    try:
        with torch.no_grad():
            unmerged = model(tokens)
            merged = merge_lora(model)
            assert merged.layers[0].attention.wq.weight.dtype == torch.float32
            assert (merged(tokens) - unmerged).abs().max().item() <= 1e-5
    finally:
        set_kernels(True)


def test_merged_checkpoint_reloads_with_identical_logits(tiny_model, tmp_path):
    torch.manual_seed(0)
    model = apply_lora(tiny_model, TARGETS, rank=4, alpha=8.0)
    tokens = _batch(model.config.vocab_size)
    _train(model, tokens, steps=3)
    merged = merge_lora(model).eval()
    out = save_checkpoint(merged, tmp_path / "merged")
    reloaded = load_model(out)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens), merged(tokens))


def test_trainable_report_counts(tiny_model):
    total_before = sum(p.numel() for p in tiny_model.parameters())
    model = apply_lora(tiny_model, ("wq",), rank=2)
    trainable, total = trainable_report(model)
    cfg = model.config
    wq = model.layers[0].attention.wq
    assert trainable == cfg.n_layers * 2 * (wq.in_features + wq.out_features)
    assert total == total_before + trainable


def test_refusals(tiny_model):
    with pytest.raises(CodeLlamaError, match="unknown LoRA target 'output'"):
        apply_lora(copy.deepcopy(tiny_model), ("wq", "output"), rank=4)
    with pytest.raises(CodeLlamaError, match="rank"):
        apply_lora(copy.deepcopy(tiny_model), TARGETS, rank=0)
    with pytest.raises(CodeLlamaError, match="dropout"):
        apply_lora(copy.deepcopy(tiny_model), TARGETS, rank=4, dropout=1.0)
    with pytest.raises(CodeLlamaError, match="at least one"):
        apply_lora(copy.deepcopy(tiny_model), (), rank=4)
    model = apply_lora(tiny_model, TARGETS, rank=4)
    with pytest.raises(CodeLlamaError, match="already has LoRA"):
        apply_lora(model, TARGETS, rank=4)


# ---- the trainer with lora_rank > 0 ---------------------------------------------------------------------
def test_recipe_lora_keys_are_validated(base):
    from dataclasses import replace

    from codellama.training.lora import DEFAULT_TARGETS
    from codellama.training.recipe import LORA_TARGETS
    assert LORA_TARGETS == DEFAULT_TARGETS and base.lora_rank == 0 and base.lora_targets == list(LORA_TARGETS)
    for bad, match in [({"lora_rank": -1}, "lora_rank"), ({"lora_alpha": 0}, "lora_alpha"),
                       ({"lora_dropout": 1.0}, "lora_dropout"), ({"lora_targets": ["wq", "output"]}, "lora_targets"),
                       ({"lora_targets": ["wq", "wq"]}, "lora_targets"), ({"lora_targets": []}, "lora_targets"),
                       ({"lora_rank": 2.5}, "lora_rank")]:
        with pytest.raises(CodeLlamaError, match=match):
            replace(base, **bad)


def test_trainer_with_lora_trains_only_adapters_and_exports_merged(base):
    from dataclasses import replace
    from pathlib import Path

    from codellama.training.checkpointing import load_run_checkpoint
    from codellama.training.init_model import initial_model
    from codellama.training.trainer import model_from_run, read_log, train

    config = replace(base, out_dir=base.out_dir + "-lora", max_steps=6, eval_interval=6, ckpt_interval=6,
                     lora_rank=4, lora_alpha=8.0, lora_targets=["wq", "wv", "w2"])
    messages: list[str] = []
    summary = train(config, log=messages.append)
    assert any("trainable parameters" in m for m in messages)
    assert 0 < summary["trainable_params"] < summary["params"]
    assert len(read_log(config.out_dir)) == 6
    # The same initial base the trainer built (seeded by the recipe), against the checkpoint's tensors.
    # (initial_model without LoRA: the recipe's base as the trainer seeds it.)
    plain = replace(config, lora_rank=0)
    initial = initial_model(plain, 384, Path(config.data_dir) / "tokenizer.model", None).state_dict()
    state = load_run_checkpoint(config.out_dir)["model"]
    adapters = {k for k in state if k.endswith((".lora_A", ".lora_B"))}
    assert len(adapters) == 2 * 3 * config.n_layers
    for key, value in state.items():
        if key in adapters:
            continue
        assert torch.equal(value, initial[key.replace(".base.", ".")]), key  # frozen: unchanged
    assert all(torch.count_nonzero(state[k]) for k in adapters if k.endswith("lora_B"))  # B left zero: trained
    # The export and model_from_run are the merged model, and the merge changed the targeted weights only.
    exported = load_model(Path(summary["export"]), device="cpu", dtype=torch.float32)
    merged = model_from_run(config.out_dir)
    assert set(exported.state_dict()) == set(initial)
    x = torch.randint(0, 384, (1, 16))
    with torch.no_grad():
        assert torch.equal(exported(x), merged(x))
    changed = {k for k, v in exported.state_dict().items() if not torch.equal(v, initial[k])}
    assert changed == {f"layers.{i}.{m}.weight" for i in range(config.n_layers)
                       for m in ("attention.wq", "attention.wv", "feed_forward.w2")}


def test_trainer_lora_resume_is_exact(base):
    from dataclasses import replace

    from codellama.training.trainer import read_log, train

    def curve(out_dir: str) -> list[tuple]:
        return [(r["step"], r["loss"], r.get("val_loss")) for r in read_log(out_dir)]

    lora = {"max_steps": 8, "eval_interval": 4, "ckpt_interval": 2, "lora_rank": 4, "lora_dropout": 0.1}
    full = replace(base, out_dir=base.out_dir + "-lora-full", **lora)
    train(full, log=lambda _m: None)
    split = replace(base, out_dir=base.out_dir + "-lora-split", **lora)
    train(split, until_step=3, log=lambda _m: None)
    train(split, resume=True, log=lambda _m: None)
    assert curve(split.out_dir) == curve(full.out_dir) and len(curve(full.out_dir)) == 8


def test_adapters_alone_round_trip(tiny_model):
    from codellama.training.lora import load_lora_state_dict
    torch.manual_seed(0)
    trained = apply_lora(copy.deepcopy(tiny_model), ("wq", "w1"), rank=4)
    tokens = _batch(trained.config.vocab_size)
    _train(trained, tokens, steps=3)
    adapters = lora_state_dict(trained)
    torch.manual_seed(1)  # a different random A: loading must overwrite it
    fresh = load_lora_state_dict(apply_lora(copy.deepcopy(tiny_model), ("wq", "w1"), rank=4), adapters)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(tokens), trained.eval()(tokens))
    with pytest.raises(CodeLlamaError, match="another rank"):
        load_lora_state_dict(apply_lora(copy.deepcopy(tiny_model), ("wq", "w1"), rank=2), adapters)
    with pytest.raises(CodeLlamaError, match="do not match"):
        load_lora_state_dict(apply_lora(copy.deepcopy(tiny_model), ("wq",), rank=4), adapters)


def test_bf16_base(tiny_model):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    tokens = _batch(model.config.vocab_size)
    with torch.no_grad():
        want = model(tokens)
    apply_lora(model, TARGETS, rank=4)
    assert model.layers[0].attention.wq.lora_A.dtype == torch.float32  # adapters keep float32 master weights
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens), want)
    losses = _train(model, tokens, steps=10)
    assert losses[-1] < losses[0]
    merged = merge_lora(model)
    assert merged.layers[0].attention.wq.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("base_dtype", ["bf16", "int8", "int4"])
def test_trainer_qlora_base_dtypes_train_and_export(base, base_dtype):
    """QLoRA-style: the frozen base held in bf16 / int8 / int4 inside the trainer; adapters train, the loss falls,
    resume is exact, and the merged export reloads with model_from_run's logits."""
    from dataclasses import replace
    from pathlib import Path

    import math

    from codellama.checkpoint import load_model
    from codellama.quantize import QuantLinear
    from codellama.training.init_model import initial_model
    from codellama.training.trainer import model_from_run, read_log, train

    config = replace(base, out_dir=f"{base.out_dir}-q{base_dtype}", max_steps=12, eval_interval=12,
                     ckpt_interval=6, lora_rank=16, lora_alpha=32.0, lr=5e-2, base_dtype=base_dtype)
    built = initial_model(config, 384, Path(config.data_dir) / "tokenizer.model", None)
    layer = built.layers[0].attention.wq.base
    if base_dtype == "bf16":
        assert layer.weight.dtype == torch.bfloat16
    else:
        assert isinstance(layer, QuantLinear) and not list(layer.parameters())
    train(config, until_step=6)
    summary = train(config, resume=True)
    log = read_log(config.out_dir)
    assert [r["step"] for r in log] == list(range(1, 13))
    # A random base whose embedding and head stay frozen: the adapters move the loss slowly, but surely.
    assert sum(r["loss"] for r in log[-3:]) / 3 < sum(r["loss"] for r in log[:3]) / 3 - 0.01
    assert summary["final_val_loss"] < math.log(384) - 0.02
    uninterrupted = replace(config, out_dir=config.out_dir + "-whole")
    train(uninterrupted)
    assert [r["loss"] for r in read_log(uninterrupted.out_dir)] == [r["loss"] for r in log]
    exported = load_model(Path(summary["export"]), device="cpu", dtype=torch.float32)
    x = torch.randint(0, 384, (1, 16))
    with torch.no_grad():
        assert torch.equal(exported(x), model_from_run(config.out_dir)(x))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_base_backward_saves_no_weight_copy(mode):
    """The input gradient through a frozen quantized layer equals plain autograd through its dequantized
    weight, and nothing weight-sized is kept for backward (the QLoRA memory saving)."""
    from codellama.quantize import quantize_weight
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    layer = quantize_weight(w, mode, group_size=32)
    x = torch.randn(5, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert not any(t.numel() >= w.numel() for t in saved)
    g = torch.randn_like(y)
    y.backward(g)
    reference = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(reference, layer.dequantize(torch.float32)).backward(g)
    assert torch.allclose(y, torch.nn.functional.linear(x.detach(), layer.dequantize(torch.float32)), atol=1e-4)
    assert torch.allclose(x.grad, reference.grad, atol=1e-4)
