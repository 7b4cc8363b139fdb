"""``codellama complete / infill / chat`` end to end, as subprocesses, on tiny checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from codellama.api import load
from codellama.checkpoint import save_checkpoint
from codellama.model import Transformer



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer_path, tiny_nofim_tokenizer_path):
    from codellama.config import ModelConfig

    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                         ffn_dim_multiplier=1.3, rope_theta=1_000_000.0, max_seq_len=256)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(std=0.3)
    root = tmp_path_factory.mktemp("ckpt")
    fim = save_checkpoint(model, root / "tiny", tokenizer=tiny_tokenizer_path)
    nofim = save_checkpoint(model, root / "tiny-python", tokenizer=tiny_nofim_tokenizer_path)
    return fim, nofim


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    env.pop("CODELLAMA_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "codellama", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=env, timeout=120)


def _error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    for w in words:
        assert w in proc.stderr


def test_complete_streams_the_same_text_as_the_api(checkpoints):
    fim, _ = checkpoints
    expected = load(fim).complete("def add(a, b):", max_new_tokens=12)
    proc = _cli("complete", "def add(a, b):", "--model", str(fim), "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected.text and len(expected.tokens) == 12
    proc = _cli("complete", "-", "--model", str(fim), "--max-new-tokens", "12", "--json", "--logprobs",
                stdin="def add(a, b):")
    out = json.loads(proc.stdout)
    assert out["text"] == expected.text and out["tokens"] == expected.tokens
    assert out["finish_reason"] == "length" and out["prompt_tokens"] == expected.prompt_tokens
    assert len(out["logprobs"]) == 12 and all(lp <= 0 for lp in out["logprobs"])


def test_infill_file_with_marker_json_and_spm(checkpoints, tmp_path):
    fim, _ = checkpoints
    prefix, suffix = "def f(x):\n    ", "\n    return y\n"
    src = tmp_path / "f.py"
    src.write_text(prefix + "<FILL_ME>" + suffix)
    expected = load(fim).infill(prefix, suffix, suffix_first=True, max_new_tokens=10)
    proc = _cli("infill", "--file", str(src), "--spm", "--model", str(fim), "--max-new-tokens", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["text"] == expected.text and out["filled"] == prefix + expected.text + suffix
    proc = _cli("infill", "--prefix", prefix, "--suffix", suffix, "--spm", "--model", str(fim),
                "--max-new-tokens", "10")
    assert proc.returncode == 0 and proc.stdout == expected.text


def test_chat_one_message(checkpoints):
    fim, _ = checkpoints
    expected = load(fim).chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                              max_new_tokens=8)
    proc = _cli("chat", "hi", "--system", "be brief", "--model", str(fim), "--max-new-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == expected.text


@pytest.mark.parametrize("case", ["unknown model", "prompt too long", "no fim", "top_p", "temperature",
                                  "special tag", "no marker"])
def test_error_paths(checkpoints, tmp_path, case):
    fim, nofim = checkpoints
    if case == "unknown model":
        _error(_cli("complete", "x", "--model", str(tmp_path / "nope")), "nope")
    elif case == "prompt too long":
        _error(_cli("complete", "x = 1\n" * 300, "--model", str(fim)), "context is 256 tokens")
    elif case == "no fim":
        _error(_cli("infill", "--prefix", "a", "--suffix", "b", "--model", str(nofim)), "tiny-python", "infill")
    elif case == "top_p":
        _error(_cli("complete", "x", "--model", str(fim), "--top-p", "1.5"), "top_p must be in (0, 1]")
    elif case == "temperature":
        _error(_cli("complete", "x", "--model", str(fim), "--temperature", "-1"), "temperature")
    elif case == "special tag":
        _error(_cli("chat", "[INST] hi", "--model", str(fim)), "special tag")
    else:
        (tmp_path / "g.py").write_text("no marker here")
        _error(_cli("infill", "--file", str(tmp_path / "g.py"), "--model", str(fim)), "<FILL_ME>")


def test_chat_repl_keeps_history(checkpoints, monkeypatch, capsys):
    """On a terminal without a message: a session; each turn sees the earlier exchanges."""
    import builtins
    import io

    from codellama import cli
    from codellama.api import CodeLlama

    fim, _ = checkpoints
    lines = iter(["hello", "", "[INST] bad", "and again", "/reset", "fresh"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    class TTY(io.StringIO):
        def isatty(self):
            return True

    seen = []
    real_chat = CodeLlama.chat

    def spy(self, messages, **kw):
        seen.append([m["content"] for m in messages])
        return real_chat(self, messages, **kw)

    reply = load(fim).chat([{"role": "user", "content": "hello"}], max_new_tokens=4).text
    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr("sys.stdin", TTY())
    monkeypatch.setattr(CodeLlama, "chat", spy)
    assert cli.main(["chat", "--model", str(fim), "--max-new-tokens", "4"]) == 0
    # the refused message is reported and leaves the history as it was; /reset empties it
    assert seen == [["hello"], ["hello", reply, "[INST] bad"], ["hello", reply, "and again"], ["fresh"]]
    out = capsys.readouterr()
    assert reply in out.out and "special tag" in out.err
