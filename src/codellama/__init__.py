"""Code Llama in plain PyTorch: load, run, infill, chat, serve, train and evaluate."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import CodeLlamaError

if TYPE_CHECKING:  # for type checkers and editors; at run time the names below are imported on first use
    from .api import CodeLlama, load
    from .config import ModelConfig
    from .model import KVCache, Transformer
    from .tokenizer import Tokenizer

__all__ = ["CodeLlama", "CodeLlamaError", "KVCache", "ModelConfig", "Tokenizer", "Transformer", "load"]
__version__ = "0.1.0"

# Public name -> the module that defines it. Importing them lazily keeps ``import codellama`` (and so
# ``codellama --help`` / ``--version``) free of torch, which takes over a second to import.
_LAZY = {"CodeLlama": ".api", "load": ".api", "ModelConfig": ".config", "KVCache": ".model",
         "Transformer": ".model", "Tokenizer": ".tokenizer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'codellama' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
