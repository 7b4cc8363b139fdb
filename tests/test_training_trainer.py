"""The trainer on a seconds-long run: the loss falls, schedule, resume is exact, LCFT changes θ, recipes, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from codellama.checkpoint import load_model
from codellama.cli import main
from codellama.errors import CodeLlamaError
from codellama.training.trainer import (RECIPES_DIR, load_recipe, lr_at, make_optimizer,
                                        model_from_run, read_log, train)

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def quiet(_msg: str) -> None:
    pass


def test_tiny_run_lowers_the_loss(base):
    config = replace(base, out_dir=base.out_dir + "-lower", max_steps=40, eval_interval=20)
    summary = train(config, log=quiet)
    log = read_log(config.out_dir)
    assert [r["step"] for r in log] == list(range(1, 41))
    first, last = log[0]["loss"], summary["final_train_loss"]
    assert first > math.log(384) - 0.5  # starts near uniform over the vocabulary
    assert last < first - 1.0
    assert summary["final_val_loss"] < log[19]["val_loss"] < math.log(384)
    assert summary["tokens_seen"] == 40 * 8 * 32
    # The export is a loadable checkpoint with the trained weights.
    model = load_model(Path(config.out_dir) / "final", device="cpu", dtype=torch.float32)
    trained = model_from_run(config.out_dir)
    x = torch.randint(0, 384, (1, 16))
    assert torch.equal(model(x), trained(x))
    assert model.config.rope_theta == 10_000.0
    assert json.loads((Path(config.out_dir) / "summary.json").read_text())["step"] == 40


def test_schedule_and_weight_decay_groups(base):
    config = replace(base, lr=1e-3, warmup_steps=10, max_steps=110)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(60, config) == pytest.approx((1e-3 + 1e-3 / 30) / 2)
    assert lr_at(110, config) == pytest.approx(1e-3 / 30)  # final LR = peak / 30
    from codellama.config import ModelConfig
    from codellama.model import Transformer
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64, multiple_of=16))
    decay, no_decay = make_optimizer(model, config).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(model.tok_embeddings.weight), id(model.norm.weight),
                                                  id(model.layers[0].attention_norm.weight),
                                                  id(model.layers[0].ffn_norm.weight)}
    assert decay["betas"] == (0.9, 0.95)


def test_bf16_mixed_precision_trains_and_auto_follows_the_hardware(base, monkeypatch):
    from codellama.training import trainer as trainer_module
    config = replace(base, out_dir=base.out_dir + "-bf16", precision="bf16", max_steps=24, eval_interval=12)
    summary = train(config, log=quiet)
    log = read_log(config.out_dir)
    assert summary["precision"] == "bf16"
    assert log[-1]["loss"] < log[0]["loss"] - 0.8
    # Weights stay float32 (autocast is mixed precision); the export loads like any checkpoint.
    trained = model_from_run(config.out_dir)
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    fp32 = train(replace(config, out_dir=base.out_dir + "-fp32", precision="fp32"), log=quiet)
    assert fp32["precision"] == "fp32"
    assert abs(fp32["final_train_loss"] - summary["final_train_loss"]) < 0.3  # same run, rounding apart
    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: False)
    assert trainer_module.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: True)
    assert trainer_module.resolve_precision("auto", cpu) == "bf16"
    assert trainer_module.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(CodeLlamaError, match="precision must be"):
        replace(base, precision="fp16")


def test_kill_and_resume_gives_the_same_curve(base):
    whole = replace(base, out_dir=base.out_dir + "-whole")
    train(whole, log=quiet)
    reference = read_log(whole.out_dir)

    broken = replace(base, out_dir=base.out_dir + "-broken")
    train(broken, until_step=4, log=quiet)  # checkpoint at step 4
    saved = (Path(broken.out_dir) / "ckpt.pt").read_bytes()
    train(broken, resume=True, until_step=7, log=quiet)  # runs on to 7 (log has 5..7) ...
    (Path(broken.out_dir) / "ckpt.pt").write_bytes(saved)  # ... and is killed before its next checkpoint
    summary = train(broken, resume=True, log=quiet)
    resumed = read_log(broken.out_dir)
    assert [r["step"] for r in resumed] == list(range(1, 17))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in reference]
    assert summary["step"] == 16
    a, b = model_from_run(whole.out_dir), model_from_run(broken.out_dir)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_refuses_a_changed_recipe(base):
    config = replace(base, out_dir=base.out_dir + "-changed")
    train(config, until_step=4, log=quiet)
    with pytest.raises(CodeLlamaError, match="recipe changed.*lr"):
        train(replace(config, lr=1e-2), resume=True, log=quiet)


def test_lcft_changes_theta_and_length_and_loads_back(base):
    pre = replace(base, out_dir=base.out_dir + "-pre", max_steps=8)
    train(pre, log=quiet)
    lcft = replace(base, name="lcft", out_dir=base.out_dir + "-lcft", init_from=pre.out_dir,
                   rope_theta=1_000_000.0, seq_len=4 * base.seq_len, lr=1e-3, warmup_steps=1, max_steps=3,
                   eval_interval=3)
    # Before any step the LCFT model is the pretrained one with only θ changed.
    start = model_from_run(pre.out_dir, rope_theta=1_000_000.0)
    train(lcft, until_step=0, log=quiet)
    assert all(torch.equal(p, q) for p, q in zip(start.state_dict().values(),
                                                 model_from_run(lcft.out_dir).state_dict().values()))
    summary = train(lcft, resume=True, log=quiet)
    assert summary["rope_theta"] == 1_000_000.0 and summary["seq_len"] == 128
    final = Path(lcft.out_dir) / "final"
    params = json.loads((final / "params.json").read_text())
    assert params["rope_theta"] == 1_000_000.0
    loaded = load_model(final, device="cpu", dtype=torch.float32)
    assert loaded.config.rope_theta == 1_000_000.0
    x = torch.randint(0, 384, (1, 100))
    assert torch.equal(loaded(x), model_from_run(lcft.out_dir)(x))
    assert not torch.allclose(loaded(x), model_from_run(pre.out_dir)(x))


def test_bundled_recipes_load_and_match_the_repository():
    for name in ("tiny-pretrain", "tiny-pretrain-wide", "tiny-lcft"):
        config = load_recipe(name)
        assert config.name == name
        if REPO_RECIPES.is_dir():
            assert (RECIPES_DIR / f"{name}.toml").read_text() == (REPO_RECIPES / f"{name}.toml").read_text()
    pre, wide, lcft = load_recipe("tiny-pretrain"), load_recipe("tiny-pretrain-wide"), load_recipe("tiny-lcft")
    # The cascade: each stage continues the previous one's run, with the first stage's tokenizer throughout.
    assert wide.init_from == pre.out_dir and wide.tokenizer == f"{pre.out_dir}/tokenizer.model"
    assert wide.corpus[0] == "stdlib" and all(root.startswith("package:") for root in wide.corpus[1:])
    pinned = [line for line in (RECIPES_DIR / "tiny-pretrain-wide-corpus.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    assert len(pinned) == len(wide.corpus) - 1 and all("==" in line for line in pinned)  # one pin per package
    # (wide keeps the checkpoint's θ: rope_theta 0; LCFT raises it.)
    assert (pre.rope_theta, wide.rope_theta, lcft.rope_theta) == (10_000.0, 0.0, 1_000_000.0)
    assert lcft.seq_len == 4 * pre.seq_len == 4 * wide.seq_len
    assert lcft.init_from == wide.out_dir and lcft.data_config() == wide.data_config()  # one prepared data set
    assert (pre.fim_rate, pre.fim_spm_rate, pre.beta1, pre.beta2, pre.weight_decay, pre.grad_clip) == \
        (0.9, 0.5, 0.9, 0.95, 0.1, 1.0)


def test_recipe_base_supplies_keys_the_recipe_does_not_set(tmp_path):
    (tmp_path / "first.toml").write_text('name = "first"\n[data]\ncorpus = ["a", "b"]\nseq_len = 64\n'
                                         '[optim]\nlr = 1e-3\nmax_steps = 7\n')
    (tmp_path / "second.toml").write_text('base = "first.toml"\nname = "second"\n[optim]\nlr = 2e-4\n')
    (tmp_path / "third.toml").write_text(f'base = "{tmp_path / "second.toml"}"\nname = "third"\nseq_len = 256\n')
    third = load_recipe(tmp_path / "third.toml")
    assert (third.name, third.corpus, third.seq_len, third.lr, third.max_steps) == ("third", ["a", "b"], 256, 2e-4, 7)
    assert third.data_dir == "runs/data/third"  # derived defaults follow the recipe's own name
    assert load_recipe(tmp_path / "second.toml", lr=0.5).lr == 0.5
    (tmp_path / "loop.toml").write_text('base = "loop.toml"\nname = "loop"\n')
    with pytest.raises(CodeLlamaError, match="nest more than 8 deep"):
        load_recipe(tmp_path / "loop.toml")
    (tmp_path / "orphan.toml").write_text('base = "missing-recipe"\n')
    with pytest.raises(CodeLlamaError, match="recipe not found: missing-recipe"):
        load_recipe(tmp_path / "orphan.toml")


def test_bad_recipes_are_user_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[optim]\nlearning_rate = 1\n')
    with pytest.raises(CodeLlamaError, match="unknown recipe keys: learning_rate"):
        load_recipe(bad)
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipe not found") and "Traceback" not in err
    bad.write_text("name = \n")
    assert main(["train", str(bad)]) == 2
    assert "invalid TOML" in capsys.readouterr().err


def test_cli_train_and_resume(base, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'name = "cli"\nout_dir = "{tmp_path / "cli"}"\n[data]\ndata_dir = "{base.data_dir}"\n'
        f'corpus = ["{base.corpus[0]}"]\nvocab_size = 384\nseq_len = 32\ndoc_chars = 200\n'
        '[model]\ndim = 32\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\n'
        '[optim]\nbatch_size = 8\nlr = 5e-3\nwarmup_steps = 3\nmax_steps = 6\n'
        '[run]\neval_interval = 6\neval_batches = 2\nckpt_interval = 2\nlog_interval = 1\nnum_threads = 1\nseed = 3\n')
    assert main(["train", str(recipe), "--no-progress", "--until-step", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    assert main(["train", str(recipe), "--no-progress", "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 6 and Path(summary["export"]).joinpath("model.safetensors").is_file()


def test_activation_checkpointing_gives_the_same_losses(base):
    plain = replace(base, out_dir=base.out_dir + "-noac", max_steps=6, eval_interval=6, ckpt_interval=6)
    ac = replace(plain, out_dir=base.out_dir + "-ac", activation_checkpointing=True)
    train(plain, log=quiet)
    train(ac, log=quiet)
    a, b = [r["loss"] for r in read_log(plain.out_dir)], [r["loss"] for r in read_log(ac.out_dir)]
    assert len(a) == 6 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5


def test_fine_tuning_starts_from_a_gguf_file_with_its_tokenizer(base, tmp_path):
    pytest.importorskip("gguf")
    from codellama.checkpoint import convert
    from codellama.tokenizer import Tokenizer
    pre = replace(base, out_dir=base.out_dir + "-gguf-src", max_steps=30, eval_interval=30, ckpt_interval=30)
    summary = train(pre, log=quiet)
    gguf = convert(summary["export"], tmp_path / "start.gguf", to="gguf", outtype="f32")
    tuned = replace(base, out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), init_from=str(gguf),
                    max_steps=4, eval_interval=4, ckpt_interval=4)
    after = train(tuned, log=quiet)
    # The data was tokenised with the tokenizer rebuilt from the GGUF metadata: the source run's pieces.
    rebuilt = Tokenizer(Path(tuned.data_dir) / "tokenizer.model")
    original = Tokenizer(Path(pre.out_dir) / "tokenizer.model")
    assert rebuilt.n_words == original.n_words and all(
        rebuilt.id_to_piece(i) == original.id_to_piece(i) for i in range(original.n_words))
    first = read_log(tuned.out_dir)[0]["loss"]
    assert first < math.log(384) - 0.5  # it continues the trained weights, not a fresh model
    assert after["step"] == 4 and (Path(after["export"]) / "model.safetensors").is_file()
