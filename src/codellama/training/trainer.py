"""The trainer: one loop for code pretraining with FIM and for long-context fine-tuning (LCFT).

Llama 2 / Code Llama optimisation (paper §2.5): AdamW β=(0.9, 0.95), weight decay 0.1 on weight matrices (not on
RMSNorm gains nor the token embedding table), linear warm-up then cosine decay to peak/30, gradient clipping at
1.0, gradient accumulation, bf16 autocast (mixed precision: float32 weights and optimizer state) on CUDA and on
CPUs with native bf16 arithmetic. Checkpoints are written to a temporary file and renamed, so a
kill at any moment leaves the previous checkpoint intact, and they hold everything that determines the rest of
the run (weights, optimizer moments, step, data position, RNG states), so ``resume`` continues the same curve."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import CodeLlamaError
from ..model import Transformer
from ..tokenizer import Tokenizer
from .corpus import CorpusConfig
from .data import DataConfig, get_batch, load_tokens, prepare_data, sequence_indices, sequence_starts

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


@dataclass
class TrainConfig:
    name: str = "run"
    out_dir: str = ""  # default: runs/<name>
    # ---- data
    data_dir: str = ""  # prepared-data cache; default: runs/data/<name>
    corpus: list[str] = field(default_factory=lambda: ["stdlib"])
    tokenizer: str = ""  # existing tokenizer.model; empty: train one with vocab_size pieces
    vocab_size: int = 4096
    seq_len: int = 256
    fim_rate: float = 0.9
    fim_spm_rate: float = 0.5
    doc_chars: int = 1200
    data_passes: int = 1
    align_documents: bool = True  # windows start at document starts (see data.py); False: back to back
    # ---- model (ignored when init_from is set, except rope_theta and seq_len)
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 0  # 0: no grouped-query attention
    multiple_of: int = 32
    ffn_dim_multiplier: float = 0.0  # 0: none
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    init_from: str = ""  # a training run directory or a checkpoint directory to continue from (LCFT)
    # ---- optimisation
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 0.0  # 0: lr / 30, as in the paper
    warmup_steps: int = 100
    max_steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # ---- bookkeeping
    eval_interval: int = 100
    eval_batches: int = 20
    ckpt_interval: int = 100
    log_interval: int = 10
    seed: int = 1234
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 (bf16 autocast); auto: bf16 where the hardware has it natively
    num_threads: int = 0  # 0: torch's default
    progress: bool = True

    def __post_init__(self) -> None:
        self.out_dir = self.out_dir or f"runs/{self.name}"
        self.data_dir = self.data_dir or f"runs/data/{self.name}"
        for key in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_interval", "ckpt_interval",
                    "log_interval", "eval_batches"):
            if getattr(self, key) <= 0:
                raise CodeLlamaError(f"recipe: {key} must be positive, got {getattr(self, key)}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise CodeLlamaError(f"recipe: precision must be auto, fp32 or bf16, got {self.precision!r}")
        if not 0 <= self.fim_rate <= 1 or not 0 <= self.fim_spm_rate <= 1:
            raise CodeLlamaError("recipe: fim_rate and fim_spm_rate must be in [0, 1]")

    @property
    def final_lr(self) -> float:
        return self.min_lr or self.lr / 30

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def data_config(self) -> DataConfig:
        return DataConfig(corpus=CorpusConfig(roots=list(self.corpus)), tokenizer=self.tokenizer,
                          vocab_size=self.vocab_size, fim_rate=self.fim_rate, fim_spm_rate=self.fim_spm_rate,
                          doc_chars=self.doc_chars, passes=self.data_passes, seed=self.seed)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                           n_kv_heads=self.n_kv_heads or None, vocab_size=vocab_size, multiple_of=self.multiple_of,
                           ffn_dim_multiplier=self.ffn_dim_multiplier or None, norm_eps=self.norm_eps,
                           rope_theta=self.rope_theta, max_seq_len=self.seq_len, name=self.name)


# ---- recipes -----------------------------------------------------------------------------------------------
def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file path, or the name of a bundled recipe (``tiny-pretrain``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / f"{name_or_path}.toml", RECIPES_DIR / str(name_or_path)):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
    raise CodeLlamaError(f"recipe not found: {name_or_path} (a .toml path or one of: {known})")


def _recipe_keys(path: Path, depth: int = 0) -> dict[str, Any]:
    """The flat keys of a recipe file, on top of those of its ``base`` recipe (if it names one)."""
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise CodeLlamaError(f"{path}: invalid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if k in flat:
                raise CodeLlamaError(f"{path}: key {k!r} given twice")
            flat[k] = v
    base = flat.pop("base", None)
    if base is None:
        return flat
    if depth >= 8:
        raise CodeLlamaError(f"{path}: recipe bases nest more than 8 deep (a cycle?)")
    beside = path.parent / str(base)
    inherited = _recipe_keys(beside if beside.is_file() else find_recipe(base), depth + 1)
    return {**inherited, **flat}


def load_recipe(name_or_path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a TOML recipe. Sections (``[data]``, ``[model]``, ``[optim]``, ``[run]``) are for the reader only:
    keys are the ``TrainConfig`` fields and must be unique across them. ``base = "other-recipe"`` starts from the
    keys of another recipe (a path beside this one or a bundled name), which this one's keys override — how a
    later stage shares an earlier stage's data settings without repeating them."""
    path = find_recipe(name_or_path)
    flat = _recipe_keys(path)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise CodeLlamaError(f"{path}: unknown recipe keys: {', '.join(unknown)}")
    flat.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**flat)
    except TypeError as e:
        raise CodeLlamaError(f"{path}: {e}") from None


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
def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half of one


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_run_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(run_dir) / "ckpt.pt"
    if not path.is_file():
        raise CodeLlamaError(f"no training checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


def model_from_run(run_dir: str | Path, **overrides: Any) -> Transformer:
    """The model of a training run's latest checkpoint (``overrides`` change its config, e.g. ``rope_theta``)."""
    ckpt = load_run_checkpoint(run_dir)
    config = ModelConfig(**{**ckpt["model_config"], **overrides})
    model = Transformer(config)
    model.load_state_dict(ckpt["model"])
    return model


def _initial_model(config: TrainConfig, vocab_size: int, tokenizer_path: Path) -> Transformer:
    if not config.init_from:
        torch.manual_seed(config.seed)
        model = Transformer(config.model_config(vocab_size))
        model.init_weights()
        return model
    # Continue from an earlier stage: keep its shape, change what the stage changes (LCFT: θ and length).
    src = Path(config.init_from)
    overrides = {"rope_theta": config.rope_theta, "max_seq_len": config.seq_len, "name": config.name}
    if (src / "ckpt.pt").is_file():
        model = model_from_run(src, **overrides)
        src_tok = src / "tokenizer.model"
    elif (src / "params.json").is_file() or (src / "config.json").is_file():
        from ..checkpoint import load_model
        model = load_model(src, device="cpu", dtype=torch.float32)
        for k, v in overrides.items():
            setattr(model.config, k, v)
        src_tok = src / "tokenizer.model"
    else:
        raise CodeLlamaError(f"init_from: {src} is neither a training run nor a checkpoint directory")
    if src_tok.is_file() and src_tok.read_bytes() != tokenizer_path.read_bytes():
        raise CodeLlamaError(f"init_from: {src} was trained with another tokenizer than the data in "
                             f"{config.data_dir}; prepare the data with tokenizer = \"{src_tok}\"")
    if model.config.vocab_size < vocab_size:
        raise CodeLlamaError(f"init_from: model vocabulary {model.config.vocab_size} < tokenizer's {vocab_size}")
    return model


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
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_train_device(config.device)
    out = Path(config.out_dir)
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

    ckpt_path = out / "ckpt.pt"
    log_path = out / "log.jsonl"
    model = _initial_model(config, tokenizer.n_words, tok_path).to(device)
    optimizer = make_optimizer(model, config)
    step, position, best_val = 0, 0, math.inf
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        saved = TrainConfig(**ckpt["train_config"])
        changed = [f.name for f in fields(TrainConfig) if f.name not in ("progress", "device", "num_threads")
                   and getattr(saved, f.name) != getattr(config, f.name)]
        if changed:
            raise CodeLlamaError(f"cannot resume {out}: recipe changed since the checkpoint ({', '.join(changed)})")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, position, best_val = ckpt["step"], ckpt["position"], ckpt["best_val"]
        _set_rng_state(ckpt["rng"])
        _truncate_log(log_path, step)
        log(f"resumed {out} at step {step}")
    elif resume:
        log(f"no checkpoint in {out}; starting from scratch")
        log_path.unlink(missing_ok=True)
    else:
        log_path.unlink(missing_ok=True)
    (out / "tokenizer.model").write_bytes(tok_path.read_bytes())
    (out / "recipe.json").write_text(json.dumps(asdict(config), indent=2))

    def save() -> None:
        _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                      "position": position, "best_val": best_val, "rng": _rng_state(),
                      "train_config": asdict(config), "model_config": asdict(model.config)}, ckpt_path)

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
        log(f"interrupted at step {step}; the last checkpoint is in {ckpt_path} (resume with --resume)")
        raise
    finally:
        logf.close()
        if bar is not None:
            bar.close()
    summary = {"name": config.name, "step": step, "max_steps": config.max_steps, "params": n_params,
               "tokens_seen": step * config.tokens_per_step, "train_tokens": len(train_tokens),
               "final_train_loss": last.get("loss"), "final_val_loss": last.get("val_loss"),
               "best_val_loss": best_val if best_val < math.inf else None,
               "unigram_val_loss": meta["unigram_val_loss"], "tokens_per_s": last.get("tokens_per_s"),
               "wall_s": round(time.time() - t_start, 1), "device": str(device), "precision": precision,
               "rope_theta": model.config.rope_theta, "seq_len": config.seq_len}
    if step >= config.max_steps:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        model.eval()
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


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records after the checkpoint being resumed, so the log is one clean curve."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
