"""Infilling benchmarks: HumanEval-infilling (Bavarian et al., 2022) and MBPP-infilling (ours).

HumanEval-infilling: single-line (1033), multi-line (5815) and random-span (1640; "light": 164) problems, each a
prefix / suffix / reference middle cut out of a HumanEval canonical solution; pass@1 of
``prefix + middle + suffix + tests``. ``--data`` is the directory of the released ``*.jsonl.gz`` files.

MBPP-infilling answers the seed question "how does infilling quality scale with model size": from each MBPP test
problem's reference solution (task_ids 11-510) mask one line (``--mask line``) or a block of 2-5 consecutive
lines (``--mask block``), chosen by a seeded RNG per task (same seed, same masks, on every machine), and ask the
model for the middle. Scores: exact match (line endings and trailing whitespace normalised), normalised edit
similarity ``1 - Levenshtein / max(len)``, and pass@1 of the infilled program against the task's tests.
Both run PSM (default) or SPM (``--spm``)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from ..errors import CodeLlamaError
from . import mbpp
from .harness import Problem

HUMANEVAL_INFILLING_FILES = {
    "single-line": "HumanEval-SingleLineInfilling.jsonl.gz",
    "multi-line": "HumanEval-MultiLineInfilling.jsonl.gz",
    "random-span": "HumanEval-RandomSpanInfilling.jsonl.gz",
    "random-span-light": "HumanEval-RandomSpanInfillingLight.jsonl.gz",
}
TIMEOUT = 10.0
BLOCK_LINES = (2, 5)


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


# ---- MBPP-infilling ---------------------------------------------------------------------------------
def mask_solution(code: str, mask: str, rng: random.Random) -> tuple[str, str, str]:
    """(prefix, middle, suffix) of ``code`` with one line or a block of lines as the middle.

    The middle is whole lines including their newline, so prefix + middle + suffix == code exactly; only
    non-blank lines can start the mask (a blank middle would be trivial)."""
    lines = code.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    candidates = [i for i, line in enumerate(lines) if line.strip()]
    if not candidates:
        raise CodeLlamaError("cannot mask an empty solution")
    if mask == "line":
        start = rng.choice(candidates)
        end = start + 1
    elif mask == "block":
        # A block of 2..5 lines where the solution has room; a one-line solution yields a one-line block.
        size = rng.randint(*BLOCK_LINES)
        size = min(size, len(lines))
        starts = [i for i in candidates if i + size <= len(lines)] or candidates[:1]
        start = rng.choice(starts)
        end = min(start + size, len(lines))
    else:
        raise CodeLlamaError(f"unknown mask {mask!r} (use line or block)")
    return "".join(lines[:start]), "".join(lines[start:end]), "".join(lines[end:])


def mbpp_infilling_rows(data: str | Path | None, mask: str = "line", seed: int = 0) -> list[dict]:
    rows = mbpp.load_mbpp(data)
    out = []
    for row in mbpp.test_rows(rows):
        rng = random.Random(f"mbpp-infilling:{mask}:{seed}:{row['task_id']}")
        prefix, middle, suffix = mask_solution(row["code"], mask, rng)
        out.append({"task_id": f"MBPP-Infilling/{mask}/{row['task_id']}", "prefix": prefix, "middle": middle,
                    "suffix": suffix, "row": row, "lines": middle.count("\n")})
    return out


def mbpp_problems(data: str | Path | None, mask: str = "line", seed: int = 0) -> list[Problem]:
    return [Problem(task_id=r["task_id"], kind="infill", prompt=r["prefix"], suffix=r["suffix"],
                    program=lambda c, r=r: mbpp.program(r["row"], r["prefix"] + c + r["suffix"]),
                    reference=r["middle"], timeout=mbpp.TIMEOUT, meta={"lines": r["lines"]})
            for r in mbpp_infilling_rows(data, mask, seed)]
