"""MBPP-Infilling v1: a fixed, versioned infilling benchmark built once from MBPP (Austin et al., 2021).

From each MBPP test problem's reference solution (task_ids 11-510, ``\\r\\n`` normalised to ``\\n``) one mask per
subset, like HumanEval-infilling's three subsets:

- ``single-line``: one non-blank line (with its newline);
- ``multi-line``: 2-5 consecutive whole lines, the first and the last non-blank;
- ``random-span``: a character span whose start and end are anywhere (mid-token included), not only whitespace.

Every mask lies strictly inside a function body (``ast``): never on a ``def`` line (or its decorators, or a
multi-line signature) of any function, never outside a function, so the masked code always keeps its
signature. A task whose functions have no such line (one-line ``def f(x): return x`` bodies) has no row in
that subset; the header of the shipped file lists them. The masks come from a fixed internal seed, not from
``--seed`` (which only drives sampling): the benchmark is the same file on every machine and in every run.

The model sees the task: ``prefix`` is the task text as a comment line and then the code before the mask;
``suffix`` is the code after the mask, a blank line and the tests (``test_setup_code`` and the asserts), so a
FIM model sees what the middle must satisfy. The executed program is the MBPP benchmark's own,
``mbpp.program(row, code_prefix + completion + code_suffix)`` (code, then setup code, then the asserts).

The rows ship with the package (``data/mbpp_infilling_v1.jsonl.gz``; MBPP is CC BY 4.0, see ``data/NOTICE.md``);
``python -m codellama.evaluation.mbpp_infilling build --data mbpp.jsonl`` rebuilds the file from the source
(the same bytes) and ``--check`` verifies the shipped one.

Scores per subset: ``exact_match`` / ``edit_similarity`` (this project's definitions), ``exact_match_codexglue``
/ ``edit_similarity_lcc`` (the CodeXGLUE/LCC ones), pass@1 of the infilled program and ``pass@1_empty_middle``
(the pass rate of an empty middle: masks the tests never exercise), each with a 95% bootstrap interval over
problems (``results["confidence_intervals"]``)."""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import json
import random
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from ..errors import CodeLlamaError
from . import mbpp
from .harness import Problem
from .metrics import METRIC_DEFINITIONS, bootstrap_ci

VERSION = "v1"
SUBSETS = ("single-line", "multi-line", "random-span")
ID_PREFIX = f"MBPP-Infilling-{VERSION}/"
BUILD_SEED = f"mbpp-infilling-{VERSION}"  # fixed for ever: changing it would be a new version
MULTI_LINES = (2, 5)
SPAN_TRIES = 1000
DATA_FILE = Path(__file__).resolve().parent / "data" / f"mbpp_infilling_{VERSION}.jsonl.gz"
SOURCE = {
    "dataset": "MBPP (Mostly Basic Python Problems), test split, task_ids 11-510",
    "repository": "google-research/google-research",
    "path": "mbpp/mbpp.jsonl",
    "commit": "2251e8c67a7fe7d6348714967ee101080b28e956",
    "sha256": "0b7004a79cd62d9ec7ecdd5a6e5f0ef1210ff00b286df3c5d5b57bf38c58e19a",
    "license": "CC BY 4.0",
    "citation": "Austin et al. 2021, Program Synthesis with Large Language Models, arXiv:2108.07732",
}
CI = {"method": "percentile bootstrap over problems", "level": 0.95, "n_resamples": 1000, "seed": 0}
OWN_DEFINITIONS = {
    "pass@1_empty_middle": "pass@1 with an empty middle: the floor of masks the tests never exercise, 0-1",
}


# ---- masks ---------------------------------------------------------------------------------------------
def split_lines(code: str) -> list[str]:
    """Lines with their ``\\n`` (the last one without, if the code does not end in one), numbered as ``ast``
    numbers them: only ``\\n`` ends a line here, where ``str.splitlines`` would also split at form feeds."""
    parts = code.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def body_runs(code: str) -> list[tuple[int, int]]:
    """Maximal runs ``(first, last)`` (0-based, inclusive) of lines that lie in some function's body and are no
    function's header (decorators, ``def`` line, a multi-line signature). A body that starts on its ``def``
    line has no such line."""
    lines = split_lines(code)
    header: set[int] = set()
    body: set[int] = set()
    with warnings.catch_warnings():  # some solutions have "\w"-style escapes in plain strings
        warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
        tree = ast.parse(code)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        stmt = node.body[0]
        own_line = not lines[stmt.lineno - 1][:stmt.col_offset].strip()
        body_first = stmt.lineno - 1 if own_line else stmt.lineno
        header.update(range(first, body_first))
        body.update(range(body_first, node.end_lineno))
    allowed = sorted(body - header)
    runs: list[tuple[int, int]] = []
    for i in allowed:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def mask(code: str, subset: str, rng: random.Random) -> tuple[int, int] | None:
    """The masked character range ``(start, end)`` of ``code`` for ``subset``, or None when its functions have
    no body line that fits."""
    lines = split_lines(code)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    runs = body_runs(code)
    filled = lambda i: bool(lines[i].strip())
    if subset == "single-line":
        cands = [i for a, b in runs for i in range(a, b + 1) if filled(i)]
        if not cands:
            return None
        i = rng.choice(cands)
        return starts[i], starts[i + 1]
    if subset == "multi-line":
        windows = {n: [(s, s + n - 1) for a, b in runs for s in range(a, b - n + 2) if filled(s) and filled(s + n - 1)]
                   for n in range(MULTI_LINES[0], MULTI_LINES[1] + 1)}
        sizes = [n for n, w in windows.items() if w]
        if not sizes:
            return None
        s, e = rng.choice(windows[rng.choice(sizes)])
        return starts[s], starts[e + 1]
    if subset == "random-span":
        spans = [(starts[a], starts[b + 1]) for a, b in runs if code[starts[a]:starts[b + 1]].strip()]
        if not spans:
            return None
        lo, hi = rng.choices(spans, weights=[e - s for s, e in spans])[0]
        for _ in range(SPAN_TRIES):
            start, end = sorted(rng.sample(range(lo, hi + 1), 2))
            if code[start:end].strip():
                return start, end
        raise AssertionError("unreachable: a run with text always yields a span with text")
    raise CodeLlamaError(f"unknown mbpp-infilling subset {subset!r} (use {', '.join(SUBSETS)})")


def context(row: dict, code_prefix: str, code_suffix: str, middle: str) -> tuple[str, str]:
    """(prefix, suffix) the model sees: task text + code before the mask; code after + blank line + tests."""
    prefix = "".join(f"# {line}\n" for line in row["text"].strip().split("\n")) + code_prefix
    code = code_prefix + middle + code_suffix
    tail = "\n" if code.endswith("\n") else "\n\n"
    setup = row.get("test_setup_code") or ""
    tests = (setup.rstrip("\n") + "\n" if setup.strip() else "") + "\n".join(row["test_list"]) + "\n"
    return prefix, code_suffix + tail + tests


# ---- building the file -----------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build(data: str | Path) -> tuple[dict, list[dict]]:
    """(header, rows) of the benchmark from the MBPP jsonl it was built from (refused for any other file)."""
    path = Path(data)
    if path.is_dir():
        path = path / "mbpp.jsonl"
    if not path.is_file():
        raise CodeLlamaError(f"MBPP data not found: {path}")
    digest = sha256_file(path)
    if digest != SOURCE["sha256"]:
        raise CodeLlamaError(f"{path} has sha256 {digest[:12]}..., not the MBPP revision MBPP-Infilling "
                             f"{VERSION} is built from ({SOURCE['sha256'][:12]}..., commit {SOURCE['commit'][:10]})")
    tasks = mbpp.test_rows(mbpp.load_mbpp(path))
    rows: list[dict] = []
    skipped: dict[str, list[int]] = {}
    for subset in SUBSETS:
        skipped[subset] = []
        for r in tasks:
            code = r["code"]
            span = mask(code, subset, random.Random(f"{BUILD_SEED}:{subset}:{r['task_id']}"))
            if span is None:
                skipped[subset].append(r["task_id"])
                continue
            code_prefix, middle, code_suffix = code[:span[0]], code[span[0]:span[1]], code[span[1]:]
            prefix, suffix = context(r, code_prefix, code_suffix, middle)
            rows.append({"task_id": f"{ID_PREFIX}{subset}/{r['task_id']}", "subset": subset,
                         "mbpp_task_id": r["task_id"], "text": r["text"], "test_setup_code": r["test_setup_code"],
                         "test_list": r["test_list"], "prefix": prefix, "middle": middle, "suffix": suffix,
                         "code_prefix": code_prefix, "code_suffix": code_suffix})
    header = {"benchmark": "MBPP-Infilling", "version": VERSION, "source": SOURCE,
              "changes": "code: \\r\\n normalised to \\n; one masked span per task and subset (prefix/middle/suffix), "
                         "task text and tests added to the model's context; text, test_setup_code and test_list "
                         "unchanged",
              "build": f"python -m codellama.evaluation.mbpp_infilling build --data mbpp.jsonl (seed {BUILD_SEED!r})",
              "counts": {s: sum(1 for r in rows if r["subset"] == s) for s in SUBSETS}, "skipped": skipped}
    return header, rows


def serialize(header: dict, rows: Sequence[dict]) -> bytes:
    """The JSONL text (header line first), then gzip without a timestamp or name: the same rows give the same
    bytes (with the same zlib)."""
    text = "".join(json.dumps(x, ensure_ascii=True) + "\n" for x in [{"header": header}, *rows])
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(text.encode("ascii"))
    return buf.getvalue()


@lru_cache(maxsize=4)
def _read(path: str) -> tuple[dict, tuple[dict, ...]]:
    try:
        with gzip.open(path, "rt", encoding="ascii") as f:
            items = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise CodeLlamaError(f"cannot read the MBPP-Infilling file {path}: {e}") from None
    if not items or "header" not in items[0] or items[0]["header"].get("version") != VERSION:
        raise CodeLlamaError(f"{path} is not an MBPP-Infilling {VERSION} file")
    return items[0]["header"], tuple(items[1:])


def load(path: str | Path = DATA_FILE) -> tuple[dict, list[dict]]:
    """(header, rows) of the shipped benchmark file."""
    if not Path(path).is_file():
        raise CodeLlamaError(f"the MBPP-Infilling file is missing from the installation: {path}")
    header, rows = _read(str(path))
    return header, [dict(r) for r in rows]


def rows_for(subset: str, data: str | Path | None = None) -> list[dict]:
    """The shipped rows of ``subset``; with ``data`` (MBPP's jsonl) the rows are rebuilt from it first and must
    equal the shipped ones."""
    if subset not in SUBSETS:
        raise CodeLlamaError(f"unknown mbpp-infilling subset {subset!r} (use {', '.join(SUBSETS)})")
    header, rows = load()
    if data is not None:
        fresh_header, fresh = build(data)
        if fresh_header != header or fresh != rows:
            raise CodeLlamaError(f"rebuilding MBPP-Infilling {VERSION} from {data} does not give the shipped file "
                                 f"{DATA_FILE.name}; the installation is damaged")
    return [r for r in rows if r["subset"] == subset]


def program(row: dict, completion: str) -> str:
    return mbpp.program(row, row["code_prefix"] + completion + row["code_suffix"])


def problems(subset: str = "single-line", data: str | Path | None = None) -> list[Problem]:
    return [Problem(task_id=r["task_id"], kind="infill", prompt=r["prefix"], suffix=r["suffix"],
                    program=lambda c, r=r: program(r, c), reference=r["middle"], timeout=mbpp.TIMEOUT,
                    meta={"subset": subset, "mbpp_task_id": r["mbpp_task_id"]})
            for r in rows_for(subset, data)]


def subset_of(task_id: str) -> str | None:
    """The subset named by a task id ``MBPP-Infilling-v1/<subset>/<n>``."""
    parts = task_id.split("/")
    if len(parts) == 3 and parts[0] + "/" == ID_PREFIX and parts[1] in SUBSETS:
        return parts[1]
    return None


def settings() -> dict:
    """What goes into the results' settings: which benchmark file, from which source."""
    return {"version": VERSION, "source_sha256": SOURCE["sha256"], "source_commit": SOURCE["commit"]}


# ---- scores ----------------------------------------------------------------------------------------------
def add_scores(results: dict, problems: Sequence[Problem], *, workers: int | None = None, limits=None,
               progress: bool = False, as_main: bool = False) -> dict:
    """Add the reference text metrics, the empty-middle pass rate, the bootstrap intervals and the metric
    definitions to ``results`` (from ``score_samples``/``run_benchmark`` with ``text_metrics=True``)."""
    from .harness import TEXT_METRICS, per_problem_values, score_samples

    by_id = {p.task_id: p for p in problems}
    values = per_problem_values(results)  # score_samples(text_metrics=True) put the text metrics on each sample
    per_problem = {key: values[key] for key in (*TEXT_METRICS, "pass@1")}
    m = results["metrics"]
    scored = [by_id[row["task_id"]] for row in results["problems"]]
    empty = score_samples(scored, [{"task_id": p.task_id, "completion": ""} for p in scored], workers=workers,
                          limits=limits, progress=progress, as_main=as_main)
    m["pass@1_empty_middle"] = empty["metrics"]["pass@1"]
    per_problem["pass@1_empty_middle"] = [float(row["correct"]) for row in empty["problems"]]
    results["empty_middle_passed"] = sorted((row["task_id"] for row in empty["problems"] if row["correct"]),
                                            key=lambda t: int(t.rsplit("/", 1)[1]))
    results["confidence_intervals"] = {
        key: list(bootstrap_ci(vals, n_resamples=CI["n_resamples"], seed=CI["seed"], level=CI["level"]))
        for key, vals in per_problem.items()}
    results["confidence_interval_method"] = dict(CI)
    results["metric_definitions"] = {key: METRIC_DEFINITIONS.get(key) or OWN_DEFINITIONS[key] for key in per_problem}
    return results


# ---- python -m codellama.evaluation.mbpp_infilling build -----------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m codellama.evaluation.mbpp_infilling",
                                 description=f"rebuild or verify the shipped MBPP-Infilling {VERSION} file")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the benchmark file from MBPP's mbpp.jsonl")
    b.add_argument("--data", required=True, help="mbpp.jsonl (sha256 " + SOURCE["sha256"][:12] + "...)")
    b.add_argument("--output", default=str(DATA_FILE), help="where to write (default: the package's file)")
    b.add_argument("--check", action="store_true", help="write nothing; exit 1 unless --output has these rows")
    args = ap.parse_args(argv)
    try:
        header, rows = build(args.data)
        data = serialize(header, rows)
        if args.check:
            same = Path(args.output).is_file() and gzip.decompress(Path(args.output).read_bytes()) == \
                gzip.decompress(data)
            print(f"{args.output}: {'identical to' if same else 'DIFFERS from'} a fresh build")
            return 0 if same else 1
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_bytes(data)
    except CodeLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.output}: {len(rows)} rows {header['counts']}, skipped "
          f"{ {s: len(v) for s, v in header['skipped'].items()} }, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
