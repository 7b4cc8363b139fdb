"""The files of a checkpoint directory, opened safely: which files make up which layout, and reading them.

Everything a loader reads goes through here, so the rules hold for every layout:
- only regular files inside the checkpoint directory are read: names from an index (``/etc/passwd``,
  ``../x``) and symlinks resolving elsewhere are refused (one exception: the Hugging Face hub cache, whose
  ``snapshots/<rev>/`` files are symlinks into the same repository's ``blobs/``);
- ``.pth`` / ``.bin`` files go through ``torch.load(weights_only=True)``, which never runs pickled code, and a
  refusal names the global the file asked for;
- safetensors headers are validated against the file (``safetensors_io``) before a byte of data is mapped.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor

from .config import ModelConfig
from .config_validation import read_json_object, shown, shown_name
from .errors import CodeLlamaError, error_line
from .safetensors_io import FLOAT_DTYPES, TensorInfo, read_safetensors_header

NATIVE_WEIGHTS = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
MAX_INDEX_ENTRIES = 2**20


# ---- staying inside the checkpoint --------------------------------------------------------------------------
def checkpoint_dir(path: str | Path) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise CodeLlamaError(f"checkpoint not found: {root}")
    if not root.is_dir():
        if root.name in ("params.json", "config.json"):
            return root.parent
        raise CodeLlamaError(f"expected a checkpoint directory, got the file {root}")
    return root


def _inside(target: Path, root: Path) -> bool:
    if target.is_relative_to(root):
        return True
    # huggingface_hub's cache: models--org--name/snapshots/<revision>/<file> -> ../../blobs/<sha256>.
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


def confined_file(root: Path, name: str, what: str = "file") -> Path:
    """``root / name`` if it is a regular file that really lives inside the checkpoint ``root``.

    ``name`` must be a plain file name: index files are written by others, and an entry like ``/etc/passwd``
    or ``../../secret`` must never be opened; a symlink that resolves outside the directory is refused too,
    as are devices and FIFOs (a FIFO would block the loader forever)."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise CodeLlamaError(f"{what} {shown(name)} in {root} is not a plain file name inside the checkpoint")
    path = root / name
    try:
        target = path.resolve(strict=True)
        real_root = root.resolve(strict=True)
    except FileNotFoundError:
        raise CodeLlamaError(f"{what} {name} is missing from {root}") from None
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CodeLlamaError(f"cannot resolve {path}: {type(e).__name__}") from None
    if not _inside(target, real_root):
        raise CodeLlamaError(f"{what} {name} in {root} points outside the checkpoint directory; refusing to read it")
    if not target.is_file():
        raise CodeLlamaError(f"{what} {name} in {root} is not a regular file")
    return path


def read_config_json(root: Path, name: str) -> dict:
    return read_json_object(confined_file(root, name, "config file"), str(root / name))


# ---- reading weight files ----------------------------------------------------------------------------------
def _refused_global(path: Path, error: Exception) -> str | None:
    """The pickled global that ``torch.load(weights_only=True)`` refused, asked of torch's own scanner rather
    than read out of its message (whose wording changes between releases); None if there is none."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if unsafe:
            return unsafe[0]
    except Exception:  # legacy (non-zip) files or a torch without the scanner: fall back to the message
        pass
    m = re.search(r"GLOBAL\s+([\w.]+)", str(error))
    return m.group(1).rstrip(".") if m else None


def unpickling_refusal(path: Path, error: Exception) -> tuple[str | None, str]:
    """Why ``torch.load(weights_only=True)`` refused ``path``: the pickled global it asked for (or None), and a
    short reason for a message. torch's own message tells the user to retry with ``weights_only=False``, which
    is exactly what must not happen with a file from elsewhere, so it is never shown whole."""
    refused = _refused_global(path, error)
    if refused:
        return refused, f"a pickled {shown_name(refused)}; unpickling it could run arbitrary code"
    text = str(error)
    detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    line = next((line.strip() for line in detail.splitlines() if line.strip()), type(error).__name__)
    return None, f"a pickle the tensors-only loader cannot read: {shown_name(line, 120)}"


def torch_load(path: Path) -> dict[str, Tensor]:
    """Memory-mapped, weights-only ``torch.load``: never unpickles arbitrary objects, reads pages on demand."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zipfile" not in str(e).lower():
                raise
            # Files from the legacy (pre-zip) serializer cannot be mapped; they are read whole.
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused, reason = unpickling_refusal(path, e)
        if refused:
            raise CodeLlamaError(f"refusing to load {path}: it holds more than tensors ({reason})") from None
        raise CodeLlamaError(f"cannot read {path}: not a PyTorch weights file ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError, MemoryError) as e:
        raise CodeLlamaError(f"cannot read {path}: {error_line(e, 160)}") from None
    wrapped = isinstance(sd, dict) and isinstance(sd.get("model"), dict)
    if wrapped and not any(isinstance(v, Tensor) for v in sd.values()):
        sd = sd["model"]  # training checkpoints that wrap the weights
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise CodeLlamaError(f"{path} does not hold a dictionary of tensors")
    return sd


def file_index(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of the tensors in one weights file, without reading their data."""
    if path.suffix == ".safetensors":
        return read_safetensors_header(path)
    return {k: TensorInfo(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in torch_load(path).items()}


def read_tensors(path: Path, names: Iterable[str]) -> dict[str, Tensor]:
    """Only the named tensors of one file. The file is opened afresh and closed on return, so the pages
    read for one layer are released once its tensors are converted (or kept, mapped, when used as they are)."""
    names = list(names)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in names}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CodeLlamaError(f"cannot read {path}: {error_line(e, 160)}") from None
    sd = torch_load(path)
    return {k: sd[k] for k in names}


# ---- layouts ------------------------------------------------------------------------------------------
def meta_shards(root: Path) -> list[Path]:
    shards = sorted(root.glob("consolidated.*.pth"))
    numbers = []
    for s in shards:
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", s.name)
        if m is None:
            raise CodeLlamaError(f"unexpected file name {shown(s.name)} in {root} (expected consolidated.NN.pth)")
        numbers.append(int(m.group(1)))
    if numbers != list(range(len(numbers))):
        shown_names = ", ".join(s.name for s in shards[:8]) + (", ..." if len(shards) > 8 else "")
        raise CodeLlamaError(f"model-parallel shards in {root} are not numbered 00..{len(numbers) - 1:02d}: "
                             + shown_names)
    return [confined_file(root, s.name, "weights file") for s in shards]


def hf_weight_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """HF weight files and, for sharded checkpoints, the index's name -> file map."""
    for index_name, pattern in (("model.safetensors.index.json", "model*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        suffix = pattern.rsplit("*", 1)[1]
        index = root / index_name
        if index.is_file():
            weight_map = read_config_json(root, index_name).get("weight_map")
            if not (isinstance(weight_map, dict) and len(weight_map) <= MAX_INDEX_ENTRIES
                    and all(isinstance(v, str) for v in weight_map.values())):
                raise CodeLlamaError(f"{index} is not a valid weight index (weight_map must map tensor names "
                                     "to file names)")
            files = []
            for name in sorted(set(weight_map.values())):
                path = confined_file(root, name, f"weights file named in {index.name}")
                if not name.endswith(suffix):
                    raise CodeLlamaError(f"{index.name} names {shown(name)}, which is not a {suffix} file")
                files.append(path)
            return files, weight_map
        files = sorted(root.glob(pattern))
        if files:
            return [confined_file(root, f.name, "weights file") for f in files], None
    return [], None


def detect_format(path: str | Path) -> str:
    """``"meta"``, ``"native"`` or ``"hf"`` from the files in a checkpoint directory."""
    root = checkpoint_dir(path)
    if (root / "params.json").is_file():
        if list(root.glob("consolidated.*.pth")):
            return "meta"
        if (root / NATIVE_WEIGHTS).exists():
            return "native"
        raise CodeLlamaError(f"{root} has params.json but no weights: expected consolidated.NN.pth (Meta) "
                             f"or {NATIVE_WEIGHTS}")
    if (root / "config.json").is_file():
        if any(root.glob("model*.safetensors")) or any(root.glob("pytorch_model*.bin")) or \
                (root / "model.safetensors.index.json").exists() or (root / "pytorch_model.bin.index.json").exists():
            return "hf"
        raise CodeLlamaError(f"{root} has config.json but no weights: expected model*.safetensors "
                             "or pytorch_model*.bin")
    raise CodeLlamaError(f"unknown checkpoint layout in {root}: expected params.json + consolidated.NN.pth (Meta), "
                         f"params.json + {NATIVE_WEIGHTS} (native) or config.json + model*.safetensors (HF)")


# ---- what a config implies --------------------------------------------------------------------------------
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a model of ``config`` has, with its shape, in the model's order.

    Built from a one-layer model on the ``meta`` device and repeated per layer: the cost is one dict entry per
    tensor, so a config claiming many layers is compared with the files before anything is built for it."""
    from .model import Transformer  # model imports config: importing it lazily keeps this module light

    with torch.device("meta"):
        one = Transformer(replace(config, n_layers=1))
    template = {k: tuple(v.shape) for k, v in one.state_dict().items()}
    layer = {k.removeprefix("layers.0."): shape for k, shape in template.items() if k.startswith("layers.0.")}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in template.items():
        if not name.startswith("layers."):
            shapes[name] = shape
        elif name == "layers.0." + next(iter(layer)):  # where the layers start: all of them, in order
            for i in range(config.n_layers):
                shapes.update({f"layers.{i}.{rest}": s for rest, s in layer.items()})
    return shapes


def check_float_dtype(name: str, file: Path, dtype: str) -> None:
    """Float weights must be stored as floats: a bool or int8 tensor cast to float32 would load as garbage."""
    if dtype not in FLOAT_DTYPES:
        raise CodeLlamaError(f"tensor {shown_name(name)} in {file.name} is stored as {dtype}; float weights must be "
                             f"{', '.join(FLOAT_DTYPES)}")


__all__ = ["NATIVE_WEIGHTS", "TOKENIZER_FILE", "TensorInfo", "checkpoint_dir", "confined_file", "read_config_json",
           "torch_load", "file_index", "read_tensors", "meta_shards", "hf_weight_files", "detect_format",
           "expected_shapes", "check_float_dtype"]


# ---- writing outputs ---------------------------------------------------------------------------------------
def refuse_non_empty_output(dst: Path) -> None:
    """Files of another layout left in ``dst`` would make the result ambiguous to load: only a missing path
    or an empty directory may be written."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CodeLlamaError(f"destination {dst} already exists and is not an empty directory")


@contextmanager
def atomic_output(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path of ``dst`` to write into (a file or a directory); when the block ends
    normally it is renamed to ``dst`` (replacing an empty directory or a file), otherwise it is deleted, so a
    failed or interrupted write never leaves a partial checkpoint under the final name."""
    dst = Path(dst).expanduser()
    dst.parent.mkdir(parents=True, exist_ok=True)
    # The name keeps its extension (save_gguf wants ".gguf") and hides the unfinished output from listings.
    tmp = dst.with_name(f".partial-{os.getpid()}-{dst.name}")
    _remove_path(tmp)
    try:
        yield tmp
        if dst.is_dir():
            dst.rmdir()  # empty (callers checked): os.replace cannot put a file over a directory
        os.replace(tmp, dst)
    except BaseException:  # KeyboardInterrupt too: the partial output must not survive
        _remove_path(tmp)
        raise


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
