"""Infilling benchmarks: HumanEval-infilling (Bavarian et al., 2022); MBPP-infilling is in ``mbpp_infilling.py``.

HumanEval-infilling: single-line (1033), multi-line (5815) and random-span (1640; "light": 164) problems, each a
prefix / suffix / reference middle cut out of a HumanEval canonical solution; pass@1 of
``prefix + middle + suffix + tests``. ``--data`` is the directory of the released ``*.jsonl.gz`` files.

MBPP-infilling (ours, a fixed shipped file) lives in ``mbpp_infilling.py``. Both run PSM (default) or SPM
(``--spm``)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from ..errors import CodeLlamaError
from .execution import DEFAULT_TIMEOUT
from .harness import Problem

HUMANEVAL_INFILLING_FILES = {
    "single-line": "HumanEval-SingleLineInfilling.jsonl.gz",
    "multi-line": "HumanEval-MultiLineInfilling.jsonl.gz",
    "random-span": "HumanEval-RandomSpanInfilling.jsonl.gz",
    "random-span-light": "HumanEval-RandomSpanInfillingLight.jsonl.gz",
}
TIMEOUT = DEFAULT_TIMEOUT  # the openai reference's 3 s


def load_humaneval_infilling(data: str | Path, subset: str = "single-line") -> list[dict]:
    if subset not in HUMANEVAL_INFILLING_FILES:
        raise CodeLlamaError(f"unknown subset {subset!r} (use {', '.join(HUMANEVAL_INFILLING_FILES)})")
    path = Path(data)
    if path.is_dir():
        path = path / HUMANEVAL_INFILLING_FILES[subset]
    if not path.is_file():
        raise CodeLlamaError(f"HumanEval-infilling data not found: {path} (pass --data DIR with the released "
                             "HumanEval-*Infilling.jsonl.gz files)")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise CodeLlamaError(f"cannot read {path}: {e}") from None
    if rows and not {"prompt", "suffix", "canonical_solution", "test", "entry_point"} <= rows[0].keys():
        raise CodeLlamaError(f"{path} is not HumanEval-infilling data")
    return rows


def humaneval_program(row: dict, middle: str) -> str:
    return (row["prompt"] + middle + row["suffix"] + "\n" + row["test"] + "\n" +
            f"check({row['entry_point']})\n")


def humaneval_problems(data: str | Path, subset: str = "single-line") -> list[Problem]:
    return [Problem(task_id=row["task_id"], kind="infill", prompt=row["prompt"], suffix=row["suffix"],
                    program=lambda c, r=row: humaneval_program(r, c), reference=row["canonical_solution"],
                    timeout=TIMEOUT)
            for row in load_humaneval_infilling(data, subset)]
