"""Tensor parallelism over ``torch.distributed``: one model split across the ranks of a ``torchrun`` group (NCCL on
CUDA, one GPU a rank; gloo on CPU), every rank running the same generation loop in step.

The split is Megatron's, in exactly the layout of Meta's model-parallel checkpoints (``checkpoint.shard_dim``), so a
Meta download with N ``consolidated.NN.pth`` files loads into TP=N with rank r reading only file r:

- ``wq``, ``wk``, ``wv``, ``w1``, ``w3``: column-parallel (each rank holds a contiguous block of output rows: its
  query heads, its KV heads, its slice of the FFN width); nothing to communicate.
- ``wo``, ``w2``: row-parallel (the matching input columns); each rank's product is a partial sum, completed by one
  all-reduce: two per block.
- ``tok_embeddings``: split on the feature dim as Meta's ``ParallelEmbedding`` is (each rank looks up its slice of
  every row, one all-gather rebuilds the activations). Meta splits the embedding this way, not by vocabulary, and
  keeping its layout is what lets a rank read only its own file.
- ``output``: vocabulary-parallel (each rank scores its block of the vocabulary, one all-gather of the logits).
- norms: replicated.

Attention stays local to a rank: it holds n_heads/N query heads and n_kv_heads/N KV heads (grouped-query attention
keeps its groups, since both are split into contiguous blocks), and its KV cache holds only its own KV heads. All
ranks therefore hold 1/N of the weights and of the KV cache. Every rank computes the same logits (all-reduce and
all-gather give every rank the same bits), and ``sync_seed`` gives every rank the same random stream, so sampling
picks the same tokens everywhere without another collective."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .errors import CodeLlamaError
from .model import Transformer


@dataclass
class TPInfo:
    """Where a tensor-parallel model's rank stands; ``model.tp`` holds it."""
    rank: int
    world_size: int
    files_read: tuple[str, ...] = ()  # the checkpoint files this rank opened


class RowParallelLinear(nn.Module):
    """A linear layer holding one rank's block of input columns; the all-reduce completes the product."""

    def __init__(self, in_features: int, out_features: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelHead(nn.Module):
    """The output head holding one rank's block of vocabulary rows; logits are gathered in vocabulary order."""

    def __init__(self, in_features: int, out_features: int, world_size: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.world_size, self.group = world_size, group

    def forward(self, x: Tensor) -> Tensor:
        return _gather_last(F.linear(x, self.weight), self.world_size, self.group)


class ParallelEmbedding(nn.Module):
    """The token embedding holding one rank's block of feature columns (Meta's ``ParallelEmbedding``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, world_size: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.world_size, self.group = world_size, group

    def forward(self, tokens: Tensor) -> Tensor:
        return _gather_last(F.embedding(tokens, self.weight), self.world_size, self.group)


def _gather_last(local: Tensor, world_size: int, group) -> Tensor:
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def check_tp(config: ModelConfig, world_size: int) -> None:
    """Refuse, in one line naming the size, a split that does not divide the model."""
    sizes = {"n_kv_heads": config.n_kv_heads, "n_heads": config.n_heads, "the FFN width": config.ffn_hidden,
             "dim": config.dim, "vocab_size": config.vocab_size}
    for what, size in sizes.items():
        if size % world_size:
            extra = " (tensor parallelism splits attention by KV head)" if what == "n_kv_heads" else ""
            raise CodeLlamaError(f"tensor parallelism over {world_size} ranks needs {what} divisible by "
                                 f"{world_size}; this model has {size}{extra}")


def build_sharded(config: ModelConfig, world_size: int, group=None) -> Transformer:
    """A ``Transformer`` on the meta device whose layers have one rank's shapes (see the module docstring); its
    parameter names are the full model's, so a rank's share of a checkpoint loads by name."""
    check_tp(config, world_size)
    W = world_size
    hd = config.head_dim
    with torch.device("meta"):
        model = Transformer(config)
        for layer in model.layers:
            a, f = layer.attention, layer.feed_forward
            a.n_heads, a.n_kv_heads = config.n_heads // W, config.n_kv_heads // W
            a.wq = nn.Linear(config.dim, a.n_heads * hd, bias=False)
            a.wk = nn.Linear(config.dim, a.n_kv_heads * hd, bias=False)
            a.wv = nn.Linear(config.dim, a.n_kv_heads * hd, bias=False)
            a.wo = RowParallelLinear(a.n_heads * hd, config.dim, group)
            hidden = config.ffn_hidden // W
            f.w1 = nn.Linear(config.dim, hidden, bias=False)
            f.w3 = nn.Linear(config.dim, hidden, bias=False)
            f.w2 = RowParallelLinear(hidden, config.dim, group)
        model.tok_embeddings = ParallelEmbedding(config.vocab_size, config.dim // W, W, group)
        model.output = VocabParallelHead(config.dim, config.vocab_size // W, W, group)
    return model


def load_tensor_parallel(path: str | Path, rank: int, world_size: int, *, device: torch.device,
                         dtype: torch.dtype, max_seq_len: int | None = None) -> Transformer:
    """Rank ``rank``'s share of the checkpoint directory ``path``, built directly at its shapes on ``device``
    (``checkpoint.stream_rank``: a Meta download with ``world_size`` shards reads only this rank's file)."""
    from .checkpoint import stream_rank

    config, files, tensors = stream_rank(path, rank, world_size, dtype, max_seq_len)
    model = build_sharded(config, world_size).to(dtype)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, t in tensors:
            target = params.get(name)
            if target is None or tuple(target.shape) != tuple(t.shape):
                raise CodeLlamaError(f"rank {rank}: tensor {name} of shape {tuple(t.shape)} does not fit this "
                                     f"rank's {tuple(target.shape) if target is not None else 'model'}")
            target.copy_(t)
            seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise CodeLlamaError(f"rank {rank}: the checkpoint did not provide {', '.join(missing[:3])}")
    model.tp = TPInfo(rank, world_size, tuple(str(f) for f in files))
    return model.eval()


def load_on_ranks(path: str | Path, *, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, max_seq_len: int | None = None) -> Transformer:
    """Join torchrun's process group (NCCL on CUDA, each rank on its local GPU; gloo on CPU), load this rank's
    share of ``path`` and give every rank the same random stream. GGUF files and quantized directories are
    refused: tensor parallelism runs float checkpoints (Meta, native, HF)."""
    from .api import resolve_device, resolve_dtype
    from .checkpoint import _is_gguf, _is_quantized_dir
    from .training.distributed import init_ranks, torchrun_world_size

    if torchrun_world_size() < 2:
        raise CodeLlamaError("tensor parallelism runs under torchrun with 2 or more processes, e.g. "
                             "torchrun --nproc-per-node 2 -m codellama complete ...")
    if _is_gguf(path) or _is_quantized_dir(path):
        raise CodeLlamaError(f"{path}: tensor parallelism loads float checkpoints (Meta, native or HF), not GGUF "
                             "or quantized directories")
    ranks, dev = init_ranks(resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    model = load_tensor_parallel(path, ranks.rank, ranks.world_size, device=dev,
                                 dtype=resolve_dtype(dtype, dev), max_seq_len=max_seq_len)
    sync_seed()
    return model


def shard_model(model: Transformer, rank: int, world_size: int) -> Transformer:
    """A tensor-parallel copy of a whole in-memory ``model`` (every rank holds it, e.g. random weights): rank
    ``rank``'s slices, on the model's device and dtype."""
    from .checkpoint import rank_slice

    weight = model.output.weight
    sharded = build_sharded(model.config, world_size)
    sharded.to_empty(device=weight.device)
    sharded.to(weight.dtype)
    params = dict(sharded.named_parameters())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            params[name].copy_(rank_slice(name, t, rank, world_size))
    sharded.tp = TPInfo(rank, world_size)
    return sharded.eval()


def tp_size(model: nn.Module) -> int:
    info = getattr(model, "tp", None)
    return info.world_size if info is not None else 1


def sync_seed(seed: int | None = None) -> int:
    """Seed every rank's torch RNG the same (rank 0's seed, or ``seed``), so unseeded sampling draws the same
    numbers on every rank and the ranks stay in step."""
    t = torch.tensor([seed if seed is not None else int(torch.randint(0, 2**62, (1,)))], dtype=torch.int64)
    backend = dist.get_backend()
    if backend == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    value = int(t.item())
    torch.manual_seed(value)
    return value


__all__ = ["ParallelEmbedding", "RowParallelLinear", "TPInfo", "VocabParallelHead", "build_sharded", "check_tp",
           "load_on_ranks", "load_tensor_parallel", "shard_model", "sync_seed", "tp_size"]
