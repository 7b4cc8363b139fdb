"""Instruction dialogs the embedded model may be trained on (``tiny-instruct``), shipped as package data.

Every ``*.jsonl`` file here holds one dialog a line: ``{"messages": [{"role", "content"}, ...], "source",
"licence"}``, optionally ``"tests"`` (``assert`` lines the code of the last ``[PYTHON]`` block passes) and, for
MBPP rows, ``"task_id"``. Roles are ``system`` (optional, first), then ``user`` / ``assistant`` alternating,
ending with the assistant. Code answers are in the Code Llama - Instruct style: ``[PYTHON]\\ncode\\n[/PYTHON]``.

- ``mbpp_train.jsonl``: MBPP's *train* split (task_ids 601-974) only, never the test split (see ATTRIBUTION.md);
- ``handwritten.jsonl``: dialogs written for this project.

No evaluation set is in here: ``evaluation/instruct_format.py`` and MBPP's chat mode use task_ids 11-510."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Iterator

from ..errors import CodeLlamaError

B_PYTHON, E_PYTHON = "[PYTHON]", "[/PYTHON]"
MBPP_TRAIN_IDS = range(601, 975)
# The instruction after the task and its tests, shared by the training rows and the held-out prompts of
# ``evaluation/instruct_format.py``, so that training and evaluation ask in the same words.
from ..evaluation.mbpp import CODE_REQUEST as PYTHON_INSTRUCTION  # noqa: E402 (the eval's own words)

_BLOCK = re.compile(re.escape(B_PYTHON) + r"\n?(.*?)" + re.escape(E_PYTHON), re.S)


def data_dir() -> Path:
    return Path(str(resources.files(__name__)))


def files() -> list[str]:
    """The names of the shipped dialog files, sorted."""
    return sorted(p.name for p in data_dir().glob("*.jsonl"))


def path(name: str) -> Path:
    """The file ``name`` (``"mbpp_train"`` or ``"mbpp_train.jsonl"``; ``instruct:NAME`` in a recipe)."""
    name = name.removeprefix("instruct:")
    if not name.endswith(".jsonl"):
        name += ".jsonl"
    p = data_dir() / name
    if name not in files():
        raise CodeLlamaError(f"no instruction data file {name!r}; have {', '.join(files())}")
    return p


def read(name: str) -> list[dict]:
    """The dialogs of one file (validated: see ``check_dialog``)."""
    from ..training.instruct import read_records
    out = []
    for n, row in read_records(path(name)):
        check_dialog(row, f"{name}:{n}")
        out.append(row)
    return out


def iter_dialogs(names: list[str] | None = None) -> Iterator[dict]:
    for name in names or files():
        yield from read(name)


def dialogs(names: list[str] | None = None) -> list[dict]:
    """All dialogs of ``names`` (default: every file)."""
    return list(iter_dialogs(names))


def check_dialog(row: dict, where: str = "dialog") -> None:
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise CodeLlamaError(f"{where}: needs a non-empty 'messages' list")
    for key in ("source", "licence"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise CodeLlamaError(f"{where}: needs a '{key}' string")
    msgs = row["messages"]
    start = 1 if msgs[0].get("role") == "system" else 0
    if len(msgs) - start < 2:
        raise CodeLlamaError(f"{where}: needs at least one user and one assistant message")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m["content"].strip():
            raise CodeLlamaError(f"{where}: message {i} needs a non-empty 'content' string")
        want = "system" if i < start else ("user" if (i - start) % 2 == 0 else "assistant")
        if m.get("role") != want:
            raise CodeLlamaError(f"{where}: message {i} should be {want!r}, got {m.get('role')!r}")
    if msgs[-1]["role"] != "assistant":
        raise CodeLlamaError(f"{where}: the last message must be the assistant's")
    tests = row.get("tests")
    if tests is not None and not (isinstance(tests, list) and all(isinstance(t, str) for t in tests)):
        raise CodeLlamaError(f"{where}: 'tests' must be a list of strings")


def python_reply(code: str) -> str:
    """An assistant answer in the Code Llama - Instruct style."""
    return f"{B_PYTHON}\n{code.strip(chr(10))}\n{E_PYTHON}"


def python_blocks(text: str) -> list[str]:
    """The code between each ``[PYTHON]`` and its ``[/PYTHON]`` (a block left open is not a block)."""
    return [b.rstrip("\n") for b in _BLOCK.findall(text)]


def mbpp_user_message(row: dict) -> str:
    """The user turn for an MBPP record: the task and its three tests in the words of the MBPP prompt
    (``evaluation.mbpp.task_prompt``, as MBPP's chat mode sends them), then the ``[PYTHON]`` instruction."""
    from ..evaluation.mbpp import task_prompt
    return task_prompt(row) + "\n" + PYTHON_INSTRUCTION


def program_with_tests(row: dict) -> str | None:
    """The code of the dialog's last ``[PYTHON]`` block followed by its tests, or None without tests."""
    if not row.get("tests"):
        return None
    blocks = [b for m in row["messages"] if m["role"] == "assistant" for b in python_blocks(m["content"])]
    if not blocks:
        raise CodeLlamaError("a dialog with tests needs a [PYTHON] block in an assistant message")
    setup = row.get("test_setup_code") or ""
    return blocks[-1] + "\n" + (setup + "\n" if setup else "") + "\n".join(row["tests"]) + "\n"
