"""Prefill and decode throughput of our generation engine vs HF transformers ``generate()``.

Both run the same random-weight Llama (ours converted to HF names, q/k rows permuted for rotate-half), in the
same dtype and with the same number of threads, in one process; greedy outputs are compared token for token.

    python benchmarks/generation.py                       # ~134M-param config, float32 and bfloat16
    python benchmarks/generation.py --threads 1 --out gen.json
    python benchmarks/generation.py --long-context 32768  # also: peak RSS of a 32k-token prefill
    python benchmarks/generation.py --device cuda --dim 4096 --layers 32 --heads 32 --dtype bfloat16  # 7B shape

Prefill tok/s = batch * prompt_len / time(generate 1 token). Decode tok/s = batch * (N - 1) /
(time(generate N) - time(generate 1)), so prefill, allocation and the first sample are not counted in decode.
Each timing is the best of ``--repeats`` runs, ours and HF interleaved."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from codellama.config import ModelConfig
from codellama.generation import generate, packed_now
from codellama.model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_models(config: ModelConfig, dtype: torch.dtype, device: str, with_hf: bool):
    torch.manual_seed(0)
    ours = Transformer(config)
    ours.init_weights()
    ours = ours.to(device=device, dtype=dtype).eval()
    if not with_hf:
        return ours, None
    import transformers
    from codellama.checkpoint import meta_to_hf_name, permute_to_hf

    hf_config = transformers.LlamaConfig(**config.to_hf())
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(hf_config)
    state = {}
    for name, w in ours.state_dict().items():
        if name.endswith("attention.wq.weight"):
            w = permute_to_hf(w, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = permute_to_hf(w, config.n_kv_heads)
        state[meta_to_hf_name(name)] = w
    hf.load_state_dict(state, strict=False)
    return ours, hf.to(dtype=dtype).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(model, prompts, n, pack, device):
    _sync(device)
    t = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=n, pack=pack)
    _sync(device)
    return time.perf_counter() - t, [r.tokens for r in out]


def run_hf(model, prompts, n, pack, device):
    tokens = torch.tensor(prompts, device=device)
    _sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    _sync(device)
    return time.perf_counter() - t, out[:, tokens.shape[1]:].tolist()


def measure(impls: dict, prompts, n: int, repeats: int, pack, device) -> dict:
    """Best-of-``repeats`` time for 1 and for ``n`` new tokens, per implementation, interleaved."""
    best = {name: {"t1": float("inf"), "tn": float("inf"), "tokens": None} for name in impls}
    for name, (fn, model) in impls.items():  # warm-up: kernels, allocator, packing
        fn(model, prompts, 2, pack, device)
    for _ in range(repeats):
        for name, (fn, model) in impls.items():
            t1, _ = fn(model, prompts, 1, pack, device)
            tn, toks = fn(model, prompts, n, pack, device)
            b = best[name]
            b["t1"], b["tn"], b["tokens"] = min(b["t1"], t1), min(b["tn"], tn), toks
    return best


def bench_dtype(args, config: ModelConfig, dtype_name: str) -> list[dict]:
    dtype = DTYPES[dtype_name]
    ours, hf = build_models(config, dtype, args.device, not args.no_hf)
    impls = {"ours": (run_ours, ours)}
    if hf is not None:
        impls["hf"] = (run_hf, hf)
    pack = {"auto": None, "on": True, "off": False}[args.pack]
    g = torch.Generator().manual_seed(1)
    rows = []
    # prefill: a long prompt, one new token
    prompt = torch.randint(3, config.vocab_size, (args.prompt_len,), generator=g).tolist()
    res = measure(impls, [prompt], 1, args.repeats, pack, args.device)
    for name, r in res.items():
        rows.append({"dtype": dtype_name, "impl": name, "phase": "prefill", "batch": 1, "tokens": args.prompt_len,
                     "seconds": r["t1"], "tok_per_s": args.prompt_len / r["t1"]})
    # decode: short prompts, N new tokens
    for batch in args.batch:
        prompts = [torch.randint(3, config.vocab_size, (args.decode_prompt_len,), generator=g).tolist()
                   for _ in range(batch)]
        res = measure(impls, prompts, args.new_tokens, args.repeats, pack, args.device)
        match = agree = None
        if "hf" in res:
            match = res["ours"]["tokens"] == res["hf"]["tokens"]
            # Where greedy paths part (bf16 rounds differently in RoPE/norms): mean length of the common prefix.
            agree = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                        for x, y in zip(res["ours"]["tokens"], res["hf"]["tokens"])) / batch
        for name, r in res.items():
            dt = r["tn"] - r["t1"]
            rows.append({"dtype": dtype_name, "impl": name, "phase": "decode", "batch": batch,
                         "tokens": batch * (args.new_tokens - 1), "seconds": dt,
                         "tok_per_s": batch * (args.new_tokens - 1) / dt, "greedy_matches_hf": match,
                         "tokens_agreeing_with_hf": agree})
    for r in rows:
        if r["impl"] == "ours":
            r["packed"] = packed_now(ours)
    return rows


def long_context(args) -> dict:
    """Run the 32k prefill in a fresh process so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--_long", str(args.long_context), "--dim", str(args.dim),
           "--layers", str(args.layers), "--heads", str(args.heads), "--vocab", str(args.vocab),
           "--threads", str(args.threads), "--prefill-chunk", str(args.prefill_chunk), "--pack", args.pack]
    if args.kv_heads:
        cmd += ["--kv-heads", str(args.kv_heads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"long-context run failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _long_child(args) -> None:
    n = args._long
    config = _config(args, max_seq_len=n + 8)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    model.eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.randint(3, config.vocab_size, (n,)).tolist()
    before = _peak_rss()
    t = time.perf_counter()
    pack = {"auto": None, "on": True, "off": False}[args.pack]
    generate(model, [prompt], max_new_tokens=2, prefill_chunk=args.prefill_chunk, pack=pack)
    seconds = time.perf_counter() - t
    peak = _peak_rss()
    kv = config.kv_cache_bytes(n + 1, 1, torch.float32)
    print(json.dumps({"prompt_tokens": n, "prefill_chunk": args.prefill_chunk, "packed": packed_now(model),
                      "seconds": seconds,
                      "prefill_tok_per_s": n / seconds, "peak_rss_bytes": peak,
                      "rss_before_generate_bytes": before, "weights_bytes": weights, "kv_cache_bytes": kv,
                      "budget_bytes": weights + kv + 2**30, "within_budget": peak < weights + kv + 2**30}))


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss would include the forking parent's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _config(args, max_seq_len: int = 4096) -> ModelConfig:
    return ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads or None,
                       vocab_size=args.vocab, max_seq_len=max_seq_len)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=0)
    p.add_argument("--vocab", type=int, default=32016)
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--prompt-len", type=int, default=512, help="prefill prompt length")
    p.add_argument("--decode-prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pack", choices=["auto", "on", "off"], default="auto",
                   help="oneDNN-packed weights for our CPU decode (auto: models up to 2 GiB)")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    p.add_argument("--long-context", type=int, default=0, help="also measure peak RSS of an N-token prefill")
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--_long", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._long:
        _long_child(args)
        return

    config = _config(args)
    rows = []
    for dtype_name in args.dtype:
        rows += bench_dtype(args, config, dtype_name)
    result = {"config": {"dim": args.dim, "layers": args.layers, "heads": args.heads,
                         "kv_heads": args.kv_heads or args.heads, "vocab": args.vocab,
                         "params": config.num_params()},
              "device": args.device, "threads": args.threads, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "prompt_len": args.prompt_len,
              "decode_prompt_len": args.decode_prompt_len, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "rows": rows}
    if not args.no_hf:
        import transformers
        result["transformers"] = transformers.__version__

    print(f"{config.num_params() / 1e6:.0f}M params (dim {args.dim}, {args.layers} layers, {args.heads} heads, "
          f"vocab {args.vocab}), {args.device}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'dtype':<9} {'phase':<8} {'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'ours/HF':>8}  same tokens")
    for r in rows:
        if r["impl"] != "ours":
            continue
        hf = next((h for h in rows if h["impl"] == "hf" and h["dtype"] == r["dtype"] and h["phase"] == r["phase"]
                   and h["batch"] == r["batch"]), None)
        hf_s = f"{hf['tok_per_s']:10.1f}" if hf else f"{'-':>10}"
        ratio = f"{r['tok_per_s'] / hf['tok_per_s']:8.2f}" if hf else f"{'-':>8}"
        same = {None: "-", True: "yes", False: f"first {r.get('tokens_agreeing_with_hf') or 0:.1f}"}[
            r.get("greedy_matches_hf")]
        print(f"{r['dtype']:<9} {r['phase']:<8} {r['batch']:>5} {r['tok_per_s']:11.1f} {hf_s} {ratio}  {same}")
        if hf:
            r["speedup_vs_hf"] = r["tok_per_s"] / hf["tok_per_s"]

    if args.long_context:
        lc = long_context(args)
        result["long_context"] = lc
        gib = 2**30
        print(f"long context: {lc['prompt_tokens']} tokens prefilled in {lc['seconds']:.1f} s "
              f"({lc['prefill_tok_per_s']:.0f} tok/s), peak RSS {lc['peak_rss_bytes'] / gib:.2f} GiB vs budget "
              f"weights {lc['weights_bytes'] / gib:.2f} + KV {lc['kv_cache_bytes'] / gib:.2f} + 1 GiB = "
              f"{lc['budget_bytes'] / gib:.2f} GiB: {'OK' if lc['within_budget'] else 'OVER'}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
