"""Reports: summary tables on stdout, results JSON (per-problem results + exact settings), PNG plots, and
``compare`` (models side by side: how the seed question's infilling-vs-size table is made)."""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Sequence, TextIO

from ..errors import CodeLlamaError

HEADLINE_ORDER = ("pass@1", "pass@10", "pass@100", "exact_match", "exact_match_codexglue", "edit_similarity",
                  "edit_similarity_lcc", "bleu", "accuracy", "perplexity")


def write_results(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    results.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    results.setdefault("environment", {"python": platform.python_version(), "machine": platform.machine()})
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=_json_default) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CodeLlamaError(f"results file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CodeLlamaError(f"{path} is not a results JSON file: {e}") from None
    if not isinstance(data, dict) or "metrics" not in data or "benchmark" not in data:
        raise CodeLlamaError(f"{path} is not a codellama eval results file (no 'benchmark'/'metrics')")
    return data


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def _ordered_metrics(keys: Sequence[str]) -> list[str]:
    head = [k for k in HEADLINE_ORDER if k in keys]
    return head + sorted(k for k in keys if k not in head)


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def summary(results: dict) -> str:
    """A human summary: metric table, statuses and timing."""
    m = results["metrics"]
    rows = [(k, _fmt(m[k])) for k in _ordered_metrics(list(m)) if not isinstance(m[k], (dict, list))]
    s = results.get("settings", {})
    head = f"{results['benchmark']}  model={results.get('model') or '?'}"
    names = ["lang", "n_samples", "temperature", "top_p", "max_new_tokens", "limit", "shots", "mask", "subset", "seed"]
    if "infilling" in results["benchmark"]:
        names.append("suffix_first")
    knobs = ", ".join(f"{k}={s[k]}" for k in names if s.get(k) is not None)
    out = [head + (f"  ({knobs})" if knobs else ""), table(rows, ("metric", "value"))]
    if results.get("statuses"):
        out.append("statuses: " + ", ".join(f"{k} {v}" for k, v in results["statuses"].items()))
    ex = results.get("execution")
    if ex:
        out.append(f"execution: {ex['programs']} programs in {ex['seconds']:.1f} s "
                   f"({ex['programs_per_second']} programs/s)")
    if "generation_seconds" in results:
        out.append(f"generation: {results['generation_seconds']:.1f} s")
    if results.get("plots"):
        out.append("plots: " + ", ".join(results["plots"]))
    if results.get("metric_definitions"):
        out.append("metric definitions:")
        out.extend(f"  {name}: {text}" for name, text in results["metric_definitions"].items())
    return "\n".join(out)


def print_summary(results: dict, file: TextIO | None = None) -> None:
    print(summary(results), file=file)


# ---- compare --------------------------------------------------------------------------------------------
def _label(r: dict, path: str) -> str:
    return r.get("model") or Path(path).stem


def bench_key(r: dict) -> str:
    """The benchmark and the settings that make it a different test (mask, subset, SPM, chat, shots)."""
    s = r.get("settings", {})
    variant = [str(s[k]) for k in ("lang", "mask", "subset") if s.get(k)]
    if s.get("suffix_first"):
        variant.append("spm")
    if s.get("chat"):
        variant.append("chat")
    if s.get("shots") not in (None, 3) and not s.get("chat"):
        variant.append(f"{s['shots']}-shot")
    return r["benchmark"] + (f"[{','.join(variant)}]" if variant else "")


def compare(paths: Sequence[str | Path], plot: str | Path | None = None) -> tuple[str, dict]:
    """Models side by side: one column per model, one row per (benchmark variant, metric); the results files
    of one model (one per benchmark) fill one column. Two files with the same model and benchmark variant get
    separate columns, named after their files.

    With ``plot``, a PNG of every 0..1 metric against model size (parameters): the "infilling metric vs
    model size" figure of the seed question."""
    if len(paths) < 1:
        raise CodeLlamaError("compare needs at least one results file")
    loaded = [(str(p), load_results(p)) for p in paths]
    columns: list[str] = []
    params: dict[str, int | None] = {}
    cells: dict[tuple[str, str], dict] = {}  # (column, bench) -> metrics
    keys: list[tuple[str, str]] = []
    for path, r in loaded:
        col, bench = _label(r, path), bench_key(r)
        if (col, bench) in cells:
            col = f"{col} ({Path(path).stem})"
        if col not in columns:
            columns.append(col)
            params[col] = r.get("model_params")
        cells[(col, bench)] = r["metrics"]
        for k in _ordered_metrics([k for k, v in r["metrics"].items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)]):
            if (bench, k) not in keys:
                keys.append((bench, k))
    first_seen = {}
    for b, _ in keys:
        first_seen.setdefault(b, len(first_seen))
    keys.sort(key=lambda bk: first_seen[bk[0]])  # rows grouped by benchmark, in first-seen order (stable)
    data: dict = {"models": columns, "params": [params[c] for c in columns], "rows": []}
    rows = []
    for bench, k in keys:
        vals = [cells.get((c, bench), {}).get(k) for c in columns]
        rows.append((bench, k, *[_fmt(v) for v in vals]))
        data["rows"].append({"benchmark": bench, "metric": k, "values": vals})
    params_row = ("", "params", *[_fmt_params(params[c]) for c in columns])
    text = table([params_row, *rows], ("benchmark", "metric", *columns))
    if plot is not None:
        data["plot"] = str(plot_metric_vs_size(data, plot))
    return text, data


def _fmt_params(n) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


# ---- plots ----------------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise CodeLlamaError("plots need matplotlib (pip install 'codellama[eval]')") from None
    return plt


def plot_heatmap(values: Sequence[Sequence[float]], rows: Sequence, cols: Sequence, path: str | Path, *,
                 title: str, xlabel: str, ylabel: str) -> Path:
    """Key-retrieval accuracy: context length (rows) x depth (columns), 0..1."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.6 * len(rows)))
    grid = [[math.nan if v is None else v for v in row] for row in values]
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_curve(xs: Sequence[float], ys: Sequence[float], path: str | Path, *, title: str, xlabel: str,
               ylabel: str, logy: bool = False, vline: float | None = None) -> Path:
    """Perplexity vs token position."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, marker="o", markersize=3)
    if logy:
        ax.set_yscale("log")
    if vline is not None:
        ax.axvline(vline, color="grey", linestyle="--", linewidth=1, label="training context")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_metric_vs_size(data: dict, path: str | Path) -> Path:
    plt = _pyplot()
    params = data["params"]
    order = sorted(range(len(params)), key=lambda i: params[i] or 0)
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in data["rows"]:
        metric = row["metric"]
        if metric in ("problems", "samples") or metric.startswith("prompts_") or metric.endswith("_lines") \
                or "empty" in metric:  # counts, per-size breakdowns and baselines stay in the table only
            continue
        pts = [(params[i], row["values"][i]) for i in order if params[i] and row["values"][i] is not None]
        if pts and all(0.0 <= v <= 1.0 for _, v in pts):
            ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", label=f"{row['benchmark']} {row['metric']}")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.set_title("metric vs model size")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
