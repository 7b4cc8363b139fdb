"""The benchmark workload: "multi-file code" prompts built from a real repository on the machine.

A prompt is repository-level context, as a code assistant sends it: the files of a package concatenated in path
order, each under a path header (``# ---- json/decoder.py ----``), cut to the target number of tokens at a file
or line boundary, then the header of a new file of that package for the model to write. The default repository
is the running Python's standard library, which every machine has: its packages in a fixed order, so every
model and every run gets the same prompts.

Models benchmarked by name (random weights at a released shape) have no tokenizer of their own; they are given the
embedded model's tokenizer, whose ids are valid in every Code Llama vocabulary. Timing does not depend on which
ids a prompt holds, only on how many."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..errors import CodeLlamaError
from ..tokenizer import Tokenizer

# Packages of the standard library, largest first, walked in this order (then the rest alphabetically).
DEFAULT_PACKAGES = ("asyncio", "email", "json", "http", "xml", "concurrent", "importlib", "logging", "unittest",
                    "multiprocessing", "urllib", "sqlite3", "tomllib", "zoneinfo", "collections")


@dataclass
class Prompt:
    tokens: list[int]
    files: list[str]  # the repository files it holds, in order
    new_file: str  # the file the model is asked to write


def repository_files(root: str | Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, file) of every ``.py`` file of the repository, packages in DEFAULT_PACKAGES order first."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise CodeLlamaError(f"workload repository not found: {base}")
    files = sorted(p for p in base.rglob("*.py") if "test" not in p.relative_to(base).parts[:-1]
                   and "site-packages" not in p.parts and "__pycache__" not in p.parts)
    order = {name: i for i, name in enumerate(DEFAULT_PACKAGES)}
    files.sort(key=lambda p: (order.get(p.relative_to(base).parts[0], len(order)), str(p.relative_to(base))))
    if not files:
        raise CodeLlamaError(f"workload repository {base} has no .py files")
    return [(str(p.relative_to(base)), p) for p in files]


def multi_file_prompt(tokenizer: Tokenizer, n_tokens: int, root: str | Path | None = None) -> Prompt:
    """A prompt of exactly ``n_tokens`` tokens (bos included): repository files, then a new file's header."""
    if n_tokens < 16:
        raise CodeLlamaError(f"a workload prompt needs at least 16 tokens, got {n_tokens}")
    files = repository_files(root)
    package = files[0][0].split("/")[0]
    new_file = f"{package}/new_module.py"
    tail = tokenizer.encode(f"\n# ---- {new_file} ----\n")
    budget = n_tokens - 1 - len(tail)
    body: list[int] = []
    used: list[str] = []
    while len(body) < budget:
        for rel, path in files:
            text = f"# ---- {rel} ----\n" + path.read_text(encoding="utf-8", errors="replace")
            body += tokenizer.encode(text)
            used.append(rel)
            if len(body) >= budget:
                break
        else:  # the whole repository is shorter than the target: repeat it (timing is what is measured)
            continue
    return Prompt([tokenizer.bos_id] + body[:budget] + tail, used, new_file)
