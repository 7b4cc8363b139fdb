"""Sharded data parallelism for the trainer: torch.distributed process groups, FSDP2, and per-rank data.

Launched by ``torchrun`` (single node or multi-node through its rendezvous; we start no processes ourselves), the
same ``codellama train RECIPE`` runs as one rank of a group: NCCL on CUDA (one GPU per local rank), gloo on CPU.
Without torchrun's environment it is one process and nothing here is used.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every transformer block's parameters, gradients and AdamW
moments across the ranks (and the embedding, final norm and output head as the root group); a block's full
parameters exist only while it computes. The mixed-precision policy computes in bf16 and keeps float32 master
weights, gradient reductions and optimizer state.

The global batch does not depend on the world size: each micro-batch is ``batch_size`` windows of the global data
stream, and rank ``r`` of ``W`` computes rows ``r*B/W .. (r+1)*B/W`` of it. FSDP averages the gradients over the
ranks, so the step equals one process's over the whole micro-batch, and so does the loss curve."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import CodeLlamaError


@dataclass
class Ranks:
    """Where this process stands in the group (world_size 1, rank 0 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: Any = None  # the 1-D DeviceMesh FSDP shards over; None in one process

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, count: int) -> tuple[int, int]:
        """This rank's [first, last) rows of a global micro-batch of ``count`` rows."""
        share = count // self.world_size
        return self.rank * share, (self.rank + 1) * share

    def mean(self, value: float) -> float:
        """The mean over ranks of a per-rank number (the loss each rank computed on its rows)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device_for_collectives)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device_for_collectives)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def device_for_collectives(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def torchrun_world_size() -> int:
    """The world size torchrun set up for this process (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def init_ranks(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group when there is one; returns where we stand and this rank's device."""
    world_size = torchrun_world_size()
    if world_size == 1:
        return Ranks(), device
    from torch.distributed.device_mesh import init_device_mesh
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise CodeLlamaError(f"rank {rank}: local rank {local_rank} has no GPU (this node has "
                                 f"{torch.cuda.device_count()}); start fewer processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise CodeLlamaError(f"distributed training runs on cuda or cpu, not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend)
        # Commands that never call close_ranks (generate, bench under torchrun) must still take the group down
        # before the interpreter exits: gloo's threads torn down at exit abort a rank now and then ("terminate
        # called without an active exception") on a loaded machine.
        atexit.register(_destroy_at_exit)
    mesh = init_device_mesh(device.type, (world_size,))
    return Ranks(rank=rank, world_size=world_size, local_rank=local_rank, mesh=mesh), device


def _destroy_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def close_ranks(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def check_divisible(batch_size: int, ranks: Ranks) -> None:
    if batch_size % ranks.world_size:
        raise CodeLlamaError(f"batch_size {batch_size} does not split over {ranks.world_size} ranks: use a "
                             f"multiple of {ranks.world_size} (the global batch stays the recipe's)")


def shard_model(model: torch.nn.Module, ranks: Ranks, precision: str) -> torch.nn.Module:
    """FSDP2 over ``ranks``: each block its own group (all-gathered only while it computes), the rest the root.
    ``precision`` bf16 computes in bf16 from float32 master weights, with float32 gradient reductions."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=ranks.mesh, mp_policy=policy)
    fully_shard(model, mesh=ranks.mesh, mp_policy=policy)
    return model


def materialise(model: torch.nn.Module, device: torch.device, tensors: Iterator[tuple[str, Tensor]],
                fresh: dict[str, Tensor]) -> None:
    """Fill a model sharded on the ``meta`` device: each rank copies only its slice of each tensor.

    ``tensors`` streams the checkpoint's full tensors (memory maps, a layer at a time), ``fresh`` holds tensors
    the checkpoint does not have (new LoRA adapters), already initialised in full on every rank the same way."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=device)
    params = dict(model.named_parameters())
    done = set()

    def put(name: str, full: Tensor) -> None:
        target = params.get(name)
        if target is None:
            raise CodeLlamaError(f"the checkpoint has a tensor {name} the model does not")
        with torch.no_grad():
            if isinstance(target, DTensor):
                # src_data_rank=None: every rank slices its own shard out of its own (mapped) copy, no traffic.
                local = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements,
                                          src_data_rank=None).to_local()
                target.to_local().copy_(local)
            else:
                target.copy_(full)
        done.add(name)

    for name, full in tensors:
        put(name, full)
    for name, full in fresh.items():
        put(name, full)
    missing = sorted(set(params) - done)
    if missing:
        raise CodeLlamaError(f"materialising the sharded model: no values for {', '.join(missing[:3])}")
    # Buffers would stay uninitialised: our model has none (quantized bases, which are buffers, stay unsharded).
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise CodeLlamaError(f"materialising the sharded model: buffer {buffers[0]} is not handled")


def full_state_dict(model: torch.nn.Module, ranks: Ranks) -> dict[str, Tensor]:
    """The whole model's weights on the CPU, on rank 0 (an empty dict on the others); a collective."""
    if not ranks.distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
