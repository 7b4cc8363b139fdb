"""What every functional-correctness benchmark shares: problems, resumable JSONL sample files, batched
generation, sandboxed scoring and the results dictionary written by ``report.py``.

A benchmark module only has to turn its data into ``Problem`` objects (how to prompt, how to build the program
that tests a completion); ``run_benchmark`` does the rest."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from ..errors import CodeLlamaError
from .execution import DEFAULT_TIMEOUT, Executor, Limits, summarize_statuses
from .metrics import (
    METRIC_DEFINITIONS,
    edit_similarity,
    edit_similarity_lcc,
    exact_match,
    exact_match_codexglue,
    mean_pass_at_k,
)

TEXT_METRICS = ("exact_match", "edit_similarity", "exact_match_codexglue", "edit_similarity_lcc")

if TYPE_CHECKING:
    from ..api import CodeLlama


@dataclass
class Problem:
    """One benchmark problem.

    ``kind`` says how the model is asked: ``"complete"`` continues ``prompt``; ``"infill"`` fills the middle
    between ``prompt`` (the prefix) and ``suffix``; ``"chat"`` sends ``messages`` to an instruct model and
    ``extract`` turns the reply into code. ``program(completion)`` is the full test program to execute.
    ``reference`` is the canonical completion (for exact match / edit similarity and for self-checks)."""

    task_id: str
    kind: str
    program: Callable[[str], str]
    prompt: str = ""
    suffix: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)
    extract: Callable[[str], str] | None = None
    stop: list[str] = field(default_factory=list)
    reference: str = ""
    timeout: float = DEFAULT_TIMEOUT
    meta: dict[str, Any] = field(default_factory=dict)
    language: str = "python"  # anything else runs with multipl_e.run_programs (that language's toolchain)


SEED_STRIDE = 100_000  # seed of sample s of problem i: seed + i * SEED_STRIDE + s


@dataclass
class GenerationSettings:
    """How samples are generated; all of it goes into the results JSON and into each sample's settings hash."""

    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    batch_size: int = 8
    seed: int = 0
    suffix_first: bool = False  # SPM instead of PSM for infilling

    def __post_init__(self) -> None:
        if not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise CodeLlamaError(f"--n-samples must be an integer >= 1, got {self.n_samples!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise CodeLlamaError(f"--batch-size must be an integer >= 1, got {self.batch_size!r}")
        from ..sampling import validate_sampling
        validate_sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                          max_new_tokens=self.max_new_tokens)

    def key(self, benchmark: str) -> str:
        """A short hash of everything that changes what a sample is (not batch size: batching is exact)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("batch_size", "n_samples")}
        d["benchmark"] = benchmark
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# ---- samples files ------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise CodeLlamaError(f"samples file not found: {path}")
    rows = []
    # Bytes that are not UTF-8 become lone surrogates: such a completion then fails to run, it never stops
    # the others from being scored.
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                # An interrupted write leaves a partial last line: drop it (it is regenerated on resume).
                if f.readline() == "":
                    break
                raise CodeLlamaError(f"{path}:{i}: not valid JSON") from None
    return rows


def load_existing_samples(path: Path, settings_key: str) -> dict[tuple[str, int], dict]:
    if not path.exists():
        return {}
    done: dict[tuple[str, int], dict] = {}
    for row in read_jsonl(path):
        if row.get("settings") != settings_key:
            raise CodeLlamaError(f"{path} holds samples made with other settings (or another benchmark); "
                                 "pass a different --samples path or --overwrite")
        done[(row["task_id"], int(row.get("sample", 0)))] = row
    return done


def _truncate_partial_line(path: Path) -> None:
    """After an interruption the file may end mid-line; cut it back to the last newline before appending."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False)


def consecutive_groups(items: Sequence, index, split: bool = True) -> list[list]:
    """``items`` cut into runs whose ``index(item)`` goes up by exactly one (one run when not ``split``): the rows
    of one seeded generation call draw seeds seed, seed + 1, ..., so a call may only hold consecutive samples."""
    groups, cur = [], [items[0]]
    for item in items[1:]:
        if not split or index(item) == index(cur[-1]) + 1:
            cur.append(item)
        else:
            groups.append(cur)
            cur = [item]
    groups.append(cur)
    return groups


def extract_code(reply: str, entry_point: str | None = None) -> str:
    """The code in an instruct model's reply: the first ``[PYTHON] ... [/PYTHON]`` block (Code Llama -
    Instruct's style) or fenced block that defines ``entry_point`` (or the first such block), else the reply."""
    blocks = re.findall(r"\[PYTHON\]\n?(.*?)(?:\[/PYTHON\]|$)", reply, flags=re.S)
    blocks += re.findall(r"```(?:[a-zA-Z0-9_+-]*)\n(.*?)(?:```|$)", reply, flags=re.S)
    if entry_point:
        for b in blocks:
            if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", b):
                return b
    return blocks[0] if blocks else reply


def generate_samples(llama: "CodeLlama", benchmark: str, problems: Sequence[Problem],
                     settings: GenerationSettings, samples_path: str | Path, *, progress: bool = True,
                     overwrite: bool = False) -> list[dict]:
    """Generate ``n_samples`` completions per problem, appending each finished batch to ``samples_path``
    (one JSON line per sample) so an interrupted run resumes where it stopped. Returns all samples.

    Seeds: sample ``s`` of the ``i``-th problem is drawn with seed ``settings.seed + i * SEED_STRIDE + s``,
    whatever the batch size, ``n_samples`` and whatever was generated before an interruption."""
    samples_path = Path(samples_path)
    key = settings.key(benchmark)
    if overwrite and samples_path.exists():
        samples_path.unlink()
    done = load_existing_samples(samples_path, key)
    greedy = settings.temperature == 0.0
    # Greedy decoding is deterministic: one generation per problem, copied to every sample index.
    if settings.n_samples > SEED_STRIDE:
        raise CodeLlamaError(f"--n-samples must be at most {SEED_STRIDE}")
    jobs = [(i * SEED_STRIDE + s, p, s) for i, p in enumerate(problems) for s in range(settings.n_samples)]
    todo = [(g, p, s) for g, p, s in jobs if (p.task_id, s) not in done and not (greedy and s > 0)]
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    _truncate_partial_line(samples_path)
    bar = _progress(len(todo), f"generating {benchmark}", progress)
    by_kind: dict[tuple, list] = {}
    for job in todo:  # one batched call needs one prompt kind and one set of stop strings
        by_kind.setdefault((job[1].kind, tuple(job[1].stop)), []).append(job)
    with open(samples_path, "a", encoding="utf-8") as out:
        for (kind, _), kind_jobs in by_kind.items():
            if greedy:  # similar lengths in one batch waste less on padding; seeds do not matter here
                kind_jobs.sort(key=lambda job: len(job[1].prompt) + len(job[1].suffix)
                               + sum(len(m["content"]) for m in job[1].messages))
            for start in range(0, len(kind_jobs), settings.batch_size):
                batch = kind_jobs[start:start + settings.batch_size]
                rows = _generate_batch(llama, kind, batch, settings)
                for row in rows:
                    row["settings"] = key
                    out.write(json.dumps(row) + "\n")
                    done[(row["task_id"], row["sample"])] = row
                out.flush()
                bar.update(len(batch))
    bar.close()
    result = []
    for p in problems:
        for s in range(settings.n_samples):
            row = done.get((p.task_id, s)) or dict(done[(p.task_id, 0)], sample=s)
            result.append(row)
    return result


def _generate_batch(llama: "CodeLlama", kind: str, batch: list, settings: GenerationSettings) -> list[dict]:
    """One batched call; prompts that do not fit the model's context get an empty completion, marked."""
    ctx = llama.config.max_seq_len
    fits, rows = [], {}
    for g, p, s in batch:
        n_prompt = _prompt_length(llama, p, settings)
        if n_prompt >= ctx:
            rows[g] = {"task_id": p.task_id, "sample": s, "completion": "", "finish_reason": "context",
                       "prompt_tokens": n_prompt}
        else:
            fits.append((g, p, s))
    if fits:
        # shrink_max_new_tokens: a long prompt gets what is left of the context (finish_reason "length"), as
        # Meta's evaluation does, rather than an error.
        common = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                      top_p=settings.top_p, top_k=settings.top_k, shrink_max_new_tokens=True,
                      seed=None if settings.temperature == 0 else settings.seed + fits[0][0])
        # Sampling: row r of a call gets seed + r, so a call may only hold consecutive sample indices; split
        # the batch wherever they are not. Greedy needs no seed and batches freely.
        for group in consecutive_groups(fits, lambda job: job[0], split=common["seed"] is not None):
            if common["seed"] is not None:
                common["seed"] = settings.seed + group[0][0]
            stop = list(group[0][1].stop)
            if kind == "complete":
                outs = llama.complete([p.prompt for _, p, _ in group], stop=stop or None, **common)
            elif kind == "infill":
                outs = llama.infill([p.prompt for _, p, _ in group], [p.suffix for _, p, _ in group],
                                    suffix_first=settings.suffix_first, stop=stop or None, **common)
            elif kind == "chat":
                outs = llama.chat([p.messages for _, p, _ in group], stop=stop or None, **common)
            else:
                raise CodeLlamaError(f"unknown problem kind {kind!r}")
            for (g, p, s), c in zip(group, outs):
                text = c.text
                row = {"task_id": p.task_id, "sample": s, "completion": text, "finish_reason": c.finish_reason,
                       "prompt_tokens": c.prompt_tokens, "new_tokens": len(c.tokens)}
                if kind == "chat":
                    row["reply"] = text
                    row["completion"] = p.extract(text) if p.extract else text
                rows[g] = row
    return [rows[g] for g, _, _ in batch]


def _prompt_length(llama: "CodeLlama", p: Problem, settings: GenerationSettings) -> int:
    tok = llama.tokenizer
    if p.kind == "complete":
        return len(tok.encode(p.prompt, bos=True))
    if p.kind == "infill":
        from ..formats import infilling_tokens
        return len(infilling_tokens(tok, p.prompt, p.suffix, suffix_first=settings.suffix_first,
                                    model_name=llama.name))
    from ..formats import chat_tokens
    return len(chat_tokens(tok, p.messages))


# ---- scoring ------------------------------------------------------------------------------------------
def score_samples(problems: Sequence[Problem], samples: Sequence[dict], *, ks: Sequence[int] = (1,),
                  workers: int | None = None, limits: Limits | None = None, progress: bool = True,
                  text_metrics: bool = False, as_main: bool = False) -> dict:
    """Execute every sample's program in the sandbox; per-problem pass counts, pass@k and (for infilling)
    exact match / edit similarity against the reference. ``limits`` (None: each problem's timeout and the default
    limits) applies to every program; ``as_main`` runs Python programs as ``__main__`` (the lenient mode)."""
    by_id = {p.task_id: p for p in problems}
    unknown = sorted({s["task_id"] for s in samples} - by_id.keys())
    if unknown:
        raise CodeLlamaError(f"samples name {len(unknown)} task(s) this benchmark does not have, "
                             f"e.g. {unknown[0]!r}")
    programs, plimits = [], []
    for i, s in enumerate(samples):
        if not isinstance(s.get("completion"), str):
            raise CodeLlamaError(f"sample {i + 1} ({s['task_id']!r}): completion must be a string, "
                                 f"got {type(s.get('completion')).__name__}")
        p = by_id[s["task_id"]]
        programs.append(p.program(s["completion"]))
        base = limits or Limits()
        plimits.append(Limits(timeout=p.timeout if limits is None else limits.timeout,
                              memory_mb=base.memory_mb, file_size_mb=base.file_size_mb,
                              max_processes=base.max_processes, as_main=as_main or base.as_main))
    bar = _progress(len(programs), "executing", progress)
    t0 = time.monotonic()
    results = _execute(programs, plimits, [by_id[s["task_id"]].language for s in samples], workers,
                       lambda i, r: bar.update(1))
    exec_seconds = time.monotonic() - t0
    bar.close()
    per: dict[str, dict] = {p.task_id: {"task_id": p.task_id, "n": 0, "correct": 0, "samples": []}
                            for p in problems if any(s["task_id"] == p.task_id for s in samples)}
    for s, r in zip(samples, results):
        row = per[s["task_id"]]
        row["n"] += 1
        row["correct"] += int(r.passed)
        entry = {"sample": s.get("sample", 0), "completion": s["completion"], "status": r.status,
                 "message": r.message, "finish_reason": s.get("finish_reason")}
        if text_metrics:
            ref = by_id[s["task_id"]].reference
            entry["exact_match"] = float(exact_match(s["completion"], ref))
            entry["edit_similarity"] = edit_similarity(_norm(s["completion"]), _norm(ref))
            entry["exact_match_codexglue"] = float(exact_match_codexglue(s["completion"], ref))
            entry["edit_similarity_lcc"] = edit_similarity_lcc(s["completion"], ref)
        row["samples"].append(entry)
    counts = [(row["n"], row["correct"]) for row in per.values()]
    metrics = mean_pass_at_k(counts, ks)
    if text_metrics:
        for name in TEXT_METRICS:
            vals = [e[name] for row in per.values() for e in row["samples"]]
            metrics[name] = sum(vals) / len(vals) if vals else 0.0
    for row in per.values():
        n, c = row["n"], row["correct"]
        row.update(mean_pass_at_k([(n, c)], ks))
    metrics["problems"] = len(per)
    metrics["samples"] = len(samples)
    statuses = summarize_statuses(results)
    definitions = {k: METRIC_DEFINITIONS[k] for k in ("pass@1", *TEXT_METRICS) if k in metrics}
    return {"metrics": metrics, "statuses": statuses, "problems": list(per.values()),
            **({"metric_definitions": definitions} if text_metrics else {}),
            "execution": {"seconds": round(exec_seconds, 3), "programs": len(programs),
                          "programs_per_second": round(len(programs) / exec_seconds, 2) if exec_seconds else None}}


def _execute(programs: list[str], plimits: list[Limits], langs: list[str], workers: int | None,
             on_result: Callable) -> list:
    """Python programs through the sandbox Executor, the others through their own toolchains (MultiPL-E)."""
    results: list = [None] * len(programs)
    py = [i for i, lang in enumerate(langs) if lang == "python"]
    other = [i for i, lang in enumerate(langs) if lang != "python"]
    if py:
        with Executor(workers) as ex:
            for i, r in zip(py, ex.map([programs[i] for i in py], [plimits[i] for i in py],
                                       on_result=lambda j, r: on_result(py[j], r))):
                results[i] = r
    if other:
        from .multipl_e import run_programs
        for i, r in zip(other, run_programs([(langs[i], programs[i], plimits[i].timeout) for i in other], workers,
                                            on_result=lambda j, r: on_result(other[j], r))):
            results[i] = r
    return results


def per_problem_values(results: dict, names: Sequence[str] = TEXT_METRICS) -> dict[str, list[float]]:
    """One value per problem of ``results["problems"]`` (as ``score_samples`` returns them) for pass@1 (the pass
    count over n), ``stop_rate`` (share of samples that ended themselves, when finish reasons were kept) and each
    of ``names`` found on the samples (their mean); a metric missing for some problem is left out."""
    out: dict[str, list[float]] = {"pass@1": []}
    for row in results["problems"]:
        out["pass@1"].append(row["correct"] / row["n"] if row["n"] else 0.0)
        reasons = [s.get("finish_reason") for s in row["samples"]]
        if reasons and all(r is not None for r in reasons):
            out.setdefault("stop_rate", []).append(sum(r == "stop" for r in reasons) / len(reasons))
        for name in names:
            vals = [float(s[name]) for s in row["samples"] if isinstance(s.get(name), (int, float))]
            if vals:
                out.setdefault(name, []).append(sum(vals) / len(vals))
    return {k: v for k, v in out.items() if len(v) == len(results["problems"])}


def safe_name(text: str) -> str:
    """A model or benchmark name as a file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text or "model")


def _norm(text: str) -> str:
    from .metrics import normalize_code
    return normalize_code(text)


def run_benchmark(llama: "CodeLlama", benchmark: str, problems: Sequence[Problem], settings: GenerationSettings,
                  *, samples_path: str | Path, ks: Sequence[int] = (1,), workers: int | None = None,
                  progress: bool = True, overwrite: bool = False, text_metrics: bool = False,
                  extra_settings: dict | None = None, timeout: float | None = None, as_main: bool = False) -> dict:
    """Generate (resumably), execute, score: the results dict that ``report.write_results`` saves."""
    if not problems:
        raise CodeLlamaError(f"{benchmark}: no problems selected")
    ks = sorted(set(ks))
    if max(ks) > settings.n_samples:
        raise CodeLlamaError(f"pass@{max(ks)} needs --n-samples >= {max(ks)} (got {settings.n_samples})")
    t0 = time.monotonic()
    samples = generate_samples(llama, benchmark, problems, settings, samples_path, progress=progress,
                               overwrite=overwrite)
    gen_seconds = time.monotonic() - t0
    scored = score_samples(problems, samples, ks=ks, workers=workers, progress=progress, text_metrics=text_metrics,
                           limits=Limits(timeout=timeout) if timeout is not None else None, as_main=as_main)
    skipped = sum(1 for s in samples if s.get("finish_reason") == "context")
    if skipped:
        scored["metrics"]["prompts_over_context"] = skipped
    return {"benchmark": benchmark, "model": llama.name, "model_params": llama.config.num_params(),
            "settings": asdict(settings) | {"k": list(ks), "timeout": timeout, "as_main": as_main}
            | (extra_settings or {}),
            "samples_file": str(samples_path), "generation_seconds": round(gen_seconds, 3), **scored}


def default_samples_path(output: str | None, benchmark: str, model_name: str) -> Path:
    if output:
        return Path(output).with_suffix(".samples.jsonl")
    return Path(f"{benchmark}-{safe_name(model_name)}.samples.jsonl")


def as_problems(items: Iterable[Problem], limit: int | None) -> list[Problem]:
    items = list(items)
    if limit is not None:
        if limit < 1:
            raise CodeLlamaError(f"--limit must be >= 1, got {limit}")
        items = items[:limit]
    return items


def env_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))
