"""Reading safetensors headers without trusting them.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{"name": {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``) and the tensor bytes. The header
decides what gets allocated and mapped, so before anything uses it every field is checked: types, a known
dtype, shapes whose byte size equals the declared span, spans that tile the data region exactly (no gaps, no
overlaps, nothing past the end of the file). A file that passes describes exactly the bytes it holds, so
``describe_checkpoint`` can trust it without reading tensor data and the loader never reads past the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config_validation import shown, shown_name
from .errors import CodeLlamaError

# safetensors dtype -> (torch dtype name, bytes per element)
DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8), "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
# Weights we compute with: anything else stored for a float weight (bool, int8 ...) would be silently cast.
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Headers of real checkpoints are tens of KB (a 70B shard: ~10 KB); the format's own limit is 100 MB.
MAX_HEADER_BYTES = 32 * 2**20
MAX_RANK = 8
MAX_DIM_SIZE = 2**40


@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # a torch dtype name: "float32", "bfloat16", "int8" ...


def _fail(path: Path, message: str) -> CodeLlamaError:
    return CodeLlamaError(f"{path} is not a valid safetensors file: {message}")


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of the tensors in ``path``, validated against the file's size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            if size < 8:
                raise _fail(path, f"the file has {size} bytes, fewer than the 8-byte header length")
            length = int.from_bytes(f.read(8), "little")
            if length < 2 or length > min(MAX_HEADER_BYTES, size - 8):
                raise _fail(path, f"header length {length} does not fit the file ({size} bytes) "
                                  f"or the {MAX_HEADER_BYTES // 2**20} MiB limit")
            raw = f.read(length)
    except FileNotFoundError:
        raise CodeLlamaError(f"weights file not found: {path}") from None
    except OSError as e:
        raise CodeLlamaError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON / UTF-8, giant integers, absurd nesting
        detail = str(e).splitlines()[0] if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise _fail(path, f"the header is not JSON ({shown_name(detail)})") from None
    return validate_header(path, header, size - 8 - length)


def validate_header(path: Path, header: Any, data_bytes: int) -> dict[str, TensorInfo]:
    """Check a parsed header against a data region of ``data_bytes`` bytes; see the module docstring."""
    if not isinstance(header, dict):
        raise _fail(path, f"the header must be a JSON object, not a {type(header).__name__}")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise _fail(path, "__metadata__ must map strings to strings")
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {shown(name)}"
        if not isinstance(entry, dict):
            raise _fail(path, f"{where} must be an object, got {shown(entry)}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _fail(path, f"{where} has unsupported dtype {shown(dtype)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_RANK
                and all(type(d) is int and 0 <= d <= MAX_DIM_SIZE for d in shape)):
            raise _fail(path, f"{where} has an invalid shape {shown(shape)} (a list of at most {MAX_RANK} "
                              "non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _fail(path, f"{where} has invalid data_offsets {shown(offsets)} (two integers, begin <= end)")
        torch_name, itemsize = DTYPES[dtype]
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * itemsize:
            raise _fail(path, f"{where}: shape {tuple(shape)} of {dtype} needs {numel * itemsize} bytes but its "
                              f"data_offsets span {offsets[1] - offsets[0]}")
        infos[name] = TensorInfo(tuple(shape), torch_name)
        spans.append((offsets[0], offsets[1], name))
    # The spans must tile the data region: a gap or an overlap means two tensors share bytes or the
    # header lies about the file; an end beyond the region means truncated data.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else f"leaves a gap at byte {position}"
            raise _fail(path, f"tensor {shown(name)} starts at byte {begin} and {what}")
        position = end
    if position != data_bytes:
        state = "truncated" if position > data_bytes else "has trailing bytes"
        raise _fail(path, f"the header describes {position} bytes of tensor data but the file holds "
                          f"{data_bytes} ({state})")
    return infos


__all__ = ["DTYPES", "FLOAT_DTYPES", "TensorInfo", "read_safetensors_header", "validate_header"]
