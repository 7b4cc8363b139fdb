"""A training run's directory on disk: its checkpoints and its JSONL log, written so that a kill at any moment
leaves something to resume from, and read so that nothing in the directory can run code.

A checkpoint holds only tensors and plain data (dicts, lists, strings, numbers): the RNG states of Python and NumPy
are stored as lists of integers rather than as the objects those libraries pickle, so ``torch.load`` reads it
with ``weights_only=True``. A ``ckpt.pt`` crafted to execute code on unpickling is refused, not run.

Two checkpoints are kept: ``ckpt.pt`` (the latest) and ``ckpt.prev.pt`` (the one before). Each is written to a
temporary file, flushed to disk and renamed into place, so neither is ever half-written by us; the previous one is
what a resume falls back to when the latest was damaged afterwards (a disk fault, a copy cut short)."""

from __future__ import annotations

import json
import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint_files import unpickling_refusal
from ..errors import CodeLlamaError, error_line

LATEST = "ckpt.pt"
PREVIOUS = "ckpt.prev.pt"
LOG = "log.jsonl"
CHECKPOINT_FORMAT = "codellama-train-checkpoint"
# 1 (no "version" key): RNG states pickled as NumPy / Python objects, which only weights_only=False could load.
CHECKPOINT_VERSION = 2


class DamagedCheckpoint(CodeLlamaError):
    """The file cannot be read as a checkpoint (truncated, corrupted, not one of ours): an older one may be used."""


# ---- RNG states as plain data ------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every random number generator the run draws from, as tensors and plain data."""
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {"bit_generator": bit_generator, "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved (raises TypeError / ValueError / RuntimeError on a malformed state)."""
    python, numpy = state["python"], state["numpy"]
    torch.set_rng_state(state["torch"])
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    np.random.set_state((numpy["bit_generator"], np.asarray(numpy["keys"], dtype=np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- writing -----------------------------------------------------------------------------------------------
def save_run_checkpoint(state: dict[str, Any], run_dir: str | Path) -> Path:
    """Write ``state`` as the run's latest checkpoint; the one it replaces becomes the previous one."""
    run_dir = Path(run_dir)
    latest, previous, tmp = run_dir / LATEST, run_dir / PREVIOUS, run_dir / (LATEST + ".tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover (or planted symlink) is replaced, never written through
        with open(tmp, "xb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power cut must not leave a renamed empty file
        if os.path.lexists(latest):
            os.replace(latest, previous)  # a kill right after this leaves ckpt.prev.pt, which resume reads
        os.replace(tmp, latest)  # atomic on POSIX: readers see the old or the new file, never half of one
    except OSError as e:  # disk full, permissions: the previous checkpoint is intact, say so
        tmp.unlink(missing_ok=True)
        raise CodeLlamaError(f"cannot write checkpoint {latest}: {e.strerror or e}; "
                             f"the last good one is still in {run_dir}") from None
    _fsync_directory(run_dir)
    return latest


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened: renames are durable there anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clear_run_checkpoints(run_dir: str | Path) -> None:
    """A run that starts from scratch: no checkpoint of an earlier run may be resumed (or fallen back to)."""
    for name in (LATEST, PREVIOUS, LATEST + ".tmp"):
        (Path(run_dir) / name).unlink(missing_ok=True)


# ---- reading -----------------------------------------------------------------------------------------------
def read_checkpoint_file(path: Path) -> dict[str, Any]:
    """One checkpoint file, loaded without running any code and checked for the structure we write.
    Raises ``DamagedCheckpoint`` for an unreadable file and ``CodeLlamaError`` for one that must not be loaded."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on foreign files: we say what's wrong
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused, reason = unpickling_refusal(path, e)
        if refused and refused.startswith("numpy"):
            raise CodeLlamaError(f"{path} was written by an older version of codellama (it pickles NumPy "
                                 "objects) and cannot be loaded safely; delete it to start the run again, or "
                                 "finish the run with the version that wrote it") from None
        if refused:
            raise CodeLlamaError(f"{path}: refused: it holds more than tensors and plain data ({reason}); "
                                 "it was not written by codellama, delete it") from None
        raise DamagedCheckpoint(f"{path} is not a readable checkpoint ({reason})") from None
    except Exception as e:  # zip, EOF, OS errors from a truncated or corrupted file: weights_only ran no code
        raise DamagedCheckpoint(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                                f"{error_line(e, 160)})") from None
    _check_structure(path, ckpt)
    return ckpt


def _check_structure(path: Path, ckpt: Any) -> None:
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DamagedCheckpoint(f"{path} is not a codellama training checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CodeLlamaError(f"{path} has checkpoint format {ckpt.get('version')!r}; this version of codellama "
                             f"reads format {CHECKPOINT_VERSION}")
    problems = []
    model, optimizer, rng = ckpt.get("model"), ckpt.get("optimizer"), ckpt.get("rng")
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        problems.append("model weights")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        problems.append("optimizer state")
    for key in ("step", "position"):
        if not isinstance(ckpt.get(key), int) or isinstance(ckpt.get(key), bool) or ckpt[key] < 0:
            problems.append(key)
    if not isinstance(ckpt.get("best_val"), (int, float)):
        problems.append("best_val")
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
            and isinstance(rng.get("python"), dict) and isinstance(rng.get("numpy"), dict)):
        problems.append("RNG state")
    for key in ("train_config", "model_config"):
        if not isinstance(ckpt.get(key), dict):
            problems.append(key)
    if problems:
        raise DamagedCheckpoint(f"{path} is damaged: bad or missing {', '.join(problems)}")


def has_run_checkpoint(run_dir: str | Path) -> bool:
    return any((Path(run_dir) / name).is_file() for name in (LATEST, PREVIOUS))


def read_run_checkpoint(run_dir: str | Path, log: Callable[[str], None] = lambda s: None
                        ) -> tuple[dict[str, Any], Path] | None:
    """The run's latest readable checkpoint and its path (``None`` if it has none). A damaged ``ckpt.pt`` falls
    back to ``ckpt.prev.pt``; a file that must not be loaded (unsafe, another format) is an error, no fallback."""
    latest, previous = Path(run_dir) / LATEST, Path(run_dir) / PREVIOUS
    damage: list[str] = []
    for path in (latest, previous):
        if not path.is_file():
            continue
        try:
            ckpt = read_checkpoint_file(path)
        except DamagedCheckpoint as e:
            damage.append(str(e))
            continue
        if damage:
            log(f"warning: {damage[0]}; using the previous checkpoint {path} (step {ckpt['step']})")
        return ckpt, path
    if not damage:
        return None
    names = " and ".join(str(p) for p in (latest, previous) if p.is_file())
    raise CodeLlamaError(f"{damage[0]}; no earlier checkpoint is readable: delete {names} to start the run again")


def load_run_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    found = read_run_checkpoint(run_dir)
    if found is None:
        raise CodeLlamaError(f"no training checkpoint at {Path(run_dir) / LATEST}")
    return found[0]


# ---- the log -----------------------------------------------------------------------------------------------
def _complete_lines(path: Path) -> list[tuple[dict[str, Any], str]]:
    """The log's records (and their lines) up to the first line that is not a whole record: a kill while a line
    was being written leaves a torn last line, which is dropped (and nothing after a damaged line is trusted)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_bytes().decode("utf-8", errors="replace").split("\n"):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            break
        records.append((record, line))
    return records


def truncate_log(run_dir: str | Path, step: int) -> None:
    """Keep the log records up to ``step`` (the checkpoint being resumed), so the log is one clean curve."""
    path = Path(run_dir) / LOG
    if not path.is_file():
        return
    kept = [line for record, line in _complete_lines(path) if record["step"] <= step]
    tmp = path.with_name(LOG + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)  # a kill while rewriting keeps the old log, which the next resume truncates again


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's log (a torn last line, as a run being written may have, left out)."""
    return [record for record, _ in _complete_lines(Path(run_dir) / LOG)]
