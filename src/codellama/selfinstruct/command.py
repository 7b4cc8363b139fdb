"""``codellama self-instruct STAGE --work DIR ...``: the self-instruct pipeline with execution feedback, one
subcommand per stage. ``cli.py`` only registers ``add_parser``; nothing here imports torch or httpx until a
stage runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CodeLlamaError

STAGES = ("questions", "tests", "solutions", "verify", "export")


def _responder_args(p: argparse.ArgumentParser, *, temperature: float, top_p: float, max_tokens: int) -> None:
    g = p.add_argument_group("responder (a local checkpoint, or an OpenAI-compatible endpoint)")
    g.add_argument("--model", default=None, help="local checkpoint directory or .gguf (default: the embedded model)")
    g.add_argument("--device", default=None, help="local model: cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", default=None, help="local model: float32, bfloat16 or float16")
    g.add_argument("--batch-size", type=int, default=8, help="local model: dialogs per batched call (default 8)")
    g.add_argument("--threads", type=int, default=None, help="local model: CPU threads")
    g.add_argument("--endpoint", default=None, metavar="URL",
                   help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000 (vLLM, codellama serve)")
    g.add_argument("--model-name", default=None, metavar="NAME", help="the model id to ask the endpoint for")
    g.add_argument("--api-key", default=None, help="bearer token for the endpoint (default: $OPENAI_API_KEY)")
    g.add_argument("--concurrency", type=int, default=8, help="endpoint: requests in flight (default 8)")
    g.add_argument("--request-timeout", type=float, default=600.0, help="endpoint: seconds per request (600)")
    g.add_argument("--retries", type=int, default=5,
                   help="endpoint: retries of a request on 429 / 5xx / dropped connections, with backoff (5)")
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=temperature, help=f"default {temperature}")
    s.add_argument("--top-p", type=float, default=top_p, help=f"default {top_p}")
    s.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens per reply (default {max_tokens})")
    s.add_argument("--seed", type=int, default=0, help="base seed; each item's seed is derived from it and its id")
    s.add_argument("--prompt-version", default="v1", help="bundled prompt version (default v1)")
    s.add_argument("--prompts", default=None, metavar="DIR",
                   help="a directory of your own questions.txt / tests.txt / solutions.txt instead")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", required=True, metavar="DIR", help="the pipeline's work directory (all stage files)")
    p.add_argument("--overwrite", action="store_true", help="start this stage's file afresh instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_parser(sub, parser_class) -> None:
    si = sub.add_parser("self-instruct", help="self-instruct data with execution feedback: questions, tests, "
                        "solutions, verify, export")
    stages = si.add_subparsers(dest="stage", metavar="STAGE", parser_class=parser_class)
    si.set_defaults(func=_need_stage)

    p = stages.add_parser("questions", help="ask for interview-style programming questions, then deduplicate")
    _common(p)
    p.add_argument("--count", type=int, required=True, help="questions to generate (before dedup)")
    p.add_argument("--batch", type=int, default=10, help="questions asked for per request (default 10)")
    p.add_argument("--max-requests", type=int, default=None,
                   help="give up after this many requests (default: 4x the ceil(count/batch) needed)")
    p.add_argument("--threshold", type=float, default=0.55,
                   help="near duplicates: Jaccard similarity of content-word shingles at or above this (0.55)")
    p.add_argument("--shingle", type=int, default=1, help="content words per shingle (default 1)")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    p.add_argument("--from", dest="source", default=None, metavar="FILE",
                   help="import questions (.jsonl with 'question', or one per line) instead of generating")
    _responder_args(p, temperature=0.8, top_p=0.95, max_tokens=1024)
    p.set_defaults(func=run)

    p = stages.add_parser("tests", help="unit tests (assert statements) for every question")
    _common(p)
    _responder_args(p, temperature=0.0, top_p=1.0, max_tokens=512)
    p.set_defaults(func=run)

    p = stages.add_parser("solutions", help="N solutions per question with valid tests")
    _common(p)
    p.add_argument("--n", type=int, default=10, help="solutions per question (the paper: 10)")
    _responder_args(p, temperature=0.8, top_p=0.95, max_tokens=512)
    p.set_defaults(func=run)

    p = stages.add_parser("verify", help="run every solution against its tests in the sandbox; keep the first pass")
    _common(p)
    p.add_argument("--workers", type=int, default=None, help="programs run at once (default: CPU cores, at most 8)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10)")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program (default 1024)")
    p.set_defaults(func=run)

    p = stages.add_parser("export", help="kept triplets as SFT dialogs JSONL, and the stats table")
    p.add_argument("--work", required=True, metavar="DIR")
    p.add_argument("--out", default=None, metavar="FILE", help="dialogs JSONL (default: DIR/sft.jsonl)")
    p.add_argument("--tests-in-prompt", action="store_true",
                   help="append the tests to the user turn, as MBPP's Instruct prompt does (default: question only)")
    p.add_argument("--json", action="store_true", help="print the stats as JSON")
    p.set_defaults(func=run)


def _need_stage(args) -> None:
    raise CodeLlamaError("self-instruct needs a stage: " + ", ".join(STAGES))


def run(args) -> None:
    from . import stages
    from .responders import Sampling, make_responder

    work = Path(args.work)
    progress = not getattr(args, "no_progress", True)
    if args.stage == "export":
        result = stages.run_export(work, Path(args.out) if args.out else None, tests_in_prompt=args.tests_in_prompt)
        print(json.dumps(result, indent=1) if args.json else stages.stats_table(result))
        print(f"dialogs: {result['output']}", file=sys.stderr)
        return
    if args.stage == "verify":
        from ..evaluation.harness import env_workers
        if not args.timeout > 0:
            raise CodeLlamaError(f"--timeout must be a positive number of seconds, got {args.timeout}")
        result = stages.run_verify(work, workers=args.workers or env_workers(), timeout=args.timeout,
                                   memory_mb=args.memory_mb, overwrite=args.overwrite, progress=progress)
        _report(args.stage, result)
        return
    from ..sampling import validate_sampling
    validate_sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_tokens)
    sampling = Sampling(args.temperature, args.top_p, args.max_tokens)
    prompts = stages.PromptChoice(args.prompt_version, args.prompts)
    if args.stage == "questions" and args.source:  # imported: no model needed
        _report(args.stage, _short(stages.run_questions(work, None, count=args.count, batch=args.batch,
                                                        sampling=sampling, source=args.source,
                                                        threshold=args.threshold, shingle=args.shingle,
                                                        num_perm=args.num_perm, overwrite=args.overwrite)))
        return
    if args.stage != "questions":  # say what is missing before loading a model
        stages.need(work, {"tests": "questions", "solutions": "tests"}[args.stage])
    elif args.count < 1 or args.batch < 1:
        raise CodeLlamaError(f"--count and --batch must be >= 1, got {args.count} and {args.batch}")
    responder = make_responder(args)
    try:
        if args.stage == "questions":
            result = _short(stages.run_questions(work, responder, count=args.count, batch=args.batch,
                                                 sampling=sampling, seed=args.seed, prompts=prompts,
                                                 threshold=args.threshold, shingle=args.shingle,
                                                 num_perm=args.num_perm, max_requests=args.max_requests,
                                                 overwrite=args.overwrite, progress=progress))
        elif args.stage == "tests":
            result = stages.run_tests(work, responder, sampling=sampling, seed=args.seed, prompts=prompts,
                                      overwrite=args.overwrite, progress=progress)
        else:
            result = stages.run_solutions(work, responder, n=args.n, sampling=sampling, seed=args.seed,
                                          prompts=prompts, overwrite=args.overwrite, progress=progress)
    finally:
        responder.close()
    _report(args.stage, result)


def _short(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "removed"}


def _report(stage: str, result: dict) -> None:
    print(f"{stage}: " + ", ".join(f"{k} {v}" for k, v in result.items()))
