"""``codellama bench report``: the answer to "how do Code Llama 34B and 70B compare in inference latency and
throughput when generating multi-file code under large context windows (up to 100k tokens)?".

Everything in the report is computed by this module: the performance model's predictions for the exact released
shapes on each GPU profile (contexts 1k-100k, batch 1, bf16 weights and KV cache; the fewest GPUs that fit, with
tensor parallelism over NVLink), and, with ``measure=True``, this machine's measurements of the same two shapes
as scaled ``--layers`` slices, with the prediction for this machine beside each. The markdown and the PNG plots
are written together; the conclusions quoted in the README are the report's own sentences."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import CodeLlamaError

MODELS = ("CodeLlama-34b", "CodeLlama-70b")
GPUS = ("A100-80GB", "H100-SXM", "H200")
CONTEXTS = (1_000, 4_000, 16_000, 32_000, 64_000, 100_000)
KEY_CONTEXTS = (1_000, 16_000, 100_000)


@dataclass
class Point:
    model: str
    hardware: str
    context: int
    gpus: int | None
    prefill_s: float
    decode_ms: float
    memory_gb: float

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return 1000.0 / self.decode_ms / self.gpus if self.gpus else float("nan")


def predicted_points(dtype: str = "bf16") -> list[Point]:
    """The two shapes on each GPU profile at each context, each on the fewest GPUs that hold it."""
    from .perf_model import min_gpus, predict

    points = []
    for name in MODELS:
        config = ModelConfig.from_name(name)
        for hw in GPUS:
            for context in CONTEXTS:
                gpus = min_gpus(config, context, 1, dtype, None, hw)
                pred = predict(config, context, batch=1, dtype=dtype, hardware=hw, tp=gpus or 1)
                points.append(Point(name, hw, context, gpus, pred.prefill_s, pred.decode_s_per_token * 1000,
                                    pred.memory_bytes / 1e9))
    return points


def _find(points: list[Point], model: str, hw: str, context: int) -> Point:
    return next(p for p in points if p.model == model and p.hardware == hw and p.context == context)


def conclusions(points: list[Point]) -> list[str]:
    out = []
    for hw in GPUS:
        steps = [c for c in CONTEXTS
                 if (_find(points, MODELS[1], hw, c).gpus or 99) > (_find(points, MODELS[0], hw, c).gpus or 99)]
        a, b = _find(points, MODELS[0], hw, CONTEXTS[0]), _find(points, MODELS[1], hw, CONTEXTS[0])
        when = (f"at every context from {steps[0]:,} tokens" if steps == [c for c in CONTEXTS if c >= steps[0]]
                else f"at {', '.join(f'{c:,}' for c in steps)} tokens") if steps else "at no context up to 100k"
        out.append(f"On {hw}, 70B needs more GPUs than 34B {when} (at 1k: {b.gpus} vs {a.gpus}; at 100k: "
                   f"{_find(points, MODELS[1], hw, 100_000).gpus} vs {_find(points, MODELS[0], hw, 100_000).gpus}).")
        ratios = []
        for c in KEY_CONTEXTS:
            p34, p70 = _find(points, MODELS[0], hw, c), _find(points, MODELS[1], hw, c)
            ratios.append(f"{c // 1000}k: per-token latency 70B/34B = {p70.decode_ms / p34.decode_ms:.2f}, "
                          f"throughput per GPU 70B/34B = {p70.tokens_per_s_per_gpu / p34.tokens_per_s_per_gpu:.2f}")
        out.append(f"On {hw} (batch 1, each on its fewest GPUs): " + "; ".join(ratios) + ".")
    return out


def _table(points: list[Point], hw: str) -> list[str]:
    lines = ["| context | 34B GPUs | 34B prefill s | 34B ms/token | 34B GB | 70B GPUs | 70B prefill s | "
             "70B ms/token | 70B GB | tok/s/GPU 70B/34B |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in CONTEXTS:
        a, b = _find(points, MODELS[0], hw, c), _find(points, MODELS[1], hw, c)
        lines.append(f"| {c:,} | {a.gpus} | {a.prefill_s:.2f} | {a.decode_ms:.1f} | {a.memory_gb:.0f} | {b.gpus} | "
                     f"{b.prefill_s:.2f} | {b.decode_ms:.1f} | {b.memory_gb:.0f} | "
                     f"{b.tokens_per_s_per_gpu / a.tokens_per_s_per_gpu:.2f} |")
    return lines


def _plots(points: list[Point], out_dir: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CodeLlamaError("bench report draws its plots with matplotlib: pip install 'codellama[eval]'") from None
    files = []
    for metric, label, name in (("decode_ms", "ms per output token", "latency"),
                                ("prefill_s", "prefill (time to first token), s", "prefill"),
                                ("memory_gb", "weights + KV cache, GB", "memory")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for model, style in zip(MODELS, ("-", "--")):
            # Memory does not depend on the GPU: one line per model, labelled with the fewest H100s that hold it.
            for hw, color in zip(GPUS if metric != "memory_gb" else GPUS[1:2], ("tab:blue", "tab:orange", "tab:green")):
                mine = [p for p in points if p.model == model and p.hardware == hw]
                ax.plot([p.context for p in mine], [getattr(p, metric) for p in mine], style, color=color,
                        marker="o", label=model[10:] if metric == "memory_gb" else f"{model[10:]} {hw}")
                if metric == "memory_gb":
                    for p in mine:
                        ax.annotate(f"{p.gpus} GPU", (p.context, p.memory_gb), fontsize=7,
                                    textcoords="offset points", xytext=(0, 6))
        ax.set_xscale("log")
        ax.set_xlabel("context tokens (batch 1, bf16)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        if metric == "memory_gb":
            ax.set_title("memory vs context (labels: fewest H100s that hold it)")
        fig.tight_layout()
        path = out_dir / f"bench-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def write_report(out: str | Path, measured: list[dict] | None = None) -> dict[str, Any]:
    """Write the markdown report (and its plots beside it); returns its data (also written as JSON)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    points = predicted_points()
    plots = _plots(points, out.parent)
    text = ["# Code Llama 34B vs 70B: latency and throughput up to 100k tokens of context", "",
            "Generated by `codellama bench report` (do not edit by hand). Predictions come from the performance "
            "model (`codellama.bench.perf_model`) for the exact released shapes. The workload is batch 1, with "
            "bf16 weights and KV cache, a multi-file prompt of the given length, then generation. Each model runs on "
            "the fewest GPUs that hold its weights and KV cache, tensor-parallel over NVLink.", "",
            "## Conclusions", ""]
    found = conclusions(points)
    text += [f"- {line}" for line in found] + [""]
    for hw in GPUS:
        text += [f"## {hw} (predicted)", ""] + _table(points, hw) + [""]
    text += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if measured:
        text += ["## Measured on this machine (scaled `--layers` slices) against the prediction for it", "",
                 f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; rows from `codellama bench "
                 "latency --json`.", "",
                 "| model | dtype | context | layers timed | TTFT s | predicted | ratio | TPOT ms | predicted | ratio |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in measured:
            pred = r.get("predicted") or {}
            ratio = r.get("measured_over_predicted") or {}
            text.append(f"| {r['model']} | {r['dtype']} | {r['context']:,} | {r.get('layers_timed')} | "
                        f"{r['ttft_s']:.2f} | {pred.get('prefill_s', float('nan')):.2f} | {ratio.get('ttft', float('nan')):.2f} | "
                        f"{r['tpot_s'] * 1000:.1f} | {pred.get('decode_s_per_token', float('nan')) * 1000:.1f} | "
                        f"{ratio.get('tpot', float('nan')):.2f} |")
        text.append("")
    else:
        text += ["## Measured", "", "No measurements in this report. Run `codellama bench report --measured ROWS.jsonl` "
                 "with rows from `codellama bench latency --json`. No GPU column: no GPU was available where this "
                 "report was generated, so the GPU numbers are predicted.", ""]
    out.write_text("\n".join(text))
    data = {"points": [p.__dict__ | {"tokens_per_s_per_gpu": p.tokens_per_s_per_gpu} for p in points],
            "conclusions": found, "measured": measured or []}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    return data
