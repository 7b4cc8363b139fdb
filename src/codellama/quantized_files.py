"""The files of a quantized checkpoint folder (``codellama quantize`` output), read without trusting them:
``quantization.json`` decides which layers get replaced and with what, ``params.json`` the model's size, and the
weights' header must describe exactly the tensors of that quantized model, with our layout's dtypes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from .checkpoint_files import confined_file, read_config_json
from .config import ModelConfig
from .config_validation import read_json_object, shown, shown_name
from .errors import CodeLlamaError
from .safetensors_io import FLOAT_DTYPES, TensorInfo

QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1  # the newest layout this code reads (and ``save_quantized`` writes)
# The activation / embedding dtypes a record may declare: ``getattr(torch, dtype)`` must never reach an
# arbitrary torch attribute.
_STORED_DTYPES = ("float32", "bfloat16", "float16")


def read_record(root: Path) -> dict[str, Any]:
    """quantization.json, checked: the layer list decides which modules get replaced and what gets allocated."""
    path = root / QUANT_FILE
    info = read_json_object(confined_file(root, QUANT_FILE, "quantization record"), str(path))
    version = info.get("format_version", 0)
    if type(version) is not int:
        raise CodeLlamaError(f"{path}: format_version must be an integer, got {shown(version)}")
    if version > FORMAT_VERSION:
        raise CodeLlamaError(f"{root} was written by a newer codellama (quantization format {version}); "
                             "upgrade to load it")
    layers = info.get("layers")
    if not (isinstance(layers, dict) and all(isinstance(v, str) for v in layers.values())):
        raise CodeLlamaError(f"{path} is not a valid quantization record (layers must map module names to "
                             "int8 / int4/gN)")
    dtype = info.get("dtype", "float32")
    if dtype not in _STORED_DTYPES:
        raise CodeLlamaError(f"{path}: dtype {shown(dtype)} is not one of {', '.join(_STORED_DTYPES)}")
    mode, group = info.get("mode", "?"), info.get("group_size")
    if not isinstance(mode, str) or not (group is None or type(group) is int):
        raise CodeLlamaError(f"{path}: mode must be a string and group_size an integer or null")
    return info


def read_config(root: Path) -> ModelConfig:
    return ModelConfig.from_params(read_config_json(root, "params.json"), source=str(root / "params.json"))


def check_stored(root: Path, stored: dict[str, TensorInfo], expected: dict[str, Tensor]) -> None:
    """Names, shapes and dtypes in the weights file against the quantized model, before reading any data."""
    missing, unexpected = set(expected) - set(stored), set(stored) - set(expected)
    if missing or unexpected:
        detail = ", ".join(sorted(missing)[:3]) or ", ".join(shown_name(n) for n in sorted(unexpected)[:3])
        raise CodeLlamaError(f"{root}: quantized weights do not match the model ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected: {detail})")
    for name, info in stored.items():
        want = expected[name]
        if tuple(info.shape) != tuple(want.shape):
            raise CodeLlamaError(f"{root}: tensor {name} has shape {tuple(info.shape)}, expected {tuple(want.shape)}")
        # Float tensors must be floats; the quantized codes must be exactly our layout's integer type.
        wanted = FLOAT_DTYPES if want.is_floating_point() \
            else (str(want.dtype).removeprefix("torch."),)
        if info.dtype not in wanted:
            raise CodeLlamaError(f"{root}: tensor {name} is stored as {info.dtype}, expected {' or '.join(wanted)}")
