"""Us vs llama.cpp on the same weights: our checkpoint is exported to GGUF (f32 / f16 / q8_0) by
``codellama.gguf``, then llama.cpp (through ``llama-cpp-python``) and our engine each report prefill tok/s,
decode tok/s (batch 1) and peak RSS, with the same thread count, in one run; plus llama.cpp's greedy tokens on
our exported file against ours, and perplexity on held-out code for our precisions.

    pip install llama-cpp-python      # builds llama.cpp from source (CMake + a C++ compiler; minutes)
    python benchmarks/vs_llamacpp.py                                  # ~110M-param random config, 2 threads
    python benchmarks/vs_llamacpp.py --model src/codellama/assets/default --out vs.json

Pairs compared at equal precision: llama.cpp f32 vs our fp32, f16 vs our bf16 (the 16-bit formats each engine
runs fast on CPU), q8_0 vs our int8, q4_0 vs our int4 (groups of 32; ours also stores a zero point per group). Without llama-cpp-python installed the llama.cpp rows are skipped (the
script says so) and our rows and the GGUF export still run. Each row runs in its own subprocess so peak RSS is
its own. Timing definitions are those of ``benchmarks/quantization.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantization as qb  # noqa: E402  (shared model building and timing)

OURS = ("fp32", "bf16", "int8", "int4")
LLAMACPP = ("f32", "f16", "q8_0", "q4_0")
PAIRS = {"f32": "fp32", "f16": "bf16", "q8_0": "int8", "q4_0": "int4"}
GREEDY_TOKENS = 32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: random config)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=32016)
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ppl-files", type=int, default=4)
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    p.add_argument("--workdir", default=None, help="where to write the GGUF files (default: a temp dir)")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prepared", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def have_llamacpp() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


# ---- workers ------------------------------------------------------------------------------------------
def ours_worker(args) -> dict:
    torch.set_num_threads(args.threads)
    llama = qb.build(args, args.worker.removeprefix("ours-"))
    prompt = qb.prompt_ids(llama, args.prompt_len)
    r = {"engine": "codellama", "precision": args.worker.removeprefix("ours-")}
    r |= qb.measure_speed(llama, args.prompt_len, args.new_tokens, args.repeats)
    r["prompt_ids"] = prompt
    # What a decode step reads: every weight but the embedding table (a step gathers one of its rows).
    r["weight_bytes_per_token"] = sum(t.numel() * t.element_size() for name, t in llama.model.state_dict().items()
                                      if name != "tok_embeddings.weight")
    if not args.no_ppl:
        r |= qb.measure_perplexity(llama, args.ppl_files, args.ppl_tokens)
    r["peak_rss_bytes"] = qb.peak_rss_bytes()
    return r


def llamacpp_worker(args) -> dict:
    import numpy as np
    from llama_cpp import Llama

    prompt = json.loads(Path(args.gguf + ".prompt.json").read_text())
    n_ctx = len(prompt) + max(args.new_tokens, GREEDY_TOKENS) + 8
    llm = Llama(model_path=args.gguf, n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=512, logits_all=False, verbose=False)

    n_vocab = llm.n_vocab()

    def last_logits():
        # Without logits_all, llama-cpp-python (0.3.x) no longer copies logits into ``scores``; the context
        # holds one output row, the last evaluated token's.
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    def greedy(n: int) -> tuple[float, float, list[int]]:
        """(prefill seconds, seconds for n-1 decode steps, tokens) with argmax sampling on raw logits."""
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tokens = []
        for i in range(n):
            tok = int(np.argmax(last_logits()))
            tokens.append(tok)
            if i < n - 1:
                llm.eval([tok])
        return t1 - t0, time.perf_counter() - t1, tokens

    greedy(2)  # warm-up
    prefill, decode = math.inf, math.inf
    tokens: list[int] = []
    for _ in range(args.repeats):
        p, d, tokens = greedy(args.new_tokens)
        prefill, decode = min(prefill, p), min(decode, d)
    _, _, greedy_tokens = greedy(GREEDY_TOKENS)
    from codellama.gguf_reader import read_gguf
    streamed = sum(t.n_bytes for name, t in read_gguf(args.gguf).tensors.items() if name != "token_embd.weight")
    return {"engine": "llama.cpp", "precision": args.worker.removeprefix("llamacpp-"), "prompt_len": len(prompt),
            "weight_bytes_per_token": streamed,
            "new_tokens": args.new_tokens, "prefill_tok_s": len(prompt) / prefill,
            "decode_tok_s": (args.new_tokens - 1) / decode, "decode_ms_per_token": 1000 * decode / (args.new_tokens - 1),
            "greedy_tokens": greedy_tokens, "tokens_timed": tokens,
            "peak_rss_bytes": qb.peak_rss_bytes()}


def read_bandwidth(threads: int) -> float:
    """This machine's read bandwidth at ``threads`` threads: the best of reading a 256 MiB float32 matrix as a sum
    (torch) and as a matrix-vector product (numpy's BLAS), fastest of 5 each — the ceiling a weight stream meets."""
    import numpy as np

    from codellama.generation_forward import sync_blas_threads

    torch.set_num_threads(threads)
    sync_blas_threads()
    big = torch.ones(8192, 8192)
    x = np.ones(8192, np.float32)
    a = big.numpy()
    best = 0.0
    for fn in (big.sum, lambda: a @ x):
        fn()
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            best = max(best, big.numel() * 4 / (time.perf_counter() - t0))
    return best


def spawn(argv: list[str], worker: str, gguf: str | None = None) -> dict:
    cmd = [sys.executable, __file__, *argv, "--worker", worker] + (["--gguf", gguf] if gguf else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{worker} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- driver -------------------------------------------------------------------------------------------
def export(args, workdir: Path) -> dict[str, Path]:
    from codellama.gguf import save_gguf

    llama = qb.build(args, "fp32")  # from the prepared float32 checkpoint
    files = {}
    for outtype in LLAMACPP:
        t0 = time.perf_counter()
        files[outtype] = save_gguf(llama.model, llama.tokenizer, workdir / f"model.{outtype}.gguf", outtype=outtype)
        print(f"... exported {files[outtype].name}: {files[outtype].stat().st_size / 2**20:.1f} MiB in "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return files


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        fn = llamacpp_worker if args.worker.startswith("llamacpp-") else ours_worker
        print(json.dumps(fn(args)))
        return
    version = have_llamacpp()
    if version is None:
        print("llama-cpp-python is not installed: llama.cpp rows skipped "
              "(pip install llama-cpp-python — it compiles llama.cpp, a few minutes)", file=sys.stderr)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vs_llamacpp_"))
    workdir.mkdir(parents=True, exist_ok=True)
    # Our float32 and int8 checkpoints on disk first: every row then loads its model as a user would.
    qb.prepare(args, ["int8", "int4"], workdir)
    args.prepared = str(workdir)
    argv = argv + ["--prepared", str(workdir)]
    files = export(args, workdir)

    rows: dict[str, dict] = {}
    for precision in OURS:
        print(f"... ours {precision}", file=sys.stderr, flush=True)
        rows[f"ours-{precision}"] = spawn(argv, f"ours-{precision}")
    prompt = rows["ours-fp32"]["prompt_ids"]
    if version is not None:
        for outtype in LLAMACPP:
            Path(str(files[outtype]) + ".prompt.json").write_text(json.dumps(prompt))
            print(f"... llama.cpp {outtype}", file=sys.stderr, flush=True)
            rows[f"llamacpp-{outtype}"] = spawn(argv, f"llamacpp-{outtype}", str(files[outtype]))

    ref = rows["ours-fp32"]["greedy_tokens"][:GREEDY_TOKENS]
    print(f"{'engine':<10} {'precision':<9} {'prefill':>9} {'decode':>9} {'peak RSS':>9} {'ppl':>10}  greedy=ours fp32")
    for key, r in rows.items():
        toks = r["greedy_tokens"][:GREEDY_TOKENS]
        n = min(len(toks), len(ref))
        agree = next((i for i in range(n) if toks[i] != ref[i]), n)
        r["greedy_prefix_agreement"] = agree
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
        print(f"{r['engine']:<10} {r['precision']:<9} {r['prefill_tok_s']:>7.0f}/s {r['decode_tok_s']:>7.1f}/s "
              f"{r['peak_rss_bytes'] / 2**20:>7.0f}Mi {ppl:>10}  first {agree}/{n} equal")
    ratios = {}
    machine_bw = read_bandwidth(args.threads)
    for r in rows.values():
        r["weight_gb_s"] = r["weight_bytes_per_token"] * r["decode_tok_s"] / 1e9
    if version is not None:
        print(f"\n| pair | decode ours / llama.cpp | prefill ours / llama.cpp | weights read, GB/s: ours | llama.cpp "
              f"| this machine's read bandwidth ({args.threads} thread{'s' if args.threads > 1 else ''}) |")
        print("|---|---:|---:|---:|---:|---:|")
        for outtype, ours in PAIRS.items():
            a, b = rows[f"ours-{ours}"], rows[f"llamacpp-{outtype}"]
            ratios[f"{ours}/{outtype}"] = {"decode": a["decode_tok_s"] / b["decode_tok_s"],
                                           "prefill": a["prefill_tok_s"] / b["prefill_tok_s"],
                                           "ours_gb_s": a["weight_gb_s"], "llamacpp_gb_s": b["weight_gb_s"]}
            ratio = ratios[f"{ours}/{outtype}"]
            print(f"| {ours} vs {outtype} | {ratio['decode']:.2f}x | {ratio['prefill']:.2f}x | {a['weight_gb_s']:.1f} "
                  f"| {b['weight_gb_s']:.1f} | {machine_bw / 1e9:.1f} |")
    report = {"benchmark": "vs_llamacpp", "llama_cpp_python": version,
              "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "gguf")},
              "gguf_files": {k: {"path": str(v), "bytes": v.stat().st_size} for k, v in files.items()},
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "read_bandwidth_bytes_s": machine_bw},
              "rows": rows, "ratios": ratios}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
