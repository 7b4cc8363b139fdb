"""One rank of a tensor-parallel run (started by tests/test_tensor_parallel.py under torchrun, gloo on CPU): loads its
share of a checkpoint, computes logits and generations, and rank 0 writes what every rank saw to OUT."""

from __future__ import annotations

import json
import resource
import sys

import torch
import torch.distributed as dist

from codellama.checkpoint import describe_checkpoint
from codellama.generation import generate
from codellama.tensor_parallel import load_tensor_parallel, sync_seed


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def main(ckpt: str, out: str, prompts_json: str, only_load: str = "") -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    prompts = json.loads(prompts_json)
    describe_checkpoint(ckpt)  # first-use imports (~75 MB, the same at any TP size) before the baseline
    before = rss_kib()
    model = load_tensor_parallel(ckpt, rank, world, device=torch.device("cpu"), dtype=torch.float32)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if only_load:  # the memory of a load and nothing else (the one-process reference)
        with open(out, "w") as f:
            json.dump([{"load_rss_kib": max(0, peak - before)}], f)
        dist.destroy_process_group()
        return
    with torch.inference_mode():
        logits = model(torch.tensor([prompts[0]]))
    greedy = [r.tokens for r in generate(model, prompts, max_new_tokens=12)]
    sync_seed(1234)  # unseeded sampling: the same random stream on every rank keeps them in step
    sampled = [r.tokens for r in generate(model, prompts[:1], max_new_tokens=12, temperature=1.0)]
    mine = {"rank": rank, "files": list(model.tp.files_read), "load_rss_kib": max(0, peak - before),
            "greedy": greedy, "sampled": sampled,
            "params_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        torch.save(logits, out + ".logits.pt")
        with open(out, "w") as f:
            json.dump(everyone, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
