"""Code Llama in plain PyTorch: load, run, infill, chat, serve, train and evaluate."""

from .api import CodeLlama, load
from .config import ModelConfig
from .errors import CodeLlamaError
from .model import KVCache, Transformer
from .tokenizer import Tokenizer

__all__ = ["CodeLlama", "CodeLlamaError", "KVCache", "ModelConfig", "Tokenizer", "Transformer", "load"]
__version__ = "0.1.0"
