"""Measure a small model trained on the standard library (by default the embedded one) on files it never saw.

    python -m codellama.training.evaluate_default [--model DIR] [--cases 500] [--functions 20] [--json OUT]

1. Validation loss (nats/token) on the validation split, as trained (FIM mixture) and plain left-to-right,
   next to the unigram baseline (train-split token frequencies) on the same tokens.
2. Single-line infilling: one non-blank line of a held-out file is masked; PSM prompt (and, reported next to
   it, SPM) with up to ``prefix_chars`` before and ``suffix_chars`` after (cut at line boundaries); greedy; exact
   match when the first generated line equals the masked line (trailing whitespace ignored, indentation must
   match). Also reported: the match rate ignoring indentation, which separates wrong content from wrong spacing.
3. Function completion: the signature (``def`` header) of held-out module-level functions is the prompt; greedy
   completion is truncated at the function's end (the first non-blank line at column 0), or at its last
   complete line if it runs out of tokens; success when signature + body parses with ``ast.parse``. Reported
   next to it: the same over every ``def`` (methods and nested functions dedented to column 0). A method header
   out of its class is a prompt the model has never seen (its body is one level deeper than the code after it),
   and its end is not a column-0 line, so the target is stated on functions.

The held-out and validation files are recomputed from the corpus split (a hash of each path), so the numbers
reproduce without the training run's files."""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..api import CodeLlama, load
from ..formats import infilling_tokens
from .corpus import CorpusConfig, Document, build_corpus
from .data import load_tokens, num_sequences, tokenize_documents, unigram_cross_entropy
from .fim import FIMConfig
from .trainer import evaluate_loss


@dataclass
class InfillCase:
    path: str
    prefix: str
    line: str
    suffix: str


def infill_cases(docs: list[Document], n: int, seed: int = 0, prefix_chars: int = 400,
                 suffix_chars: int = 300) -> list[InfillCase]:
    """``n`` masked lines drawn uniformly (without replacement) from all non-blank lines of ``docs``."""
    candidates = [(d, i) for d in docs for i, line in enumerate(d.text.splitlines()) if line.strip()]
    rng = random.Random(seed)
    picked = rng.sample(candidates, min(n, len(candidates)))
    cases = []
    for doc, i in picked:
        lines = doc.text.splitlines(keepends=True)
        before, after = lines[:i], lines[i + 1:]
        prefix = ""
        for line in reversed(before):  # whole lines, nearest first, within the budget
            if len(prefix) + len(line) > prefix_chars:
                break
            prefix = line + prefix
        suffix = ""
        for line in after:
            if len(suffix) + len(line) > suffix_chars:
                break
            suffix += line
        cases.append(InfillCase(doc.path, prefix, lines[i].rstrip("\n"), suffix))
    return cases


def function_prompts(docs: list[Document], n: int, seed: int = 0, scope: str = "module") -> list[str]:
    """``n`` function headers (``def name(args):``, decorators excluded) from ``docs``: module-level functions
    (``scope="module"``) or every ``def``, dedented (``scope="any"``)."""
    headers = []
    for doc in docs:
        try:
            tree = ast.parse(doc.text)
        except SyntaxError:
            continue
        lines = doc.text.splitlines()
        for node in (tree.body if scope == "module" else ast.walk(tree)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                header = "\n".join(lines[node.lineno - 1: node.body[0].lineno - 1])
                # Only the header up to its colon: a docstring or body on the same lines is not part of it.
                header = textwrap.dedent(header).rstrip()
                if header.endswith(":") and len(header) < 300:
                    try:
                        ast.parse(header + "\n    pass\n")
                    except SyntaxError:
                        continue
                    headers.append(header)
    headers = sorted(set(headers))
    return random.Random(seed).sample(headers, min(n, len(headers)))


def truncate_function(prompt: str, completion: str) -> str:
    """The body of the completed function: up to the first non-blank line at column 0, else whole lines."""
    body = []
    lines = completion.split("\n")
    complete_lines = lines if completion.endswith("\n") else lines[:-1]
    for line in complete_lines[:]:
        if line.strip() and not line[0].isspace():
            return "\n".join(body) + "\n"
        body.append(line)
    return "\n".join(complete_lines) + "\n"


def parses(source: str) -> bool:
    try:
        ast.parse(source)
        return True
    except (SyntaxError, ValueError):
        return False


def fit_case(llama: CodeLlama, case: InfillCase, max_new_tokens: int) -> InfillCase:
    """Drop the farthest prefix / suffix lines until prompt and answer fit the model's context."""
    prefix, suffix = case.prefix.splitlines(keepends=True), case.suffix.splitlines(keepends=True)
    budget = llama.config.max_seq_len - max_new_tokens
    while len(infilling_tokens(llama.tokenizer, "".join(prefix), "".join(suffix))) > budget and (prefix or suffix):
        if len(prefix) >= len(suffix):
            prefix.pop(0)
        else:
            suffix.pop()
    return InfillCase(case.path, "".join(prefix), case.line, "".join(suffix))


def evaluate_infilling(llama: CodeLlama, cases: list[InfillCase], batch_size: int = 16,
                       max_new_tokens: int = 40, suffix_first: bool = False) -> dict:
    hits, content_hits, examples = 0, 0, []
    cases = [fit_case(llama, c, max_new_tokens) for c in cases]
    for start in range(0, len(cases), batch_size):
        chunk = cases[start:start + batch_size]
        outs = llama.infill([c.prefix for c in chunk], [c.suffix for c in chunk], max_new_tokens=max_new_tokens,
                            suffix_first=suffix_first)
        for case, out in zip(chunk, outs):
            predicted = out.text.split("\n")[0].rstrip()
            ok = predicted == case.line.rstrip()
            hits += ok
            content_hits += predicted.strip() == case.line.strip()
            if len(examples) < 8:
                examples.append({"path": case.path, "line": case.line, "predicted": predicted, "exact": ok})
    n = max(1, len(cases))
    return {"cases": len(cases), "format": "spm" if suffix_first else "psm", "exact_match": hits / n,
            "match_ignoring_indentation": content_hits / n, "examples": examples}


def evaluate_functions(llama: CodeLlama, prompts: list[str], max_new_tokens: int = 160) -> dict:
    outs = llama.complete([p + "\n" for p in prompts], max_new_tokens=max_new_tokens)
    ok, examples = 0, []
    for prompt, out in zip(prompts, outs):
        source = prompt + "\n" + truncate_function(prompt, out.text)
        good = parses(source)
        ok += good
        examples.append({"source": source, "parses": good})
    return {"functions": len(prompts), "parse_rate": ok / max(1, len(prompts)), "examples": examples}


def evaluate_losses(llama: CodeLlama, splits: dict[str, list[Document]], seq_len: int, seed: int = 1235,
                    doc_chars: int = 600) -> dict:
    tok, out = llama.tokenizer, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenize_documents(tok, splits["train"], tmp / "train.bin", fim=FIMConfig(rate=0.0), doc_chars=0,
                           passes=1, seed=seed)
        train = load_tokens(tmp / "train.bin", tok.n_words)
        for name, fim in (("fim_mixture", FIMConfig()), ("plain", FIMConfig(rate=0.0))):
            tokenize_documents(tok, splits["val"], tmp / f"{name}.bin", fim=fim, doc_chars=doc_chars, passes=1,
                               seed=seed)
            val = load_tokens(tmp / f"{name}.bin", tok.n_words)
            n_seq = num_sequences(len(val), seq_len)
            loss = evaluate_loss(llama.model, val, seq_len, 8, (n_seq + 7) // 8, llama.device)
            used = np.asarray(val[: n_seq * seq_len + 1])[1:]
            out[name] = {"val_loss": loss, "unigram_loss": unigram_cross_entropy(train, used, tok.n_words),
                         "tokens": int(n_seq * seq_len)}
    return out


def evaluate(model: str | None = None, cases: int = 500, functions: int = 20, seed: int = 0,
             device: str | None = "cpu") -> dict:
    llama = load(model, device=device, dtype=torch.float32)
    splits, stats = build_corpus(CorpusConfig())
    seq_len = min(llama.config.max_seq_len, 256)
    t0 = time.time()
    result = {"model": model or "default", "params": llama.config.num_params(),
              "corpus": {"heldout_files": stats.files["heldout"], "val_files": stats.files["val"]}}
    result["loss"] = evaluate_losses(llama, splits, seq_len)
    masked = infill_cases(splits["heldout"], cases, seed)
    result["infilling"] = evaluate_infilling(llama, masked)
    result["infilling_spm"] = evaluate_infilling(llama, masked, suffix_first=True)
    result["functions"] = evaluate_functions(llama, function_prompts(splits["heldout"], functions, seed))
    result["functions_any_scope"] = evaluate_functions(
        llama, function_prompts(splits["heldout"], functions, seed, scope="any"))
    t1 = time.time()
    llama.complete("def fibonacci(n):", max_new_tokens=64)
    result["quickstart_complete_s"] = round(time.time() - t1, 2)
    result["wall_s"] = round(t1 - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    parser.add_argument("--cases", type=int, default=500)
    parser.add_argument("--functions", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the full result here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate(args.model, args.cases, args.functions, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    short = {k: v for k, v in result.items()
             if k not in ("infilling", "infilling_spm", "functions", "functions_any_scope")}
    for key in ("infilling", "infilling_spm"):
        short[f"{key}_exact_match"] = result[key]["exact_match"]
        short[f"{key}_match_ignoring_indentation"] = result[key]["match_ignoring_indentation"]
    short["function_parse_rate"] = result["functions"]["parse_rate"]
    short["function_parse_rate_any_scope"] = result["functions_any_scope"]["parse_rate"]
    print(json.dumps(short, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
