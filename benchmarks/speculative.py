"""Speculative decoding on a draft/target pair of our own: the embedded default model (9M parameters) as the
target, a 1.4M-parameter model (most of it the 4,096-id embedding and output) trained here on the standard library with the embedded model's tokenizer as the
draft. Speedup vs the target alone and acceptance rate at k = 2, 4, 8 on a few code prompts, greedy.

    python benchmarks/speculative.py                         # trains the draft once (~7 min) into the cache dir
    python benchmarks/speculative.py --draft PATH --threads 2 --json spec.json

Each configuration (target alone, then each k) generates ``--new-tokens`` greedy tokens (eos ignored) for every
prompt; the configurations run interleaved ``--repeats`` times and the table shows the median wall time per
configuration summed over the prompts. Speedup = target-alone time / speculative time; acceptance = accepted /
proposed draft tokens; tokens/round = tokens emitted per target forward. Every speculative output is checked to
equal the target's (greedy). On a CPU the target is small, so its verify forward of k + 1 tokens costs more than
one decode step and the draft is not free: the speedup is bounded by (tokens per round) x (decode step) /
(verify forward + k draft steps)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import codellama
from codellama import speculative
from codellama.api import DEFAULT_MODEL_DIR
from codellama.generation import generate

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_files(path):\n    \"\"\"Return the files under path.\"\"\"\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(description=",
    "    for key, value in sorted(mapping.items()):\n        if value is None:\n",
]

# 1.4M parameters (1.05M of them the 4,096-id embedding and output), 1,200 steps of 4,096 tokens: ~7 minutes
# on a shared 2-core CPU, val loss 3.66. Measured against a 0.7M one (dim 64, 4 layers, 400 steps, val loss 4.4):
# acceptance 0.44 vs 0.33 at k = 2 and a draft step as cheap (both are dominated by per-op overhead here).
DRAFT_RECIPE = """\
name = "speculative-draft"
out_dir = "{out}"

[data]
data_dir = "{data}"
corpus = ["stdlib"]
tokenizer = "{tokenizer}"
seq_len = 256
fim_rate = 0.9
fim_spm_rate = 0.5
doc_chars = 600
data_passes = 1

[model]
dim = 128
n_layers = 2
n_heads = 4
n_kv_heads = 2
multiple_of = 32
rope_theta = 1000000.0

[optim]
batch_size = 16
grad_accum = 1
lr = 3e-3
warmup_steps = 60
max_steps = 1200
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

[run]
eval_interval = 400
eval_batches = 4
ckpt_interval = 400
log_interval = 20
seed = 1234
num_threads = {threads}
precision = "auto"
"""


def train_draft(cache: Path, threads: int) -> Path:
    """The draft checkpoint, trained with ``codellama train`` on first use and kept in ``cache``."""
    final = cache / "run" / "final"
    if (final / "params.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    recipe = cache / "draft.toml"
    recipe.write_text(DRAFT_RECIPE.format(out=cache / "run", data=cache / "data", threads=threads,
                                          tokenizer=DEFAULT_MODEL_DIR / "tokenizer.model"))
    print(f"training the draft into {cache} (a few minutes, once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "codellama", "train", str(recipe), "--no-progress"], check=True)
    return final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default=None, help="draft checkpoint (default: train one into --cache)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/codellama/speculative-draft"))
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    draft_path = args.draft or train_draft(Path(args.cache), args.threads)
    llama = codellama.load(draft=draft_path)
    target, draft = llama.model, llama.draft.model
    prompts = [llama.tokenizer.encode(p, bos=True) for p in PROMPTS]
    ks = [int(k) for k in args.ks.split(",")]
    n = args.new_tokens

    want = [generate(target, [p], max_new_tokens=n)[0].tokens for p in prompts]  # warm-up + the reference
    times: dict[str, list[float]] = {"target": []} | {f"k={k}": [] for k in ks}
    stats: dict[int, speculative.SpeculativeStats] = {}
    for rep in range(args.repeats):
        for name in times:  # interleaved: machine noise hits every configuration alike
            t0 = time.perf_counter()
            if name == "target":
                for p in prompts:
                    generate(target, [p], max_new_tokens=n)
            else:
                k = int(name[2:])
                total = speculative.SpeculativeStats()
                for p, w in zip(prompts, want):
                    (res,), (s,) = speculative.generate(target, draft, [p], k=k, max_new_tokens=n)
                    assert res.tokens == w, f"k={k}: speculative output differs from the target's"
                    total.add(s)
                stats[k] = total
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["target"])
    tokens = n * len(prompts)
    rows = [{"config": "target alone", "k": 0, "seconds": round(base, 3), "tok_s": round(tokens / base, 1),
             "speedup": 1.0, "acceptance_rate": None, "tokens_per_round": 1.0}]
    for k in ks:
        t = statistics.median(times[f"k={k}"])
        d = stats[k].as_dict()
        rows.append({"config": f"speculative k={k}", "k": k, "seconds": round(t, 3), "tok_s": round(tokens / t, 1),
                     "speedup": round(base / t, 2), "acceptance_rate": d["acceptance_rate"],
                     "tokens_per_round": d["tokens_per_round"]})
    print(f"target: embedded default ({target.config.num_params() / 1e6:.1f}M), draft: {draft_path} "
          f"({draft.config.num_params() / 1e6:.2f}M); {len(prompts)} prompts x {n} greedy tokens, "
          f"median of {args.repeats} interleaved runs, {args.threads} thread(s)")
    print(f"{'config':<18} {'seconds':>8} {'tok/s':>7} {'speedup':>8} {'accept':>7} {'tok/round':>10}")
    for r in rows:
        acc = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        print(f"{r['config']:<18} {r['seconds']:>8.3f} {r['tok_s']:>7.1f} {r['speedup']:>7.2f}x {acc:>7} "
              f"{r['tokens_per_round']:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "draft": str(draft_path), "new_tokens": n,
                                               "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
