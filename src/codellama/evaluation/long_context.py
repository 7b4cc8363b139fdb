"""Long-context probes of the paper (§3.3): synthetic key retrieval and perplexity vs token position.

Key retrieval: a prompt of syntactically valid Python (generated functions) with, at a relative depth, a
function returning a random integer; the prompt ends with ``assert <that function>() == `` and the model must
complete the value (greedy). Run over a grid of context lengths x depths; accuracy per cell, heatmap PNG.

Perplexity: per-token negative log-likelihood of long files, averaged per position bin over files, as
perplexity vs position (the paper's Figure 4a). The forward pass runs chunk by chunk through the KV cache, so
memory is O(chunk x vocab) for the logits whatever the file length; positions past the model's training
context are allowed (that is what the plot is for)."""

from __future__ import annotations

import math
import random
import re
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..errors import CodeLlamaError

if TYPE_CHECKING:
    from ..api import CodeLlama

KEY_NAME = "get_secret_value"
ANSWER_TOKENS = 10

_TEMPLATES = [
    "def {name}(x, y):\n    z = x * {a} + y\n    if z > {b}:\n        return z - {c}\n    return z + {d}\n",
    "def {name}(items):\n    total = 0\n    for item in items:\n        if item % {a} == 0:\n"
    "            total += item * {b}\n    return total - {c}\n",
    "def {name}(text):\n    words = text.split()\n    counts = {{}}\n    for w in words:\n"
    "        counts[w] = counts.get(w, 0) + {a}\n    return sorted(counts, key=counts.get)[:{b}]\n",
    "class {cname}:\n    def __init__(self, value={a}):\n        self.value = value\n\n"
    "    def step(self, n):\n        self.value = (self.value * {b} + n) % {c}\n        return self.value\n",
    "def {name}(n):\n    a, b = {a}, {b}\n    for _ in range(n):\n        a, b = b, (a + b) % {c}\n    return a\n",
]


def _filler_unit(rng: random.Random, i: int) -> str:
    t = rng.choice(_TEMPLATES)
    return t.format(name=f"helper_{i}_{rng.randrange(10**4)}", cname=f"Helper{i}x{rng.randrange(10**4)}",
                    a=rng.randrange(2, 97), b=rng.randrange(2, 997), c=rng.randrange(2, 9973),
                    d=rng.randrange(2, 97))


def key_function(value: int) -> str:
    return f'def {KEY_NAME}():\n    """Remember this value: it is checked at the end of the file."""\n    return {value}\n'


QUESTION = f"\n\nassert {KEY_NAME}() == "


def key_retrieval_prompt(tokenizer, length: int, depth: float, seed: int) -> tuple[str, int]:
    """(prompt, value): about ``length`` tokens of Python with the key function at relative ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise CodeLlamaError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"key-retrieval:{length}:{depth}:{seed}")
    value = rng.randrange(1000, 100000)
    key = key_function(value)
    budget = length - len(tokenizer.encode(key + QUESTION, bos=True))
    units, used = [], 0
    while True:
        unit = _filler_unit(rng, len(units)) + "\n"
        n = len(tokenizer.encode(unit))
        if used + n > budget:
            break
        units.append(unit)
        used += n
    # Top up with one-line assignments so the prompt lands within a few tokens of ``length``.
    while True:
        unit = f"CONSTANT_{len(units)} = {rng.randrange(10**6)}\n"
        n = len(tokenizer.encode(unit))
        if used + n > budget:
            break
        units.append(unit)
        used += n
    at = round(depth * len(units))
    prompt = "".join(units[:at]) + key + "\n" + "".join(units[at:])
    return prompt.rstrip("\n") + QUESTION, value


def parse_answer(text: str) -> int | None:
    m = re.match(r"\s*(-?\d+)", text)
    return int(m.group(1)) if m else None


def default_lengths(context: int) -> list[int]:
    """Powers of two from 256 up to the model's context (leaving room for the answer)."""
    out, n = [], 256
    while n + ANSWER_TOKENS < context:
        out.append(n)
        n *= 2
    top = context - ANSWER_TOKENS
    if top > 64 and (not out or top > out[-1]):
        out.append(top)
    return out


def key_retrieval(llama: "CodeLlama", lengths: Sequence[int], depths: Sequence[float], trials: int = 3,
                  seed: int = 0, batch_size: int = 8, progress: bool = True) -> dict:
    from .harness import _progress

    ctx = llama.config.max_seq_len
    cells = []
    bar = _progress(len(lengths) * len(depths) * trials, "key retrieval", progress)
    t0 = time.monotonic()
    for length in lengths:
        jobs = [(d, t) + key_retrieval_prompt(llama.tokenizer, length, d, seed * 1000 + t)
                for d in depths for t in range(trials)]
        outs: list = []
        fits = [j for j in jobs if len(llama.tokenizer.encode(j[2], bos=True)) + ANSWER_TOKENS <= ctx]
        for i in range(0, len(fits), batch_size):
            chunk = fits[i:i + batch_size]
            outs += llama.complete([j[2] for j in chunk], max_new_tokens=ANSWER_TOKENS, temperature=0.0,
                                   stop=["\n"])
            bar.update(len(chunk))
        bar.update(len(jobs) - len(fits))
        answers = {(j[0], j[1]): (j[3], o.text, len(llama.tokenizer.encode(j[2], bos=True)))
                   for j, o in zip(fits, outs)}
        for d in depths:
            rows = [answers.get((d, t)) for t in range(trials)]
            if any(r is None for r in rows):
                cells.append({"length": length, "depth": d, "accuracy": None, "skipped": "longer than the context"})
                continue
            correct = [parse_answer(text) == value for value, text, _ in rows]
            cells.append({"length": length, "depth": d, "accuracy": sum(correct) / trials,
                          "prompt_tokens": [n for _, _, n in rows],
                          "answers": [{"expected": v, "completion": text} for v, text, _ in rows]})
    bar.close()
    scored = [c["accuracy"] for c in cells if c["accuracy"] is not None]
    return {"benchmark": "key-retrieval", "model": llama.name, "model_params": llama.config.num_params(),
            "settings": {"lengths": list(lengths), "depths": list(depths), "n_samples": trials, "seed": seed,
                         "temperature": 0.0, "max_new_tokens": ANSWER_TOKENS, "context": ctx},
            "metrics": {"accuracy": sum(scored) / len(scored) if scored else None, "cells": len(scored),
                        "cells_skipped": len(cells) - len(scored)},
            "cells": cells, "generation_seconds": round(time.monotonic() - t0, 3)}


def key_retrieval_grid(results: dict) -> tuple[list, list, list[list]]:
    lengths, depths = results["settings"]["lengths"], results["settings"]["depths"]
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in results["cells"]}
    return lengths, depths, [[acc.get((length, d)) for d in depths] for length in lengths]


# ---- perplexity -------------------------------------------------------------------------------------------
def default_perplexity_files(n: int) -> list[Path]:
    """The longest *held-out* modules of the Python standard library: long real code every install has, and
    which the training pipeline's deterministic split (``training.corpus.split_of``) kept out of the embedded
    model's training data (the rest of the standard library is its training corpus)."""
    from ..training.corpus import EXCLUDED_DIRS, CorpusConfig, reject_reason, split_of

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    config = CorpusConfig()
    files = []
    for path in stdlib.rglob("*.py"):
        rel = path.relative_to(stdlib)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        if split_of(f"stdlib/{rel.as_posix()}", config) == "heldout" and \
                reject_reason(path.read_bytes(), config)[0] is None:  # no generated tables
            files.append(path)
    files.sort(key=lambda p: (-p.stat().st_size, str(p)))
    return files[:n]


def resolve_files(data: str | Path | None, limit: int | None) -> list[Path]:
    if data is None:
        return default_perplexity_files(limit or 8)
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".py", ".txt", ".c", ".java",
                                                                                    ".js", ".rs", ".go", ".cpp"))
    elif path.is_file():
        files = [path]
    else:
        raise CodeLlamaError(f"perplexity data not found: {path}")
    if not files:
        raise CodeLlamaError(f"no source files under {path}")
    return files[:limit] if limit else files


@torch.inference_mode()
def cached_perplexity(llama: "CodeLlama", tokens: Sequence[int], kv_dtype: torch.dtype, chunk: int = 256) -> float:
    """Teacher-forced perplexity of ``tokens`` through a KV cache of ``kv_dtype`` (torch.int8: the int8 cache),
    prefilled ``chunk`` tokens at a time, so later chunks attend to what the cache stored."""
    from ..model import KVCache

    ids = torch.tensor(list(tokens))
    n = len(tokens) - 1
    cache = KVCache.for_model(llama.model, 1, n, device=llama.device, dtype=kv_dtype)
    total = 0.0
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        logp = torch.log_softmax(llama.model(ids[start:end].unsqueeze(0), cache=cache)[0], dim=-1)
        total -= logp.gather(1, ids[start + 1:end + 1].unsqueeze(1)).sum().item()
    return math.exp(total / n)


def token_nlls(llama: "CodeLlama", tokens: Sequence[int], chunk: int = 512) -> list[float]:
    """NLL of tokens[1:] given everything before, computed chunk by chunk through the KV cache (stored as the
    model's ``kv_cache_dtype`` says: int8 measures what the int8 cache costs in perplexity)."""
    from ..generation_admission import resolve_kv_cache_dtype
    from ..model import KVCache

    if len(tokens) < 2:
        return []
    model = llama.model
    kv_dtype = resolve_kv_cache_dtype(getattr(llama, "kv_cache_dtype", None), llama.dtype) or llama.dtype
    cache = KVCache.for_model(model, 1, len(tokens) - 1, device=llama.device, dtype=kv_dtype)
    ids = torch.as_tensor(list(tokens), dtype=torch.long, device=llama.device)
    out = []
    for start in range(0, len(tokens) - 1, chunk):
        end = min(start + chunk, len(tokens) - 1)
        logits = model(ids[start:end].unsqueeze(0), cache=cache)[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = ids[start + 1:end + 1]
        out += (-logp.gather(1, target.unsqueeze(1)).squeeze(1)).tolist()
    return out


def perplexity(llama: "CodeLlama", files: Sequence[Path], max_length: int, bin_size: int,
               chunk: int = 512, progress: bool = True) -> dict:
    from .harness import _progress

    if max_length < 2:
        raise CodeLlamaError("--max-length must be at least 2 tokens")
    if bin_size < 1:
        raise CodeLlamaError("--bin-size must be >= 1")
    n_bins = math.ceil((max_length - 1) / bin_size)
    sums, counts = [0.0] * n_bins, [0] * n_bins
    per_file = []
    bar = _progress(len(files), "perplexity", progress)
    t0 = time.monotonic()
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise CodeLlamaError(f"cannot read {f}: {e}") from None
        toks = llama.tokenizer.encode(text, bos=True)[:max_length]
        nll = token_nlls(llama, toks, chunk)
        for i, v in enumerate(nll):  # v is the loss of the token at position i + 1
            sums[i // bin_size] += v
            counts[i // bin_size] += 1
        if nll:
            per_file.append({"file": str(f), "tokens": len(toks), "perplexity": math.exp(sum(nll) / len(nll))})
        bar.update(1)
    bar.close()
    bins = [{"start": b * bin_size + 1, "end": min((b + 1) * bin_size, max_length - 1), "tokens": counts[b],
             "nll": sums[b] / counts[b], "perplexity": math.exp(sums[b] / counts[b])}
            for b in range(n_bins) if counts[b]]
    total = sum(counts)
    return {"benchmark": "perplexity", "model": llama.name, "model_params": llama.config.num_params(),
            "settings": {"max_length": max_length, "bin_size": bin_size, "chunk": chunk, "files": len(files),
                         "context": llama.config.max_seq_len,
                         "kv_cache_dtype": getattr(llama, "kv_cache_dtype", None) or "auto"},
            "metrics": {"perplexity": math.exp(sum(sums) / total) if total else None, "tokens": total,
                        "files": len(per_file)},
            "bins": bins, "files": per_file, "generation_seconds": round(time.monotonic() - t0, 3)}
