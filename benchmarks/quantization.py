"""What weight-only quantization buys and costs: decode / prefill tok/s, weight bytes, peak RSS and perplexity on
held-out code for float32, bfloat16, int8 and int4 (groups 32/64/128), through our real generation engine.

    python benchmarks/quantization.py                                   # ~110M-param random config (dim 768,
                                                                        # 12 layers, vocab 32016), 2 threads
    python benchmarks/quantization.py --model src/codellama/assets/default   # the embedded model
    python benchmarks/quantization.py --variants fp32,int8,int4-g32 --out quant.json

The float32 checkpoint and each quantized one are written first (``--workdir``); every variant then loads
its checkpoint in its own subprocess (same weights, same thread count), so peak RSS is what a user loading
that checkpoint sees. Prefill tok/s = prompt_len / time(generate 1 token). Decode tok/s = (N - 1) /
(time(generate N) - time(generate 1)): prefill and the first sample are not counted. Best of ``--repeats``.
Perplexity: the longest held-out standard-library modules (``evaluation.long_context``; unseen by the embedded
model), first ``--ppl-tokens`` tokens of each, needs a tokenizer (the checkpoint's, or ``--tokenizer``; the
real vocabulary in ../shared is used for random configs when present). On a random-weight model perplexity is
~vocab size and its *change* under quantization is all that means anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

# ``-out8``: the output projection in int8 (llama.cpp's mixed formats keep it at higher precision too).
VARIANTS = ("fp32", "bf16", "int8", "int4-g32", "int4-g64", "int4-g128", "int4-g32-out8")
REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "codellama-tokenizer.model"
PROMPT = ("import os\nimport sys\n\n\ndef read_config(path):\n    \"\"\"Read a key=value file into a dict.\"\"\"\n"
          "    result = {}\n    with open(path) as f:\n        for line in f:\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory or .gguf (default: random config below)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model for perplexity / prompts")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=32016)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ppl-files", type=int, default=4)
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--profile", action="store_true", help="also profile 16 decode steps (top ops by self CPU time)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--workdir", default=None, help="where the prepared checkpoints go (default: a temp dir)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prepared", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args, variant: str):
    """A ``CodeLlama`` for ``variant``: the checkpoint (or seeded random config), cast or quantized."""
    from codellama.api import CodeLlama, load
    from codellama.config import ModelConfig
    from codellama.model import Transformer
    from codellama.quantize import quantize_model
    from codellama.tokenizer import Tokenizer

    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    prepared = getattr(args, "prepared", None)
    if prepared:  # load from disk, as a user would: peak RSS is then the variant's own
        return load(Path(prepared) / ("fp32" if variant in ("fp32", "bf16") else variant), device="cpu", dtype=dtype)
    if args.model:
        llama = load(args.model, device="cpu", dtype=dtype, tokenizer=args.tokenizer)
    else:
        config = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                             vocab_size=args.vocab, max_seq_len=4096, name=f"random-{args.dim}x{args.layers}")
        torch.manual_seed(0)
        model = Transformer(config)
        model.init_weights()
        tok_path = args.tokenizer or (REAL_TOKENIZER if REAL_TOKENIZER.is_file() else None)
        if tok_path is None:
            raise SystemExit("a random config needs --tokenizer (a 32016-piece tokenizer.model)")
        llama = CodeLlama(model.to(dtype).eval(), Tokenizer(tok_path), name=config.name)
    if variant.startswith("int"):
        base, _, out = variant.partition("-out")
        mode, _, group = base.partition("-g")
        quantize_model(llama.model, mode, int(group or 32), output=f"int{out}" if out else None)
    return llama


def prepare(args, variants: list[str], workdir: Path) -> None:
    """Write the float32 checkpoint and one quantized checkpoint per int variant under ``workdir``."""
    import copy

    from codellama.checkpoint import save_checkpoint
    from codellama.quantize import quantize_model, save_quantized

    llama = build(args, "fp32")
    out = save_checkpoint(llama.model, workdir / "fp32")
    (out / "tokenizer.model").write_bytes(llama.tokenizer.model_proto)
    for v in variants:
        if v.startswith("int"):
            model = copy.deepcopy(llama.model)
            base, _, o = v.partition("-out")
            mode, _, group = base.partition("-g")
            quantize_model(model, mode, int(group or 32), output=f"int{o}" if o else None)
            d = save_quantized(model, workdir / v, mode=mode, group_size=int(group) if group else None)
            (d / "tokenizer.model").write_bytes(llama.tokenizer.model_proto)


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over ``exec`` from the forked
    parent image, so a worker spawned by a parent holding a model would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(llama, length: int) -> list[int]:
    ids = llama.tokenizer.encode(PROMPT * 50, bos=True)
    return ids[:length]


def time_generate(llama, prompt: list[int], n: int, repeats: int) -> tuple[float, list[int]]:
    from codellama.generation import generate

    best, tokens = math.inf, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate(llama.model, [prompt], max_new_tokens=n)
        best = min(best, time.perf_counter() - t0)
        tokens = out[0].tokens
    return best, tokens


def measure_speed(llama, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    prompt = prompt_ids(llama, prompt_len)
    time_generate(llama, prompt, 2, 1)  # warm-up: kernel checks, packing, allocator
    t1, _ = time_generate(llama, prompt, 1, repeats)
    tn, tokens = time_generate(llama, prompt, new_tokens, repeats)
    return {"prompt_len": len(prompt), "new_tokens": new_tokens,
            "prefill_tok_s": len(prompt) / t1, "decode_tok_s": (new_tokens - 1) / max(tn - t1, 1e-9),
            "decode_ms_per_token": 1000 * (tn - t1) / (new_tokens - 1), "greedy_tokens": tokens}


def measure_perplexity(llama, n_files: int, max_tokens: int) -> dict:
    from codellama.evaluation.long_context import default_perplexity_files, token_nlls

    files = default_perplexity_files(n_files)
    nll, count = 0.0, 0
    for f in files:
        toks = llama.tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"), bos=True)[:max_tokens]
        values = token_nlls(llama, toks, chunk=256)
        nll += sum(values)
        count += len(values)
    return {"perplexity": math.exp(nll / count), "ppl_tokens": count, "ppl_files": [f.name for f in files]}


def profile_decode(llama, prompt_len: int, steps: int = 16, top: int = 8) -> list[dict]:
    """Where decode time goes: the ops with the most self CPU time over ``steps`` decode steps."""
    from torch.profiler import ProfilerActivity, profile

    from codellama.generation import generate

    prompt = prompt_ids(llama, prompt_len)
    generate(llama.model, [prompt], max_new_tokens=2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(llama.model, [prompt], max_new_tokens=steps + 1)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1000,
             "share": e.self_cpu_time_total / total} for e in rows]


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    from codellama.quantize import QuantLinear, quantization_summary

    t0 = time.perf_counter()
    llama = build(args, args.worker)
    build_s = time.perf_counter() - t0
    quant = [m for m in llama.model.modules() if isinstance(m, QuantLinear)]
    result = {"variant": args.worker, "build_s": build_s,
              "weight_bytes": quantization_summary(llama.model)["weight_bytes"],
              "kernel_layers": sum(m.uses_kernel("cpu") for m in quant), "quantized_layers": len(quant)}
    result |= measure_speed(llama, args.prompt_len, args.new_tokens, args.repeats)
    # Peak RSS of load + generation (perplexity scoring below allocates [tokens, vocab] logits on top).
    result["peak_rss_bytes"] = peak_rss_bytes()
    result |= measure_perplexity(llama, args.ppl_files, args.ppl_tokens)
    if args.profile:
        result["profile"] = profile_decode(llama, args.prompt_len)
    return result


def run_variant(args, variant: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--worker", variant]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{variant} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r} (use {', '.join(VARIANTS)})")
    import tempfile
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="quant_bench_"))
    print(f"... preparing checkpoints in {workdir}", file=sys.stderr, flush=True)
    prepare(args, variants, workdir)
    results = []
    for v in variants:
        print(f"... {v}", file=sys.stderr, flush=True)
        results.append(run_variant(args, v, argv + ["--prepared", str(workdir)]))
    base = next((r for r in results if r["variant"] == "fp32"), results[0])
    print(f"{'variant':<10} {'weights':>9} {'peak RSS':>9} {'prefill':>9} {'decode':>8} {'vs fp32':>8} "
          f"{'ppl':>10} {'Δppl':>7}  greedy=fp32")
    for r in results:
        r["decode_speedup_vs_fp32"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["ppl_increase_vs_fp32"] = r["perplexity"] / base["perplexity"] - 1
        same = sum(a == b for a, b in zip(r["greedy_tokens"], base["greedy_tokens"]))
        r["greedy_agree_with_fp32"] = same
        print(f"{r['variant']:<10} {r['weight_bytes'] / 2**20:>7.1f}Mi {r['peak_rss_bytes'] / 2**20:>7.0f}Mi "
              f"{r['prefill_tok_s']:>7.0f}/s {r['decode_tok_s']:>6.1f}/s {r['decode_speedup_vs_fp32']:>7.2f}x "
              f"{r['perplexity']:>10.3f} {100 * r['ppl_increase_vs_fp32']:>+6.2f}%  {same}/{len(base['greedy_tokens'])}")
    for r in results:
        for p in r.get("profile", []):
            print(f"  {r['variant']:<10} {p['op'][:40]:<40} {p['calls']:>6} calls {p['self_ms']:>8.1f} ms "
                  f"{100 * p['share']:>5.1f}%")
    report = {"benchmark": "quantization", "settings": {k: v for k, v in vars(args).items() if k != "worker"},
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "cpu_capability": torch.backends.cpu.get_cpu_capability()},
              "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
