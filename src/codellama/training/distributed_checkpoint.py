"""Checkpoints of a sharded run, with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards in
parallel, and any world size reads them back (DCP reshards on load), so a run saved on 8 GPUs resumes on 4, or in
one process.

Layout under the run directory: ``ckpt.dcp/`` (the latest) and ``ckpt.prev.dcp/`` (the one before), each holding
DCP's files (weights and AdamW moments, keyed by parameter name, as tensors only) and ``train_state.json`` (step,
data position, best validation loss, RNG states, the recipe and the model config: plain data). A save is
written to ``ckpt.dcp.tmp/`` and committed by renames once every rank has finished, so a save killed at any point
leaves the previous checkpoint loadable, as single-process checkpoints (checkpointing.py) do.

Reading is as safe as for ``ckpt.pt``: DCP stores its index (``.metadata``) as a pickle and non-tensor values
through ``torch.load(weights_only=False)``. We write no non-tensor values, refuse an index that lists any, and
read the index with an unpickler that only builds DCP's own metadata classes, so a crafted checkpoint directory
cannot run code."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CodeLlamaError, error_line
from .checkpointing import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, LATEST, PREVIOUS, _fsync_directory,
                            rng_state)

DCP_LATEST = "ckpt.dcp"
DCP_PREVIOUS = "ckpt.prev.dcp"
DCP_TMP = "ckpt.dcp.tmp"
STATE_FILE = "train_state.json"
MAX_STATE_BYTES = 16 << 20


# ---- plain-data RNG state (tensors as lists of ints, for JSON) ------------------------------------------------
def _plain_rng() -> dict[str, Any]:
    state = rng_state()
    out = dict(state)
    out["torch"] = state["torch"].tolist()
    if "cuda" in state:
        out["cuda"] = [s.tolist() for s in state["cuda"]]
    return out


def _tensor_rng(plain: dict[str, Any]) -> dict[str, Any]:
    state = dict(plain)
    state["torch"] = torch.tensor(plain["torch"], dtype=torch.uint8)
    if "cuda" in plain:
        state["cuda"] = [torch.tensor(s, dtype=torch.uint8) for s in plain["cuda"]]
    return state


# ---- the index, read without running code ---------------------------------------------------------------------
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _read_index(path: Path) -> Any:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
    try:
        data = (path / ".metadata").read_bytes()
        index = _IndexUnpickler(io.BytesIO(data)).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as e:
        raise CodeLlamaError(f"{path}: unreadable distributed checkpoint index ({error_line(e, 160)})") from None
    if not isinstance(index, Metadata):
        raise CodeLlamaError(f"{path}: the distributed checkpoint index is not DCP metadata")
    if any(isinstance(m, BytesStorageMetadata) for m in index.state_dict_metadata.values()):
        raise CodeLlamaError(f"{path}: refused: the checkpoint holds non-tensor values, which DCP would unpickle; "
                             "codellama never writes them, delete it")
    return index


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            index = _read_index(Path(self.path))
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    return SafeReader(str(path))


# ---- plain data -------------------------------------------------------------------------------------------------
def _read_state(path: Path) -> dict[str, Any]:
    file = path / STATE_FILE
    try:
        if file.stat().st_size > MAX_STATE_BYTES:
            raise ValueError("too large")
        state = json.loads(file.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CodeLlamaError(f"{file}: unreadable ({error_line(e, 120)})") from None
    problems = [k for k in ("step", "position", "world_size") if not isinstance(state.get(k), int)
                or isinstance(state.get(k), bool) or state[k] < 0]
    problems += [k for k in ("train_config", "model_config", "rng") if not isinstance(state.get(k), dict)]
    if not isinstance(state.get("best_val"), (int, float)):
        problems.append("best_val")
    if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
        problems.append("format")
    if problems:
        raise CodeLlamaError(f"{file} is damaged: bad or missing {', '.join(problems)}")
    return state


def has_distributed_checkpoint(run_dir: str | Path) -> bool:
    return any((Path(run_dir) / name / STATE_FILE).is_file() for name in (DCP_LATEST, DCP_PREVIOUS))


def read_distributed_state(run_dir: str | Path, log: Callable[[str], None] = lambda s: None
                           ) -> tuple[dict[str, Any], Path] | None:
    """The plain data of the run's latest readable distributed checkpoint and its directory (None if none);
    a damaged latest falls back to the previous one, as for single-process checkpoints."""
    damage = []
    for name in (DCP_LATEST, DCP_PREVIOUS):
        path = Path(run_dir) / name
        if not path.is_dir():
            continue
        try:
            state = _read_state(path)
            _read_index(path)
        except CodeLlamaError as e:
            if "refused" in str(e):
                raise
            damage.append(str(e))
            continue
        if damage:
            log(f"warning: {damage[0]}; using the previous checkpoint {path} (step {state['step']})")
        return state, path
    if damage:
        raise CodeLlamaError(f"{damage[0]}; no earlier checkpoint is readable: delete the ckpt*.dcp directories "
                             "to start the run again")
    return None


# ---- tensors ------------------------------------------------------------------------------------------------
def _tensor_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list]:
    """Weights and optimizer moments keyed by parameter name (DTensors when sharded): tensors only. The
    optimizer's param_groups (hyper-parameters) are the recipe's and are rebuilt from it, never stored."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state["state"]}, optim_state["param_groups"]


def save_distributed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, plain: dict[str, Any],
                     run_dir: str | Path, main: bool, barrier: Callable[[], None]) -> Path:
    """Write a checkpoint of every rank's shards plus ``plain`` data, then commit it atomically (a collective)."""
    import torch.distributed.checkpoint as dcp

    run_dir = Path(run_dir)
    tmp, latest, previous = run_dir / DCP_TMP, run_dir / DCP_LATEST, run_dir / DCP_PREVIOUS
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    tensors, _ = _tensor_state(model, optimizer)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
    if main:
        state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "rng": _plain_rng(), **plain}
        with open(tmp / STATE_FILE, "x") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, latest, previous)
        for name in (LATEST, PREVIOUS):  # a single-process checkpoint of this run is now older than this one
            (run_dir / name).unlink(missing_ok=True)
    barrier()
    return latest


def _commit(tmp: Path, latest: Path, previous: Path) -> None:
    """tmp → latest, latest → previous. At every instant latest or previous is a whole checkpoint."""
    if latest.is_dir():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(latest, previous)
    os.replace(tmp, latest)
    _fsync_directory(latest.parent)


def load_distributed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Put the weights and optimizer moments of the checkpoint at ``path`` into ``model`` and ``optimizer``,
    resharded to this world size (one process, no process group, included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    _init_optimizer_state(optimizer)
    tensors, param_groups = _tensor_state(model, optimizer)
    try:
        with warnings.catch_warnings():  # "no process group: loading in a single process" is what we mean
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(tensors, storage_reader=_reader(path))
        set_state_dict(model, optimizer, model_state_dict=tensors["model"],
                       optim_state_dict={"state": tensors["optimizer"], "param_groups": param_groups})
    except CodeLlamaError:
        raise
    except Exception as e:  # DCP wraps per-rank failures (missing keys, shapes) in its own exception types
        raise CodeLlamaError(f"{path} does not fit this run ({type(e).__name__}: {error_line(e, 200)}); delete it "
                             "to start the run again") from None


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW creates its moments on the first step; DCP loads in place, so they must exist first. A step with
    zero gradients and zero learning rate creates them without moving any weight; loading then overwrites them."""
    if optimizer.state:
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def restore_rng(plain: dict[str, Any]) -> None:
    from .checkpointing import set_rng_state
    set_rng_state(_tensor_rng(plain["rng"]))


def clear_distributed_checkpoints(run_dir: str | Path) -> None:
    for name in (DCP_LATEST, DCP_PREVIOUS, DCP_TMP):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)
