"""Tensor parallelism on this machine: per-token latency and per-rank memory at TP 1 against TP N (torchrun, gloo).

    python benchmarks/tensor_parallel.py [--nproc 2] [--rounds 3] [--dim 768] [--layers 12] [--tokens 32]

One Meta-layout checkpoint of a ~110M-parameter GQA config (random weights, float32) is written twice: as one file
and as ``--nproc`` model-parallel shards. Each round loads it at TP 1 (one process, all the cores' threads) and at TP
N (N ranks of one thread each, every rank reading only its shard), alternating so machine noise hits both alike, and
greedy-decodes ``--tokens`` tokens after a 128-token prompt. The table shows medians: prefill, per-token latency,
and per rank the weight bytes held, the KV-cache bytes, and the time the decode step's
all-reduces and all-gathers take (two all-reduces per block plus the embedding and logits gathers, timed alone on
tensors of the decode step's sizes) and the peak resident memory of loading and generating. A 2-core CPU will not get faster from TP: the point is that it runs, gives the
same tokens, halves each rank's memory, and what the collectives cost."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [1] + [(7 * i) % 30000 + 100 for i in range(127)]


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def worker(ckpt: str, tokens: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from codellama.checkpoint import describe_checkpoint, load_model
    from codellama.generation import make_requests, run
    from codellama.tensor_parallel import load_tensor_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    describe_checkpoint(ckpt)  # first-use imports before the memory baseline
    before = _rss_kib()
    if world > 1:
        model = load_tensor_parallel(ckpt, rank, world, device=torch.device("cpu"), dtype=torch.float32)
    else:
        model = load_model(ckpt, dtype=torch.float32)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    pack = False  # the same kernels at both sizes (a TP rank cannot use the oneDNN-packed path)
    for _ in run(model, make_requests(model, [PROMPT[:16]], max_new_tokens=4), pack=pack):
        pass
    requests = make_requests(model, [PROMPT], max_new_tokens=tokens)
    t0 = time.perf_counter()
    marks = []
    for _ in run(model, requests, pack=pack):
        marks.append(time.perf_counter())
    prefill = marks[0] - t0
    per_token = statistics.median(b - a for a, b in zip(marks, marks[1:]))
    # Peak resident memory of loading and generating (a one-process load keeps mapped pages until they are read).
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    c = model.config
    kv = 2 * c.n_layers * model.layers[0].attention.n_kv_heads * c.head_dim * (len(PROMPT) + tokens) * 4
    comm = 0.0
    if world > 1:  # the decode step's collectives alone, on tensors of its sizes
        x = torch.ones(1, 1, c.dim)
        parts = [torch.empty(1, 1, c.dim // world) for _ in range(world)]
        logit_parts = [torch.empty(1, 1, c.vocab_size // world) for _ in range(world)]
        times = []
        for _ in range(5):
            dist.barrier()
            s = time.perf_counter()
            for _ in range(2 * c.n_layers):
                dist.all_reduce(x)
            dist.all_gather(parts, parts[rank])
            dist.all_gather(logit_parts, logit_parts[rank])
            times.append(time.perf_counter() - s)
        comm = statistics.median(times)
    row = {"rank": rank, "world": world, "prefill_s": prefill, "per_token_s": per_token, "params_bytes": params,
           "kv_bytes": kv, "peak_bytes": peak, "collectives_s_per_token": comm,
           "tokens": requests[0].tokens}
    rows = [row]
    if world > 1:
        rows = [None] * world
        dist.all_gather_object(rows, row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _launch(ckpt: Path, nproc: int, tokens: int, out: Path, threads: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(threads)}
    me = [str(Path(__file__).resolve()), "--worker", str(ckpt), "--tokens", str(tokens), "--out", str(out)]
    cmd = [sys.executable, *me] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *me]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        sys.exit(f"error: TP={nproc} run failed:\n{done.stderr[-2000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.tokens, args.out)

    import torch

    from codellama.checkpoint import save_checkpoint
    from codellama.config import ModelConfig
    from codellama.model import Transformer

    cores = os.cpu_count() or 1
    config = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64, n_kv_heads=4,
                         vocab_size=32016, max_seq_len=512)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        model = Transformer(config)
        save_checkpoint(model, work / "one", format="meta", shards=1)
        save_checkpoint(model, work / "sharded", format="meta", shards=args.nproc)
        del model
        results: dict[int, list[list[dict]]] = {1: [], args.nproc: []}
        for r in range(args.rounds):
            for n in (1, args.nproc):
                threads = cores if n == 1 else max(1, cores // n)
                rows = _launch(work / ("one" if n == 1 else "sharded"), n, args.tokens, work / f"r{r}-{n}.json",
                               threads)
                results[n].append(rows)
                print(f"round {r + 1}/{args.rounds} TP={n}: {rows[0]['per_token_s'] * 1000:.1f} ms/token",
                      file=sys.stderr, flush=True)
    same = all(rows[0]["tokens"] == results[1][0][0]["tokens"] for n in results for rows in results[n])

    def med(n: int, key: str) -> float:
        return statistics.median(max(row[key] for row in rows) for rows in results[n])

    print(f"\nTensor parallelism on this machine ({cores} cores): {config.num_params() / 1e6:.0f}M-parameter GQA "
          f"config (dim {config.dim}, {config.n_layers} layers, {config.n_heads}/{config.n_kv_heads} heads, "
          f"vocab 32016), float32, 128-token prompt, {args.tokens} greedy tokens; medians of {args.rounds} "
          "interleaved rounds (per-rank figures: the largest rank)\n")
    print(f"| | TP=1 | TP={args.nproc} | ratio |\n|---|---:|---:|---:|")
    for label, key, scale, unit in (("prefill", "prefill_s", 1000, "ms"), ("per token", "per_token_s", 1000, "ms"),
                                    ("weights per rank", "params_bytes", 2**-20, "MiB"),
                                    ("KV cache per rank", "kv_bytes", 2**-20, "MiB"),
                                    ("peak memory per rank (load + generate)", "peak_bytes", 2**-20, "MiB")):
        a, b = med(1, key) * scale, med(args.nproc, key) * scale
        print(f"| {label} ({unit}) | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    comm = med(args.nproc, "collectives_s_per_token") * 1000
    print(f"| collectives per token (ms) | - | {comm:.2f} | {comm / (med(args.nproc, 'per_token_s') * 1000):.0%} "
          "of the step |")
    print(f"\nsame greedy tokens at TP=1 and TP={args.nproc}: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
