"""Sharded training for real: two processes under torchrun (gloo on CPU) against one process.

FSDP2 gives one process's loss curve for the same global batch, holds half the parameters and optimizer state
per rank, checkpoints with torch.distributed.checkpoint resumable at world size 1 and 2, survives a save killed
at its worst moment, and fine-tunes from an HF checkpoint written by ``transformers``, streamed shard by shard."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from codellama.training.trainer import TrainConfig, read_log, train
from conftest import torchrun  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "codellama-tokenizer.model"


def quiet(_msg: str) -> None:
    pass


def write_recipe(config: TrainConfig, path: Path) -> Path:
    lines = []
    for key, value in asdict(config).items():
        if key in ("out_dir",) or value in ("", None) or key == "sources":
            continue
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def losses(run_dir: str | Path) -> list[float]:
    return [r["loss"] for r in read_log(run_dir)]


@pytest.fixture(scope="module")
def cfg(base) -> TrainConfig:
    return replace(base, max_steps=20, eval_interval=10, ckpt_interval=5, device="cpu")


@pytest.fixture(scope="module")
def one_process(cfg) -> dict:
    config = replace(cfg, out_dir=cfg.out_dir + "-ws1")
    return {"config": config, "summary": train(config, log=quiet)}


@pytest.fixture(scope="module")
def two_processes(cfg, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("fsdp")
    recipe = write_recipe(cfg, work / "recipe.toml")
    out = work / "ws2"
    done = torchrun(["train", str(recipe), "--out-dir", str(out), "--no-progress"], work)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"recipe": recipe, "out": out, "work": work, "summary": json.loads(done.stdout)}


def test_fsdp_two_ranks_follow_one_process_loss_curve(one_process, two_processes):
    one, two = losses(one_process["config"].out_dir), losses(two_processes["out"])
    assert len(one) == len(two) == 20
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5 + 1e-12
    assert one[-1] < one[0] - 0.5  # and it trains
    assert read_log(two_processes["out"])[0]["world_size"] == 2
    assert read_log(one_process["config"].out_dir)[0]["world_size"] == 1
    summary = json.loads((two_processes["out"] / "summary.json").read_text())
    assert summary["world_size"] == 2 and one_process["summary"]["world_size"] == 1
    assert summary["final_val_loss"] == pytest.approx(one_process["summary"]["final_val_loss"], abs=1e-5)


def test_fsdp_rank_holds_half_the_parameters_and_optimizer_state(one_process, two_processes):
    one, two = one_process["summary"], two_processes["summary"]
    whole = one["param_bytes_per_rank"][0] + one["optimizer_bytes_per_rank"][0]
    assert whole > 16 * one["params"] * 0.7  # fp32 weights + two moments ≈ 12 bytes a parameter, measured
    for rank in range(2):
        held = two["param_bytes_per_rank"][rank] + two["optimizer_bytes_per_rank"][rank]
        assert 0.45 < held / whole < 0.55, (rank, held, whole)


def test_fsdp_export_is_an_ordinary_checkpoint(one_process, two_processes):
    from codellama.checkpoint import load_model
    a = load_model(Path(one_process["config"].out_dir) / "final", dtype=torch.float32)
    b = load_model(two_processes["out"] / "final", dtype=torch.float32)
    x = torch.randint(0, 384, (2, 16))
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-4)


def test_distributed_checkpoint_resumes_at_world_size_one_and_two(cfg, one_process, two_processes):
    work = two_processes["work"]
    half = work / "half"
    done = torchrun(["train", str(two_processes["recipe"]), "--out-dir", str(half), "--until-step", "10",
                     "--no-progress"], work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (half / "ckpt.dcp" / "train_state.json").is_file() and not (half / "ckpt.pt").exists()
    shutil.copytree(half, work / "half-copy")
    # World size 2 -> 1: no process group at all, DCP reshards the two ranks' files into one model.
    summary = train(replace(cfg, out_dir=str(half)), resume=True, log=quiet)
    assert summary["step"] == 20 and summary["world_size"] == 1
    reference = losses(one_process["config"].out_dir)
    assert max(abs(a - b) for a, b in zip(losses(half), reference)) <= 1e-5 + 1e-12
    # World size 2 -> 2.
    again = work / "half-copy"
    done = torchrun(["train", str(two_processes["recipe"]), "--out-dir", str(again), "--resume",
                     "--no-progress"], work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed" in done.stderr and "world size 2, now 2" in done.stderr
    assert max(abs(a - b) for a, b in zip(losses(again), reference)) <= 1e-5 + 1e-12


KILL_AT_COMMIT = """
import os, signal, sys
import codellama.training.distributed_checkpoint as dc
from codellama.cli import main

calls = {"n": 0}
real_replace = os.replace

def dying_replace(src, dst):
    # The second save's commit, after latest was moved to previous and before tmp became latest: the worst
    # instant, where only ckpt.prev.dcp holds a whole checkpoint.
    real_replace(src, dst)
    if str(dst).endswith("ckpt.prev.dcp"):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGKILL)

dc.os.replace = dying_replace
sys.exit(main())
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(cfg, one_process, two_processes):
    work = two_processes["work"]
    script = work / "dying.py"
    script.write_text(textwrap.dedent(KILL_AT_COMMIT))
    out = work / "killed"
    done = torchrun(["train", str(two_processes["recipe"]), "--out-dir", str(out), "--no-progress"], work,
                    script=script, retry=False)
    assert done.returncode != 0  # rank 0 was killed during its second save (step 10)
    assert not (out / "ckpt.dcp").exists() and (out / "ckpt.prev.dcp" / "train_state.json").is_file()
    messages: list[str] = []
    summary = train(replace(cfg, out_dir=str(out)), resume=True, log=messages.append)
    assert any("resumed" in m and "at step 5" in m for m in messages), messages
    assert summary["step"] == 20
    reference = losses(one_process["config"].out_dir)
    assert max(abs(a - b) for a, b in zip(losses(out), reference)) <= 1e-5 + 1e-12


def test_a_crafted_distributed_checkpoint_is_refused_without_running_code(cfg, two_processes, tmp_path):
    import pickle

    from codellama.errors import CodeLlamaError
    run = tmp_path / "run"
    shutil.copytree(two_processes["out"], run)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (run / "ckpt.dcp" / ".metadata").write_bytes(pickle.dumps(Evil()))
    (run / "ckpt.prev.dcp" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CodeLlamaError, match="refused global|unreadable distributed checkpoint index"):
        train(replace(cfg, out_dir=str(run)), resume=True, log=quiet)
    assert not marker.exists()


# ---- fine-tuning a checkpoint written by transformers ----------------------------------------------------------
@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    if not REAL_TOKENIZER.is_file():
        pytest.skip("../shared/tokenizers/codellama-tokenizer.model not present")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=32016, hidden_size=64, intermediate_size=172,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, rope_theta=1_000_000.0,
                                         tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf_config)
    out = tmp_path_factory.mktemp("hf") / "tiny-hf"
    model.save_pretrained(out, safe_serialization=True)
    shutil.copyfile(REAL_TOKENIZER, out / "tokenizer.model")  # as a hub repository ships it
    return out


@pytest.fixture(scope="module")
def hf_cfg(cfg, hf_checkpoint, tmp_path_factory) -> TrainConfig:
    work = tmp_path_factory.mktemp("hfruns")
    return replace(cfg, name="hf", out_dir=str(work / "ws1"), data_dir=str(work / "data"), init_from=str(hf_checkpoint),
                   max_steps=10, eval_interval=10, ckpt_interval=10, lr=3e-3, rope_theta=1_000_000.0)


def test_fine_tuning_an_hf_checkpoint_uses_its_tokenizer_lowers_the_loss_and_round_trips(hf_cfg, hf_checkpoint,
                                                                                         tmp_path):
    transformers = pytest.importorskip("transformers")
    from codellama.checkpoint import convert, load_model
    from codellama.tokenizer import Tokenizer
    summary = train(hf_cfg, log=quiet)
    assert Tokenizer(Path(hf_cfg.data_dir) / "tokenizer.model").n_words == 32016  # the checkpoint's own
    log = read_log(hf_cfg.out_dir)
    assert log[-1]["loss"] < log[0]["loss"] - 0.3
    assert log[0]["loss"] == pytest.approx(torch.log(torch.tensor(32016.0)).item(), abs=0.5)
    # Export -> HF with our converter -> transformers: the same logits as our trained model.
    ours = load_model(summary["export"], dtype=torch.float32)
    convert(summary["export"], tmp_path / "back", to="hf")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back", torch_dtype=torch.float32).eval()
    x = torch.randint(0, 32016, (1, 24))
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x).logits, atol=1e-4)


def test_sharded_lora_from_an_hf_checkpoint_streams_shards_and_matches_one_process(hf_cfg, tmp_path):
    lora = replace(hf_cfg, name="hflora", out_dir=str(tmp_path / "lora1"), lora_rank=4, lora_alpha=8.0,
                   max_steps=4, eval_interval=4, ckpt_interval=4)
    train(lora, log=quiet)
    recipe = write_recipe(lora, tmp_path / "lora.toml")
    done = torchrun(["train", str(recipe), "--out-dir", str(tmp_path / "lora2"), "--no-progress"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trainable parameters" in done.stderr
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "lora1"), losses(tmp_path / "lora2"))) <= 1e-5 + 1e-12
