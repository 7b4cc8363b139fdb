"""What the int8 KV cache buys and costs on the embedded model: KV bytes per token, perplexity on long held-out
files, greedy agreement with the default cache, and decode tok/s, default cache vs ``kv_cache_dtype="int8"``.

    python benchmarks/kv_cache_int8.py                      # embedded model, 1 thread
    python benchmarks/kv_cache_int8.py --threads 2 --json kv.json

KV bytes per token: the allocated cache's ``nbytes()`` / its slots, batch 1 (int8: head_dim int8 values plus a
2-byte bfloat16 scale per layer, kv head and token, for keys and for values). Perplexity: teacher-forced through
the cache, prefilled ``--chunk`` tokens at a time so later chunks attend to the stored (int8) keys/values, on the
``--ppl-files`` longest held-out standard-library modules (never trained on), first 1,024 tokens (the model's
context). Greedy agreement: share of prompts (first ``--lines`` lines of each held-out module, up to 512 tokens)
whose first 32 greedy tokens equal the default cache's, each run alone. Decode tok/s: (N - 1) / (time(generate N)
- time(generate 1)) after a ``--context``-token prompt, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import codellama
from codellama.evaluation.long_context import cached_perplexity, default_perplexity_files
from codellama.generation import generate
from codellama.model import KVCache, kv_bytes_per_token




def decode_tok_s(llama, prompt: list[int], kv, new: int, repeats: int) -> float:
    def timed(n: int) -> float:
        t = time.perf_counter()
        generate(llama.model, [prompt], max_new_tokens=n, kv_cache_dtype=kv, stop_ids=())
        return time.perf_counter() - t
    best = math.inf
    for _ in range(repeats):
        best = min(best, (timed(new) - timed(1)) / (new - 1))
    return 1.0 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ppl-files", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--lines", type=int, default=40)
    ap.add_argument("--context", type=int, default=900, help="prompt tokens before the timed decode")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llama = codellama.load()
    tok, c = llama.tokenizer, llama.config
    files = default_perplexity_files(19)
    ppl_tokens = [tok.encode(f.read_text(), bos=True)[:c.max_seq_len] for f in files[:args.ppl_files]]
    prompts = [tok.encode("".join(f.read_text().splitlines(keepends=True)[:args.lines]), bos=True)[:512]
               for f in files]
    long_prompt = tok.encode("\n".join(f.read_text() for f in files), bos=True)[:args.context]
    baseline = [generate(llama.model, [p], max_new_tokens=32)[0].tokens for p in prompts]

    rows = []
    for name, kv in ((f"default ({str(llama.dtype).removeprefix('torch.')})", None), ("int8", "int8")):
        dtype = torch.int8 if kv else llama.dtype
        cache = KVCache.allocate(c, 1, c.max_seq_len, dtype=dtype)
        assert cache.nbytes() == c.max_seq_len * kv_bytes_per_token(c, dtype)
        ppls = [cached_perplexity(llama, t, dtype, args.chunk) for t in ppl_tokens]
        same = sum(generate(llama.model, [p], max_new_tokens=32, kv_cache_dtype=kv)[0].tokens == b
                   for p, b in zip(prompts, baseline))
        rows.append({"kv_cache": name, "kv_bytes_per_token": cache.nbytes() // c.max_seq_len,
                     "ppl": math.exp(sum(map(math.log, ppls)) / len(ppls)), "ppl_per_file": ppls,
                     "greedy_agreement": same / len(prompts), "greedy_prompts": len(prompts),
                     "decode_tok_s": decode_tok_s(llama, long_prompt, kv, args.new_tokens, args.repeats)})
    base = rows[0]
    bf16 = kv_bytes_per_token(c, torch.bfloat16)
    print(f"embedded model ({c.n_layers} layers, {c.n_kv_heads} kv heads, head_dim {c.head_dim}), {args.threads} "
          f"thread(s); ppl: {len(ppl_tokens)} held-out files x {len(ppl_tokens[0])} tokens, chunks of {args.chunk}; "
          f"agreement: {len(prompts)} held-out prompts x 32 tokens; decode after {len(long_prompt)} tokens")
    print(f"{'KV cache':<16} {'KV B/token':>10} {'vs bf16':>8} {'ppl':>9} {'dppl':>8} {'greedy=':>8} {'decode tok/s':>13}")
    for r in rows:
        dppl = (r["ppl"] - base["ppl"]) / base["ppl"]
        print(f"{r['kv_cache']:<16} {r['kv_bytes_per_token']:>10} {r['kv_bytes_per_token'] / bf16:>8.3f} "
              f"{r['ppl']:>9.4f} {dppl:>+8.3%} {r['greedy_agreement']:>8.0%} {r['decode_tok_s']:>13.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "settings": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
