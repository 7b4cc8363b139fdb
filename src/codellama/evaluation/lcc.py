"""LCC-style long-code completion (Guo et al., 2023, "LongCoder"): next-line completion from a long context.

From each long source file a cut point is drawn at a line boundary whose next line is non-blank; the context is
the text before it, truncated from the left to at most ``context_tokens`` tokens, and the target is that next
line (without its newline). The model continues the context greedily and its first generated line is scored
with the CodeXGLUE / LCC definitions (``metrics.METRIC_DEFINITIONS``): exact match, edit similarity as
rapidfuzz ``fuzz.ratio`` of the stripped strings (0-100), corpus BLEU-4, plus this project's Levenshtein edit
similarity (0-1)."""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import CodeLlamaError
from .metrics import (METRIC_DEFINITIONS, bleu, edit_similarity, edit_similarity_lcc, exact_match_codexglue,
                      normalize_code)

if TYPE_CHECKING:
    from ..api import CodeLlama

SOURCE_SUFFIXES = (".py", ".c", ".h", ".cc", ".cpp", ".java", ".js", ".ts", ".go", ".rs", ".cs", ".rb", ".txt")


@dataclass
class Example:
    file: str
    line: int  # 1-based number of the target line in the file
    context: str
    target: str


def _resolve(files: Sequence[Path | str] | Path | str) -> list[Path]:
    if isinstance(files, (str, Path)):
        path = Path(files)
        if path.is_dir():
            out = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)
        elif path.is_file():
            out = [path]
        else:
            raise CodeLlamaError(f"no such file or directory: {path}")
    else:
        out = [Path(p) for p in files]
    if not out:
        raise CodeLlamaError(f"no source files in {files}")
    return out


def _truncate_left(tokenizer, text: str, context_tokens: int) -> str:
    """The longest suffix of ``text`` (starting at a line start when one fits) encoding to <= context_tokens."""
    def fits(start: int) -> bool:
        return len(tokenizer.encode(text[start:])) <= context_tokens

    if fits(0):
        return text

    def first_fitting(points: Sequence[int]) -> int | None:
        # Binary search: a later start is a shorter suffix, so (for a sane tokenizer) fitting is monotone.
        lo, hi = 0, len(points)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(points[mid]) else (mid + 1, hi)
        return points[lo] if lo < len(points) else None

    starts = [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 < len(text)]
    start = first_fitting(starts)
    if start is None:  # even the last line is too long: cut inside it
        start = first_fitting(range(starts[-1] if starts else 0, len(text))) or len(text)
    while start < len(text) and not fits(start):  # guarantee the bound even where counts are not monotone
        start += 1
    return text[start:]


def build_examples(files: Sequence[Path | str] | Path | str, tokenizer, context_tokens: int, n_per_file: int = 1,
                   seed: int = 0) -> list[Example]:
    """``n_per_file`` examples per file (fewer where a file has fewer cut points), deterministic in ``seed``,
    the file names and contents."""
    if context_tokens < 1:
        raise CodeLlamaError(f"context_tokens must be >= 1, got {context_tokens}")
    if n_per_file < 1:
        raise CodeLlamaError(f"n_per_file must be >= 1, got {n_per_file}")
    examples: list[Example] = []
    for path in _resolve(files):
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        lines = text.splitlines(keepends=True)
        offsets, pos = [], 0
        for line in lines:
            offsets.append(pos)
            pos += len(line)
        seen_code = False
        candidates = []
        for i, line in enumerate(lines):
            if line.strip() and seen_code:
                candidates.append(i)
            seen_code = seen_code or bool(line.strip())
        if not candidates:
            continue
        rng = random.Random(f"lcc:{seed}:{path.name}:{len(text)}")
        for i in sorted(rng.sample(candidates, min(n_per_file, len(candidates)))):
            context = _truncate_left(tokenizer, text[:offsets[i]], context_tokens)
            examples.append(Example(file=str(path), line=i + 1, context=context, target=lines[i].rstrip("\n")))
    if not examples:
        raise CodeLlamaError("no completion points found in the given files")
    return examples


def first_line(completion: str) -> str:
    """The generated text up to (not including) the first newline."""
    return completion.split("\n", 1)[0]


def score(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """Means over examples, each under the name of its definition (``metrics.METRIC_DEFINITIONS``):
    ``exact_match_codexglue`` (percent), ``edit_similarity_lcc`` (rapidfuzz fuzz.ratio, 0-100), ``edit_similarity``
    (this project's Levenshtein ratio, 0-1) and corpus ``bleu`` (0-100). Predictions are scored as given (pass
    first lines)."""
    if len(predictions) != len(examples):
        raise CodeLlamaError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise CodeLlamaError("no examples to score")
    n = len(examples)
    targets = [ex.target for ex in examples]
    return {
        "exact_match_codexglue": 100.0 * sum(exact_match_codexglue(p, t) for p, t in zip(predictions, targets)) / n,
        "edit_similarity_lcc": sum(edit_similarity_lcc(p, t) for p, t in zip(predictions, targets)) / n,
        "edit_similarity": sum(edit_similarity(normalize_code(p), normalize_code(t))
                               for p, t in zip(predictions, targets)) / n,
        "bleu": bleu(predictions, targets),
        "examples": n,
    }


def run_lcc(llama: "CodeLlama", examples: Sequence[Example], max_new_tokens: int = 64,
            progress: bool = False) -> dict:
    """Greedy next-line completion of every example: the results dict (``report.write_results``) with metrics,
    their definitions, settings and per-example rows."""
    from tqdm import tqdm

    t0 = time.monotonic()
    predictions, rows = [], []
    bar = tqdm(total=len(examples), desc="lcc", unit="example", disable=not progress, dynamic_ncols=True)
    for ex in examples:
        completion = llama.complete(ex.context, max_new_tokens=max_new_tokens, stop=["\n"])
        pred = first_line(completion.text)
        predictions.append(pred)
        row = asdict(ex)
        del row["context"]
        row.update(prediction=pred, exact_match_codexglue=exact_match_codexglue(pred, ex.target),
                   edit_similarity_lcc=edit_similarity_lcc(pred, ex.target))
        rows.append(row)
        bar.update(1)
    bar.close()
    metrics = score(predictions, examples)
    return {"benchmark": "lcc", "model": getattr(llama, "name", None),
            "model_params": llama.config.num_params() if hasattr(llama, "config") else None,
            "settings": {"max_new_tokens": max_new_tokens, "examples": len(examples), "greedy": True},
            "metrics": metrics, "metric_definitions": {k: METRIC_DEFINITIONS[k] for k in metrics
                                                       if k in METRIC_DEFINITIONS},
            "examples": rows, "generation_seconds": round(time.monotonic() - t0, 3)}


def run_command(args, load) -> dict:
    """``codellama eval lcc``: examples from ``--data`` (a directory or file) or, by default, the longest held-out
    modules of the standard library (never in the embedded model's training data), then :func:`run_lcc`."""
    from .long_context import default_perplexity_files

    for name in ("n_per_file", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise CodeLlamaError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise CodeLlamaError(f"--limit must be >= 1, got {args.limit}")
    files = _resolve(args.data) if args.data else default_perplexity_files(args.limit or 8)
    files = files[:args.limit] if args.limit else files
    llama = load(args)
    window = llama.config.max_seq_len
    context_tokens = args.context_tokens or window - args.max_new_tokens
    if not 0 < context_tokens <= window - args.max_new_tokens:
        raise CodeLlamaError(f"--context-tokens + --max-new-tokens must fit the model's context ({window} tokens)")
    examples = build_examples(files, llama.tokenizer, context_tokens, args.n_per_file, args.seed)
    results = run_lcc(llama, examples, args.max_new_tokens, progress=not args.no_progress)
    results["settings"].update(context_tokens=context_tokens, n_per_file=args.n_per_file, seed=args.seed,
                               data=str(args.data) if args.data else "stdlib held-out split", files=len(files))
    return results
