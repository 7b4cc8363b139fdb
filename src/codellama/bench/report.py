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
THROUGHPUT_CONTEXT = 16_000
BATCHES = (1, 2, 4, 8, 16, 32, 64)


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


@dataclass
class BatchPoint:
    model: str
    hardware: str
    batch: int
    gpus: int
    tokens_per_s: float  # decode tokens/s over the batch at THROUGHPUT_CONTEXT
    decode_ms: float  # per-token latency each sequence sees

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.gpus


def predicted_batches(dtype: str = "bf16", context: int = THROUGHPUT_CONTEXT) -> list[BatchPoint]:
    """Decode throughput as the batch grows at ``context`` tokens each, on the fewest GPUs that hold the weights
    and every sequence's KV cache; a batch that not even 8 GPUs hold ends the model's sweep."""
    from .perf_model import min_gpus, predict

    points = []
    for name in MODELS:
        config = ModelConfig.from_name(name)
        for hw in GPUS:
            for batch in BATCHES:
                gpus = min_gpus(config, context, batch, dtype, None, hw)
                if gpus is None:
                    break
                pred = predict(config, context, batch=batch, dtype=dtype, hardware=hw, tp=gpus)
                points.append(BatchPoint(name, hw, batch, gpus, pred.decode_tokens_per_s,
                                         pred.decode_s_per_token * 1000))
    return points


def _batch_table(points: list[BatchPoint]) -> list[str]:
    lines = ["| hardware | batch | 34B GPUs | 34B tok/s | 34B tok/s/GPU | 70B GPUs | 70B tok/s | 70B tok/s/GPU | "
             "per GPU 70B/34B |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for hw in GPUS:
        for batch in BATCHES:
            mine = {p.model: p for p in points if p.hardware == hw and p.batch == batch}
            if not mine:
                continue
            cells = []
            for model in MODELS:
                p = mine.get(model)
                cells += [str(p.gpus), f"{p.tokens_per_s:.0f}", f"{p.tokens_per_s_per_gpu:.0f}"] if p else \
                    ["-", "does not fit 8 GPUs", "-"]
            ratio = (f"{mine[MODELS[1]].tokens_per_s_per_gpu / mine[MODELS[0]].tokens_per_s_per_gpu:.2f}"
                     if len(mine) == 2 else "-")
            lines.append(f"| {hw} | {batch} | " + " | ".join(cells) + f" | {ratio} |")
    return lines


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


def _throughput_plot(points: list[BatchPoint], out_dir: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for model, style in zip(MODELS, ("-", "--")):
        for hw, color in zip(GPUS, ("tab:blue", "tab:orange", "tab:green")):
            mine = [p for p in points if p.model == model and p.hardware == hw]
            ax.plot([p.batch for p in mine], [p.tokens_per_s_per_gpu for p in mine], style, color=color,
                    marker="o", label=f"{model[10:]} {hw}")
            for p in mine:
                ax.annotate(str(p.gpus), (p.batch, p.tokens_per_s_per_gpu), fontsize=6,
                            textcoords="offset points", xytext=(0, 5))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"batch (sequences decoding together, {THROUGHPUT_CONTEXT // 1000}k context each)")
    ax.set_ylabel("decode tokens/s per GPU")
    ax.set_title("throughput vs batch (labels: GPUs used)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "bench-throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _measured_latency(rows: list[dict]) -> list[str]:
    text = ["## Measured latency against the prediction for the device it ran on", "",
            f"Rows from `codellama bench latency --json` (this report was written on {platform.machine()}, "
            f"{platform.processor() or 'cpu'}; its CPU rows time `--layers` slices scaled to the whole depth, the GPU "
            "rows from `benchmarks/gpu_check_bench.sh` whole models).", "",
            "| model | device | dtype | context | layers timed | TTFT s | predicted | ratio | TPOT ms | predicted | "
            "ratio |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for key, what in (("ttft", "TTFT"), ("tpot", "TPOT")):
        ratios = [r["measured_over_predicted"][key] for r in rows if r.get("measured_over_predicted")]
        if ratios:
            within = sum(abs(x - 1) <= 0.15 for x in ratios)
            text.insert(-2, f"{what} measured / predicted: {min(ratios):.2f} to {max(ratios):.2f} over {len(ratios)} "
                            f"rows; {within} of them within ±15%, {sum(abs(x - 1) <= 0.30 for x in ratios)} within "
                            "±30%.")
            text.insert(-2, "")
    for r in rows:
        pred = r.get("predicted") or {}
        ratio = r.get("measured_over_predicted") or {}
        text.append(f"| {r['model']} | {r.get('device', 'cpu')} | {r['dtype']} | {r['context']:,} | "
                    f"{r.get('layers_timed')} | {r['ttft_s']:.2f} | {pred.get('prefill_s', nan):.2f} | "
                    f"{ratio.get('ttft', nan):.2f} | "
                    f"{r['tpot_s'] * 1000:.1f} | {pred.get('decode_s_per_token', nan) * 1000:.1f} | "
                    f"{ratio.get('tpot', nan):.2f} |")
    return text + [""]


def _measured_slices(rows: list[dict]) -> list[str]:
    text = ["## The `--layers` method checked against whole-model timing", "",
            "Rows from `codellama bench latency --layers K --check-slice --json`: a model that fits timed whole, and "
            "as a K-layer slice scaled to its depth.", "",
            "| model | dtype | context | layers timed | TTFT whole s | TTFT scaled s | ratio | TPOT whole ms | "
            "TPOT scaled ms | ratio |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        w, sl = r["whole"], r["sliced"]
        text.append(f"| {r['model']} | {r['dtype']} | {r['context']:,} | {r['layers_timed']} | {w['ttft_s']:.2f} | "
                    f"{sl['ttft_s']:.2f} | {r['ttft_ratio']:.2f} | {w['tpot_s'] * 1000:.1f} | "
                    f"{sl['tpot_s'] * 1000:.1f} | {r['tpot_ratio']:.2f} |")
    return text + [""]


def _measured_throughput(rows: list[dict]) -> list[str]:
    text = ["## Throughput measured on this machine through the serving engine", "",
            "Rows from `codellama bench throughput --json`; the prediction is `bench.throughput.predict_row` on the "
            "local profile. It counts the kernels' time only: a small model's engine also pays a fixed cost per "
            "request and per step (admission, the engine thread's hand-offs, Python), which a large model's seconds "
            "per step make negligible.", "",
            "| model | dtype | context | concurrency | requests | tok/s | predicted | ratio | req/s | TTFT p50 s | "
            "TPOT p50 ms | TPOT p99 ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for r in rows:
        pred = r.get("predicted") or {}
        text.append(f"| {r['model']} | {r.get('dtype', '-')} | {r['context']:,} | {r['concurrency']} | "
                    f"{r['requests']} | {r['tokens_per_s']:.1f} | {pred.get('tokens_per_s', nan):.1f} | "
                    f"{(r.get('measured_over_predicted') or {}).get('tokens_per_s', nan):.2f} | "
                    f"{r['requests_per_s']:.2f} | {r['ttft_p50_s']:.3f} | {r['tpot_p50_s'] * 1000:.1f} | "
                    f"{r['tpot_p99_s'] * 1000:.1f} |")
    return text + [""]


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
    batches = predicted_batches()
    plots.append(_throughput_plot(batches, out.parent))
    text += [f"## Throughput vs batch at {THROUGHPUT_CONTEXT // 1000}k context (predicted)", "",
             "Decode tokens/s once every sequence holds its context, each model on the fewest GPUs that hold the "
             "weights and all the sequences' KV caches.", ""] + _batch_table(batches) + [""]
    text += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    measured = measured or []
    latency_rows = [r for r in measured if "ttft_s" in r]
    slice_rows = [r for r in measured if r.get("method") == "slice-check"]
    throughput_rows = [r for r in measured if "concurrency" in r]
    if latency_rows:
        text += _measured_latency(latency_rows)
    if slice_rows:
        text += _measured_slices(slice_rows)
    if throughput_rows:
        text += _measured_throughput(throughput_rows)
    if not measured:
        text += ["## Measured", "", "No measurements in this report. Run `codellama bench report --measured "
                 "ROWS.jsonl` with rows from `codellama bench latency --json` or `codellama bench throughput --json`.",
                 ""]
    if not any(r.get("device", "cpu").startswith("cuda") for r in measured):
        text += ["## GPU measurements", "", "None: no GPU was available where this report was generated, so the GPU "
                 "numbers above are predicted. `benchmarks/gpu_check_bench.sh` measures 34B (bf16) and 70B (int8) "
                 "on one H200 at 4k, 16k and 64k context; pass its rows to `--measured`.", ""]
    out.write_text("\n".join(text))
    data = {"points": [p.__dict__ | {"tokens_per_s_per_gpu": p.tokens_per_s_per_gpu} for p in points],
            "batches": [p.__dict__ | {"tokens_per_s_per_gpu": p.tokens_per_s_per_gpu} for p in batches],
            "conclusions": found, "measured": measured}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    return data
