"""The embedded default model: loads with no argument, runs the README quickstart, and is what its card says."""

from __future__ import annotations

import json

import pytest

import codellama
from codellama.api import DEFAULT_MODEL_DIR
from codellama.cli import main


@pytest.fixture(scope="module")
def default():
    return codellama.load()


def test_files_are_shipped_and_small():
    for name in ("params.json", "tokenizer.model", "model.safetensors", "MODEL_CARD.md"):
        assert (DEFAULT_MODEL_DIR / name).is_file(), name
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size <= 60 * 2**20


def test_load_without_argument_returns_the_embedded_model(default):
    params = json.loads((DEFAULT_MODEL_DIR / "params.json").read_text())
    c = default.config
    assert (c.dim, c.n_layers, c.n_heads, c.vocab_size) == \
        (params["dim"], params["n_layers"], params["n_heads"], params["vocab_size"])
    assert c.rope_theta == params["rope_theta"]
    assert default.tokenizer.n_words == c.vocab_size == 4096
    assert default.tokenizer.supports_infilling
    assert (default.tokenizer.bos_id, default.tokenizer.eos_id) == (1, 2)
    assert default.device.type == "cpu" or default.device.type in ("cuda", "mps")


def test_default_model_completes_and_infills_python(default):
    out = default.complete("def fibonacci(n):", max_new_tokens=24)
    assert out.text and out.tokens
    middle = default.infill("def add(a, b):\n", "\n\nprint(add(1, 2))\n", max_new_tokens=16)
    assert isinstance(middle.text, str) and middle.finish_reason in ("stop", "length")
    # It learned code, not noise: the likeliest next token after an indented block opener is whitespace/keyword.
    logits = default.logits(default.tokenizer.encode("def f(x):\n", bos=True))
    top = default.tokenizer.id_to_piece(int(logits[-1].argmax()))
    assert top.startswith("▁") or top == "<0x0A>"


def test_cli_complete_without_model(capsys):
    assert main(["complete", "def f", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def f") or len(captured.out) > 0
    assert "Traceback" not in captured.err
