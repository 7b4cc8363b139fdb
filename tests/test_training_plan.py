"""The training memory plan (training/plan.py): exact parameter, adapter and quantized-base counts, the activation
estimate against autograd's saved tensors on a tiny model, check()'s refusals and suggestions, and the CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from codellama.checkpoint import save_checkpoint
from codellama.config import ModelConfig
from codellama.errors import CodeLlamaError
from codellama.model import Transformer
from codellama.quantize import quantization_summary, quantize_model, save_quantized
from codellama.training.lora import DEFAULT_TARGETS, apply_lora, trainable_report
from codellama.training.plan import (GiB, activation_estimate, base_weight_bytes, lora_trainable_params,
                                     memory_plan, weight_copy_bytes)
from codellama.training.recipe import TrainConfig

# The released 7B shape (ModelConfig's defaults are CodeLlama-7b's).
SEVEN_B = dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, vocab_size=32016, seq_len=4096)
SEVEN_B_PARAMS = 6_738_546_688  # Llama 2 7B (6,738,415,616 at vocab 32000) + 16 FIM/infilling rows x 2 x 4096
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=300, seq_len=16, batch_size=3)


def _seven_b(**kw) -> TrainConfig:
    return TrainConfig(**{**SEVEN_B, "precision": "fp32", "device": "cpu", "batch_size": 1, **kw})


def _meta_numel(mc: ModelConfig) -> tuple[int, int, int]:
    """(total, one block, root group) parameter counts of model.py's own model, built on the meta device."""
    with torch.device("meta"):
        model = Transformer(mc)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.layers[0].parameters())
    return total, block, total - mc.n_layers * block


# ---- parameters, gradients, optimizer state ---------------------------------------------------------------
def test_7b_full_finetune_states_are_16_bytes_a_parameter_and_shard():
    one = memory_plan(_seven_b(), world_size=1, device_memory=1000 * GiB)
    total, block, root = _meta_numel(one.model)
    assert one.total_params == total == SEVEN_B_PARAMS
    states = one.parameter_bytes + one.gradient_bytes + one.optimizer_bytes
    assert one.weight_copy_bytes == 0  # float32 compute: the matmuls save the weights themselves
    assert states == 16 * SEVEN_B_PARAMS
    assert abs(states - 108e9) / 108e9 < 0.01  # ~108 GB: the "~110 GB of state"

    eight = memory_plan(_seven_b(), world_size=8, device_memory=1000 * GiB)
    # FSDP2: fp32 master, grads and moments sharded /8; the unsharded root and two blocks (fp32 compute) on top
    assert eight.weight_copy_bytes == 4 * (root + 2 * block)
    assert eight.parameter_bytes - eight.weight_copy_bytes == 4 * SEVEN_B_PARAMS // 8
    assert eight.gradient_bytes == 4 * SEVEN_B_PARAMS // 8
    assert eight.optimizer_bytes == 8 * SEVEN_B_PARAMS // 8
    assert eight.micro_batch == 1 and eight.activation_bytes < one.activation_bytes + 1


def test_world_size_defaults_to_torchrun_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert memory_plan(TrainConfig(**TINY), device="cpu").world_size == 4
    monkeypatch.delenv("WORLD_SIZE")
    assert memory_plan(TrainConfig(**TINY), device="cpu").world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(CodeLlamaError, match="WORLD_SIZE"):
        memory_plan(TrainConfig(**TINY), device="cpu")


# ---- LoRA and quantized bases -----------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [list(DEFAULT_TARGETS), ["wq", "wv"], ["w2"]])
def test_lora_trainable_count_matches_lora_py(targets):
    mc = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=96)
    model = apply_lora(Transformer(mc), targets, rank=5)
    trainable, total = trainable_report(model)
    assert lora_trainable_params(mc, 5, targets) == trainable
    assert total - trainable == mc.num_params()
    plan = memory_plan(TrainConfig(**{**TINY, "dim": 64, "n_layers": 3}, lora_rank=5, lora_targets=targets),
                       device="cpu")
    assert plan.trainable_params == lora_trainable_params(plan.model, 5, targets)


def test_lora_7b_rank_16_all_targets_exact():
    plan = memory_plan(_seven_b(lora_rank=16), world_size=1, device_memory=1000 * GiB)
    # per layer: wq wk wv wo 16*(4096+4096) each; w1 w3 16*(4096+11008); w2 16*(11008+4096)
    per_layer = 4 * 16 * (4096 + 4096) + 3 * 16 * (4096 + 11008)
    assert plan.trainable_params == 32 * per_layer == 39_976_960
    with torch.device("meta"):  # lora.py itself, at the real shape, without allocating a byte
        model = apply_lora(Transformer(plan.model), DEFAULT_TARGETS, rank=16)
    assert trainable_report(model) == (39_976_960, SEVEN_B_PARAMS + 39_976_960)
    assert plan.gradient_bytes == 4 * 39_976_960 and plan.optimizer_bytes == 8 * 39_976_960
    assert plan.parameter_bytes == 4 * SEVEN_B_PARAMS + 4 * 39_976_960  # fp32 base, fp32 adapters, fp32 compute


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_base_bytes_equal_quantize_py(mode):
    # As the trainer holds a QLoRA base (init_model.py): the whole model in bf16, then each block's linears
    # quantized. Hidden 80: w2's rows are not a multiple of the int4 group (32), so quantize.py stores it as int8.
    for hidden in (96, 80):
        mc = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=hidden)
        model = Transformer(mc).to(torch.bfloat16)
        for block in model.layers:
            quantize_model(block, mode)
        assert base_weight_bytes(mc, mode) == sum(t.numel() * t.element_size() for t in model.state_dict().values())
        assert base_weight_bytes(mc, mode) == quantization_summary(model)["weight_bytes"]
    # and at 7B: int4 is 0.5 byte a weight + 4 bytes of bf16 scale and zero per group of 32; the rest bf16
    mc = memory_plan(_seven_b(), device_memory=GiB).model
    rest = 2 * mc.vocab_size * mc.dim + (2 * mc.n_layers + 1) * mc.dim
    linear = mc.num_params() - rest
    assert base_weight_bytes(mc, "int4") == linear // 2 + linear // 8 + 2 * rest


def test_quantized_base_refuses_several_ranks():
    plan = memory_plan(_seven_b(lora_rank=16, base_dtype="int4"), world_size=2, device_memory=1000 * GiB)
    with pytest.raises(CodeLlamaError, match='base_dtype = "int4" holds the quantized base on one device') as e:
        plan.check()
    assert "\n" not in str(e.value) and 'base_dtype = "bf16" with --nproc 2' in str(e.value)


# ---- activations against autograd ----------------------------------------------------------------------------
def _saved_bytes(model: Transformer, batch: int, seq_len: int, bf16: bool, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward + loss (the model's
    own parameters and buffers excluded): what stays alive from the forward into the backward pass."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    if checkpointing:  # per block, as the trainer's switch does; reentrant, so the saved inputs are visible
        for block in model.layers:
            block.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=True))(block.forward)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()  # it runs: what was counted is what backward needed
    return sum(saved.values())


_LORA_CASES = [tuple(DEFAULT_TARGETS), ("wq", "wv"), ("wo", "w2"), ("w1",), ("w3", "w2"), ("w2",)]
# (parameters, autocast, checkpointing, LoRA targets, base): the trainer's set-ups. Full fine-tuning keeps float32
# parameters, with or without bf16 autocast in one process; bf16 parameters without autocast are what FSDP2's
# bf16 policy computes with. A LoRA base other than fp32 puts the whole model in bf16 (init_model.py), int8/int4
# then quantize the block linears. Checkpointing is measured for full fine-tuning: a reentrant checkpoint (whose
# saved inputs the hooks see) cannot start from a frozen embedding's output, and a checkpointed block keeps only
# its input whatever is adapted.
_ACTIVATION_CASES = (
    [(params, autocast, ckpt, None, "fp32") for params, autocast in (("fp32", False), ("fp32", True), ("bf16", False))
     for ckpt in (False, True)]
    + [("fp32", autocast, False, targets, "fp32") for autocast in (False, True) for targets in _LORA_CASES]
    + [("bf16", True, False, targets, base) for base in ("bf16", "int8", "int4")
       for targets in (tuple(DEFAULT_TARGETS), ("wq", "wv"), ("wo", "w2"))])


@pytest.mark.parametrize("params, autocast, checkpointing, lora_targets, base", _ACTIVATION_CASES)
def test_activation_estimate_matches_saved_tensors(params, autocast, checkpointing, lora_targets, base):
    mc = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=96)
    torch.manual_seed(0)
    model = Transformer(mc)
    model.init_weights()
    if params == "bf16":
        model.to(torch.bfloat16)
    if base in ("int8", "int4"):
        for block in model.layers:
            quantize_model(block, base)  # trains through the dequantizing path, whose weight copies count
    lora, rank = lora_targets is not None, 4
    if lora:
        apply_lora(model, lora_targets, rank=rank)
    batch, seq_len = 3, 20
    measured = _saved_bytes(model, batch, seq_len, autocast, checkpointing)
    compute, bf16_params = (2 if autocast or params == "bf16" else 4), params == "bf16"
    estimate = activation_estimate(mc, batch, seq_len, compute, checkpointing, lora_targets, rank,
                                   autocast=autocast, bf16_params=bf16_params)
    if checkpointing:  # at the end of the forward pass only the output projection's copy is held
        copies = 2 * mc.vocab_size * mc.dim if autocast and params == "fp32" else 0
    else:
        copies = weight_copy_bytes(mc, base, lora_targets, rank, 1, False, compute, autocast)
    expected = estimate.saved_bytes + copies
    assert abs(expected - measured) / measured < 0.01, (expected, measured)  # exact to a few bytes today


def test_activation_estimate_7b_orders_of_magnitude():
    plan = memory_plan(_seven_b(precision="bf16", device="cuda"), world_size=8, device_memory=80 * GiB)
    acts = plan.activations
    # FSDP2 computes from bf16 parameters: per token and block, the norms' two float32 inputs, six dim-sized
    # bf16 tensors + k and v, four SwiGLU-sized ones, two rsqrt and 32 log-sum-exps in float32
    assert acts.per_layer_bytes == 4096 * (2 * 4 * 4096 + 2 * (8 * 4096 + 4 * 11008) + 4 * 34)
    assert acts.logits_bytes == 4 * 4096 * 4 * 32016
    ckpt = memory_plan(_seven_b(precision="bf16", device="cuda", activation_checkpointing=True), world_size=8,
                       device_memory=80 * GiB)
    assert ckpt.activation_bytes < plan.activation_bytes / 5


# ---- check() ----------------------------------------------------------------------------------------------
def _replanned(config: TrainConfig, message: str, world_size: int, memory: int):
    """Every suggestion in ``message``, re-planned: (description, plan)."""
    out = []
    if m := re.search(r"--nproc (\d+) fits", message):
        out.append(("ranks", memory_plan(config, world_size=int(m.group(1)), device_memory=memory)))
    if "turn on activation_checkpointing" in message:
        changed = TrainConfig(**{**asdict(config), "activation_checkpointing": True})
        out.append(("ckpt", memory_plan(changed, world_size=world_size, device_memory=memory)))
    if m := re.search(r"batch_size = (\d+) with grad_accum = (\d+)", message):
        changed = TrainConfig(**{**asdict(config), "batch_size": int(m.group(1)), "grad_accum": int(m.group(2))})
        out.append(("batch", memory_plan(changed, world_size=world_size, device_memory=memory)))
    if m := re.search(r'lora_rank = (\d+) with base_dtype = "(\w+)"', message):
        changed = TrainConfig(**{**asdict(config), "lora_rank": int(m.group(1)), "base_dtype": m.group(2)})
        out.append(("lora", memory_plan(changed, world_size=world_size, device_memory=memory)))
    return out


def test_check_refuses_with_suggestions_that_fit():
    config = _seven_b(precision="bf16", device="cuda", batch_size=2)
    plan = memory_plan(config, world_size=1, device_memory=80 * GiB)
    assert not plan.fits and plan.total_bytes > 80 * GiB
    with pytest.raises(CodeLlamaError) as e:
        plan.check()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"memory plan: needs {plan.total_bytes / GiB:.1f} GiB per rank, the cuda device "
                              "has 80.0 GiB: use more ranks (--nproc ")
    suggestions = _replanned(config, message, 1, 80 * GiB)
    assert {kind for kind, _ in suggestions} == {"ranks", "lora"}
    for kind, alternative in suggestions:
        assert alternative.fits, kind
        alternative.check()
        assert f"{alternative.total_bytes / GiB:.1f} GiB" in message
    # the smallest world size that fits is the one suggested
    ranks = int(re.search(r"--nproc (\d+)", message).group(1))
    assert not memory_plan(config, world_size=ranks // 2, device_memory=80 * GiB).fits


def test_check_suggests_checkpointing_and_combinations():
    config = _seven_b(precision="bf16", device="cuda", batch_size=16)
    plan = memory_plan(config, world_size=8, device_memory=40 * GiB)
    expected = (r"--nproc 16 fits: .*, turn on activation_checkpointing \(saves .*, or batch_size = 8 with "
                r"grad_accum = 2 \(the same tokens per step")
    with pytest.raises(CodeLlamaError, match=expected) as e:
        plan.check()
    suggestions = _replanned(config, str(e.value), 8, 40 * GiB)
    assert [kind for kind, _ in suggestions] == ["ranks", "ckpt", "batch"]
    for _, alternative in suggestions:
        assert alternative.fits
    saved = plan.total_bytes - suggestions[1][1].total_bytes
    assert f"saves {saved / GiB:.1f} GiB" in str(e.value)
    # QLoRA 7B on a 24 GiB card: no single change is enough, the combination is named and fits
    qlora = _seven_b(precision="bf16", device="cuda", batch_size=8, lora_rank=16, base_dtype="int4")
    with pytest.raises(CodeLlamaError, match="together they do: activation_checkpointing = true, batch_size = 1 "
                                             "with grad_accum = 8") as e:
        memory_plan(qlora, world_size=1, device_memory=24 * GiB).check()
    fixed = TrainConfig(**{**asdict(qlora), "activation_checkpointing": True, "batch_size": 1, "grad_accum": 8})
    assert memory_plan(fixed, world_size=1, device_memory=24 * GiB).fits
    with pytest.raises(CodeLlamaError, match="use a bigger device or a smaller model"):
        memory_plan(qlora, world_size=1, device_memory=GiB).check()
    one = _seven_b(precision="bf16", device="cuda", batch_size=1)
    with pytest.raises(CodeLlamaError, match="LoRA") as e:
        memory_plan(one, world_size=1, device_memory=80 * GiB).check()
    assert "--nproc" not in str(e.value)  # a batch of one does not split over ranks: the trainer would refuse


def test_plan_that_fits_passes_and_table_names_the_choices():
    plan = memory_plan(TrainConfig(**TINY, precision="fp32"), world_size=2, device="cpu", device_memory=80 * GiB)
    assert plan.fits
    plan.check()
    table = plan.table()
    for text in ("world size 2", "full fine-tuning", "activation checkpointing off", "fp32 compute",
                 "80.0 GiB", "parameters", "gradients", "optimizer state", "activations", "total",
                 "sharded /2", "2 layers, dim 64, vocab 300"):
        assert text in table, text
    assert plan.total_bytes == (plan.parameter_bytes + plan.gradient_bytes + plan.optimizer_bytes
                                + plan.activation_bytes)


def test_device_memory_from_env_and_unknown_cuda(monkeypatch):
    monkeypatch.setenv("CODELLAMA_DEVICE_MEMORY_GB", "24")
    assert memory_plan(TrainConfig(**TINY), device="cpu").device_memory == 24 * GiB
    monkeypatch.setenv("CODELLAMA_DEVICE_MEMORY_GB", "lots")
    with pytest.raises(CodeLlamaError, match="CODELLAMA_DEVICE_MEMORY_GB"):
        memory_plan(TrainConfig(**TINY), device="cpu")
    monkeypatch.delenv("CODELLAMA_DEVICE_MEMORY_GB")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory_plan(TrainConfig(**TINY), device="cpu").device_memory == ram
    # CPU ranks on one machine share its RAM (torchrun's LOCAL_WORLD_SIZE, else all of --nproc)
    assert memory_plan(TrainConfig(**TINY), world_size=3, device="cpu").device_memory == ram // 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert memory_plan(TrainConfig(**TINY), world_size=4, device="cpu").device_memory == ram // 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    import codellama.training.plan as plan_module
    monkeypatch.setattr(plan_module, "_device_total_memory", lambda d: 64 * GiB if d.type == "cpu" else None)
    with pytest.raises(CodeLlamaError, match="the cpu device has") as e:  # 7B: 108 GB of state
        memory_plan(_seven_b(batch_size=8), world_size=1, device="cpu").check()
    assert "--nproc" not in str(e.value)  # more CPU ranks only split the same RAM
    if not torch.cuda.is_available():  # a GPU plan from a CPU machine: bf16 assumed, no size to compare with
        gpu = memory_plan(TrainConfig(**TINY), device="cuda")
        assert gpu.precision == "bf16" and gpu.device_memory is None and gpu.fits
        assert "unknown (set CODELLAMA_DEVICE_MEMORY_GB)" in gpu.table()


# ---- the model shape of init_from, from headers only ------------------------------------------------------
@pytest.fixture(scope="module")
def small_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=32,
                                   max_seq_len=64))


def _init_plan(path) -> ModelConfig:
    config = TrainConfig(**{**TINY, "vocab_size": 300}, init_from=str(path), rope_theta=123.0)
    return memory_plan(config, device="cpu").model


@pytest.mark.parametrize("layout", ["native", "hf", "meta", "quantized", "run", "run-final"])
def test_init_from_reads_the_checkpoint_shape_without_tensors(layout, small_model, tmp_path, monkeypatch):
    expected = small_model.config
    if layout == "quantized":
        save_quantized(quantize_model(Transformer(expected), "int8"), tmp_path / "q")
        path = tmp_path / "q"
    elif layout.startswith("run"):
        path = tmp_path / "run"
        path.mkdir()
        torch.save({"model_config": asdict(expected), "model": small_model.state_dict()}, path / "ckpt.pt")
        if layout == "run-final":
            save_checkpoint(small_model, path / "final", format="native")
            (path / "ckpt.pt").write_bytes(b"damaged")  # the export's headers are read, not the checkpoint
    else:
        path = save_checkpoint(small_model, tmp_path / layout, format=layout)
    import safetensors.torch

    import codellama.checkpoint as checkpoint
    for module, name in ((checkpoint, "read_tensors"), (safetensors.torch, "load_file")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("tensors were read"))
    got = _init_plan(path)
    assert (got.dim, got.n_layers, got.n_heads, got.n_kv_heads, got.vocab_size, got.ffn_hidden) == \
        (64, 2, 4, 2, 320, expected.ffn_hidden)
    # As the trainer sets them: the longer of the checkpoint's context and the recipe's seq_len, the recipe's θ.
    assert got.max_seq_len >= TINY["seq_len"] and got.rope_theta == 123.0


def test_init_from_gguf_and_missing(small_model, tiny_tokenizer_path, tmp_path):
    from codellama.gguf import save_gguf
    from codellama.tokenizer import Tokenizer
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32))
    path = save_gguf(model, Tokenizer(tiny_tokenizer_path), tmp_path / "m.gguf", outtype="f32")
    got = _init_plan(path)
    assert (got.dim, got.n_layers, got.vocab_size) == (64, 2, 512)
    with pytest.raises(CodeLlamaError, match="init_from: .* does not exist"):
        _init_plan(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodeLlamaError, match="init_from: "):
        _init_plan(tmp_path / "empty")


# ---- the CLI ----------------------------------------------------------------------------------------------
def _cli(recipe, *args, env=None):
    return subprocess.run([sys.executable, "-m", "codellama", "train", str(recipe), "--plan", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_cli_plan_prints_the_table_and_refuses_what_cannot_fit(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "plan-test"\ndim = 64\nn_layers = 2\nn_heads = 4\nseq_len = 32\nbatch_size = 8\n'
                      'vocab_size = 300\ndevice = "cpu"\nprecision = "fp32"\n')
    ok = _cli(recipe, "--nproc", "8")
    assert ok.returncode == 0, ok.stderr
    assert "world size 8" in ok.stdout and "micro-batch 1 x 32" in ok.stdout and "fits (" in ok.stdout
    big = _cli(recipe, env={"CODELLAMA_DEVICE_MEMORY_GB": "0.0001"})
    assert big.returncode == 2 and "does NOT fit" in big.stdout
    assert big.stderr.startswith("error: memory plan: needs ") and big.stderr.count("\n") == 1
    assert "Traceback" not in big.stderr
    assert not (tmp_path / "runs").exists() and not os.path.exists("runs/plan-test")  # nothing was started


def test_plan_table_names_model_sizes_readably():
    assert memory_plan(_seven_b(), world_size=1, device_memory=1000 * GiB).table().startswith(
        "memory plan: run (recipe): 6.74B parameters")
    tiny = memory_plan(TrainConfig(**TINY, precision="fp32", device="cpu"), world_size=1, device_memory=GiB)
    assert re.search(r": 0\.\d\dM parameters \(", tiny.table().splitlines()[0]), tiny.table()
