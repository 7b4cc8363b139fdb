"""MBPP (Austin et al., 2021): the 500 test problems (task_ids 11-510), 3-shot.

The prompt is the one of the MBPP paper that the Llama / Code Llama evaluations use: each shot is
``You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\\n\\n
{tests}\\n[BEGIN]\\n{code}\\n[DONE]``, with tasks 2, 3 and 4 as the shots; the model continues after
``[BEGIN]\\n`` and stops at ``[DONE]``. Instruct models get the task and the tests in one chat turn.

Data: ``--data mbpp.jsonl`` (google-research's file), or downloaded once into ``~/.cache/codellama`` when
online."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from ..errors import CodeLlamaError
from .execution import DEFAULT_TIMEOUT
from .harness import Problem, extract_code

MBPP_URL = "https://raw.githubusercontent.com/google-research/google-research/master/mbpp/mbpp.jsonl"
TEST_IDS = range(11, 511)
FEW_SHOT_IDS = (2, 3, 4)
STOP = ["[DONE]"]
TIMEOUT = DEFAULT_TIMEOUT  # bigcode's 3 s (task 123's reference alone needs ~5 s on a slow core: --timeout)


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "codellama"


def download_mbpp() -> Path:
    dest = _cache_dir() / "mbpp.jsonl"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(MBPP_URL, timeout=30) as r:
            data = r.read()
    except OSError as e:
        raise CodeLlamaError(f"could not download MBPP ({e}); pass --data PATH/mbpp.jsonl") from None
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest


def load_mbpp(data: str | Path | None = None) -> dict[int, dict]:
    """All MBPP records by task_id, code with ``\\r\\n`` normalised to ``\\n``."""
    path = Path(data) if data is not None else download_mbpp()
    if path.is_dir():
        path = path / "mbpp.jsonl"
    if not path.is_file():
        raise CodeLlamaError(f"MBPP data not found: {path}")
    rows: dict[int, dict] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    r["code"] = r["code"].replace("\r\n", "\n").replace("\r", "\n")
                    rows[int(r["task_id"])] = r
    except (OSError, ValueError, KeyError) as e:
        raise CodeLlamaError(f"{path} is not MBPP jsonl data: {e}") from None
    return rows


def task_prompt(row: dict) -> str:
    tests = "\n".join(row["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {row['text']} "
            f"Your code should pass these tests:\n\n{tests}\n")


def few_shot_prompt(rows: dict[int, dict], row: dict, shots: tuple[int, ...] = FEW_SHOT_IDS) -> str:
    missing = [i for i in shots if i not in rows]
    if missing:
        raise CodeLlamaError(f"MBPP data lacks the few-shot tasks {missing}")
    parts = [task_prompt(rows[i]) + "[BEGIN]\n" + rows[i]["code"] + "\n[DONE]\n\n" for i in shots]
    return "".join(parts) + task_prompt(row) + "[BEGIN]\n"


def program(row: dict, code: str) -> str:
    setup = row.get("test_setup_code") or ""
    return code + "\n" + (setup + "\n" if setup else "") + "\n".join(row["test_list"]) + "\n"


# Code Llama - Instruct puts the code of an answer between [PYTHON] and [/PYTHON] (its self-instruct data does);
# the instruct training data (codellama.instruct_data) asks for it in these same words.
CODE_REQUEST = "Reply with the code only, between [PYTHON] and [/PYTHON] tags."


def chat_message(row: dict) -> str:
    return task_prompt(row) + "\n" + CODE_REQUEST


def test_rows(rows: dict[int, dict]) -> list[dict]:
    out = [rows[i] for i in TEST_IDS if i in rows]
    if not out:
        raise CodeLlamaError("MBPP data has none of the test task_ids 11-510")
    return out


def problems(data: str | Path | None = None, *, chat: bool = False, shots: int = 3) -> list[Problem]:
    """The test problems; ``shots`` < 3 uses the first ``shots`` of tasks 2, 3, 4 (for models whose context
    cannot hold the paper's 3-shot prompt; report it with the numbers)."""
    if not isinstance(shots, int) or not 0 <= shots <= len(FEW_SHOT_IDS):
        raise CodeLlamaError(f"--shots must be 0..{len(FEW_SHOT_IDS)}, got {shots!r}")
    rows = load_mbpp(data)
    out = []
    for row in test_rows(rows):
        tid = f"MBPP/{row['task_id']}"
        entry = _entry_point(row)
        if chat:
            out.append(Problem(task_id=tid, kind="chat", messages=[{"role": "user", "content": chat_message(row)}],
                               extract=lambda reply, e=entry: extract_code(reply, e),
                               program=lambda c, r=row: program(r, c), reference=row["code"], timeout=TIMEOUT))
        else:
            out.append(Problem(task_id=tid, kind="complete", prompt=few_shot_prompt(rows, row, FEW_SHOT_IDS[:shots]), stop=list(STOP),
                               program=lambda c, r=row: program(r, c), reference=row["code"], timeout=TIMEOUT))
    return out


def _entry_point(row: dict) -> str | None:
    import re
    m = re.match(r"\s*assert\s+(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", row["test_list"][0]) if row["test_list"] else None
    return m.group(1) if m else None
