"""Resumable stage files: JSONL, one record per item, appended and flushed as each item finishes, so a kill at
any moment loses only the items in flight. On restart a torn last line is cut off and the ids already on disk
are skipped. Every record carries the stage's ``settings`` key (a hash of its provenance without the per-item
seed): resuming with other settings would mix two data sets in one file, so it is refused."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from ..errors import CodeLlamaError

FILES = {"questions": "questions.jsonl", "raw": "questions.raw.jsonl", "dedup": "dedup.json",
         "tests": "tests.jsonl", "solutions": "solutions.jsonl", "verify": "verify.jsonl", "stats": "stats.json",
         "export": "sft.jsonl"}
# The stage that writes each input file, for the "run it first" message.
MADE_BY = {"questions": "questions", "tests": "tests", "solutions": "solutions", "verify": "verify"}


def settings_key(provenance: dict) -> str:
    return hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:12]


def read_records(path: Path) -> list[dict]:
    """Every complete record; a torn last line (an interrupted write) is dropped, a bad line elsewhere is an
    error (the file was edited or is not ours)."""
    rows: list[dict] = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().split("\n")
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == last:  # no newline after it: the write was cut short
                break
            raise CodeLlamaError(f"{path}:{i + 1}: not valid JSON") from None
        if not isinstance(row, dict):
            raise CodeLlamaError(f"{path}:{i + 1}: expected a JSON object")
        rows.append(row)
    return rows


def need(work: Path, name: str) -> list[dict]:
    """The records of a previous stage's file, or a one-line error naming the stage to run first."""
    path = work / FILES[name]
    if not path.is_file():
        raise CodeLlamaError(f"{path} not found: run `codellama self-instruct {MADE_BY[name]} --work {work}` first")
    return read_records(path)


class StageFile:
    """Append-only records of one stage, keyed by ``id``; ``done`` holds what is already on disk."""

    def __init__(self, path: Path, key: str, overwrite: bool = False):
        self.path, self.key = path, key
        path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and path.exists():
            path.unlink()
        self.done: dict[str, dict] = {}
        if path.exists():
            for row in read_records(path):
                if row.get("settings") != key:
                    raise CodeLlamaError(f"{path} was made with other settings (model, prompt, sampling or "
                                         "seed); pass --overwrite to start it afresh, or another --work")
                self.done[str(row["id"])] = row
            _truncate_partial_line(path)
        self._f = open(path, "a", encoding="utf-8", errors="surrogateescape")

    def write(self, row: dict) -> None:
        row = {"id": row["id"], "settings": self.key, **{k: v for k, v in row.items() if k != "id"}}
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()  # per item: a kill loses only what is in flight
        self.done[str(row["id"])] = row

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "StageFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _truncate_partial_line(path: Path) -> None:
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def write_atomic(path: Path, text: str) -> None:
    """Whole-file outputs (the kept questions, reports, the export): a temporary file renamed over the old one,
    so a kill leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def jsonl(rows: Iterator[dict] | list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
