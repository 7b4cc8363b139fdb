"""The memory plan of a training run: what each rank holds, before anything is allocated.

``memory_plan(config, world_size, device)`` reads only the recipe and the ``init_from`` checkpoint's headers
(never its tensors) and counts per rank, in bytes:

- **parameters**: full fine-tuning's float32 master weights, sharded ``/W`` by FSDP2 (world size > 1), which also
  holds the root group (embeddings, final norm, output) and two blocks (computing, prefetched) unsharded in the
  compute dtype; one process under bf16 autocast keeps a bf16 copy of each linear weight until backward (the
  matmul saves it for the input's gradient). LoRA: the frozen base in ``base_dtype`` (int8/int4 in quantize.py's
  exact layout, one device only), float32 adapters, and the copies backward needs (none for a quantized base,
  which quantize.py dequantizes again in backward): ``weight_copy_bytes``;
- **gradients** (float32) and **optimizer state** (AdamW's two float32 moments) per trainable parameter, ``/W``;
- **activations**: what autograd saves for one micro-batch of ``ceil(batch_size / W)`` sequences, counted tensor
  by tensor for model.py (``_block_saved``), plus the loss head at its peak (``_LOGIT_COPIES``). The count equals
  autograd's saved tensors on a tiny model to a few bytes (tests/test_training_plan.py measures them with
  ``saved_tensors_hooks``). Adding full gradients to the start of backward makes the total an upper bound.

``MemoryPlan.check()`` refuses a plan that does not fit with one line naming the changes that would, each found
by re-planning. Device memory: the CUDA device's total, or physical RAM shared by the machine's ranks
(``LOCAL_WORLD_SIZE``, else all); ``device_memory`` (bytes) or ``CODELLAMA_DEVICE_MEMORY_GB`` (GiB, the table's
unit) replaces it, to plan a GPU run elsewhere (with ``--device cuda`` so that precision resolves as there).
"""

from __future__ import annotations

import inspect
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CodeLlamaError, error_line
from ..quantize import quantize_model
from .recipe import TrainConfig

GiB = 2**30
ENV_DEVICE_MEMORY = "CODELLAMA_DEVICE_MEMORY_GB"
# The int4 group a QLoRA base is quantized with: quantize_model's default (rows it does not divide are int8).
INT4_GROUP_SIZE: int = inspect.signature(quantize_model).parameters["group_size"].default
# The loss head at the start of backward: the float32 logits the loop holds, the log-probabilities
# cross_entropy saved, the gradient nll_loss hands back and the logits' gradient log_softmax makes from it.
_LOGIT_COPIES = 4
_LORA_SUGGESTION_RANK = 16
_MAX_SUGGESTED_RANKS = 1024


# ---- the model's shape -------------------------------------------------------------------------------------
def _linears(mc: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of a block, by model.py name."""
    d, kv, f = mc.dim, mc.n_kv_heads * mc.head_dim, mc.ffn_hidden
    q = mc.n_heads * mc.head_dim
    return {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "w1": (d, f), "w2": (f, d), "w3": (d, f)}


def _block_params(mc: ModelConfig) -> int:
    return sum(i * o for i, o in _linears(mc).values()) + 2 * mc.dim


def _root_params(mc: ModelConfig) -> int:
    return 2 * mc.vocab_size * mc.dim + mc.dim  # embeddings, output, final norm


def lora_trainable_params(mc: ModelConfig, rank: int, targets) -> int:
    """Adapter elements: ``rank * (in + out)`` per targeted linear of every block (A [r, in] and B [out, r])."""
    shapes = _linears(mc)
    return mc.n_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def _quantized_linear_bytes(n_in: int, n_out: int, mode: str, group_size: int = INT4_GROUP_SIZE) -> int:
    """Bytes of one linear as quantize.py stores it (its state_dict): int8 weight + float32 scale per row, or
    int4 nibbles + bfloat16 scale and zero per group (int8 where the group does not divide the row)."""
    if mode == "int4" and n_in % group_size == 0:
        return n_out * (n_in // 2) + 2 * 2 * n_out * (n_in // group_size)
    return n_out * n_in + 4 * n_out


def base_weight_bytes(mc: ModelConfig, base_dtype: str, group_size: int = INT4_GROUP_SIZE) -> int:
    """The frozen base model's bytes as the trainer holds it (init_model.py): fp32; or the whole model in bf16,
    whose block linears int8/int4 then quantize in quantize.py's layout (embedding, norms, output stay bf16)."""
    if base_dtype in ("fp32", "bf16"):
        return mc.num_params() * (4 if base_dtype == "fp32" else 2)
    linears = mc.n_layers * sum(_quantized_linear_bytes(i, o, base_dtype, group_size)
                                for i, o in _linears(mc).values())
    return linears + 2 * (2 * mc.vocab_size * mc.dim + (2 * mc.n_layers + 1) * mc.dim)


# ---- activations -------------------------------------------------------------------------------------------
# How a run computes (``_regime``): float32; bf16 autocast over float32 (or, under LoRA, bf16) parameters, where
# each linear casts its own input; or bf16 parameters without autocast (FSDP2's bf16 mixed-precision policy).
# The residual stream has the parameters' dtype (the embedding's output), RMSNorm works in float32 whatever it is.
# The order in which a block's linears see the residual stream: under LoRA, gradients start in the first block
# at its first adapted stage, since nothing before it trains (the embedding and norms are frozen).
_STAGES = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 2, "w3": 2, "w2": 3}


def _block_saved(mc: ModelConfig, compute_bytes: int, lora_targets: tuple[str, ...] | None, rank: int,
                 autocast: bool, bf16_params: bool) -> int:
    """Bytes autograd saves per token in one block of model.py (no checkpointing); ``lora_targets`` None is full
    fine-tuning.

    Full FT, tensor by tensor: each RMSNorm's float32 input (pow/mul) and normalised output (its weight's grad);
    the norm's output for the weights' grads (once, or each linear's own cast under autocast); rotated q, k and v,
    the attention output and its log-sum-exp (SDPA; wo reads a view of the output); SwiGLU's w1 output (silu),
    silu's and w3's outputs (their product) and the product (w2's input). LoRA: frozen norms and linears save no
    inputs for weight grads; each adapter saves its input and its rank-sized middle (B's grad); under autocast
    an adapter re-casts its input through float32 (wo's and w2's bf16 inputs too)."""
    d, kv, f, c = mc.dim, mc.n_kv_heads * mc.head_dim, mc.ffn_hidden, compute_bytes
    q = mc.n_heads * mc.head_dim
    lora = lora_targets is not None
    targets = set(lora_targets or ())
    total = 2 * 4 * d + 4 * (2 + mc.n_heads)  # the norms' float32 inputs; two rsqrt and the log-sum-exp per head
    total += 0 if lora else 2 * d * (2 if bf16_params else 4)  # the normalised outputs, in the residual's dtype
    total += c * (q + 2 * kv + q) + 3 * c * f  # q, k, v, attention output; silu in, silu out, w3 out
    if not autocast:  # one shared input per linear group
        attn_in = not lora or bool(targets & {"wq", "wk", "wv"})
        ffn_in = not lora or bool(targets & {"w1", "w3"})
        total += c * (d * attn_in + d * ffn_in + f * (not lora or "w2" in targets))
    else:
        total += c * d * sum(1 for t in ("wq", "wk", "wv", "w1", "w3") if not lora or t in targets)
        total += c * f * (not lora or "w2" in targets)  # w2's input (LoRA: its cast copy)
        total += c * q * (lora and "wo" in targets)  # LoRA's float32 round trip of wo's bf16 input
    return total + (c * rank * len(targets) if lora else 0)


def _first_block_unsaved(mc: ModelConfig, compute_bytes: int, targets: tuple[str, ...], autocast: bool) -> int:
    """Bytes per token ``_block_saved`` counts that the first block does not save under LoRA: upstream of its
    first adapter nothing requires grad, so autograd records nothing there."""
    d, kv, f, c = mc.dim, mc.n_kv_heads * mc.head_dim, mc.ffn_hidden, compute_bytes
    q = mc.n_heads * mc.head_dim
    first = min(_STAGES[t] for t in targets)
    unsaved = 4 * d + 4  # the block's first norm: input and rsqrt
    if first >= 1:  # attention without any adapter in front of it
        unsaved += c * (q + 2 * kv) + 4 * mc.n_heads
        if autocast or "wo" not in targets:  # without autocast, wo's adapter saves the attention output itself
            unsaved += c * q
    if first >= 2:
        unsaved += 4 * d + 4  # the second norm
        if "w1" not in targets:  # silu sees no grad; the product saves silu's output for w3's grad only
            unsaved += 2 * c * f
        elif "w3" not in targets:
            unsaved += c * f
    if first >= 3:
        unsaved += c * f  # silu's output and w3's output, but not their product (w2's adapter input)
    return unsaved


def _head_saved(mc: ModelConfig, compute_bytes: int, lora: bool, bf16_params: bool) -> int:
    """Bytes saved per token outside the blocks: targets (and tokens, for the embedding's grad) in int64, RoPE
    cos/sin (shared by all layers), the final norm as a block's, the output projection's input (frozen under
    LoRA: none) and the float32 log-probabilities."""
    d, c = mc.dim, compute_bytes
    total = 8 * (1 + (not lora)) + 4 * mc.head_dim + 4 + 4 * d
    total += 0 if lora else d * (2 if bf16_params else 4) + c * d
    return total + 4 * mc.vocab_size


@dataclass(frozen=True)
class ActivationEstimate:
    saved_bytes: int  # what autograd holds at the end of the forward pass (comparable with a measurement)
    peak_extra_bytes: int  # transient on top of it in backward: loss head copies, a recomputed block
    per_layer_bytes: int  # one block, unrecomputed, for the micro-batch
    logits_bytes: int  # the loss head at its peak

    @property
    def total_bytes(self) -> int:
        return self.saved_bytes + self.peak_extra_bytes


def activation_estimate(mc: ModelConfig, batch: int, seq_len: int, compute_bytes: int, checkpointing: bool,
                        lora_targets: tuple[str, ...] | None = None, rank: int = 0, *, autocast: bool = False,
                        bf16_params: bool = False) -> ActivationEstimate:
    """Activations of one micro-batch of ``batch`` sequences of ``seq_len`` tokens. With checkpointing each block
    keeps only its input (the residual's dtype), and one block at a time is recomputed in full in backward."""
    tokens, lora = batch * seq_len, lora_targets is not None
    per_layer = tokens * _block_saved(mc, compute_bytes, lora_targets, rank, autocast, bf16_params)
    head = tokens * _head_saved(mc, compute_bytes, lora, bf16_params)
    logits = tokens * 4 * mc.vocab_size * _LOGIT_COPIES
    extra = logits - tokens * 4 * mc.vocab_size  # the log-probabilities are already in ``head``
    if checkpointing:
        saved = mc.n_layers * tokens * (2 if bf16_params else 4) * mc.dim + head
        return ActivationEstimate(saved, extra + per_layer, per_layer, logits)
    saved = mc.n_layers * per_layer + head
    if lora:
        saved -= tokens * _first_block_unsaved(mc, compute_bytes, lora_targets, autocast)
    return ActivationEstimate(saved, extra, per_layer, logits)


def weight_copy_bytes(mc: ModelConfig, base_dtype: str, lora_targets: tuple[str, ...] | None, rank: int,
                      world_size: int, checkpointing: bool, compute_bytes: int, autocast: bool) -> int:
    """Compute-dtype weights held besides the stored ones until backward, per rank.

    FSDP2 (world size > 1): the unsharded root group and two blocks. One process: under bf16 autocast every float32
    linear (and LoRA adapter) is cast per call and saved for backward. An int8/int4 base saves no copy: quantize.py
    dequantizes it again in backward.
    Checkpointing keeps the copies of one recomputed block (and the output projection) only."""
    if world_size > 1:
        return compute_bytes * (_root_params(mc) + 2 * _block_params(mc))
    lora = lora_targets is not None
    layers = 1 if checkpointing else mc.n_layers
    per_block = sum(i * o for i, o in _linears(mc).values())
    if not lora or base_dtype == "fp32":
        base_bytes, copies = (2, 2 * (layers * per_block + mc.vocab_size * mc.dim)) if autocast else (0, 0)
    else:  # a bf16 base is the compute dtype; an int8/int4 base re-dequantizes in backward (quantize.py)
        base_bytes, copies = 0, 0
    if lora and autocast:
        copies += 2 * lora_trainable_params(mc, rank, lora_targets) * layers // mc.n_layers
    if lora and not checkpointing:  # the first block's frozen linears and adapters whose inputs need no grad
        first = min(_STAGES[t] for t in lora_targets)
        shapes = _linears(mc)
        copies -= base_bytes * sum(shapes[n][0] * shapes[n][1] for n, stage in _STAGES.items() if stage <= first)
        copies -= 2 * autocast * sum(rank * shapes[n][0] for n in lora_targets if _STAGES[n] == first)
    return copies


def _regime(config: TrainConfig, world_size: int, precision: str) -> tuple[int, bool, bool]:
    """(compute bytes, autocast, bf16 parameters) of a run, as the trainer sets it up: one process autocasts to
    bf16; FSDP2 casts the parameters instead; a non-fp32 LoRA base puts the whole model in bf16. (A bf16 base
    under precision fp32 is planned as float32.)"""
    if precision != "bf16":
        return 4, False, False
    return 2, world_size == 1, world_size > 1 or (config.lora_rank > 0 and config.base_dtype != "fp32")


# ---- the plan ----------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Per-rank bytes of a run; ``parameter_bytes`` includes ``weight_copy_bytes``."""
    model: ModelConfig
    source: str  # where the shape came from: "recipe", or the init_from checkpoint
    world_size: int
    lora_rank: int
    base_dtype: str
    activation_checkpointing: bool
    precision: str  # resolved: fp32 | bf16
    device: str
    device_memory: int | None  # bytes; None: unknown (nothing to compare with)
    ram_shared: bool  # device_memory is this rank's share of the machine's RAM (CPU ranks)
    micro_batch: int  # sequences per rank per micro-batch
    seq_len: int
    total_params: int
    trainable_params: int
    parameter_bytes: int
    weight_copy_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    activations: ActivationEstimate
    notes: dict[str, str] = field(default_factory=dict)
    train_config: TrainConfig | None = field(default=None, repr=False, compare=False)

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.device_memory is None or self.total_bytes <= self.device_memory

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    def table(self) -> str:
        mc = self.model
        method = f"LoRA rank {self.lora_rank}, {self.base_dtype} base" if self.lora else "full fine-tuning"
        memory = (f"{self.device_memory / GiB:.1f} GiB" if self.device_memory is not None
                  else f"unknown (set {ENV_DEVICE_MEMORY})")
        lines = [
            f"memory plan: {mc.name or 'model'} ({self.source}): {_count(self.total_params)} parameters "
            f"({self.trainable_params / 1e6:,.1f}M trainable), {mc.n_layers} layers, dim {mc.dim}, "
            f"vocab {mc.vocab_size}",
            f"world size {self.world_size}, {method}, activation checkpointing "
            f"{'on' if self.activation_checkpointing else 'off'}, {self.precision} compute, micro-batch "
            f"{self.micro_batch} x {self.seq_len} tokens per rank; device {self.device}: {memory}",
            f"{'':17}{'GiB/rank':>9}  what drives it",
        ]
        rows = [("parameters", self.parameter_bytes), ("gradients", self.gradient_bytes),
                ("optimizer state", self.optimizer_bytes), ("activations", self.activation_bytes)]
        for name, value in rows:
            lines.append(f"{name:<17}{value / GiB:>9.2f}  {self.notes.get(name, '')}")
        verdict = ("" if self.device_memory is None else
                   f"fits ({100 * self.total_bytes / self.device_memory:.0f}% of {memory})" if self.fits
                   else f"does NOT fit in {memory}")
        lines.append(f"{'total':<17}{self.total_bytes / GiB:>9.2f}  {verdict}")
        return "\n".join(lines)

    def check(self) -> None:
        """Raise a one-line CodeLlamaError when the run cannot start: a quantized base over several ranks, or a
        total beyond the device's memory (naming the changes that would fit, each re-planned)."""
        if self.lora and self.base_dtype in ("int8", "int4") and self.world_size > 1:
            raise CodeLlamaError(
                f"memory plan: base_dtype = \"{self.base_dtype}\" holds the quantized base on one device and "
                f"does not shard over {self.world_size} ranks: run one process, or use base_dtype = \"bf16\" "
                f"with --nproc {self.world_size}")
        if self.fits:
            return
        needs = (f"memory plan: needs {self.total_bytes / GiB:.1f} GiB per rank, the {self.device} device has "
                 f"{self.device_memory / GiB:.1f} GiB")
        single, together = _alternatives(self)
        if single:
            raise CodeLlamaError(f"{needs}: {', '.join(single[:-1])}{', or ' if len(single) > 1 else ''}{single[-1]}")
        if together:
            raise CodeLlamaError(f"{needs}; no single change fits, together they do: {together}")
        raise CodeLlamaError(f"{needs}, and no change of world size, activation checkpointing, batch size or LoRA "
                             "makes it fit: use a bigger device or a smaller model")


_BASES = ("fp32", "bf16", "int8", "int4")


def _alternatives(plan: MemoryPlan) -> tuple[list[str], str]:
    """The single changes that make ``plan`` fit (the smallest world size, checkpointing, a smaller micro-batch at
    the same tokens per step, LoRA or a smaller base), and failing those the first cumulative combination."""
    config = plan.train_config
    if config is None:
        return [], ""

    def again(world_size: int | None = None, **changes) -> MemoryPlan:
        ranks = world_size or plan.world_size
        memory = plan.device_memory
        if plan.ram_shared:  # more CPU ranks on the machine: a smaller share each
            memory = memory * plan.world_size // ranks
        return _plan(replace(config, **changes), plan.model, plan.source, ranks, plan.device, memory,
                     plan.precision, plan.ram_shared)

    options = []
    if not (plan.lora and plan.base_dtype in ("int8", "int4")):
        ranks, previous = plan.world_size * 2, plan.total_bytes
        while ranks <= _MAX_SUGGESTED_RANKS and config.batch_size % ranks == 0:  # each rank a share of the batch
            wider = again(world_size=ranks)
            if wider.fits:
                options.append(f"use more ranks (--nproc {ranks} fits: {wider.total_bytes / GiB:.1f} GiB)")
                break
            if wider.total_bytes >= previous:
                break  # what does not shard (activations, unsharded blocks) dominates: more ranks do not help
            ranks, previous = ranks * 2, wider.total_bytes
    if not config.activation_checkpointing and (ckpt := again(activation_checkpointing=True)).fits:
        options.append(f"turn on activation_checkpointing (saves {(plan.total_bytes - ckpt.total_bytes) / GiB:.1f}"
                       " GiB)")
    batch = config.batch_size
    while plan.micro_batch > 1 and batch > 1:
        batch //= 2
        accum = config.grad_accum * (config.batch_size // batch)
        if config.batch_size % batch or batch % plan.world_size:
            continue
        if (smaller := again(batch_size=batch, grad_accum=accum)).fits:
            options.append(f"batch_size = {batch} with grad_accum = {accum} (the same tokens per step; needs "
                           f"{smaller.total_bytes / GiB:.1f} GiB)")
            break
    rank = config.lora_rank or _LORA_SUGGESTION_RANK
    bases = [b for b in _BASES[_BASES.index(plan.base_dtype) + 1 if plan.lora else 1:]
             if plan.world_size == 1 or b == "bf16"]  # a quantized base does not shard
    for base in bases:
        if (adapted := again(lora_rank=rank, base_dtype=base)).fits:
            needs = f"needs {adapted.total_bytes / GiB:.1f} GiB"
            options.append(f"base_dtype = \"{base}\" {needs}" if plan.lora
                           else f"LoRA (lora_rank = {rank} with base_dtype = \"{base}\" {needs})")
            break
    if options:
        return options, ""
    steps: list[tuple[dict, str]] = []  # applied one after another; a smaller base replaces the bigger one
    if not config.activation_checkpointing:
        steps.append(({"activation_checkpointing": True}, "activation_checkpointing = true"))
    if plan.micro_batch > 1 and plan.world_size == 1:
        accum = config.grad_accum * config.batch_size
        steps.append(({"batch_size": 1, "grad_accum": accum}, f"batch_size = 1 with grad_accum = {accum}"))
    steps += [({"lora_rank": rank, "base_dtype": b}, f"lora_rank = {rank} with base_dtype = \"{b}\"")
              for b in (bases if plan.world_size == 1 else ())]
    changes: dict = {}
    said: list[str] = []
    for change, text in steps:
        changes.update(change)
        said = said[:-1] if said and said[-1].startswith("lora_rank") and "lora_rank" in change else said
        said.append(text)
        if (result := again(**changes)).fits:
            return [], f"{', '.join(said)} (needs {result.total_bytes / GiB:.1f} GiB)"
    return [], ""


def _plan(config: TrainConfig, mc: ModelConfig, source: str, world_size: int, device: str,
          device_memory: int | None, precision: str, ram_shared: bool = False) -> MemoryPlan:
    W, lora, n = world_size, config.lora_rank > 0, mc.num_params()
    compute, autocast, bf16_params = _regime(config, W, precision)
    targets = tuple(config.lora_targets) if lora else None
    trainable = lora_trainable_params(mc, config.lora_rank, targets) if lora else n
    shard, sharded = (lambda b: -(-b // W)), (f", sharded /{W}" if W > 1 else "")
    ckpt = config.activation_checkpointing
    copies = weight_copy_bytes(mc, config.base_dtype, targets, config.lora_rank, W, ckpt, compute, autocast)
    cdt = "bf16" if compute == 2 else "fp32"
    what = "autocast copies"
    copy_note = (f" + {cdt} unsharded root and 2 blocks (FSDP)" if W > 1 else "" if not copies
                 else f" + {cdt} {what}{' of one block' if ckpt else ''} kept for backward")
    if lora:
        params = shard(base_weight_bytes(mc, config.base_dtype)) + shard(4 * trainable) + copies
        param_note = f"{config.base_dtype} frozen base{sharded} + fp32 adapters{copy_note}"
    else:
        params, param_note = shard(4 * n) + copies, f"fp32 master weights{sharded}{copy_note}"
    micro = -(-config.batch_size // W)
    acts = activation_estimate(mc, micro, config.seq_len, compute, ckpt, targets, config.lora_rank,
                               autocast=autocast, bf16_params=bf16_params)
    layer, head = acts.per_layer_bytes / GiB, acts.logits_bytes / GiB
    act_note = (f"{mc.n_layers} block inputs + 1 recomputed block ({layer:.2f} GiB) + loss head {head:.2f} GiB"
                if ckpt else f"{mc.n_layers} layers x {layer:.2f} GiB ({cdt}) + loss head {head:.2f} GiB")
    notes = {"parameters": param_note, "gradients": f"fp32, {trainable / 1e6:,.1f}M trainable{sharded}",
             "optimizer state": f"AdamW: 2 fp32 moments per trainable parameter{sharded}", "activations": act_note}
    return MemoryPlan(model=mc, source=source, world_size=W, lora_rank=config.lora_rank, base_dtype=config.base_dtype,
                      activation_checkpointing=ckpt, precision=precision, device=device, device_memory=device_memory,
                      ram_shared=ram_shared, micro_batch=micro, seq_len=config.seq_len, total_params=n,
                      trainable_params=trainable, parameter_bytes=params, weight_copy_bytes=copies,
                      gradient_bytes=shard(4 * trainable), optimizer_bytes=shard(8 * trainable),
                      activation_bytes=acts.total_bytes, activations=acts, notes=notes, train_config=config)


def memory_plan(config: TrainConfig, world_size: int | None = None, device: torch.device | str | None = None,
                device_memory: int | None = None) -> MemoryPlan:
    """The per-rank memory plan of ``config`` over ``world_size`` ranks (default: torchrun's ``WORLD_SIZE``,
    else 1) on ``device`` (default: the recipe's; ``auto`` is CUDA when present). ``device_memory`` (bytes, or
    ``CODELLAMA_DEVICE_MEMORY_GB``) replaces the device's own size."""
    if world_size is None:
        world_size = _env_positive_int("WORLD_SIZE", 1)  # set by torchrun
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise CodeLlamaError(f"world size must be an integer >= 1, got {world_size!r}")
    dev = _resolve_device(config.device if device is None else device)
    if device_memory is None:
        device_memory = _env_device_memory()
    ram_shared = device_memory is None and dev.type == "cpu"
    if device_memory is None:
        device_memory = _device_total_memory(dev)
        if device_memory is not None and ram_shared:  # the ranks of one machine share its RAM
            device_memory //= _env_positive_int("LOCAL_WORLD_SIZE", world_size)
    elif isinstance(device_memory, bool) or not isinstance(device_memory, int) or device_memory <= 0:
        raise CodeLlamaError(f"device_memory must be a positive number of bytes, got {device_memory!r}")
    mc, source = model_shape(config)
    return _plan(config, mc, source, world_size, str(dev), device_memory, _resolve_precision(config.precision, dev),
                 ram_shared and device_memory is not None)


# ---- inputs: world size, device, model shape -----------------------------------------------------------------
def _env_positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip() or str(default)
    if not raw.isdigit() or int(raw) < 1:
        raise CodeLlamaError(f"{name} must be an integer >= 1, got {raw[:40]!r}")
    return int(raw)


def _env_device_memory() -> int | None:
    raw = os.environ.get(ENV_DEVICE_MEMORY, "").strip()
    if not raw:
        return None
    gib = float(raw) if re.fullmatch(r"\d+(\.\d*)?|\.\d+", raw) else math.nan
    if not math.isfinite(gib) or gib <= 0 or gib > 2**40:
        raise CodeLlamaError(f"{ENV_DEVICE_MEMORY} must be a positive number of GiB, got {raw[:40]!r}")
    return int(gib * GiB)


def _resolve_device(name: torch.device | str) -> torch.device:
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CodeLlamaError(f"unknown device {str(name)[:40]!r} ({error_line(e)})") from None


def _device_total_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None  # planning a GPU run from elsewhere: the budget comes from CODELLAMA_DEVICE_MEMORY_GB
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if device.type == "cpu" else None
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare with
        return None


def _resolve_precision(precision: str, device: torch.device) -> str:
    """As the trainer resolves it; a CUDA device that is not here is assumed to have bf16 (Ampere and later)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        from .trainer import cpu_has_native_bf16  # lazy: the trainer imports this module
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def model_shape(config: TrainConfig) -> tuple[ModelConfig, str]:
    """The run's model config (with the recipe's seq_len and rope_theta, as the trainer sets them) and where it
    came from, read without loading any tensor."""
    if not config.init_from:
        vocab = config.vocab_size
        if config.tokenizer and Path(config.tokenizer).is_file():  # an existing tokenizer decides the vocabulary
            from ..tokenizer import Tokenizer
            vocab = Tokenizer(config.tokenizer).n_words
        return config.model_config(vocab), "recipe"
    src = Path(config.init_from).expanduser()
    mc, kind = _checkpoint_shape(src)
    mc = replace(mc, max_seq_len=max(config.seq_len, mc.max_seq_len),
                 rope_theta=config.rope_theta or mc.rope_theta)
    mc.name = mc.name or src.name
    return mc, f"init_from {kind}"


def _checkpoint_shape(src: Path) -> tuple[ModelConfig, str]:
    from ..checkpoint import describe_checkpoint
    from .checkpointing import LATEST, PREVIOUS

    if not src.exists():
        raise CodeLlamaError(f"init_from: {src} does not exist")
    run = [src / name for name in (LATEST, PREVIOUS) if (src / name).is_file()]
    try:
        if not run:  # Meta, native, HF, GGUF or quantized: params/config files and tensor headers
            info = describe_checkpoint(src)
            return info["config"], f"{info['format']} checkpoint"
        if (src / "final" / "params.json").is_file():  # a finished training run: its export's headers
            return describe_checkpoint(src / "final")["config"], "training run (final export)"
    except CodeLlamaError as e:
        raise CodeLlamaError(f"init_from: {e}") from None
    for path in run:  # the config the checkpoint records, memory-mapped: no weight or moment is read
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return ModelConfig(**ckpt["model_config"]), "training run"
        except Exception:  # a damaged latest: the trainer falls back to the previous one, so do we
            continue
    raise CodeLlamaError(f"init_from: {src}: no readable checkpoint ({', '.join(p.name for p in run)})")


def _count(n: int) -> str:
    """1.79M, 6.74B: a size a reader can compare (a tiny model used to print as 0.00B)."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
