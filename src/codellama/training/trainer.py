"""The trainer: one loop for code pretraining with FIM and for long-context fine-tuning (LCFT).

Llama 2 / Code Llama optimisation (paper §2.5): AdamW β=(0.9, 0.95), weight decay 0.1 on weight matrices (not on
RMSNorm gains nor the token embedding table), linear warm-up then cosine decay to peak/30, gradient clipping at
1.0, gradient accumulation, bf16 autocast (mixed precision: float32 weights and optimizer state) on CUDA and on
CPUs with native bf16 arithmetic. Checkpoints (checkpointing.py) are written to a temporary file and renamed, so a
kill at any moment leaves the previous checkpoint intact, and they hold everything that determines the rest of
the run (weights, optimizer moments, step, data position, RNG states), so ``resume`` continues the same curve.
Recipes (the ``TrainConfig`` and its validation) are in recipe.py."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import CodeLlamaError, error_line
from ..model import Transformer
from ..tokenizer import Tokenizer
from .checkpointing import (LATEST, PREVIOUS, clear_run_checkpoints, load_run_checkpoint,
                            read_run_checkpoint, rng_state, save_run_checkpoint, set_rng_state,
                            truncate_log)
from .checkpointing import read_log  # noqa: F401 (part of this module's API, used by the tests)
from .data import get_batch, load_tokens, prepare_data, sequence_indices, sequence_starts
# The recipe API has always been importable from here (tests, benchmarks, notebooks).
from .recipe import RECIPES_DIR, TrainConfig, find_recipe, load_recipe  # noqa: F401

# ---- optimisation pieces (also used by benchmarks/training.py) -----------------------------------------------
def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, cosine to ``final_lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.final_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.final_lr)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on weight matrices (attention, FFN, output projection); none on norms and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.startswith("tok_embeddings") else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run ~2x faster than float32 there (and far slower without them)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast_for(device: torch.device, precision: str = "auto"):
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: Transformer, optimizer: torch.optim.Optimizer,
               micro_batches: list[tuple[torch.Tensor, torch.Tensor]], grad_clip: float,
               autocast=contextlib.nullcontext) -> tuple[float, float]:
    """One optimizer step over ``micro_batches`` (gradient accumulation); returns (mean loss, grad norm)."""
    total = 0.0
    for x, y in micro_batches:
        with autocast():
            logits = model(x)
        # The loss in float32 whatever the autocast dtype of the logits: bf16 log-softmax loses ~2 digits.
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / len(micro_batches)
        loss.backward()
        total += loss.item()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else torch.tensor(0.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, float(norm)


@torch.no_grad()
def evaluate_loss(model: Transformer, tokens: np.ndarray, seq_len: int, batch_size: int, batches: int,
                  device: torch.device, autocast=contextlib.nullcontext, bos_id: int | None = None) -> float:
    """Mean next-token loss over the first ``batches × batch_size`` windows of ``tokens`` (a fixed set); windows
    start at documents when ``bos_id`` is given, as in training."""
    starts = sequence_starts(tokens, seq_len, bos_id)
    count = min(len(starts), batches * batch_size)
    if count == 0:
        raise CodeLlamaError(f"validation split has fewer than {seq_len + 1} tokens")
    was_training = model.training
    model.eval()
    losses = []
    for first in range(0, count, batch_size):
        x, y = get_batch(tokens, starts[first:min(count, first + batch_size)], seq_len, device)
        with autocast():
            logits = model(x)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item())
    model.train(was_training)
    return sum(losses) / (count * seq_len)


# ---- checkpoints -------------------------------------------------------------------------------------------
def model_from_run(run_dir: str | Path, **overrides: Any) -> Transformer:
    """The model of a training run's latest checkpoint (``overrides`` change its config, e.g. ``rope_theta``)."""
    return _model_from_checkpoint(load_run_checkpoint(run_dir), Path(run_dir), **overrides)


def _model_from_checkpoint(ckpt: dict[str, Any], where: Path, **overrides: Any) -> Transformer:
    try:
        model = Transformer(ModelConfig(**{**ckpt["model_config"], **overrides}))
        state = ckpt["model"]
        if any(k.endswith(".lora_A") for k in state):
            # A LoRA run checkpoints base + adapters; whoever reads it as a model gets the merged weights.
            from .lora import apply_lora, merge_lora
            saved = ckpt["train_config"]
            apply_lora(model, saved["lora_targets"], saved["lora_rank"], saved["lora_alpha"], saved["lora_dropout"])
            model.load_state_dict(state)
            merge_lora(model)
        else:
            model.load_state_dict(state)
    except (CodeLlamaError, AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CodeLlamaError(f"{where}: the checkpoint's model does not load ({error_line(e)})") from None
    return model


def _init_source(config: TrainConfig, log: Callable[[str], None]) -> dict[str, Any] | Path | None:
    """What ``init_from`` names, read before any data is prepared so a bad source fails in seconds: a training
    run's checkpoint (safely loaded), or a checkpoint directory for ``load_model``."""
    if not config.init_from:
        return None
    src = Path(config.init_from)
    found = read_run_checkpoint(src, log=log)
    if found is not None:
        return found[0]
    if (src / "params.json").is_file() or (src / "config.json").is_file():
        return src
    raise CodeLlamaError(f"init_from: {src} is neither a training run nor a checkpoint directory")


def _initial_model(config: TrainConfig, vocab_size: int, tokenizer_path: Path,
                   source: dict[str, Any] | Path | None) -> Transformer:
    if source is None:
        torch.manual_seed(config.seed)
        model = Transformer(config.model_config(vocab_size))
        model.init_weights()
        return model
    # Continue from an earlier stage: keep its shape, change what the stage changes (LCFT: θ and length).
    src = Path(config.init_from)
    overrides = {"rope_theta": config.rope_theta, "max_seq_len": config.seq_len, "name": config.name}
    if isinstance(source, dict):
        model = _model_from_checkpoint(source, src, **overrides)
    else:
        from ..checkpoint import load_model
        model = load_model(src, device="cpu", dtype=torch.float32)
        for k, v in overrides.items():
            setattr(model.config, k, v)
    src_tok = src / "tokenizer.model"
    if src_tok.is_file() and src_tok.read_bytes() != tokenizer_path.read_bytes():
        raise CodeLlamaError(f"init_from: {src} was trained with another tokenizer than the data in "
                             f"{config.data_dir}; prepare the data with tokenizer = \"{src_tok}\"")
    if model.config.vocab_size < vocab_size:
        raise CodeLlamaError(f"init_from: model vocabulary {model.config.vocab_size} < tokenizer's {vocab_size}")
    return model


def _check_resumable(ckpt: dict[str, Any], path: Path, config: TrainConfig) -> None:
    """The checkpoint belongs to this recipe (before any data is prepared: a wrong run fails in seconds)."""
    try:
        saved = TrainConfig(**ckpt["train_config"])
    except (CodeLlamaError, TypeError) as e:
        raise CodeLlamaError(f"{path}: its recipe is not one this version reads ({error_line(e)})") from None
    changed = [f.name for f in fields(TrainConfig) if f.name not in ("progress", "device", "num_threads")
               and getattr(saved, f.name) != getattr(config, f.name)]
    if changed:
        raise CodeLlamaError(f"cannot resume {config.out_dir}: recipe changed since the checkpoint "
                             f"({', '.join(changed)})")
    if ckpt["position"] != ckpt["step"] * config.batch_size * config.grad_accum:
        raise CodeLlamaError(f"{path} is damaged: its data position does not match its step; delete it to "
                             "start the run again")


def _restore(ckpt: dict[str, Any], path: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> None:
    """Put the checkpoint's weights, optimizer moments and RNG states in place, or say which file to delete."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # load_state_dict checks counts, not shapes: a bad file fails here
            for param in group["params"]:
                for key, value in optimizer.state.get(param, {}).items():
                    expected = torch.Size([]) if key == "step" else param.shape
                    if isinstance(value, torch.Tensor) and value.shape != expected:
                        raise ValueError(f"optimizer {key} of shape {tuple(value.shape)} for a parameter of "
                                         f"shape {tuple(param.shape)}")
        set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise CodeLlamaError(f"{path} does not fit this run ({error_line(e)}); delete it to start the run "
                             "again") from None


def _check_fits_in_memory(model_config: ModelConfig, device: torch.device) -> None:
    """Refuse a model whose weights, gradients and two AdamW moments (16 bytes a parameter) exceed the memory of
    the machine: allocating it would swap the machine to a halt or wake the OOM killer, not raise."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare with
            return
    needed = 16 * model_config.num_params()
    if needed > total:
        raise CodeLlamaError(f"model of {model_config.num_params() / 1e9:.1f}B parameters needs ~{needed / 2**30:.0f} "
                             f"GiB to train, more than this {device.type} device has ({total / 2**30:.0f} GiB)")


def export(model: Transformer, out_dir: str | Path, tokenizer_path: str | Path) -> Path:
    """The run's model as a loadable native checkpoint (params.json, model.safetensors, tokenizer.model)."""
    from ..checkpoint import save_checkpoint
    out = Path(out_dir)
    save_checkpoint(model, out, format="native", tokenizer=tokenizer_path)
    return out


# ---- the loop ----------------------------------------------------------------------------------------------
def resolve_train_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ..api import resolve_device
    return resolve_device(name)


def train(config: TrainConfig, *, resume: bool = False, until_step: int | None = None,
          log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Run (or resume) a training run; returns its summary. ``until_step`` stops early (after a checkpoint)
    without changing the schedule, as an interruption would — used to test resuming."""
    if until_step is not None and (not isinstance(until_step, int) or until_step < 0):
        raise CodeLlamaError(f"until_step must be an integer >= 0, got {until_step!r}")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_train_device(config.device)
    out = Path(config.out_dir)
    # Everything read from disk is read (and refused, if it must be) before minutes of data preparation.
    resumed = read_run_checkpoint(out, log=log) if resume else None
    if resume and resumed is None:  # a typo in --out-dir must not silently start a new run from step 0
        raise CodeLlamaError(f"cannot resume: no checkpoint in {out} (run without --resume to start a new run)")
    if resumed is not None:
        _check_resumable(*resumed, config)
    init_source = _init_source(config, log)
    if init_source is None:
        _check_fits_in_memory(config.model_config(config.vocab_size), device)
    out.mkdir(parents=True, exist_ok=True)
    meta = prepare_data(config.data_config(), config.data_dir, log=log)
    data_dir = Path(config.data_dir)
    tok_path = data_dir / "tokenizer.model"
    tokenizer = Tokenizer(tok_path)
    train_tokens = load_tokens(data_dir / "train.bin", tokenizer.n_words)
    val_tokens = load_tokens(data_dir / "val.bin", tokenizer.n_words)
    bos_id = tokenizer.bos_id if config.align_documents else None
    starts = sequence_starts(train_tokens, config.seq_len, bos_id)
    n_seq = len(starts)

    log_path = out / "log.jsonl"
    model = _initial_model(config, tokenizer.n_words, tok_path, init_source).to(device)
    if config.lora_rank:
        from .lora import apply_lora, trainable_report_line
        torch.manual_seed(config.seed)  # the adapters' random A: the same for the same recipe
        apply_lora(model, config.lora_targets, config.lora_rank, config.lora_alpha, config.lora_dropout)
        log(f"LoRA rank {config.lora_rank} on {', '.join(config.lora_targets)}: {trainable_report_line(model)}")
    optimizer = make_optimizer(model, config)  # over the trainable parameters only (frozen ones are skipped)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step, position, best_val = 0, 0, math.inf
    if resumed is not None:
        ckpt, ckpt_path = resumed
        _restore(ckpt, ckpt_path, model, optimizer)
        step, position, best_val = ckpt["step"], ckpt["position"], float(ckpt["best_val"])
        if ckpt_path.name == PREVIOUS and (out / LATEST).is_file():
            # Set the damaged latest aside, so that the next save does not rotate it into the fallback slot.
            os.replace(out / LATEST, out / (LATEST + ".damaged"))
        truncate_log(out, step)
        log(f"resumed {out} at step {step}")
        del ckpt  # its tensors are copied into the model and optimizer: do not keep a second copy alive
    else:
        clear_run_checkpoints(out)  # a fresh start: no earlier run's checkpoint may be resumed or fallen back to
        log_path.unlink(missing_ok=True)
    del resumed, init_source
    (out / "tokenizer.model").write_bytes(tok_path.read_bytes())
    (out / "recipe.json").write_text(json.dumps(asdict(config), indent=2))

    def save() -> None:
        save_run_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                             "position": position, "best_val": best_val, "rng": rng_state(),
                             "train_config": asdict(config), "model_config": asdict(model.config)}, out)

    precision = resolve_precision(config.precision, device)
    autocast = lambda: autocast_for(device, precision)  # noqa: E731
    n_params = model.config.num_params()
    packing = "document-aligned" if bos_id is not None else "back-to-back"
    log(f"{config.name}: {n_params / 1e6:.2f}M parameters, {len(train_tokens):,} train tokens "
        f"({n_seq:,} {packing} sequences of {config.seq_len}), {config.tokens_per_step:,} tokens/step, "
        f"{config.max_steps} steps, device {device}, {precision}")
    stop = min(config.max_steps, until_step) if until_step is not None else config.max_steps
    bar = _progress(config, step, stop)
    logf = open(log_path, "a")
    model.train()
    t_start, tokens_done, last, saved_step = time.time(), 0, {}, -1
    try:
        while step < stop:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = []
            for _ in range(config.grad_accum):
                idx = sequence_indices(position, config.batch_size, n_seq, config.seed)
                position += config.batch_size
                micro.append(get_batch(train_tokens, starts[idx], config.seq_len, device))
            t0 = time.time()
            loss, norm = train_step(model, optimizer, micro, config.grad_clip, autocast)
            dt = time.time() - t0
            step += 1
            tokens_done += config.tokens_per_step
            tok_s = tokens_done / (time.time() - t_start)
            record = {"step": step, "loss": round(loss, 5), "lr": lr, "grad_norm": round(norm, 4),
                      "tokens": step * config.tokens_per_step, "epoch": round(position / n_seq, 4),
                      "step_s": round(dt, 4), "tokens_per_s": round(tok_s, 1)}
            if step % config.eval_interval == 0 or step == config.max_steps:
                record["val_loss"] = round(evaluate_loss(model, val_tokens, config.seq_len, config.batch_size,
                                                         config.eval_batches, device, autocast, bos_id), 5)
                best_val = min(best_val, record["val_loss"])
            last = record
            if step % config.log_interval == 0 or "val_loss" in record or step == stop:
                logf.write(json.dumps(record) + "\n")
                logf.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", val=f"{best_val:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
            if step % config.ckpt_interval == 0:
                save()
                saved_step = step
        if saved_step != step:  # the end of this invocation (finished, or until_step) is always resumable
            save()
    except KeyboardInterrupt:
        log(f"interrupted at step {step}; the last checkpoint is in {out / LATEST} (resume with --resume)")
        raise
    finally:
        logf.close()
        if bar is not None:
            bar.close()
    summary = {"name": config.name, "step": step, "max_steps": config.max_steps, "params": n_params,
               "trainable_params": n_trainable,
               "tokens_seen": step * config.tokens_per_step, "train_tokens": len(train_tokens),
               "final_train_loss": last.get("loss"), "final_val_loss": last.get("val_loss"),
               "best_val_loss": best_val if best_val < math.inf else None,
               "unigram_val_loss": meta["unigram_val_loss"], "tokens_per_s": last.get("tokens_per_s"),
               "wall_s": round(time.time() - t_start, 1), "device": str(device), "precision": precision,
               "rope_theta": model.config.rope_theta, "seq_len": config.seq_len}
    if step >= config.max_steps:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        model.eval()
        if config.lora_rank:  # the export is an ordinary checkpoint: adapters folded into the base weights
            from .lora import merge_lora
            merge_lora(model)
        export(model.cpu(), out / "final", tok_path)
        summary["export"] = str(out / "final")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log(f"done: {out / 'final'}")
    return summary


def _progress(config: TrainConfig, step: int, stop: int):
    if not config.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=stop, initial=step, desc=config.name, unit="step", dynamic_ncols=True, mininterval=2.0,
                file=sys.stderr)
