"""Training throughput: the trainer's step against an equivalent hand-written PyTorch loop.

    python benchmarks/training.py [--recipe tiny-pretrain] [--steps 20] [--threads 2] [--precision auto] [--json OUT]

Both run the same model (the recipe's shape), the same AdamW settings and the same batches; steps alternate
(trainer, hand-written, trainer, ...) so that load from other processes on a shared machine hits both alike.
The hand-written loop is the textbook one: forward, cross-entropy, backward, clip, step, zero_grad. The trainer
adds its per-step work (learning-rate schedule, parameter groups, loss bookkeeping); the ratio shows its cost.
Both use the same precision: float32, or bf16 autocast (``auto``: what the trainer would pick on this machine)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from codellama.model import Transformer
from codellama.training.trainer import autocast_for, load_recipe, lr_at, make_optimizer, resolve_precision, train_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="tiny-pretrain")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per loop (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                        help="default: the recipe's")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_recipe(args.recipe)
    cpu = torch.device("cpu")
    precision = resolve_precision(args.precision or config.precision, cpu)
    autocast = lambda: autocast_for(cpu, precision)  # noqa: E731
    model_config = config.model_config(config.vocab_size)

    def fresh():
        torch.manual_seed(0)
        model = Transformer(model_config)
        model.init_weights()
        return model.train()

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (config.batch_size, config.seq_len + 1), generator=gen)
               for _ in range(4)]

    trainer_model = fresh()
    trainer_opt = make_optimizer(trainer_model, config)
    plain_model = fresh()
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                                  weight_decay=config.weight_decay)

    def trainer_step(i: int) -> float:
        for group in trainer_opt.param_groups:
            group["lr"] = lr_at(i, config)
        b = batches[i % len(batches)]
        loss, _ = train_step(trainer_model, trainer_opt, [(b[:, :-1], b[:, 1:])], config.grad_clip, autocast)
        return loss

    def plain_step(i: int) -> float:
        b = batches[i % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = plain_model(b[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), b[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), config.grad_clip)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        return loss.item()

    times: dict[str, list[float]] = {"trainer": [], "hand_written": []}
    for i in range(args.steps + 2):
        for name, step in (("trainer", trainer_step), ("hand_written", plain_step)):
            t0 = time.perf_counter()
            step(i)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    tokens = config.batch_size * config.seq_len
    result = {"recipe": config.name, "params": model_config.num_params(), "tokens_per_step": tokens,
              "threads": args.threads, "steps": args.steps, "precision": precision}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"median_step_s": round(med, 4), "min_step_s": round(min(ts), 4),
                        "tokens_per_s": round(tokens / med, 1)}
    result["trainer_over_hand_written"] = round(result["trainer"]["median_step_s"]
                                                / result["hand_written"]["median_step_s"], 3)
    print(f"{config.name}: {result['params'] / 1e6:.2f}M parameters, {tokens:,} tokens/step, {precision}, "
          f"{args.threads} threads, median of {args.steps} steps")
    print(f"{'loop':<14}{'median step s':>15}{'min step s':>12}{'tokens/s':>11}")
    for name in times:
        r = result[name]
        print(f"{name:<14}{r['median_step_s']:>15.4f}{r['min_step_s']:>12.4f}{r['tokens_per_s']:>11,.0f}")
    print(f"trainer / hand-written step time: {result['trainer_over_hand_written']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
