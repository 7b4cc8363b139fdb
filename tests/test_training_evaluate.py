"""The held-out evaluation of the default model: case construction, truncation, parsing."""

from __future__ import annotations

from codellama.training.corpus import Document
from codellama.training.evaluate_default import (function_prompts, infill_cases, parses, truncate_function)

SOURCE = '''import os


def join(a, b):
    """Join two paths."""
    return os.path.join(a, b)


class Box:
    def __init__(self, value,
                 label=None):
        self.value = value

    async def get(self):
        return self.value
'''


def test_infill_cases_mask_one_nonblank_line_with_its_context():
    docs = [Document("m.py", SOURCE)]
    cases = infill_cases(docs, 100, seed=0, prefix_chars=60, suffix_chars=40)
    nonblank = [line for line in SOURCE.splitlines() if line.strip()]
    assert len(cases) == len(nonblank) == 10  # all of them, each once
    assert sorted(c.line for c in cases) == sorted(nonblank)
    for c in cases:
        assert c.line.strip()
        assert (c.prefix + c.line + "\n" + c.suffix) in SOURCE
        assert len(c.prefix) <= 60 and len(c.suffix) <= 40
        assert c.prefix == "" or c.prefix.endswith("\n")
    assert infill_cases(docs, 5, seed=1) == infill_cases(docs, 5, seed=1)


def test_function_prompts_are_module_functions_or_every_def_dedented():
    assert function_prompts([Document("m.py", SOURCE)], 10) == ["def join(a, b):"]
    prompts = function_prompts([Document("m.py", SOURCE)], 10, scope="any")
    assert sorted(prompts) == ["async def get(self):", "def __init__(self, value,\n             label=None):",
                               "def join(a, b):"]


def test_truncation_at_the_function_end():
    prompt = "def f(x):"
    body = "\n    y = x + 1\n    return y\n\nprint(f(2))\ndef g(:\n"
    assert truncate_function(prompt, body) == "\n    y = x + 1\n    return y\n\n"
    assert parses(prompt + truncate_function(prompt, body))
    # Out of tokens mid-line: keep the complete lines only.
    assert truncate_function(prompt, "\n    y = [1,\n         2]\n    return (y") == "\n    y = [1,\n         2]\n"
    assert parses(prompt + truncate_function(prompt, "\n    y = [1,\n         2]\n    return (y"))
    assert not parses(prompt + "\n\n")


def test_infilling_scores_exact_and_indentation_blind_matches(tiny_tokenizer_path):
    from types import SimpleNamespace

    from codellama.tokenizer import Tokenizer
    from codellama.training.evaluate_default import InfillCase, evaluate_infilling

    answers = {"a": "    return x\n    more", "b": "     return y", "c": "pass"}  # exact, one space off, wrong
    seen = []

    def infill(prefixes, suffixes, max_new_tokens, suffix_first):
        seen.append(suffix_first)
        return [SimpleNamespace(text=answers[p]) for p in prefixes]

    llama = SimpleNamespace(tokenizer=Tokenizer(tiny_tokenizer_path), config=SimpleNamespace(max_seq_len=512),
                            infill=infill)
    cases = [InfillCase("m.py", "a", "    return x", "\n"), InfillCase("m.py", "b", "    return y", "\n"),
             InfillCase("m.py", "c", "    return z", "\n")]
    psm = evaluate_infilling(llama, cases)
    assert (psm["format"], psm["cases"]) == ("psm", 3)
    assert psm["exact_match"] == 1 / 3 and psm["match_ignoring_indentation"] == 2 / 3
    assert [e["exact"] for e in psm["examples"]] == [True, False, False]
    spm = evaluate_infilling(llama, cases, suffix_first=True)
    assert spm["format"] == "spm" and seen == [False, True]
