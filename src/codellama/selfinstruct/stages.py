"""The five stages of the self-instruct pipeline (paper §2.5): questions -> tests -> solutions -> verify ->
export. Each reads the previous stage's file in the work directory and appends to its own (``store.py``), so
each can be killed and re-run, and later stages can run on what an earlier one has finished so far.

Seeds: item ``key`` (a request index, a question id) sample ``s`` is drawn with
``seed + (hash(key) mod 2**40) * SEED_STRIDE + s``: the same whatever the order, batching, concurrency or
interruptions, and the ten solutions of a question have consecutive seeds (one batched local call)."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from ..errors import CodeLlamaError
from .dedup import deduplicate
from .parsing import first_assert, parse_questions, parse_solution, parse_tests
from .prompts import DEFAULT_VERSION, load_prompt, load_topics
from .responders import ChatJob, Responder, Sampling
from .store import FILES, StageFile, jsonl, need, read_records, settings_key, write_atomic

SEED_STRIDE = 1000  # at most this many samples per item
SEED_LIMIT = 2**63


def item_seed(seed: int, key: str, sample: int = 0) -> int:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:5], "big")
    return (seed + h * SEED_STRIDE + sample) % SEED_LIMIT


@dataclass(frozen=True)
class PromptChoice:
    version: str = DEFAULT_VERSION
    directory: str | None = None


def _bar(total: int, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False)


def _stage_provenance(stage: str, responder: Responder, prompt, sampling: Sampling, seed: int) -> dict:
    return {"stage": stage, **responder.provenance(), "prompt": prompt.provenance(),
            "sampling": sampling.to_dict(), "seed": seed}


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise CodeLlamaError(f"--seed must be an integer in [0, 2**63), got {seed!r}")


# ---- questions ------------------------------------------------------------------------------------------
def run_questions(work: Path, responder: Responder | None, *, count: int, batch: int, sampling: Sampling,
                  seed: int = 0, prompts: PromptChoice | None = None, threshold: float = 0.55, shingle: int = 1,
                  num_perm: int = 128, max_requests: int | None = None, source: str | None = None,
                  overwrite: bool = False, progress: bool = True) -> dict:
    """Ask for ``batch`` questions per request until ``count`` are parsed (at most ``max_requests`` requests,
    default four times the ``ceil(count / batch)`` needed: a model that rarely writes a usable list must not
    loop for ever), or import them from ``source``; then deduplicate. Writes questions.raw.jsonl (one record
    per request), questions.jsonl (the kept questions) and dedup.json. Returns the dedup report."""
    if count < 1 or batch < 1:
        raise CodeLlamaError(f"--count and --batch must be >= 1, got {count} and {batch}")
    if not 0.0 < threshold <= 1.0:
        raise CodeLlamaError(f"--threshold must be in (0, 1], got {threshold}")
    if shingle < 1 or num_perm < 8:
        raise CodeLlamaError(f"--shingle must be >= 1 and --num-perm >= 8, got {shingle} and {num_perm}")
    _check_seed(seed)
    work.mkdir(parents=True, exist_ok=True)
    if source is not None:
        _import_questions(work, source, count, overwrite)
    else:
        assert responder is not None
        needed = math.ceil(count / batch)
        max_requests = max_requests or 4 * needed
        if max_requests < needed:
            raise CodeLlamaError(f"--max-requests {max_requests} cannot give --count {count} at --batch {batch}")
        prompts = prompts or PromptChoice()
        prompt = load_prompt("questions", prompts.version, prompts.directory)
        topics = load_topics(prompts.version, prompts.directory)
        base = _stage_provenance("questions", responder, prompt, sampling, seed) | {"batch": batch}
        with StageFile(work / FILES["raw"], settings_key(base), overwrite) as raw:
            def parsed() -> int:
                return sum(len(r["questions"]) for r in raw.done.values())

            bar = _bar(count, "questions", "question", progress)
            bar.update(min(count, parsed()))
            issued = needed
            wave = [r for r in range(needed) if f"r{r:06d}" not in raw.done]
            while True:
                jobs = []
                for r in wave:
                    topic = topics[r % len(topics)]
                    jobs.append(ChatJob(f"r{r:06d}", [{"role": "user",
                                                        "content": prompt.render(count=batch, topic=topic)}],
                                        item_seed(seed, f"r{r:06d}")))
                for job, reply in responder.run(jobs, sampling):
                    r = int(job.key[1:])
                    qs = parse_questions(reply.text, batch) if not reply.error else []
                    raw.write({"id": job.key, "request": r, "topic": topics[r % len(topics)], "reply": reply.text,
                               "finish_reason": reply.finish_reason, "error": reply.error, "questions": qs,
                               "provenance": base | {"seed": job.seed}})
                    bar.update(max(0, min(count, parsed()) - bar.n))
                have = parsed()
                if have >= count or issued >= max_requests:
                    break
                more = min(max_requests - issued, math.ceil((count - have) / batch))
                wave = [r for r in range(issued, issued + more) if f"r{r:06d}" not in raw.done]
                issued += more
                # Requests past ``needed`` done in an earlier run are counted again without being asked again.
            bar.close()
    return dedup_questions(work, count, threshold=threshold, shingle=shingle, num_perm=num_perm)


def _import_questions(work: Path, source: str, count: int, overwrite: bool) -> None:
    """Questions from a file (``.jsonl`` with a "question" field, else one per line): a hand-written seed set
    or another pipeline's output goes through the same dedup and later stages."""
    path = Path(source)
    if not path.is_file():
        raise CodeLlamaError(f"questions file not found: {path}")
    if path.suffix == ".jsonl":
        qs = []
        for i, row in enumerate(read_records(path)):
            if not isinstance(row.get("question"), str):
                raise CodeLlamaError(f"{path}: record {i + 1} needs a string 'question'")
            qs.append(row["question"].strip())
    else:
        qs = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    qs = qs[:count]
    digest = hashlib.sha256(json.dumps(qs).encode()).hexdigest()[:16]
    base = {"stage": "questions", "responder": "import", "source": str(path), "sha256": digest}
    with StageFile(work / FILES["raw"], settings_key(base), overwrite) as raw:
        if "import" not in raw.done:
            raw.write({"id": "import", "request": 0, "reply": None, "questions": qs, "provenance": base})


def dedup_questions(work: Path, count: int, *, threshold: float, shingle: int, num_perm: int) -> dict:
    rows = sorted(read_records(work / FILES["raw"]), key=lambda r: r["request"])
    items = [(f"q{r['request']:06d}.{j:03d}", q, r) for r in rows for j, q in enumerate(r["questions"])][:count]
    result = deduplicate([q for _, q, _ in items], threshold=threshold, shingle=shingle, num_perm=num_perm)
    kept = [{"id": items[i][0], "question": items[i][1], "request": items[i][2]["request"],
             "provenance": items[i][2]["provenance"]} for i in result.kept]
    write_atomic(work / FILES["questions"], jsonl(kept))
    report = {"requests": len(rows), "generated": len(items),
              "exact_duplicates": sum(r["kind"] == "exact" for r in result.removed),
              "near_duplicates": sum(r["kind"] == "near" for r in result.removed), "kept": len(kept),
              "threshold": threshold, "shingle": shingle, "num_perm": num_perm, "bands": result.bands,
              "rows": result.rows,
              "removed": [{"id": items[r["index"]][0], "question": items[r["index"]][1],
                           "duplicate_of": items[r["duplicate_of"]][0], "kind": r["kind"], "jaccard": r["jaccard"]}
                          for r in result.removed]}
    write_atomic(work / FILES["dedup"], json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report


# ---- tests ----------------------------------------------------------------------------------------------
def run_tests(work: Path, responder: Responder, *, sampling: Sampling, seed: int = 0,
              prompts: PromptChoice | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Unit tests (asserts in one python block) for every kept question. Returns status counts."""
    _check_seed(seed)
    questions = need(work, "questions")
    prompts = prompts or PromptChoice()
    prompt = load_prompt("tests", prompts.version, prompts.directory)
    base = _stage_provenance("tests", responder, prompt, sampling, seed)
    with StageFile(work / FILES["tests"], settings_key(base), overwrite) as out:
        todo = [q for q in questions if q["id"] not in out.done]
        by_id = {q["id"]: q for q in todo}
        jobs = [ChatJob(q["id"], [{"role": "user", "content": prompt.render(question=q["question"])}],
                        item_seed(seed, q["id"])) for q in todo]
        bar = _bar(len(jobs), "tests", "question", progress)
        for job, reply in responder.run(jobs, sampling):
            parsed = parse_tests(reply.text) if not reply.error else None
            status = "error" if reply.error else ("ok" if parsed.ok else "rejected")
            out.write({"id": job.key, "question": by_id[job.key]["question"], "status": status,
                       "reason": reply.error or (parsed.reason if parsed else ""),
                       "tests": parsed.code if parsed else None, "reply": reply.text,
                       "finish_reason": reply.finish_reason, "provenance": base | {"seed": job.seed}})
            bar.update(1)
        bar.close()
        return _counts(out.done[q["id"]] for q in questions if q["id"] in out.done)


def _counts(rows) -> dict:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


# ---- solutions ------------------------------------------------------------------------------------------
def run_solutions(work: Path, responder: Responder, *, n: int, sampling: Sampling, seed: int = 0,
                  prompts: PromptChoice | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """``n`` solutions for every question with usable tests, shown the tests' first assert so that they use
    its function name and signature. Returns status counts."""
    if not 1 <= n <= SEED_STRIDE:
        raise CodeLlamaError(f"--n must be in [1, {SEED_STRIDE}], got {n}")
    _check_seed(seed)
    tests = [t for t in need(work, "tests") if t["status"] == "ok"]
    prompts = prompts or PromptChoice()
    prompt = load_prompt("solutions", prompts.version, prompts.directory)
    base = _stage_provenance("solutions", responder, prompt, sampling, seed) | {"n": n}
    with StageFile(work / FILES["solutions"], settings_key(base), overwrite) as out:
        jobs, meta = [], {}
        for t in tests:
            content = prompt.render(question=t["question"], example_test=first_assert(t["tests"]))
            for s in range(n):
                key = f"{t['id']}/{s}"
                if key not in out.done:
                    jobs.append(ChatJob(key, [{"role": "user", "content": content}], item_seed(seed, t["id"], s)))
                    meta[key] = (t["id"], s)
        bar = _bar(len(jobs), "solutions", "solution", progress)
        for job, reply in responder.run(jobs, sampling):
            parsed = parse_solution(reply.text) if not reply.error else None
            status = "error" if reply.error else ("ok" if parsed.ok else "rejected")
            qid, s = meta[job.key]
            out.write({"id": job.key, "question_id": qid, "sample": s, "status": status,
                       "reason": reply.error or (parsed.reason if parsed else ""),
                       "code": parsed.code if parsed else None, "reply": reply.text,
                       "finish_reason": reply.finish_reason, "provenance": base | {"seed": job.seed}})
            bar.update(1)
        bar.close()
        return _counts(out.done.values())


# ---- verify ---------------------------------------------------------------------------------------------
def run_verify(work: Path, *, workers: int, timeout: float, memory_mb: int = 1024, overwrite: bool = False,
               progress: bool = True, executor=None) -> dict:
    """Run every parsed solution followed by its question's tests in the evaluation sandbox (one program
    each, the same isolation and limits as HumanEval scoring); keep the first passing solution, in sample
    order, and record how many passed and every verdict. Questions whose solutions are not all on disk yet
    wait for a later run. Returns counts."""
    from ..evaluation.execution import Executor, Limits

    if workers < 1:
        raise CodeLlamaError(f"--workers must be >= 1, got {workers}")
    limits = Limits(timeout=timeout, memory_mb=memory_mb)
    tests = {t["id"]: t for t in need(work, "tests") if t["status"] == "ok"}
    solutions = need(work, "solutions")
    n = solutions[0]["provenance"]["n"] if solutions else 0
    by_q: dict[str, dict[int, dict]] = {}
    for s in solutions:
        by_q.setdefault(s["question_id"], {})[s["sample"]] = s
    ready = [q for q in tests if len(by_q.get(q, {})) == n and n]
    waiting = len(tests) - len(ready)
    own = executor is None
    ex = executor or Executor(workers, limits)
    base = {"stage": "verify", "isolation": ex.isolation, "timeout": timeout, "memory_mb": memory_mb,
            "max_processes": limits.max_processes, "solutions": solutions[0]["settings"] if solutions else None}
    try:
        with StageFile(work / FILES["verify"], settings_key(base), overwrite) as out:
            todo = [q for q in ready if q not in out.done]
            programs = [(q, s) for q in todo for s in range(n) if by_q[q][s]["code"] is not None]
            verdicts: dict[str, dict[int, dict]] = {q: {} for q in todo}
            for q in todo:
                for s in range(n):
                    if by_q[q][s]["code"] is None:
                        verdicts[q][s] = {"sample": s, "status": "unparsed", "message": by_q[q][s]["reason"],
                                          "duration": 0.0}
            bar = _bar(len(programs), "verify", "program", progress)

            def finish(q: str) -> None:
                vs = [verdicts[q][s] for s in range(n)]
                passing = [v["sample"] for v in vs if v["status"] == "passed"]
                kept = passing[0] if passing else None
                out.write({"id": q, "n": n, "passed": len(passing), "kept_sample": kept,
                           "code": by_q[q][kept]["code"] if kept is not None else None, "verdicts": vs,
                           "provenance": base})

            for q in todo:  # questions with nothing to run are decided at once
                if len(verdicts[q]) == n:
                    finish(q)
            pending: dict[Future, tuple[str, int]] = {}
            it = iter(programs)
            with ThreadPoolExecutor(workers, thread_name_prefix="verify") as pool:
                while True:
                    while len(pending) < 2 * workers:
                        job = next(it, None)
                        if job is None:
                            break
                        q, s = job
                        program = by_q[q][s]["code"] + "\n\n\n" + tests[q]["tests"] + "\n"
                        pending[pool.submit(ex.run, program, limits)] = job
                    if not pending:
                        break
                    done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                    for f in done:
                        q, s = pending.pop(f)
                        r = f.result()  # results are gathered (and written) in this thread only
                        verdicts[q][s] = {"sample": s, "status": r.status, "message": r.message,
                                          "duration": round(r.duration, 3)}
                        if len(verdicts[q]) == n:
                            finish(q)
                        bar.update(1)
            bar.close()
            rows = [out.done[q] for q in tests if q in out.done]
    finally:
        if own:
            ex.close()
    return {"verified": len(rows), "with_passing_solution": sum(r["passed"] > 0 for r in rows),
            "waiting_for_solutions": waiting}


# ---- export ---------------------------------------------------------------------------------------------
def run_export(work: Path, out: Path | None = None, *, tests_in_prompt: bool = False) -> dict:
    """The kept triplets as SFT dialogs (the answer's code between [PYTHON] and [/PYTHON], as Code Llama -
    Instruct answers) and the paper-shaped stats table. The user turn is the question alone unless
    ``tests_in_prompt``: the solutions were not written against the full tests, and most uses of an instruct
    model (chat, HumanEval-style prompts) give none, so by default the tests only travel in ``"tests"``."""
    questions = need(work, "questions")
    tests = {t["id"]: t for t in need(work, "tests")}
    verify = {v["id"]: v for v in need(work, "verify")}
    solutions = {}
    sol_path = work / FILES["solutions"]
    if sol_path.is_file():
        solutions = {s["id"]: s for s in read_records(sol_path)}
    dedup_path = work / FILES["dedup"]
    report = json.loads(dedup_path.read_text()) if dedup_path.is_file() else {}
    out = out or work / FILES["export"]
    dialogs = []
    for q in questions:
        v = verify.get(q["id"])
        if not v or v["kept_sample"] is None:
            continue
        t = tests[q["id"]]
        user = q["question"]
        if tests_in_prompt:  # MBPP's Instruct evaluation prompt puts the tests after the task the same way
            user += "\nYour code should pass these tests:\n\n" + t["tests"]
        sol = solutions.get(f"{q['id']}/{v['kept_sample']}", {})
        dialogs.append({"id": q["id"],
                        "messages": [{"role": "user", "content": user},
                                     {"role": "assistant", "content": f"[PYTHON]\n{v['code']}\n[/PYTHON]"}],
                        "tests": t["tests"],
                        "provenance": {"question": q["provenance"], "tests": t["provenance"],
                                       "solution": sol.get("provenance"), "sample": v["kept_sample"],
                                       "verify": v["provenance"], "passed": v["passed"], "n": v["n"],
                                       "tests_in_prompt": tests_in_prompt}})
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, jsonl(dialogs))
    rows = list(verify.values())
    stats = {"generated_questions": report.get("generated", len(questions)),
             "after_dedup": len(questions),
             "with_tests": sum(t["status"] == "ok" for t in tests.values()),
             "verified": len(rows),
             "with_passing_solution": sum(v["passed"] > 0 for v in rows),
             "kept": len(dialogs),
             "solutions_run": sum(v["n"] for v in rows),
             "solutions_passed": sum(v["passed"] for v in rows),
             "output": str(out)}
    write_atomic(work / FILES["stats"], json.dumps(stats, indent=1) + "\n")
    return stats


def stats_table(stats: dict) -> str:
    """As the paper reports it: 62,000 generated -> 52,000 after dedup -> 14,000 kept."""
    lines = [("generated questions", stats["generated_questions"]), ("after dedup", stats["after_dedup"]),
             ("with valid tests", stats["with_tests"]), ("with a passing solution", stats["with_passing_solution"]),
             ("kept (question, tests, solution)", stats["kept"])]
    width = max(len(name) for name, _ in lines)
    text = [f"{'stage':<{width}}  {'count':>8}", "-" * (width + 10)]
    text += [f"{name:<{width}}  {value:>8,}" for name, value in lines]
    if stats["solutions_run"]:
        text.append(f"(solutions passing their tests: {stats['solutions_passed']:,} of {stats['solutions_run']:,})")
    return "\n".join(text)
