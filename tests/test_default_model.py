"""The embedded default model: loads with no argument, runs the README quickstart, and is what its card says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import codellama
from codellama.api import DEFAULT_INSTRUCT_DIR, DEFAULT_MODEL_DIR
from codellama.cli_generate import looks_instruct
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


# ---- default-instruct: the embedded model after tiny-instruct -------------------------------------------------
SHARED_MBPP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"


@pytest.fixture(scope="module")
def instruct():
    return codellama.load("default-instruct")


def test_default_instruct_is_shipped_and_loads_by_name(instruct):
    for name in ("params.json", "tokenizer.model", "model.safetensors", "MODEL_CARD.md"):
        assert (DEFAULT_INSTRUCT_DIR / name).is_file(), name
    base = json.loads((DEFAULT_MODEL_DIR / "params.json").read_text())
    assert json.loads((DEFAULT_INSTRUCT_DIR / "params.json").read_text()) == base  # the same shape, fine-tuned
    assert (DEFAULT_INSTRUCT_DIR / "tokenizer.model").read_bytes() == (DEFAULT_MODEL_DIR / "tokenizer.model").read_bytes()
    assert instruct.name == "default-instruct" and looks_instruct(instruct)


def test_default_instruct_answers_in_python_tags(instruct):
    reply = instruct.chat([{"role": "user", "content": "Write a Python function `square(x)` that returns x * x."}],
                          max_new_tokens=96)
    assert reply.finish_reason == "stop" and reply.text.lstrip().startswith("[PYTHON]")
    assert "[/PYTHON]" in reply.text


def test_chat_without_model_uses_default_instruct(capsys):
    assert main(["chat", "Write a function that adds two numbers.", "--max-new-tokens", "64"]) == 0
    captured = capsys.readouterr()
    assert "[PYTHON]" in captured.out
    assert "does not look like an Instruct model" not in captured.err


@pytest.mark.skipif(not SHARED_MBPP.is_file(), reason="../shared/data/mbpp/mbpp.jsonl not present")
def test_default_instruct_format_rates_on_held_out_mbpp_prompts(instruct, default):
    """The model card's measurement, on the first 20 of its 100 held-out prompts (greedy, deterministic):
    the instruction-tuned model ends its replies and writes parsing [PYTHON] blocks; the base model does not."""
    from codellama.evaluation.instruct_format import held_out_prompts, instruct_format_report
    prompts = held_out_prompts(SHARED_MBPP, limit=20)
    tuned = instruct_format_report(instruct, prompts, 256)
    base = instruct_format_report(default, prompts, 256)
    assert tuned["eos_rate"] >= 0.85 and tuned["parse_rate"] >= 0.6
    assert base["parse_rate"] <= 0.1 and base["eos_rate"] <= 0.3
