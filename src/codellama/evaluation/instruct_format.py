"""Does an instruct model answer in the Code Llama - Instruct format? (issue 15, acceptance)

On N held-out instructions (default: the first 100 MBPP *test* problems, task_ids 11-510, asked in one user
turn: the task and its tests as MBPP's chat mode sends them, then ``instruct_data.PYTHON_INSTRUCTION``, the very
words the ``tiny-instruct`` training rows use) the replies are generated greedily with a token budget and
measured:

- ``eos_rate``: share of replies that ended with the end-of-turn token (eos; ``<step>`` for the 70B layout)
  within the budget, i.e. generation's ``finish_reason == "stop"`` (no stop strings are passed, so "stop" can
  only mean a stop token); ``"length"`` means the budget or the context ran out;
- ``parse_rate``: share whose first ``[PYTHON] ... [/PYTHON]`` block exists (both tags) and parses with ``ast``;
- ``block_rate``: share with such a block at all (parsing or not);
- ``mean_reply_tokens`` / ``mean_reply_chars``: mean reply length (tokens exclude the closing eos).

A prompt with no room left in the model's context gets no reply and counts as a failure on every rate
(``prompts_over_context``). Pass@1 is ``codellama eval mbpp --chat``'s business, not this module's."""

from __future__ import annotations

import ast
import time
import warnings
from pathlib import Path
from typing import Sequence

from ..errors import CodeLlamaError

DEFAULT_LIMIT = 100
DEFAULT_MAX_NEW_TOKENS = 256


def held_out_prompts(data: str | Path, limit: int | None = DEFAULT_LIMIT) -> list[dict]:
    """``[{"task_id", "messages"}]`` for the first ``limit`` MBPP test problems (task_ids 11-510)."""
    from ..instruct_data import mbpp_user_message
    from .mbpp import load_mbpp, test_rows

    if limit is not None and limit < 1:
        raise CodeLlamaError(f"--limit must be >= 1, got {limit}")
    rows = test_rows(load_mbpp(data))
    if limit is not None:
        rows = rows[:limit]
    return [{"task_id": f"MBPP/{r['task_id']}", "messages": [{"role": "user", "content": mbpp_user_message(r)}]}
            for r in rows]


def python_block_parses(reply: str) -> tuple[bool, bool]:
    """(has a closed ``[PYTHON]`` block, its first block parses with ``ast``)."""
    from ..instruct_data import python_blocks

    blocks = python_blocks(reply)
    if not blocks:
        return False, False
    try:
        with warnings.catch_warnings():  # a reply's invalid escapes are no business of the user's terminal
            warnings.simplefilter("ignore")
            ast.parse(blocks[0])
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return True, False
    return True, True


def _as_dialog(p) -> list[dict]:
    if isinstance(p, dict) and "messages" in p:
        return list(p["messages"])
    if isinstance(p, str):
        return [{"role": "user", "content": p}]
    if isinstance(p, (list, tuple)):
        return list(p)
    raise CodeLlamaError(f"a prompt must be a string, a dialog or {{'messages': ...}}, got {type(p).__name__}")


def instruct_format_report(model, prompts: Sequence, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, *,
                           batch_size: int = 8, progress: bool = False) -> dict:
    """Greedy replies of ``model`` (a ``CodeLlama``) to ``prompts`` (strings, dialogs, or
    ``{"task_id", "messages"}`` as from ``held_out_prompts``), and the format rates of the module docstring.
    Returns ``{"n", "eos_rate", "parse_rate", "block_rate", "mean_reply_tokens", "mean_reply_chars",
    "prompts_over_context", "max_new_tokens", "replies": [...]}``."""
    from ..formats import chat_tokens

    if not prompts:
        raise CodeLlamaError("instruct_format_report needs at least one prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise CodeLlamaError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if batch_size < 1:
        raise CodeLlamaError(f"batch_size must be >= 1, got {batch_size}")
    dialogs = [_as_dialog(p) for p in prompts]
    ids = [p.get("task_id") if isinstance(p, dict) else None for p in prompts]
    context = model.config.max_seq_len
    fits = [len(chat_tokens(model.tokenizer, d)) < context for d in dialogs]
    results: list[dict | None] = [None] * len(dialogs)
    todo = [i for i, ok in enumerate(fits) if ok]
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="instruct-format", unit="reply")
    for b in range(0, len(todo), batch_size):
        batch = todo[b:b + batch_size]
        outs = model.chat([dialogs[i] for i in batch], max_new_tokens=max_new_tokens, temperature=0.0,
                          shrink_max_new_tokens=True)
        for i, c in zip(batch, outs):
            has_block, parses = python_block_parses(c.text)
            results[i] = {"reply": c.text, "tokens": len(c.tokens), "finish_reason": c.finish_reason,
                          "eos": c.finish_reason == "stop", "has_block": has_block, "parses": parses}
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    for i, ok in enumerate(fits):
        if not ok:
            results[i] = {"reply": "", "tokens": 0, "finish_reason": "over_context", "eos": False,
                          "has_block": False, "parses": False}
    n = len(results)
    for i, r in enumerate(results):
        r["task_id"] = ids[i] if ids[i] is not None else i
    return {"n": n,
            "eos_rate": sum(r["eos"] for r in results) / n,
            "parse_rate": sum(r["parses"] for r in results) / n,
            "block_rate": sum(r["has_block"] for r in results) / n,
            "mean_reply_tokens": sum(r["tokens"] for r in results) / n,
            "mean_reply_chars": sum(len(r["reply"]) for r in results) / n,
            "prompts_over_context": n - sum(fits),
            "max_new_tokens": max_new_tokens,
            "seconds": round(time.perf_counter() - start, 3),
            "replies": results}


def format_summary(report: dict, name: str = "") -> str:
    who = f"{name}: " if name else ""
    line = (f"{who}{report['n']} instructions, budget {report['max_new_tokens']} tokens: "
            f"ends with eos {report['eos_rate']:.1%}, [PYTHON] block parses {report['parse_rate']:.1%} "
            f"(block present {report['block_rate']:.1%}), mean reply {report['mean_reply_tokens']:.1f} tokens")
    if report.get("prompts_over_context"):
        line += f"; {report['prompts_over_context']} prompt(s) over the context counted as failures"
    return line


METRIC_KEYS = ("eos_rate", "parse_rate", "block_rate", "mean_reply_tokens", "mean_reply_chars",
               "prompts_over_context", "n")


def results_json(llama, report: dict, settings: dict) -> dict:
    """The report as a ``codellama eval`` results file (``benchmark``, ``metrics``, ...), so that
    ``codellama eval compare`` sets it beside other models' and benchmarks' numbers."""
    return {"benchmark": "instruct-format", "model": llama.name, "model_params": llama.config.num_params(),
            "settings": {"max_new_tokens": report["max_new_tokens"], "temperature": 0.0, **settings},
            "metrics": {k: report[k] for k in METRIC_KEYS},
            "generation_seconds": report["seconds"], "problems": report["replies"]}


def run_command(args, load) -> dict:
    """``codellama eval instruct-format``: load the model with ``load(args)`` and build the results."""
    prompts = held_out_prompts(args.data, args.limit)
    llama = load(args)
    report = instruct_format_report(llama, prompts, args.max_new_tokens, batch_size=args.batch_size,
                                    progress=not args.no_progress)
    return results_json(llama, report, {"limit": args.limit, "data": str(args.data)})
