"""What a new user meets on the command line (issue 13, items 3/5/6 CLI side, 7-13): a fast ``--help``, one line
on Ctrl-C, ``--threads``, one escape rule for text options, the penalty flags, loud checks instead of silence,
atomic convert/quantize outputs, and training's early refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
import torch

from codellama.cli import main
from codellama.cli_generate import decode_escapes, default_threads


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


# ---- a fake model: records what the CLI passes to the API ---------------------------------------------------
@dataclass
class _Result:
    text: str = "ok"
    tokens: list[int] = field(default_factory=lambda: [1])
    logprobs: list[float] | None = None
    finish_reason: str = "length"
    prompt_tokens: int = 1


class _Tok:
    step_id = None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [1] * len(text)


class _FakeLlama:
    def __init__(self, name: str = "tiny"):
        self.name, self.tokenizer, self.calls = name, _Tok(), []

    def _record(self, kind, *args, **kwargs):
        self.calls.append((kind, args, kwargs))
        return _Result()

    def complete(self, *a, **k):
        return self._record("complete", *a, **k)

    def infill(self, *a, **k):
        return self._record("infill", *a, **k)

    def chat(self, *a, **k):
        return self._record("chat", *a, **k)


@pytest.fixture
def fake(monkeypatch):
    llama = _FakeLlama()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr("codellama.api.load", lambda *a, **k: llama)
    return llama


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_tokenizer_path):
    from codellama.checkpoint import save_checkpoint
    from codellama.config import ModelConfig
    from codellama.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                                    max_seq_len=256))
    model.init_weights(0.1)
    return save_checkpoint(model, tmp_path_factory.mktemp("ux") / "tiny", tokenizer=tiny_tokenizer_path)


# ---- 9: fast start, Ctrl-C ----------------------------------------------------------------------------------
def test_help_and_version_do_not_import_torch():
    code = ("import sys; from codellama.cli import build_parser; build_parser(); import codellama; "
            "print('torch' in sys.modules, codellama.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.split() == ["False", "0.1.0"], out.stderr
    t0 = time.perf_counter()
    version = subprocess.run([sys.executable, "-m", "codellama", "--version"], capture_output=True, text=True,
                             timeout=60, check=False)
    assert version.returncode == 0 and version.stdout.startswith("codellama ")
    assert time.perf_counter() - t0 < 1.0  # was 1.5 s idle with torch imported up front; now ~0.13 s


def test_ctrl_c_during_import_and_load_is_one_line():
    """SIGINT as soon as the command starts (torch still importing): ``interrupted``, exit 130, no traceback."""
    code = ("import sys; from codellama.cli import main; print('ready', flush=True); "
            "sys.exit(main(['complete', 'def f(x):', '--max-new-tokens', '4']))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "interrupted\n", err


def test_ctrl_c_inside_a_command(capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("codellama.cli_generate.load_for_generation", interrupt)
    previous = signal.getsignal(signal.SIGINT)
    try:
        code, _, err = _run(capsys, "complete", "x")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and err == "interrupted\n"


# ---- 8: threads ---------------------------------------------------------------------------------------------
def test_threads_option_and_default(capsys, fake, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_threads() == 1  # a busy 2-core box: no second thread fighting for the other core
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert default_threads() == 4
    code, _, _ = _run(capsys, "complete", "x", "--threads", "2", "--json")
    assert code == 0 and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    code, _, _ = _run(capsys, "chat", "hi", "--json")
    assert code == 0 and torch.get_num_threads() == default_threads()
    _one_line_error(*_run(capsys, "infill", "--prefix", "a", "--threads", "0")[::2], "--threads")
    for command in (["eval", "humaneval"], ["train", "tiny-pretrain"], ["serve"]):
        assert "--threads" in _run(capsys, *command, "--help")[1]


# ---- 7: one escape rule -------------------------------------------------------------------------------------
def test_escapes_are_decoded_in_every_text_option_unless_raw(capsys, fake):
    assert decode_escapes(r"a\nb\tc\\n\d\"") == 'a\nb\tc\\n\\d"'
    code, _, _ = _run(capsys, "infill", "--prefix", r"def add(a, b):\n    ", "--suffix", r"\n    return c\n",
                      "--stop", r"\n\n", "--json")
    assert code == 0
    _, args, kwargs = fake.calls[-1]
    assert args == ("def add(a, b):\n    ", "\n    return c\n") and kwargs["stop"] == ["\n\n"]
    _run(capsys, "complete", r"x = 1\n", "--raw", "--stop", r"\n", "--json")
    _, args, kwargs = fake.calls[-1]
    assert args == (r"x = 1\n",) and kwargs["stop"] == [r"\n"]
    _run(capsys, "chat", r"one\ntwo", "--system", r"a\tb", "--json")
    _, (messages,), _ = fake.calls[-1]
    assert messages == [{"role": "system", "content": "a\tb"}, {"role": "user", "content": "one\ntwo"}]


# ---- 3/5/6: penalties, over-long prompts, empty prompts -----------------------------------------------------
def test_penalty_flags_reach_the_api(capsys, fake):
    code, _, _ = _run(capsys, "complete", "x", "--repeat-penalty", "1.1", "--presence-penalty", "0.5",
                      "--frequency-penalty", "-0.5", "--repeat-last-n", "-1", "--json")
    assert code == 0
    kwargs = fake.calls[-1][2]
    assert (kwargs["repetition_penalty"], kwargs["presence_penalty"], kwargs["frequency_penalty"],
            kwargs["penalty_last_n"]) == (1.1, 0.5, -0.5, -1)
    assert "shrink_max_new_tokens" not in kwargs  # the API's default: refuse prompt + max_new_tokens > context
    _run(capsys, "chat", "hi", "--repetition-penalty", "1.3", "--shrink-max-new-tokens", "--json")
    kwargs = fake.calls[-1][2]
    assert kwargs["repetition_penalty"] == 1.3 and kwargs["shrink_max_new_tokens"] is True
    _run(capsys, "infill", "--prefix", "a", "--json")
    assert "repetition_penalty" not in fake.calls[-1][2]  # unset flags leave the API's defaults
    n = len(fake.calls)
    _one_line_error(*_run(capsys, "complete", "x", "--presence-penalty", "3")[::2], "presence_penalty")
    _one_line_error(*_run(capsys, "complete", "x", "--repeat-penalty", "0")[::2], "repetition_penalty")
    _one_line_error(*_run(capsys, "complete", "x", "--repeat-last-n", "-2")[::2], "penalty_last_n")
    assert len(fake.calls) == n  # refused before the model was used


@pytest.mark.parametrize("argv,words", [
    (["complete", ""], ["prompt is empty"]),
    (["complete", "x", "--stop", ""], ["--stop", "non-empty"]),
    (["complete", "x", "--logprobs"], ["--logprobs needs --json"]),
    (["serve", "--port", "70000"], ["--port"]),
])
def test_loud_errors(capsys, fake, argv, words):
    _one_line_error(*_run(capsys, *argv)[::2], *words)
    assert fake.calls == []


# ---- 10: non-UTF-8 input ------------------------------------------------------------------------------------
def test_non_utf8_file_is_a_clean_error(capsys, fake, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_bytes(b"def f():\n    <FILL_ME>\n# \xff\xfe\n")
    _one_line_error(*_run(capsys, "infill", "--file", str(bad))[::2], "bad.py", "not UTF-8")


# ---- 12: warnings -------------------------------------------------------------------------------------------
def test_chat_on_a_base_model_warns(capsys, fake):
    code, _, err = _run(capsys, "chat", "hi", "--json")
    assert code == 0 and err.startswith("warning: tiny does not look like an Instruct model")
    fake.name = "CodeLlama-7b-Instruct-hf"
    code, _, err = _run(capsys, "chat", "hi", "--json")
    assert code == 0 and err == ""


def test_max_seq_len_beyond_training_warns_and_serve_context_is_checked(capsys, tiny_ckpt, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code, _, err = _run(capsys, "complete", "x", "--model", str(tiny_ckpt), "--max-seq-len", "512",
                          "--max-new-tokens", "2", "--json")
    assert code == 0 and "warning: --max-seq-len 512 is beyond the model's trained context (256 tokens)" in err
    code, _, err = _run(capsys, "complete", "x", "--model", str(tiny_ckpt), "--max-new-tokens", "2", "--json")
    assert code == 0 and err == ""
    _one_line_error(*_run(capsys, "serve", "--model", str(tiny_ckpt), "--context", "1000")[::2],
                    "--context 1000 exceeds the model's context (256 tokens)")


# ---- 11: convert / quantize outputs -------------------------------------------------------------------------
def test_convert_output_name_must_match_to(capsys, tiny_ckpt, tmp_path):
    _one_line_error(*_run(capsys, "convert", str(tiny_ckpt), str(tmp_path / "out.gguf"), "--to", "hf")[::2],
                    "out.gguf", "--to gguf")
    assert list(tmp_path.iterdir()) == []


def test_failed_conversion_leaves_nothing(capsys, tiny_ckpt, tmp_path, monkeypatch):
    from codellama import checkpoint

    real_save = checkpoint.save_checkpoint

    def save_then_fail(model, out, **kwargs):
        real_save(model, out, **kwargs)  # every file written ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_fail)
    code, _, err = _run(capsys, "convert", str(tiny_ckpt), str(tmp_path / "hf"), "--to", "hf")
    assert code == 1 and "No space left" in err
    assert list(tmp_path.iterdir()) == []  # neither hf/ nor a temporary sibling
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    code, _, _ = _run(capsys, "convert", str(tiny_ckpt), str(tmp_path / "hf"), "--to", "hf")
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_quantize_refuses_a_non_empty_output_and_quantized_to_hf_is_explained(capsys, tiny_ckpt, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "config.json").write_text("{}")
    _one_line_error(*_run(capsys, "quantize", str(tiny_ckpt), str(busy), "--int8")[::2], "not an empty directory")
    assert [p.name for p in busy.iterdir()] == ["config.json"]
    q = tmp_path / "q8"
    code, _, err = _run(capsys, "quantize", str(tiny_ckpt), str(q), "--int8")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "q8"]  # no temporary sibling left
    _one_line_error(*_run(capsys, "convert", str(q), str(tmp_path / "hf"), "--to", "hf")[::2],
                    "quantized checkpoint", "convert the original float checkpoint")
    assert not (tmp_path / "hf").exists()


# ---- 12/10: training refuses early --------------------------------------------------------------------------
def test_train_refuses_bad_recipe_and_resume_without_checkpoint(capsys, tmp_path, monkeypatch):
    from codellama.training import trainer

    def no_corpus_work(*a, **k):
        raise AssertionError("data preparation started")
    monkeypatch.setattr(trainer, "prepare_training_data", no_corpus_work)
    recipe = tmp_path / "r.toml"
    recipe.write_text('base = "tiny-pretrain"\nlr = "fast"\n')
    _one_line_error(*_run(capsys, "train", str(recipe), "--out-dir", str(tmp_path / "run"))[::2], "lr", "fast")
    recipe.write_text('base = "tiny-pretrain"\n')
    _one_line_error(*_run(capsys, "train", str(recipe), "--out-dir", str(tmp_path / "run"), "--resume")[::2],
                    "cannot resume", "no checkpoint")


# ---- 13: --model everywhere it makes sense ------------------------------------------------------------------
def test_info_takes_model(capsys, tiny_ckpt):
    code, out, _ = _run(capsys, "info", "--model", str(tiny_ckpt), "--json")
    assert code == 0 and json.loads(out)["config"]["max_seq_len"] == 256
    _one_line_error(*_run(capsys, "info", str(tiny_ckpt), "--model", str(tiny_ckpt))[::2], "not both")


def test_recipe_data_dir_is_relative_to_the_recipe_file(tmp_path, monkeypatch):
    from codellama.training.recipe import load_recipe

    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "mine.toml"
    recipe.write_text('base = "tiny-pretrain"\ndata_dir = "data/mine"\nout_dir = "runs/mine"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # started from another directory: the data is still found beside the recipe
    config = load_recipe(recipe)
    assert config.data_dir == str(tmp_path / "recipes" / "data" / "mine")
    assert config.out_dir == "runs/mine"  # an output, relative to the current directory like --out-dir
    assert load_recipe("tiny-pretrain").data_dir == "runs/data/stdlib-4k-x8"  # bundled: the workspace's


def test_penalties_and_overflow_end_to_end(capsys, tiny_ckpt, monkeypatch):
    """On a real (tiny) model: the flags give the API's output, and an overflowing max_new_tokens is refused
    unless --shrink-max-new-tokens."""
    from codellama.api import load

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    llama = load(tiny_ckpt)
    plain = llama.complete("def f(x):", max_new_tokens=24)
    penalised = llama.complete("def f(x):", max_new_tokens=24, repetition_penalty=1.5, penalty_last_n=-1)
    code, out, err = _run(capsys, "complete", "def f(x):", "--model", str(tiny_ckpt), "--max-new-tokens", "24",
                          "--repeat-penalty", "1.5", "--repeat-last-n", "-1", "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] == penalised.tokens != plain.tokens
    prompt = "x = 1\n" * 40  # well inside the 256-token context, but not with 256 new tokens on top
    _one_line_error(*_run(capsys, "complete", prompt, "--model", str(tiny_ckpt), "--max-new-tokens", "256")[::2])
    code, out, err = _run(capsys, "complete", prompt, "--model", str(tiny_ckpt), "--max-new-tokens", "256",
                          "--shrink-max-new-tokens", "--json")
    assert code == 0 and json.loads(out)["finish_reason"] == "length", err
