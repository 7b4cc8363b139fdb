"""The model a run starts from: fresh weights, an earlier training run, or any checkpoint we load (Meta shards,
HF, native, GGUF dequantized, ``codellama quantize`` output), with the run's LoRA adapters, base-weight dtype
(QLoRA-style bf16 / int8 / int4) and activation checkpointing applied.

In one process the model is loaded whole. In a sharded run (distributed.py) a checkpoint directory is streamed:
the model is built on the ``meta`` device, sharded, and each rank copies only its slice of each tensor, so no rank
ever holds the whole model; other starting points are small enough to build whole and then shard."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import CodeLlamaError, error_line
from ..model import Transformer
from .checkpointing import load_run_checkpoint, read_run_checkpoint
from .distributed import Ranks, materialise, shard_model
from .recipe import TrainConfig


# ---- what init_from names --------------------------------------------------------------------------------------
def init_source(config: TrainConfig, log: Callable[[str], None]) -> dict[str, Any] | Path | None:
    """What ``init_from`` names, read before any data is prepared so a bad source fails in seconds: a training
    run's checkpoint (safely loaded), or a checkpoint (directory or GGUF file) for ``load_model``."""
    if not config.init_from:
        return None
    src = Path(config.init_from).expanduser()
    if src.is_dir():
        found = read_run_checkpoint(src, log=log)
        if found is not None:
            return found[0]
        if (src / "params.json").is_file() or (src / "config.json").is_file():
            return src
    elif src.is_file() and src.suffix.lower() == ".gguf":
        return src
    raise CodeLlamaError(f"init_from: {src} is neither a training run nor a checkpoint (a directory with "
                         "params.json or config.json, or a .gguf file)")


def source_tokenizer(config: TrainConfig, work_dir: Path) -> Path | None:
    """The tokenizer of the checkpoint a run starts from (the real 32016-piece one for Code Llama): a run or
    checkpoint directory's ``tokenizer.model``, or one rebuilt from a GGUF file's metadata into ``work_dir``."""
    if not config.init_from:
        return None
    src = Path(config.init_from).expanduser()
    if src.is_file():
        from ..gguf import load_gguf_tokenizer, read_gguf, tokenizer_proto_from_gguf
        load_gguf_tokenizer(src)  # refuses a vocabulary SentencePiece cannot use, in one line
        out = work_dir / "init-tokenizer.model"
        proto = tokenizer_proto_from_gguf(read_gguf(src))
        if not (out.is_file() and out.read_bytes() == proto):  # every rank calls this: never rewrite it under one
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
            tmp.write_bytes(proto)
            os.replace(tmp, out)
        return out
    candidate = src / "tokenizer.model"
    return candidate if candidate.is_file() else None


def _overrides(config: TrainConfig, start: ModelConfig | dict[str, Any]) -> dict[str, Any]:
    """Continue from an earlier stage: keep its shape, change what the stage changes. LCFT sets θ and a longer
    context; a stage on shorter sequences (instruction tuning) keeps the checkpoint's context and θ."""
    get = start.get if isinstance(start, dict) else lambda k: getattr(start, k)
    return {"rope_theta": config.rope_theta or get("rope_theta"),
            "max_seq_len": max(config.seq_len, get("max_seq_len")), "name": config.name}


def model_from_checkpoint(ckpt: dict[str, Any], where: Path, **overrides: Any) -> Transformer:
    """The model of a training run's checkpoint (a LoRA run's adapters merged into its base)."""
    try:
        model = Transformer(ModelConfig(**{**ckpt["model_config"], **overrides}))
        state = ckpt["model"]
        if any(k.endswith(".lora_A") for k in state):
            # A LoRA run checkpoints base + adapters; whoever reads it as a model gets the merged weights.
            from .lora import merge_lora
            saved = ckpt["train_config"]
            _prepare_base(model, saved.get("base_dtype", "fp32"))
            _apply_lora(model, saved)
            model.load_state_dict(state)
            merge_lora(model)
            model.float()
        else:
            model.load_state_dict(state)
    except (CodeLlamaError, AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CodeLlamaError(f"{where}: the checkpoint's model does not load ({error_line(e)})") from None
    return model


def model_from_run(run_dir: str | Path, **overrides: Any) -> Transformer:
    """The model of a training run's latest checkpoint (``overrides`` change its config, e.g. ``rope_theta``)."""
    return model_from_checkpoint(load_run_checkpoint(run_dir), Path(run_dir), **overrides)


# ---- the pieces a run adds ------------------------------------------------------------------------------------
def _apply_lora(model: Transformer, settings: dict[str, Any] | TrainConfig) -> None:
    from .lora import apply_lora
    get = settings.get if isinstance(settings, dict) else lambda k: getattr(settings, k)
    apply_lora(model, get("lora_targets"), get("lora_rank"), get("lora_alpha"), get("lora_dropout"))


def _prepare_base(model: Transformer, base_dtype: str) -> None:
    """Hold the (frozen) base weights in ``base_dtype``: bf16 halves them; int8 / int4 quantize the block linears
    with quantize.py (the embedding, norms and output head stay bf16, as QLoRA keeps them)."""
    if base_dtype == "fp32":
        return
    model.to(torch.bfloat16)
    if base_dtype in ("int8", "int4"):
        from ..quantize import quantize_model
        for block in model.layers:
            quantize_model(block, base_dtype)


def fresh_adapters(model: Transformer, seed: int) -> dict[str, Tensor]:
    """The adapter values ``apply_lora`` draws after ``torch.manual_seed(seed)`` in one process (A from
    nn.Linear's kaiming bound, in module order; B zeros), made in full on every rank for a sharded model."""
    from .lora import LoRALinear
    torch.manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            a = torch.empty(module.rank, module.in_features, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            out[f"{name}.lora_A"] = a
            out[f"{name}.lora_B"] = torch.zeros(module.out_features, module.rank, dtype=torch.float32)
    return out


def _finish(model: Transformer, config: TrainConfig, log: Callable[[str], None]) -> Transformer:
    if config.lora_rank:
        from .lora import trainable_report_line
        _prepare_base(model, config.base_dtype)
        torch.manual_seed(config.seed)  # the adapters' random A: the same for the same recipe
        _apply_lora(model, config)
        log(f"LoRA rank {config.lora_rank} on {', '.join(config.lora_targets)}, base weights "
            f"{config.base_dtype}: {trainable_report_line(model)}")
    model.activation_checkpointing = config.activation_checkpointing
    return model


# ---- one process -----------------------------------------------------------------------------------------------
def initial_model(config: TrainConfig, vocab_size: int, tokenizer_path: Path,
                  source: dict[str, Any] | Path | None, log: Callable[[str], None] = lambda s: None) -> Transformer:
    """The whole starting model on the CPU, with the run's LoRA / base dtype / checkpointing applied."""
    return _finish(_whole_model(config, vocab_size, tokenizer_path, source), config, log)


def _whole_model(config: TrainConfig, vocab_size: int, tokenizer_path: Path,
                 source: dict[str, Any] | Path | None) -> Transformer:
    if source is None:
        torch.manual_seed(config.seed)
        model = Transformer(config.model_config(vocab_size))
        model.init_weights()
        return model
    src = Path(config.init_from).expanduser()
    if isinstance(source, dict):
        model = model_from_checkpoint(source, src, **_overrides(config, source["model_config"]))
    else:
        from ..checkpoint import load_model
        model = load_model(src, device="cpu", dtype=torch.float32)
        from ..quantize import is_quantized
        if is_quantized(model):  # a quantized checkpoint: train from its dequantized weights
            model = _dequantized(model)
        for k, v in _overrides(config, model.config).items():
            setattr(model.config, k, v)
        model.train()
    _check_vocabulary(model.config, src, tokenizer_path, vocab_size)
    return model


def _dequantized(model: Transformer) -> Transformer:
    from ..quantize import QuantLinear
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                layer = torch.nn.Linear(child.in_features, child.out_features, bias=False)
                with torch.no_grad():
                    layer.weight.copy_(child.dequantize(torch.float32))
                setattr(parent, child_name, layer)
    return model.float()


def _check_vocabulary(model_config: ModelConfig, src: Path, tokenizer_path: Path, vocab_size: int) -> None:
    src_tok = src / "tokenizer.model" if src.is_dir() else None
    if src_tok is not None and src_tok.is_file() and src_tok.read_bytes() != tokenizer_path.read_bytes():
        raise CodeLlamaError(f"init_from: {src} was trained with another tokenizer than the data in use; "
                             f"prepare the data with tokenizer = \"{src_tok}\"")
    if model_config.vocab_size < vocab_size:
        raise CodeLlamaError(f"init_from: model vocabulary {model_config.vocab_size} < tokenizer's {vocab_size}")


def _as_named_in(model: Transformer, tensors: Iterator[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    """Checkpoint names as the model has them: a LoRA-wrapped layer holds its weight as ``<layer>.base.weight``."""
    names = {name for name, _ in model.named_parameters()}
    for name, tensor in tensors:
        wrapped = name.removesuffix(".weight") + ".base.weight"
        yield (wrapped if name not in names and wrapped in names else name), tensor


# ---- a sharded run ---------------------------------------------------------------------------------------------
def sharded_model(config: TrainConfig, vocab_size: int, tokenizer_path: Path, source: dict[str, Any] | Path | None,
                  ranks: Ranks, device: torch.device, precision: str,
                  log: Callable[[str], None] = lambda s: None) -> Transformer:
    """The starting model sharded with FSDP2 over ``ranks``, on ``device``."""
    if config.lora_rank and config.base_dtype in ("int8", "int4"):
        raise CodeLlamaError(f"base_dtype {config.base_dtype} is for one device (QLoRA); a sharded run holds its "
                             "base in fp32 or bf16 (FSDP shards parameters, not quantized buffers)")
    if isinstance(source, Path) and source.is_dir():
        from ..checkpoint import stream_checkpoint
        model_config, tensors = stream_checkpoint(source, torch.float32)
        for k, v in _overrides(config, model_config).items():
            setattr(model_config, k, v)
        _check_vocabulary(model_config, source, tokenizer_path, vocab_size)
        with torch.device("meta"):
            model = Transformer(model_config)
        _finish(model, config, log)
        fresh = fresh_adapters(model, config.seed) if config.lora_rank else {}
        shard_model(model, ranks, precision)
        materialise(model, device, _as_named_in(model, tensors), fresh)
        return model
    model = initial_model(config, vocab_size, tokenizer_path, source, log).to(device)
    return shard_model(model, ranks, precision)
