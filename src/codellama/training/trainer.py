"""The trainer: one loop for code pretraining with FIM and for long-context fine-tuning (LCFT).

Llama 2 / Code Llama optimisation (paper §2.5): AdamW β=(0.9, 0.95), weight decay 0.1 on weight matrices (not on
RMSNorm gains nor the token embedding table), linear warm-up then cosine decay to peak/30, gradient clipping at
1.0, gradient accumulation, bf16 autocast (mixed precision: float32 weights and optimizer state) on CUDA and on
CPUs with native bf16 arithmetic. Checkpoints (checkpointing.py) are written to a temporary file and renamed, so a
kill at any moment leaves the previous checkpoint intact, and they hold everything that determines the rest of
the run (weights, optimizer moments, step, data position, RNG states), so ``resume`` continues the same curve.
Recipes (the ``TrainConfig`` and its validation) are in recipe.py, the starting model in init_model.py.

Under ``torchrun`` the same loop is one rank of a sharded run (distributed.py: FSDP2, each rank a disjoint slice of
every global micro-batch) and checkpoints with torch.distributed.checkpoint (distributed_checkpoint.py), which
resumes at any world size; rank 0 alone writes the log, the summary and the export."""

from __future__ import annotations

import contextlib
import gc
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
from .checkpointing import (LATEST, PREVIOUS, clear_run_checkpoints, read_run_checkpoint, rng_state,
                            save_run_checkpoint, set_rng_state, truncate_log)
from .checkpointing import read_log  # noqa: F401 (part of this module's API, used by the tests)
from .data import get_batch, sequence_starts
from .distributed import Ranks, check_divisible, close_ranks, full_state_dict, init_ranks
from .distributed_checkpoint import (clear_distributed_checkpoints, load_distributed,
                                     read_distributed_state, restore_rng, save_distributed)
from .instruct import IGNORE, Rows
from .init_model import (init_source, initial_model, model_from_checkpoint, model_from_run, sharded_model,
                         source_tokenizer)
from .mixture import TrainingData, prepare_training_data
# The recipe API has always been importable from here (tests, benchmarks, notebooks).
from .plan import memory_plan
from .recipe import RECIPES_DIR, TrainConfig, find_recipe, load_recipe  # noqa: F401

__all__ = ["train", "model_from_run", "export", "lr_at", "make_optimizer", "train_step", "evaluate_loss",
           "read_log", "load_recipe", "TrainConfig"]

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
    """One optimizer step over ``micro_batches`` (gradient accumulation); returns (mean loss, grad norm).
    Sharded, each rank passes its rows of every micro-batch and gets its own rows' loss; FSDP averages the
    gradients, and the norm (of DTensors) is the global one."""
    total = 0.0
    for batch in micro_batches:
        # (x, y) windows of text, or (x, y, segments) when packed dialogs are in the batch: y is IGNORE (-100,
        # cross_entropy's ignore_index) where a position carries no loss, and the mean is over the rest.
        x, y, *segments = batch
        with autocast():
            logits = model(x, segments=segments[0] if segments else None)
        # The loss in float32 whatever the autocast dtype of the logits: bf16 log-softmax loses ~2 digits.
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / len(micro_batches)
        loss.backward()
        total += loss.item()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else torch.tensor(0.0)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, float(norm)


def _rank_share(items, ranks: Ranks):
    """This rank's part of one validation batch, and whether it counts. Every rank must run a forward (FSDP's
    all-gathers are collectives): one whose share of a short last batch is empty computes the first item and
    does not count it."""
    share = -(-len(items) // ranks.world_size)
    mine = items[ranks.rank * share:(ranks.rank + 1) * share]
    return (mine, True) if len(mine) else (items[:1], False)


@torch.no_grad()
def evaluate_loss(model: Transformer, tokens: np.ndarray, seq_len: int, batch_size: int, batches: int,
                  device: torch.device, autocast=contextlib.nullcontext, bos_id: int | None = None,
                  ranks: Ranks = Ranks()) -> float:
    """Mean next-token loss over the first ``batches × batch_size`` windows of ``tokens`` (a fixed set); windows
    start at documents when ``bos_id`` is given, as in training. Sharded, the ranks split each batch
    (``_rank_share``) and sum their losses."""
    starts = sequence_starts(tokens, seq_len, bos_id)
    count = min(len(starts), batches * batch_size)
    if count == 0:
        raise CodeLlamaError(f"validation split has fewer than {seq_len + 1} tokens")
    was_training = model.training
    model.eval()
    total = 0.0
    for first in range(0, count, batch_size):
        rows = starts[first:min(count, first + batch_size)]
        mine, counted = _rank_share(rows, ranks)
        x, y = get_batch(tokens, mine, seq_len, device)
        with autocast():
            logits = model(x)
        if counted:
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
    model.train(was_training)
    return ranks.sum([total])[0] / (count * seq_len)


@torch.no_grad()
def evaluate_rows(model: Transformer, rows: Rows, batch_size: int, batches: int, device: torch.device,
                  autocast=contextlib.nullcontext, ranks: Ranks = Ranks()) -> float:
    """Mean loss per target token over the first ``batches × batch_size`` packed dialog rows (a fixed set),
    split over the ranks as evaluate_loss splits windows."""
    count = min(len(rows), batches * batch_size)
    was_training = model.training
    model.eval()
    total, targets = 0.0, 0
    for first in range(0, count, batch_size):
        idx = list(range(first, min(count, first + batch_size)))
        mine, counted = _rank_share(idx, ranks)
        x, y, seg = rows.batch(mine, device)
        with autocast():
            logits = model(x, segments=seg)
        if counted:
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            targets += int((y != IGNORE).sum())
    model.train(was_training)
    total, targets = ranks.sum([total, float(targets)])
    return total / max(1.0, targets)


def evaluate_mixture(model: Transformer, data: TrainingData, config: TrainConfig, device: torch.device,
                     autocast, ranks: Ranks) -> tuple[float, dict[str, float]]:
    """Validation loss of each source and their weighted mean (the mixture's objective)."""
    per_source, mean = {}, 0.0
    for name, weight, tokens, bos_id in data.val_sets():
        if isinstance(tokens, Rows):  # a dialog source: its packed validation rows, loss on assistant tokens
            loss = evaluate_rows(model, tokens, config.batch_size, config.eval_batches, device, autocast, ranks)
        else:
            loss = evaluate_loss(model, tokens, config.seq_len, config.batch_size, config.eval_batches, device,
                                 autocast, bos_id, ranks)
        per_source[name] = loss
        mean += weight * loss
    return mean, per_source


# ---- checkpoints -------------------------------------------------------------------------------------------
def _check_resumable(ckpt: dict[str, Any], path: Path, config: TrainConfig) -> None:
    """The checkpoint belongs to this recipe (before any data is prepared: a wrong run fails in seconds)."""
    try:
        saved = TrainConfig(**ckpt["train_config"])
    except (CodeLlamaError, TypeError) as e:
        raise CodeLlamaError(f"{path}: its recipe is not one this version reads ({error_line(e)})") from None
    changed = [f.name for f in fields(TrainConfig) if f.name not in ("progress", "device", "num_threads", "out_dir")
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
    without changing the schedule, as an interruption would — used to test resuming. Under torchrun this is one
    rank of a sharded run (every rank calls it; rank 0 logs and writes)."""
    if until_step is not None and (not isinstance(until_step, int) or until_step < 0):
        raise CodeLlamaError(f"until_step must be an integer >= 0, got {until_step!r}")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    ranks, device = init_ranks(resolve_train_device(config.device))
    try:
        summary = _train(config, resume, until_step, ranks, device, log if ranks.main else lambda s: None)
        ranks.barrier()  # a finished run: no rank tears its group down while another still talks to it
        return summary
    finally:
        # FSDP's modules and hooks form reference cycles that keep the process group alive; left to the
        # interpreter's exit, gloo's worker threads can be torn down in the wrong order (an abort after a
        # finished run). Free them, then destroy the group on every rank together.
        gc.collect()
        close_ranks(ranks)


def _read_resume_point(out: Path, ranks: Ranks, log: Callable[[str], None]) -> tuple[dict[str, Any], Path, str]:
    """The checkpoint to resume from: a distributed one (any world size reads it) or a single-process one."""
    found = read_distributed_state(out, log=log)
    if found is not None:
        return found[0], found[1], "dcp"
    found = read_run_checkpoint(out, log=log)
    if found is None:  # a typo in --out-dir must not silently start a new run from step 0
        raise CodeLlamaError(f"cannot resume: no checkpoint in {out} (run without --resume to start a new run)")
    if ranks.distributed:
        raise CodeLlamaError(f"{found[1]} is a single-process checkpoint: resume it in one process (without "
                             "torchrun); checkpoints of sharded runs resume at any world size")
    return found[0], found[1], "pt"


def _data_tokenizer(config: TrainConfig, out: Path) -> str | None:
    """Data for a run that starts from a checkpoint is tokenised with that checkpoint's own tokenizer, unless the
    recipe names one, or its data directory was already prepared with exactly that tokenizer."""
    if config.tokenizer:
        return None
    src_tok = source_tokenizer(config, out)
    if src_tok is None:
        return None
    prepared = Path(config.data_dir) / "tokenizer.model"
    if prepared.is_file() and prepared.read_bytes() == src_tok.read_bytes():
        # Already tokenised with these very pieces (an earlier stage's data, say): reuse it as it was prepared.
        try:
            key = json.loads(json.loads((Path(config.data_dir) / "meta.json").read_text())["key"])
            return key["tokenizer"] or None
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return str(src_tok)


def _prepare(config: TrainConfig, out: Path, ranks: Ranks, log: Callable[[str], None]) -> TrainingData:
    """Rank 0 prepares the data (corpus, tokenizer, token files) while the others wait, then all read it."""
    if ranks.main:
        data = prepare_training_data(config, log, tokenizer_override=_data_tokenizer(config, out))
    ranks.barrier()
    if not ranks.main:
        data = prepare_training_data(config, lambda s: None, tokenizer_override=_data_tokenizer(config, out))
    return data


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Bytes this rank actually holds for parameters and for optimizer state (local shards under FSDP)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t
    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    params += sum(b.numel() * b.element_size() for b in model.buffers())
    moments = sum(local(v).numel() * local(v).element_size() for state in optimizer.state.values()
                  for v in state.values() if isinstance(v, torch.Tensor))
    return params, moments


def _peak_rss_bytes() -> int | None:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except (ImportError, OSError):
        return None


def _train(config: TrainConfig, resume: bool, until_step: int | None, ranks: Ranks, device: torch.device,
           log: Callable[[str], None]) -> dict[str, Any]:
    out = Path(config.out_dir)
    check_divisible(config.batch_size, ranks)
    # Everything read from disk is read (and refused, if it must be) before minutes of data preparation.
    resumed = _read_resume_point(out, ranks, log) if resume else None
    if resumed is not None:
        _check_resumable(resumed[0], resumed[1], config)
    source = init_source(config, log)
    # The memory plan (plan.py) before anything is allocated: a run that cannot fit would swap the machine to a
    # halt or wake the OOM killer minutes later, not raise.
    memory_plan(config, world_size=ranks.world_size, device=device).check()
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
    ranks.barrier()
    data = _prepare(config, out, ranks, log)
    tok_path = data.tokenizer_path

    precision = resolve_precision(config.precision, device)
    if ranks.distributed:
        model = sharded_model(config, data.vocab_size, tok_path, source, ranks, device, precision, log)
        autocast = contextlib.nullcontext  # FSDP's mixed-precision policy computes in bf16 itself
    else:
        model = initial_model(config, data.vocab_size, tok_path, source, log).to(device)
        autocast = lambda: autocast_for(device, precision)  # noqa: E731
    optimizer = make_optimizer(model, config)  # over the trainable parameters only (frozen ones are skipped)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step, position, best_val = 0, 0, math.inf
    log_path = out / "log.jsonl"
    if resumed is not None:
        ckpt, ckpt_path, kind = resumed
        if kind == "dcp":
            load_distributed(model, optimizer, ckpt_path)
            restore_rng(ckpt)
        else:
            _restore(ckpt, ckpt_path, model, optimizer)
        step, position, best_val = ckpt["step"], ckpt["position"], float(ckpt["best_val"])
        if ranks.main and ckpt_path.name == PREVIOUS and (out / LATEST).is_file():
            # Set the damaged latest aside, so that the next save does not rotate it into the fallback slot.
            os.replace(out / LATEST, out / (LATEST + ".damaged"))
        if ranks.main:
            truncate_log(out, step)
        log(f"resumed {out} at step {step} (saved at world size {ckpt.get('world_size', 1)}, now "
            f"{ranks.world_size})")
        del ckpt
    elif ranks.main:  # a fresh start: no earlier run's checkpoint may be resumed or fallen back to
        clear_run_checkpoints(out)
        clear_distributed_checkpoints(out)
        log_path.unlink(missing_ok=True)
    del resumed, source
    if ranks.main:
        (out / "tokenizer.model").write_bytes(tok_path.read_bytes())
        (out / "recipe.json").write_text(json.dumps(asdict(config), indent=2))
    ranks.barrier()
    model_config = asdict(model.config)

    def save() -> None:
        plain = {"step": step, "position": position, "best_val": best_val, "train_config": asdict(config),
                 "model_config": model_config, "world_size": ranks.world_size}
        if ranks.distributed:
            save_distributed(model, optimizer, plain, out, ranks.main, ranks.barrier)
        else:
            save_run_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "rng": rng_state(), **plain}, out)
            clear_distributed_checkpoints(out)

    n_params = model.config.num_params()
    first_row, last_row = ranks.rows(config.batch_size)
    log(f"{config.name}: {n_params / 1e6:.2f}M parameters, {data.describe()}, {config.tokens_per_step:,} "
        f"tokens/step, {config.max_steps} steps, device {device}, {precision}"
        + (f", FSDP2 over {ranks.world_size} ranks" if ranks.distributed else ""))
    stop = min(config.max_steps, until_step) if until_step is not None else config.max_steps
    bar = _progress(config, step, stop) if ranks.main else None
    logf = open(log_path, "a") if ranks.main else None
    model.train()
    t_start, tokens_done, last, saved_step = time.time(), 0, {}, -1
    try:
        while step < stop:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = []
            for _ in range(config.grad_accum):
                micro.append(data.train_batch(position + first_row, last_row - first_row, device))
                position += config.batch_size
            t0 = time.time()
            loss, norm = train_step(model, optimizer, micro, config.grad_clip, autocast)
            loss = ranks.mean(loss)
            dt = time.time() - t0
            step += 1
            tokens_done += config.tokens_per_step
            tok_s = tokens_done / (time.time() - t_start)
            record = {"step": step, "loss": round(loss, 5), "lr": lr, "grad_norm": round(norm, 4),
                      "tokens": step * config.tokens_per_step, "epoch": round(data.epoch(position), 4),
                      "step_s": round(dt, 4), "tokens_per_s": round(tok_s, 1), "world_size": ranks.world_size}
            if step % config.eval_interval == 0 or step == config.max_steps:
                val, per_source = evaluate_mixture(model, data, config, device, autocast, ranks)
                record["val_loss"] = round(val, 5)
                if len(per_source) > 1:
                    record["val_loss_by_source"] = {k: round(v, 5) for k, v in per_source.items()}
                best_val = min(best_val, record["val_loss"])
            last = record
            if logf is not None and (step % config.log_interval == 0 or "val_loss" in record or step == stop):
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
        log(f"interrupted at step {step}; the last checkpoint is in {out} (resume with --resume)")
        raise
    finally:
        if logf is not None:
            logf.close()
        if bar is not None:
            bar.close()
    # What each rank actually holds (its local shards), gathered so rank 0's summary shows every rank's.
    held = [0.0] * (3 * ranks.world_size)
    held[3 * ranks.rank: 3 * ranks.rank + 3] = [*_state_bytes(model, optimizer), _peak_rss_bytes() or 0]
    held = [int(v) for v in ranks.sum(held)]
    summary = {"name": config.name, "step": step, "max_steps": config.max_steps, "params": n_params,
               "trainable_params": n_trainable,
               "tokens_seen": step * config.tokens_per_step, "train_tokens": data.n_train_tokens,
               "final_train_loss": last.get("loss"), "final_val_loss": last.get("val_loss"),
               "best_val_loss": best_val if best_val < math.inf else None,
               "unigram_val_loss": data.meta["unigram_val_loss"], "tokens_per_s": last.get("tokens_per_s"),
               "wall_s": round(time.time() - t_start, 1), "device": str(device), "precision": precision,
               "rope_theta": model.config.rope_theta, "seq_len": config.seq_len, "world_size": ranks.world_size,
               "rank": ranks.rank, "param_bytes_per_rank": held[0::3], "optimizer_bytes_per_rank": held[1::3],
               "peak_rss_bytes_per_rank": held[2::3]}
    if step >= config.max_steps:
        state = full_state_dict(model, ranks)  # a collective: every rank takes part, rank 0 gets the weights
        if ranks.main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            _export_final(state, model.config, config, out / "final", tok_path)
            summary["export"] = str(out / "final")
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            log(f"done: {out / 'final'}")
        ranks.barrier()
    return summary


def _export_final(state: dict[str, torch.Tensor], model_config: ModelConfig, config: TrainConfig, out_dir: Path,
                  tokenizer_path: Path) -> None:
    """The trained model as an ordinary float checkpoint: LoRA adapters folded into the base weights."""
    if config.lora_rank:
        model = model_from_checkpoint({"model": state, "model_config": asdict(model_config),
                                       "train_config": asdict(config)}, out_dir)
    else:
        with torch.device("meta"):
            model = Transformer(model_config)
        model.load_state_dict(state, assign=True)
    export(model.eval(), out_dir, tokenizer_path)


def _progress(config: TrainConfig, step: int, stop: int):
    if not config.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=stop, initial=step, desc=config.name, unit="step", dynamic_ncols=True, mininterval=2.0,
                file=sys.stderr)
