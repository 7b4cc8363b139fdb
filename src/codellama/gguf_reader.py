"""A bounded reader for GGUF files: every count, length and offset is checked against the file before use.

GGUF (llama.cpp's format) is a little-endian header — magic ``GGUF``, version, tensor count, key/value count —
then typed metadata (scalars, strings, arrays), tensor infos (name, dims fastest-first, ggml type, offset
relative to the data section) and, aligned to ``general.alignment`` (default 32), the tensor data.

A hostile file can declare an array of 2^40 entries, a string longer than the file, a tensor at offset 2^64 - 1
or two tensors sharing bytes. So nothing is iterated or allocated from a declared size until that size has been
compared with the bytes that remain, tensor extents are computed from each tensor's type and shape (exact
integers, no wrap-around) and must lie inside the file without overlapping, and numeric arrays stay views of the
memory map rather than becoming Python lists. Reading costs time and memory proportional to the file's header.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config_validation import shown_name
from .errors import CodeLlamaError

# ggml type id -> (name, elements per block, bytes per block), as in ggml.h / the GGUF specification.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
# GGUF metadata value types: id -> (name, numpy dtype for fixed-size ones)
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("UINT8", "<u1"), 1: ("INT8", "<i1"), 2: ("UINT16", "<u2"), 3: ("INT16", "<i2"), 4: ("UINT32", "<u4"),
    5: ("INT32", "<i4"), 6: ("FLOAT32", "<f4"), 7: ("BOOL", "<u1"), 10: ("UINT64", "<u8"), 11: ("INT64", "<i8"),
    12: ("FLOAT64", "<f8"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# Far above real files (a 70B model has 723 tensors and ~30 keys; vocabularies reach ~256k entries), far
# below what would take a machine down when every entry becomes a Python object.
MAX_TENSORS = 65536
MAX_KEYS = 65536
MAX_STRING_BYTES = 16 * 2**20
MAX_STRING_ARRAY = 2**21
MAX_ELEMENTS = 2**50


class _Truncated(Exception):
    pass


@dataclass
class GGUFTensor:
    """One tensor's entry: ``dims`` in GGUF order (fastest first), ``offset`` absolute in the file."""

    name: str
    type_id: int
    dims: tuple[int, ...]
    offset: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The PyTorch shape ([out_features, in_features] for a weight)."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


class Unreadable:
    """A metadata value that could not be decoded (invalid UTF-8 ...): an error only if a loader needs it."""

    def __init__(self, why: str):
        self.why = why

    def __repr__(self) -> str:
        return f"<unreadable: {self.why}>"


@dataclass
class GGUFFile:
    """An opened GGUF file: metadata as Python values (numeric arrays as read-only numpy views), tensors by
    llama.cpp name."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    buffer: Any = field(default=None, repr=False)  # the memory map the tensor data is read from

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def type_name(self, name: str) -> str:
        return self.tensors[name].type_name

    def data(self, name: str) -> np.ndarray:
        """The raw bytes of tensor ``name`` (uint8, a view of the memory map)."""
        t = self.tensors[name]
        return np.frombuffer(self.buffer, dtype=np.uint8, count=t.n_bytes, offset=t.offset)

    def file_type(self) -> str:
        """The dominant stored type of the 2-D weights ("F16", "Q4_K", ...)."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if len(t.dims) == 2:
                counts[t.type_name] = counts.get(t.type_name, 0) + t.n_elements
        return max(counts, key=counts.get) if counts else "F32"


class _Cursor:
    """Sequential little-endian reads that refuse to go past the end of the buffer."""

    def __init__(self, buf: Any, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int) -> int:
        if n < 0 or n > self.size - self.pos:
            raise _Truncated()
        start = self.pos
        self.pos += n
        return start

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8))[0]

    def raw_string(self, what: str) -> bytes:
        n = self.u64()
        if n > self.remaining():
            raise _Truncated()
        if n > MAX_STRING_BYTES:
            raise CodeLlamaError(f"{what}: a string of {n} bytes exceeds the {MAX_STRING_BYTES // 2**20} MiB limit")
        start = self.take(n)
        return bytes(self.buf[start:start + n])


def _decode(raw: bytes) -> str | Unreadable:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Unreadable(f"invalid UTF-8 at byte {e.start}")


def _read_value(cur: _Cursor, kind: int, key: str) -> Any:
    if kind in _SCALARS:
        _, dtype = _SCALARS[kind]
        size = np.dtype(dtype).itemsize
        value = np.frombuffer(cur.buf, dtype=dtype, count=1, offset=cur.take(size))[0].item()
        return bool(value) if kind == _BOOL else value
    if kind == _STRING:
        return _decode(cur.raw_string(f"metadata {key}"))
    if kind == _ARRAY:
        item_kind, count = cur.u32(), cur.u64()
        if item_kind in _SCALARS:
            size = np.dtype(_SCALARS[item_kind][1]).itemsize
            if count * size > cur.remaining():
                raise _Truncated()
            values = np.frombuffer(cur.buf, dtype=_SCALARS[item_kind][1], count=count, offset=cur.take(count * size))
            return values.astype(bool) if item_kind == _BOOL else values
        if item_kind == _STRING:
            # Each string costs at least its 8-byte length: a count the remaining bytes cannot hold is a lie.
            if count * 8 > cur.remaining():
                raise _Truncated()
            if count > MAX_STRING_ARRAY:
                raise CodeLlamaError(f"metadata {key}: array of {count} strings exceeds the limit of "
                                     f"{MAX_STRING_ARRAY}")
            items = [_decode(cur.raw_string(f"metadata {key}")) for _ in range(count)]
            bad = next((s for s in items if isinstance(s, Unreadable)), None)
            return bad if bad is not None else items
        raise CodeLlamaError(f"metadata {key}: arrays of type {item_kind} are not supported")
    raise CodeLlamaError(f"metadata {key}: unknown value type {kind}")


def _fail(path: Path, message: str) -> CodeLlamaError:
    return CodeLlamaError(f"{path}: {message}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Open and validate ``path``; malformed, hostile or truncated files give one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CodeLlamaError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CodeLlamaError(f"{path} is not a GGUF file (bad magic)")
        size = f.seek(0, 2)
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CodeLlamaError(f"cannot map {path}: {type(e).__name__}") from None
    try:
        metadata, tensors = _parse(path, buf, size)
    except _Truncated:
        raise _fail(path, f"truncated GGUF file: the header runs past the end of the file ({size} bytes)") from None
    except CodeLlamaError as e:
        raise _fail(path, str(e)) from None
    return GGUFFile(path=path, metadata=metadata, tensors=tensors, buffer=buf)


def _parse(path: Path, buf: Any, size: int) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    cur = _Cursor(buf, size)
    cur.take(4)  # magic, checked by the caller
    version = cur.u32()
    if version not in SUPPORTED_VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            raise CodeLlamaError("big-endian GGUF files are not supported")
        raise CodeLlamaError(f"GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})")
    n_tensors, n_kv = cur.u64(), cur.u64()
    # Every key/value pair and tensor info takes more than 8 bytes: counts the file cannot hold are refused
    # before the loop, so a claim of 2^60 entries costs nothing.
    if n_tensors > MAX_TENSORS or n_kv > MAX_KEYS:
        raise CodeLlamaError(f"GGUF header claims {n_tensors} tensors and {n_kv} metadata keys "
                             f"(limits {MAX_TENSORS}, {MAX_KEYS})")
    if (n_tensors + n_kv) * 8 > cur.remaining():
        raise _Truncated()
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key_raw = cur.raw_string("metadata key")
        key = _decode(key_raw)
        if isinstance(key, Unreadable):
            raise CodeLlamaError(f"a metadata key is not valid UTF-8 ({key.why})")
        kind = cur.u32()
        value = _read_value(cur, kind, shown_name(key))
        if key in metadata:
            raise CodeLlamaError(f"duplicate metadata key {shown_name(key)}")
        metadata[key] = value

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment < 1 or alignment > 2**20 or alignment & (alignment - 1):
        raise CodeLlamaError(f"general.alignment must be a power of two, got {shown_name(repr(alignment))}")

    infos: list[tuple[str, int, tuple[int, ...], int]] = []
    for _ in range(n_tensors):
        name = _decode(cur.raw_string("tensor name"))
        if isinstance(name, Unreadable):
            raise CodeLlamaError(f"a tensor name is not valid UTF-8 ({name.why})")
        n_dims = cur.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise CodeLlamaError(f"tensor {shown_name(name)} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = tuple(cur.u64() for _ in range(n_dims))
        type_id, offset = cur.u32(), cur.u64()
        infos.append((name, type_id, dims, offset))
    data_start = -(-cur.pos // alignment) * alignment

    tensors: dict[str, GGUFTensor] = {}
    for name, type_id, dims, offset in infos:
        where = f"tensor {shown_name(name)}"
        if name in tensors:
            raise CodeLlamaError(f"duplicate {where}")
        if type_id not in GGML_TYPES:
            from .gguf_quants import SUPPORTED_TYPES
            raise CodeLlamaError(f"unknown GGUF tensor type id {type_id} for {where} "
                                 f"(supported: {', '.join(SUPPORTED_TYPES)})")
        type_name, block, block_bytes = GGML_TYPES[type_id]
        n_elements = 1
        for d in dims:
            n_elements *= d
        if n_elements > MAX_ELEMENTS:
            raise CodeLlamaError(f"{where} claims {n_elements} elements")
        if dims[0] % block:
            raise CodeLlamaError(f"{where}: row length {dims[0]} is not a multiple of the {type_name} block "
                                 f"size {block}")
        if offset % alignment:
            raise CodeLlamaError(f"{where}: data offset {offset} is not a multiple of the alignment {alignment}")
        n_bytes = n_elements // block * block_bytes
        start = data_start + offset  # Python integers: an offset near 2^64 cannot wrap around
        if start + n_bytes > size:
            raise CodeLlamaError(f"truncated GGUF file: {where} ({type_name}, {n_bytes} bytes at offset "
                                 f"{offset}) ends at byte {start + n_bytes} but the file has {size} bytes")
        tensors[name] = GGUFTensor(name, type_id, dims, start, n_bytes)
    # Writers (llama.cpp's and the gguf package's) lay tensors out back to back, each padded to the alignment.
    # A tensor whose declared type or shape disagrees with the bytes written for it therefore runs into its
    # neighbour (too large) or leaves a gap before it (too small): either way its data would be garbage.
    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    position = data_start
    for i, t in enumerate(ordered):
        if t.offset < position:
            raise CodeLlamaError(f"tensor {shown_name(ordered[i - 1].name)} ({ordered[i - 1].type_name}, "
                                 f"{ordered[i - 1].n_bytes} bytes) overlaps tensor {shown_name(t.name)}: "
                                 "the file's tensor table is inconsistent")
        if t.offset != position:
            before = f"tensor {shown_name(ordered[i - 1].name)} ({ordered[i - 1].type_name}, " \
                     f"{ordered[i - 1].n_bytes} bytes)" if i else "the data section's start"
            raise CodeLlamaError(f"{t.offset - position} unaccounted bytes between {before} and tensor "
                                 f"{shown_name(t.name)}: the file's tensor table is inconsistent")
        position = -(-(t.offset + t.n_bytes) // alignment) * alignment
    return metadata, tensors


__all__ = ["GGML_TYPES", "GGUFFile", "GGUFTensor", "Unreadable", "read_gguf"]
