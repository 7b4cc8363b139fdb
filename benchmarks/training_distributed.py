"""Sharded training: one process against FSDP2 over torchrun, and the MFU of a 7B-shaped slice on GPUs.

    python benchmarks/training_distributed.py [--nproc 2] [--steps 30] [--rounds 3] [--dim 256] [--layers 4]
    torchrun --nproc-per-node N benchmarks/training_distributed.py --mfu [--shape CodeLlama-7b] [--slice-layers 4]

Default mode (CPU): the real ``codellama train`` on the same recipe, same global batch and data, once as one
process with all the cores' threads and once as ``--nproc`` ranks under torchrun (gloo) with the cores split
between them; rounds alternate (1, N, 1, N, ...) so machine noise hits both alike, and the table shows medians:
tokens/s, and per rank the parameter and optimizer bytes actually held (local shards) and the peak RSS.

``--mfu`` mode (run it under torchrun on GPUs): ``--slice-layers`` transformer blocks at the exact dimensions of a
released shape (plus its embedding and output head), FSDP2 with bf16 compute and fp32 master weights, activation
checkpointing per block, random tokens; prints tokens/s, model FLOPs utilisation (6·N + 12·L·d·T FLOPs a token,
the standard count, against the GPU's dense bf16 peak) and peak memory per rank."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 peak FLOP/s (no sparsity), per GPU, from the vendor's data sheets.
# Shapes that are not released checkpoints, for the GPU check: a Llama-style 1B (0.95B parameters).
SHAPES = {"llama-1b": dict(dim=2048, n_layers=16, n_heads=16)}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def _recipe(work: Path, dim: int, layers: int, steps: int) -> Path:
    corpus = work / "corpus"
    corpus.mkdir()
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]:
        shutil.copyfile(f, corpus / f.name)
    recipe = work / "bench.toml"
    recipe.write_text(f"""name = "bench"
corpus = ["{corpus}"]
data_dir = "{work / 'data'}"
vocab_size = 2048
seq_len = 256
dim = {dim}
n_layers = {layers}
n_heads = {max(2, dim // 64)}
batch_size = 8
lr = 1e-3
warmup_steps = 5
max_steps = {steps}
eval_interval = {steps}
eval_batches = 1
ckpt_interval = {steps}
log_interval = 1
precision = "fp32"
device = "cpu"
progress = false
""")
    return recipe


def _run(recipe: Path, out: Path, nproc: int, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    train = ["train", str(recipe), "--out-dir", str(out), "--no-progress", "--threads", str(threads)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "codellama", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "codellama", *train]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    # Steady-state speed: the log's last record averages over every step, including the first (warm-up) ones.
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step_s"] for r in records[2:]] or [r["step_s"] for r in records]
    summary["steady_tokens_per_s"] = summary["tokens_seen"] / summary["step"] / statistics.median(steps)
    return summary


def compare(args: argparse.Namespace) -> int:
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipe = _recipe(work, args.dim, args.layers, args.steps)
        _run(recipe, work / "prep", 1, cores)  # prepares the data once, outside the measurement
        results: dict[int, list[dict]] = {1: [], args.nproc: []}
        for _ in range(args.rounds):
            for nproc in (1, args.nproc):
                results[nproc].append(_run(recipe, work / f"run{nproc}", nproc, max(1, cores // nproc)))
    first = results[1][0]
    print(f"model: {first['params'] / 1e6:.1f}M parameters, dim {args.dim}, {args.layers} layers, global batch "
          f"8 x 256 tokens, fp32, {args.steps} steps, {args.rounds} interleaved rounds, {cores} cores")
    print(f"{'processes':>9} | {'tokens/s':>9} | {'params MiB/rank':>15} | {'optimizer MiB/rank':>18} | "
          f"{'peak RSS MiB/rank':>17} | {'final loss':>10}")
    print("-" * 94)
    for nproc, runs in results.items():
        med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
        per_rank = lambda key: statistics.median(max(r[key]) for r in runs) / 2**20  # noqa: E731
        print(f"{nproc:>9} | {med('steady_tokens_per_s'):>9.0f} | {per_rank('param_bytes_per_rank'):>15.2f} | "
              f"{per_rank('optimizer_bytes_per_rank'):>18.2f} | {per_rank('peak_rss_bytes_per_rank'):>17.0f} | "
              f"{med('final_train_loss'):>10.5f}")
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    return 0


# ---- MFU on GPUs ------------------------------------------------------------------------------------------------
def mfu(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from codellama.config import ModelConfig
    from codellama.model import Transformer
    from codellama.training.distributed import init_ranks, shard_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ranks, device = init_ranks(device)
    shape = (ModelConfig(**SHAPES[args.shape], vocab_size=32016, name=args.shape) if args.shape in SHAPES
             else ModelConfig.from_name(args.shape))
    shape = replace(shape, n_layers=args.slice_layers or shape.n_layers, max_seq_len=args.seq_len)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(shape)
    model.activation_checkpointing = not args.no_checkpointing
    precision = "bf16" if device.type == "cuda" else "fp32"
    if ranks.distributed:
        shard_model(model, ranks, precision)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if not ranks.distributed and device.type == "cuda"
                else torch.autocast(device.type, enabled=False))
    n_params = shape.num_params()
    flops_per_token = 6 * n_params + 12 * shape.n_layers * shape.dim * args.seq_len
    tokens = torch.randint(0, shape.vocab_size, (args.batch, args.seq_len + 1), device=device)
    times = []
    for step in range(args.steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tok_s = args.batch * args.seq_len / step_s  # per rank
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    utilisation = tok_s * flops_per_token / peak if peak else float("nan")
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    if ranks.main:
        print(f"{args.shape}: {shape.n_layers} layers at dim {shape.dim}, {n_params / 1e9:.2f}B parameters, "
              f"{ranks.world_size} rank(s) on {name}, "
              f"{'bf16 compute / fp32 master' if precision == 'bf16' else 'fp32'}, activation checkpointing "
              f"{'off' if args.no_checkpointing else 'on'}, batch {args.batch} x {args.seq_len} per rank")
        print(f"{'tokens/s/rank':>13} | {'step s':>7} | {'MFU':>6} | {'peak GiB/rank':>13}")
        print(f"{tok_s:>13.0f} | {step_s:>7.3f} | {utilisation:>6.1%} | {mem:>13.1f}")
    if ranks.distributed:
        torch.distributed.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mfu", action="store_true", help="the GPU MFU mode (run under torchrun)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shape", default="CodeLlama-7b", help="--mfu: a released shape, or llama-1b")
    parser.add_argument("--slice-layers", type=int, default=None,
                        help="--mfu: time this many blocks of the shape (default: all of them)")
    parser.add_argument("--seq-len", type=int, default=4096, help="--mfu: sequence length")
    parser.add_argument("--batch", type=int, default=2, help="--mfu: sequences per rank")
    parser.add_argument("--no-checkpointing", action="store_true", help="--mfu: keep every block's activations")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    return mfu(args) if args.mfu else compare(args)


if __name__ == "__main__":
    sys.exit(main())
