"""What bounds speculative decoding's speedup on a GPU: the target's verify forward of k+1 tokens against one decode
step, at a released shape (issue 17's GPU check; random weights time like real ones).

    python benchmarks/gpu_check_speculative.py                       # CodeLlama-34b, bf16, cuda, 1k context
    python benchmarks/gpu_check_speculative.py --device cpu --layers 2 --shape CodeLlama-7b   # a CPU smoke run

Prints one row per k = 1..8: the verify forward's time, its ratio to one decode step, and the speedup bound
(k + 1) / ratio that a draft accepting every token (at no cost of its own) would give."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from codellama.bench.latency import model_config, random_model
from codellama.generation import decoder_for, forward_step
from codellama.model import KVCache, rope_angles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="CodeLlama-34b")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--layers", type=int, default=None, help="time a slice of this many blocks (CPU smoke runs)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    device = torch.device(args.device)
    config = model_config(args.shape, args.context, 16)
    if args.layers:
        config = replace(config, n_layers=args.layers)
    model = random_model(config, args.dtype, device)
    dec = decoder_for(model, False)
    cache = KVCache.for_model(model, 1, args.context + 16, device=device, dtype=model.output.weight.dtype)
    cos, sin = rope_angles(torch.arange(cache.size, device=device).unsqueeze(0), config.head_dim, config.rope_theta)
    rope = (cos[0], sin[0])
    prompt = torch.randint(3, config.vocab_size, (1, args.context), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        forward_step(model, dec, prompt, torch.arange(args.context, device=device).unsqueeze(0), cache, rope, False,
                     decode=False)

        def timed(n: int) -> float:
            tokens = torch.randint(3, config.vocab_size, (1, n), device=device)
            positions = torch.arange(args.context, args.context + n, device=device).unsqueeze(0)
            times = []
            for _ in range(args.repeats + 2):
                cache.length = args.context  # roll back, as a rejected proposal does
                sync()
                start = time.perf_counter()
                forward_step(model, dec, tokens, positions, cache, rope, False, last_only=False, decode=n == 1)
                sync()
                times.append(time.perf_counter() - start)
            return statistics.median(times[2:])

        step = timed(1)
        print(f"{args.shape}{f' ({args.layers} layers)' if args.layers else ''}, {args.dtype} on {device}, "
              f"{args.context} tokens of context: one decode step {step * 1000:.2f} ms (median of {args.repeats})\n")
        print("| k | verify k+1 tokens ms | / decode step | speedup bound (k+1)/ratio |\n|---:|---:|---:|---:|")
        for k in range(1, 9):
            t = timed(k + 1)
            print(f"| {k} | {t * 1000:.2f} | {t / step:.2f} | {(k + 1) / (t / step):.2f} |", flush=True)


if __name__ == "__main__":
    main()
