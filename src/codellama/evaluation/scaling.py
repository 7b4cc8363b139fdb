"""Metric against model size: one benchmark run over several models, a table and a plot of every metric against
parameter count with bootstrap confidence intervals, and a Markdown report — the project's answer to the seed
question "how does infilling quality scale with model size (7B vs 34B vs 70B)?".

``codellama eval scaling --models A B C`` runs each model (one at a time, freed before the next) on every subset
of the benchmark through the ordinary harness (``run_benchmark``: resumable samples files, sandboxed execution),
keeps each results JSON under ``OUT/results/``, and writes ``OUT/scaling.json`` (the table), ``OUT/scaling.png``
(the plot) and ``OUT/README.md`` (the report). Intervals are percentile bootstrap intervals over problems
(``metrics.bootstrap_ci``, fixed seed), so the report says which differences the benchmark can resolve."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import CodeLlamaError
from .harness import (
    GenerationSettings,
    as_problems,
    per_problem_values,
    run_benchmark,
    safe_name,
)
from .metrics import METRIC_DEFINITIONS, bootstrap_ci
from .report import _fmt_params, _pyplot, table, write_results

# What each benchmark's subsets are, in report order; a benchmark without subsets has [None].
SUBSETS: dict[str, list[str | None]] = {
    "mbpp-infilling": ["single-line", "multi-line", "random-span"],
    "humaneval-infilling": ["single-line", "multi-line", "random-span"],
    "humaneval": [None],
    "mbpp": [None],
}
# Per-problem values that get an interval: pass@1 from the pass count, the rest the mean over a problem's samples.
SAMPLE_METRICS = ("exact_match", "exact_match_codexglue", "edit_similarity", "edit_similarity_lcc")
PLOTTED = ("pass@1", "exact_match", "edit_similarity", "edit_similarity_lcc", "stop_rate")
# A model that never ends its middle (no EOT within --max-new-tokens) scores badly on every metric above; how
# often it does end it is part of the answer for small models.
STOP_RATE = ("stop_rate", "share of samples the model ended itself (end-of-infill / stop token) rather than "
                          "running out of --max-new-tokens, 0-1")
PERCENT_SCALE = ("exact_match_codexglue", "edit_similarity_lcc")  # 0-100 by their reference definitions


@dataclass
class Cell:
    """One (model, subset, metric) value with its interval."""

    model: str
    params: int
    subset: str | None
    metric: str
    value: float
    low: float
    high: float
    problems: int


@dataclass
class ScalingResult:
    benchmark: str
    cells: list[Cell] = field(default_factory=list)
    results_files: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"benchmark": self.benchmark, "settings": self.settings, "results_files": self.results_files,
                "cells": [asdict(c) for c in self.cells]}


def cells_of(results: dict, model: str, params: int, subset: str | None, *, n_resamples: int = 1000,
             seed: int = 0) -> list[Cell]:
    cells = []
    for metric, values in per_problem_values(results, SAMPLE_METRICS).items():
        if not values:
            continue
        low, high = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
        cells.append(Cell(model, params, subset, metric, sum(values) / len(values), low, high, len(values)))
    return cells


def run_scaling(models: Sequence[str | None], out_dir: str | Path, *, benchmark: str = "mbpp-infilling",
                subsets: Sequence[str] | None = None, names: Sequence[str] | None = None, data=None,
                limit: int | None = None, settings: GenerationSettings | None = None,
                workers: int | None = None, progress: bool = True,
                load: Callable[[str | None], object] | None = None, build_problems=None,
                log: Callable[[str], None] = print) -> ScalingResult:
    """Run ``benchmark`` (each of ``subsets``) on every model, smallest to largest as given; ``None`` is the
    embedded model. ``load(path)`` and ``build_problems(bench, data=..., subset=...)`` default to the API's
    ``load`` and the CLI's benchmark table; they are parameters so that tests can pass small fakes."""
    if benchmark not in SUBSETS:
        raise CodeLlamaError(f"scaling supports {', '.join(SUBSETS)}; got {benchmark!r}")
    if not models:
        raise CodeLlamaError("scaling needs --models (one or more checkpoints; 'default' is the embedded model)")
    if names is not None and len(names) != len(models):
        raise CodeLlamaError(f"--names gives {len(names)} names for {len(models)} models")
    chosen = list(subsets) if subsets else SUBSETS[benchmark]
    unknown = [s for s in chosen if s not in SUBSETS[benchmark]]
    if unknown:
        raise CodeLlamaError(f"{benchmark} has no subset {unknown[0]!r} (it has {SUBSETS[benchmark]})")
    if load is None:
        from ..api import load as api_load
        load = api_load
    if build_problems is None:
        from .command import build_problems
    settings = settings or GenerationSettings(max_new_tokens=128)
    out = Path(out_dir)
    (out / "results").mkdir(parents=True, exist_ok=True)
    # Problems first, for every subset: bad data fails before any model is loaded.
    problem_sets = {s: as_problems(build_problems(benchmark, data=data, subset=s) if s else
                                   build_problems(benchmark, data=data), limit) for s in chosen}
    result = ScalingResult(benchmark, settings={**asdict(settings), "subsets": chosen, "limit": limit,
                                                "data": str(data) if data else None})
    labels: list[str] = []
    for i, path in enumerate(models):
        t0 = time.monotonic()
        llama = load(None if path in (None, "default") else path)
        name = names[i] if names else (getattr(llama, "name", "") or Path(str(path)).name or "default")
        if name in labels:
            name = f"{name}-{i + 1}"
        labels.append(name)
        params = llama.config.num_params()
        for s in chosen:
            stem = f"{benchmark}{'-' + s if s else ''}-{safe_name(name)}"
            res = run_benchmark(llama, benchmark, problem_sets[s], settings,
                                samples_path=out / "results" / f"{stem}.samples.jsonl", workers=workers,
                                progress=progress, text_metrics="infilling" in benchmark,
                                extra_settings={"subset": s, "limit": limit})
            if benchmark == "mbpp-infilling":  # its reference metrics, empty-middle floor and definitions
                from . import mbpp_infilling
                res["settings"] |= mbpp_infilling.settings()
                mbpp_infilling.add_scores(res, problem_sets[s], workers=workers, progress=progress)
                result.settings.setdefault("pass@1_empty_middle", {})[s] = res["metrics"]["pass@1_empty_middle"]
            res["model"] = name
            path_json = write_results(res, out / "results" / f"{stem}.json")
            result.results_files.append(str(path_json.relative_to(out)))
            result.cells.extend(cells_of(res, name, params, s))
        log(f"{name}: {params / 1e6:.2f}M parameters, {len(chosen)} subset(s) in {time.monotonic() - t0:.0f} s")
        del llama
        gc.collect()
    return result


# ---- table, plot, report --------------------------------------------------------------------------------
def _fmt_cell(c: Cell) -> str:
    digits = 1 if c.metric in PERCENT_SCALE else 3
    return f"{c.value:.{digits}f} [{c.low:.{digits}f}, {c.high:.{digits}f}]"


def _grid(result: ScalingResult) -> tuple[list[str], dict[str, int], list[tuple[str, str, list[str]]]]:
    """Models in run order, their parameter counts, and one (subset, metric, cells) row per (subset, metric)."""
    models = list(dict.fromkeys(c.model for c in result.cells))
    params = {c.model: c.params for c in result.cells}
    by = {(c.model, c.subset, c.metric): c for c in result.cells}
    rows = [(subset or result.benchmark, metric,
             [_fmt_cell(by[(m, subset, metric)]) if (m, subset, metric) in by else "-" for m in models])
            for subset, metric in dict.fromkeys((c.subset, c.metric) for c in result.cells)]
    return models, params, rows


def scaling_table(result: ScalingResult) -> str:
    """Text table: one row per (subset, metric), one column per model (value [95% CI])."""
    models, params, rows = _grid(result)
    return table([("", "params", *[_fmt_params(params[m]) for m in models]),
                  *[(subset, metric, *cells) for subset, metric, cells in rows]], ("subset", "metric", *models))


def markdown_table(result: ScalingResult) -> str:
    models, params, rows = _grid(result)
    lines = ["| subset | metric | " + " | ".join(f"{m} ({_fmt_params(params[m])})" for m in models) + " |",
             "|---|---|" + "---|" * len(models)]
    lines += [f"| {subset} | {metric} | " + " | ".join(cells) + " |" for subset, metric, cells in rows]
    return "\n".join(lines)


def plot_scaling(result: ScalingResult, path: str | Path) -> Path:
    """One panel per metric: value against parameters (log scale), one line per subset, 95% CI error bars."""
    plt = _pyplot()
    metrics = [m for m in PLOTTED if any(c.metric == m for c in result.cells)]
    if not metrics:
        raise CodeLlamaError("nothing to plot: no metric with values")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for subset in dict.fromkeys(c.subset for c in result.cells):
            cs = sorted((c for c in result.cells if c.metric == metric and c.subset == subset), key=lambda c: c.params)
            if not cs:
                continue
            ax.errorbar([c.params for c in cs], [c.value for c in cs],
                        yerr=[[c.value - c.low for c in cs], [c.high - c.value for c in cs]],
                        marker="o", capsize=3, label=subset or result.benchmark)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(metric, fontsize=10)
        top = 100.0 if metric in PERCENT_SCALE else 1.0
        highest = max((c.high for c in result.cells if c.metric == metric), default=0.0)
        ax.set_ylim(0, min(top, highest * 1.25) if highest > 0 else top / 20)  # small differences stay visible
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (95% bootstrap CI)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{result.benchmark}: metric vs model size", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def reading(result: ScalingResult) -> list[str]:
    """What the numbers support, computed: for every (subset, metric), whether it grows with size and whether
    the smallest and largest models' intervals are apart (a resolved difference) or overlap (not resolved)."""
    out = []
    for subset, metric in dict.fromkeys((c.subset, c.metric) for c in result.cells):
        cs = sorted((c for c in result.cells if c.subset == subset and c.metric == metric), key=lambda c: c.params)
        if len(cs) < 2:
            continue
        small, large = cs[0], cs[-1]
        values = [c.value for c in cs]
        trend = ("rises monotonically" if all(a < b for a, b in zip(values, values[1:])) else
                 "falls monotonically" if all(a > b for a, b in zip(values, values[1:])) else
                 "is flat" if max(values) == min(values) else "is not monotone")
        apart = small.high < large.low or large.high < small.low
        out.append(f"- {subset or result.benchmark} / {metric}: {trend} with size "
                   f"({' → '.join(f'{v:.3g}' for v in values)}); smallest vs largest "
                   + ("**resolved** (intervals do not overlap)" if apart else "not resolved (intervals overlap)"))
    return out


def _floor_lines(result: ScalingResult) -> list[str]:
    floor = result.settings.get("pass@1_empty_middle")
    if not floor:
        return []
    return ["", "pass@1 of an empty middle (the floor: masks the tests never exercise, the same for every model): "
            + ", ".join(f"{s} {v:.3f}" for s, v in floor.items()) + "."]


def write_report(result: ScalingResult, out_dir: str | Path, *, command: str, notes: str | None = None) -> Path:
    out = Path(out_dir)
    (out / "scaling.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
    plot = plot_scaling(result, out / "scaling.png")
    defs = [m for m in (*SAMPLE_METRICS, "pass@1", STOP_RATE[0]) if any(c.metric == m for c in result.cells)]
    n = sorted({c.problems for c in result.cells})
    lines = [f"# {result.benchmark}: infilling quality against model size", "",
             "Generated by:", "", "```", command, "```", "",
             f"Values are means over problems ({', '.join(map(str, n))} per subset) with 95% percentile bootstrap "
             "intervals (1,000 resamples of the problems, seed 0). Generation: "
             + ", ".join(f"{k} {result.settings[k]}" for k in ("temperature", "n_samples", "max_new_tokens", "seed")
                         if k in result.settings)
             + "; settings and per-problem results are in `scaling.json` and `results/`.", "",
             markdown_table(result), "", f"![metric vs size]({plot.name})", "", "## What the numbers say", "",
             *(reading(result) or ["- one model only: nothing to compare."]), *_floor_lines(result), "",
             "## Metric definitions", ""]
    for m in defs:
        lines.append(f"- `{m}`: {STOP_RATE[1] if m == STOP_RATE[0] else METRIC_DEFINITIONS[m]}")
    if notes:
        lines += ["", notes.rstrip()]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def command_line(args) -> str:
    """The ``codellama eval scaling`` command that reproduces this run (for the report)."""
    import shlex
    parts = ["codellama", "eval", "scaling", "--models", *args.models]
    if args.names:
        parts += ["--names", *args.names]
    parts += ["--benchmark", args.benchmark]
    for flag, value in (("--subsets", args.subsets),):
        if value:
            parts += [flag, *value]
    for flag, value in (("--data", args.data), ("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens),
                        ("--notes", args.notes), ("--out-dir", args.out_dir)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def run_command(args) -> Path:
    """``codellama eval scaling``: run, then write the table, plot and report into ``--out-dir``."""
    from ..api import load
    from ..cli_generate import apply_threads

    apply_threads(args.threads)
    notes = None
    if args.notes:
        try:
            notes = Path(args.notes).read_text(encoding="utf-8")
        except OSError as e:
            raise CodeLlamaError(f"cannot read --notes {args.notes}: {e.strerror or e}") from None
    if args.workers is not None and args.workers < 1:
        raise CodeLlamaError(f"--workers must be >= 1, got {args.workers}")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    result = run_scaling(args.models, args.out_dir, benchmark=args.benchmark, subsets=args.subsets,
                         names=args.names, data=args.data, limit=args.limit, settings=settings,
                         workers=args.workers, progress=not args.no_progress,
                         load=lambda path: load(path, device=args.device, dtype=args.dtype),
                         log=(lambda s: None) if args.quiet else print)
    report = write_report(result, args.out_dir, command=command_line(args), notes=notes)
    if not args.quiet:
        print(scaling_table(result))
        print(f"report: {report}")
    return report
