"""The Python API: ``codellama.load()`` returns a ``CodeLlama`` holding config, tokenizer and model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from .config import ModelConfig
from .errors import CodeLlamaError
from .model import Transformer
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .generation import Completion

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default"
DEFAULT_INSTRUCT_DIR = Path(__file__).parent / "assets" / "default-instruct"
# The embedded models, loadable by name: the base model (code training + LCFT) and its instruction-tuned version.
BUNDLED_MODELS = {"default": DEFAULT_MODEL_DIR, "default-instruct": DEFAULT_INSTRUCT_DIR}


def resolve_model_path(path: str | Path | None) -> str | Path | None:
    """``"default"`` / ``"default-instruct"`` name an embedded model (unless a path of that name exists)."""
    if isinstance(path, str) and path in BUNDLED_MODELS and not Path(path).exists():
        bundled = BUNDLED_MODELS[path]
        if not (bundled / "params.json").is_file():
            raise CodeLlamaError(f"the embedded model {path!r} is not installed; pass a checkpoint path")
        return bundled
    return path


def _label(path: str | Path) -> str:
    """A loaded model's name when its config has none: the embedded model's name, else the path's last part."""
    return next((n for n, d in BUNDLED_MODELS.items() if Path(path) == d), Path(path).name)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise CodeLlamaError(f"unknown device {device!r} (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CodeLlamaError("device 'cuda' requested but CUDA is not available")
    return device


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        # float32 on CPU: bfloat16 matmuls are slow on CPUs without native support.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CodeLlamaError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    return DTYPES[dtype]


class CodeLlama:
    """A loaded model with its tokenizer. Generation methods live in ``generation.py`` and are bound here."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str = "",
                 kv_cache_dtype: str | None = None, draft: "CodeLlama | None" = None, speculative_k: int = 4):
        if tokenizer.n_words > model.config.vocab_size:
            raise CodeLlamaError(f"tokenizer has {tokenizer.n_words} pieces but the model's vocabulary is "
                                 f"{model.config.vocab_size}: wrong tokenizer for this checkpoint")
        from .generation_admission import resolve_kv_cache_dtype
        resolve_kv_cache_dtype(kv_cache_dtype, model.output.weight.dtype)  # a bad value fails here, not later
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or model.config.name
        # The KV cache's storage for every complete/infill/chat (and a server's engine): None = the model's
        # dtype, "int8" = int8 values with a bfloat16 scale per token and head (about half of bfloat16's bytes).
        self.kv_cache_dtype = None if kv_cache_dtype == "auto" else kv_cache_dtype
        # Speculative decoding (speculative.py): with a draft attached, complete/infill/chat let it propose
        # ``speculative_k`` tokens per target forward; the output is the target's (greedy: token for token).
        from .speculative import check_draft, check_k
        self.speculative_k = check_k(speculative_k)
        if draft is not None:
            check_draft(self, draft)
        self.draft = draft

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.output.weight.dtype

    @torch.inference_mode()
    def logits(self, tokens: Tensor | list[int] | list[list[int]]) -> Tensor:
        """Full-sequence forward: ``[T, V]`` for one sequence, ``[B, T, V]`` for a batch (float32)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if tokens.dim() == 1:
            return self.model(tokens.unsqueeze(0))[0]
        if tokens.dim() != 2:
            raise CodeLlamaError(f"tokens must be 1-D or 2-D, got shape {tuple(tokens.shape)}")
        return self.model(tokens)

    # ---- generation (implemented in generation.py) ------------------------------------------------
    # Every generation method also takes the repetition controls (``repetition_penalty`` 1 = off, as HF and
    # llama.cpp's repeat_penalty; ``presence_penalty`` / ``frequency_penalty`` 0 = off, OpenAI's, in [-2, 2];
    # ``penalty_last_n`` tokens of prompt + completion they look at, 64 as llama.cpp, -1 all as HF, 0 none)
    # and ``max_new_tokens=None`` (up to the end of the context). A prompt that leaves less room than
    # ``max_new_tokens`` raises ``CodeLlamaError`` unless ``shrink_max_new_tokens=True`` (then the completion
    # is cut at the end of the context, finish_reason "length"). The FIM sentinels are never sampled outside
    # infilling (where only ``EOT`` may be).
    def complete(self, prompt: str | list[str], *, max_new_tokens: int | None = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                 logprobs: bool = False, echo: bool = False, stream: bool = False, prefill_chunk: int = 2048,
                 repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 penalty_last_n: int = 64, shrink_max_new_tokens: bool = False,
                 ) -> "Completion | list[Completion] | Iterator[str]":
        """Continue ``prompt`` (greedy unless ``temperature > 0``; below ``sampling.MIN_TEMPERATURE`` is greedy
        too). A list of prompts runs as one batch and returns a list. ``stream=True`` returns an iterator of
        text deltas (its return value is the ``Completion``). ``seed`` is an integer in ``[0, 2**64)``; prompt
        ``i`` of a batch samples with ``(seed + i) mod 2**64``, as it would alone with that seed (the same holds
        for ``infill`` and ``chat``). ``prompt + completion.text == decode(bos + prompt ids + completion.tokens)``.
        An empty prompt raises ``CodeLlamaError``."""
        from .generation import complete
        return complete(self, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        top_k=top_k, seed=seed, stop=stop, logprobs=logprobs, echo=echo, stream=stream,
                        prefill_chunk=prefill_chunk, repetition_penalty=repetition_penalty,
                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                        penalty_last_n=penalty_last_n, shrink_max_new_tokens=shrink_max_new_tokens)

    def infill(self, prefix: str | list[str], suffix: str | list[str], *, suffix_first: bool = False,
               max_new_tokens: int | None = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: int | None = None, stop: list[str] | None = None, logprobs: bool = False,
               echo: bool = False, stream: bool = False, prefill_chunk: int = 2048,
               repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               penalty_last_n: int = 64, shrink_max_new_tokens: bool = False,
               ) -> "Completion | list[Completion] | Iterator[str]":
        """The middle between ``prefix`` and ``suffix`` (PSM; SPM with ``suffix_first``), stopping at EOT.
        ``echo=True`` gives the whole document. Raises ``CodeLlamaError`` if the model has no FIM pieces."""
        from .generation import infill
        return infill(self, prefix, suffix, suffix_first=suffix_first, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                      logprobs=logprobs, echo=echo, stream=stream, prefill_chunk=prefill_chunk,
                      repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                      frequency_penalty=frequency_penalty, penalty_last_n=penalty_last_n,
                      shrink_max_new_tokens=shrink_max_new_tokens)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]], *,
             max_new_tokens: int | None = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop: list[str] | None = None, logprobs: bool = False, echo: bool = False,
             stream: bool = False, prefill_chunk: int = 2048, repetition_penalty: float = 1.0,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0, penalty_last_n: int = 64,
             shrink_max_new_tokens: bool = False) -> "Completion | list[Completion] | Iterator[str]":
        """The assistant's reply to ``messages`` ([{"role", "content"}, ...], ending with the user), or to
        each of a list of dialogs. The format follows the tokenizer (``<step>`` means 70B-Instruct)."""
        from .generation import chat
        return chat(self, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, seed=seed, stop=stop, logprobs=logprobs, echo=echo, stream=stream,
                    prefill_chunk=prefill_chunk, repetition_penalty=repetition_penalty,
                    presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                    penalty_last_n=penalty_last_n, shrink_max_new_tokens=shrink_max_new_tokens)

    def __repr__(self) -> str:
        c = self.config
        return (f"CodeLlama({self.name or 'unnamed'}: {c.num_params() / 1e6:.1f}M params, dim={c.dim}, "
                f"layers={c.n_layers}, heads={c.n_heads}/{c.n_kv_heads}, vocab={c.vocab_size}, "
                f"dtype={self.dtype}, device={self.device})")


def load(path: str | Path | None = None, *, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, tokenizer: str | Path | None = None,
         max_seq_len: int | None = None, quantize: str | None = None, group_size: int = 32,
         kv_cache_dtype: str | None = None, draft: "str | Path | CodeLlama | None" = None,
         speculative_k: int = 4, tensor_parallel: bool = False) -> CodeLlama:
    """Load a checkpoint directory (Meta, native, HF or quantized layout) or a ``.gguf`` file; no path means
    the embedded default model. ``quantize="int8"|"int4"`` quantizes every linear layer weight-only
    (int4 in groups of ``group_size``). ``kv_cache_dtype="int8"`` stores every generation's KV cache as int8
    (None: the model's dtype). ``draft`` (a checkpoint path, loaded on the same device and dtype, or a loaded
    ``CodeLlama``) turns on speculative decoding with ``speculative_k`` proposals per round; it must share
    the target's tokenizer (``CodeLlamaError`` otherwise). ``tensor_parallel=True`` (under ``torchrun``: one
    process a GPU, or gloo ranks on CPU) loads this rank's share of the model (``tensor_parallel.py``); every rank
    then runs the same calls in step, and a Meta download with one shard per rank reads only its own file."""
    from .checkpoint import load_model, load_tokenizer
    from .generation_admission import resolve_kv_cache_dtype
    from .speculative import check_k

    resolve_kv_cache_dtype(kv_cache_dtype, torch.float32)  # a bad value fails before the (slow) load
    check_k(speculative_k)
    if tensor_parallel and (quantize is not None or draft is not None):
        raise CodeLlamaError("tensor parallelism runs float weights without a draft model (drop quantize / draft)")
    if draft is not None and not isinstance(draft, CodeLlama):
        draft_path = resolve_model_path(draft)
        if not Path(draft_path).expanduser().exists():
            raise CodeLlamaError(f"draft model {str(draft)!r} not found")
        draft = load(draft_path, device=device, dtype=dtype)  # its own context: RoPE runs past it

    if tensor_parallel:
        from .tensor_parallel import load_on_ranks
        path = DEFAULT_MODEL_DIR if path is None else resolve_model_path(path)
        model = load_on_ranks(path, device=device, dtype=dtype, max_seq_len=max_seq_len)
        tok = load_tokenizer(path, tokenizer)
        return CodeLlama(model, tok, name=model.config.name or _label(path), kv_cache_dtype=kv_cache_dtype)

    if path is None:
        if not (DEFAULT_MODEL_DIR / "params.json").is_file():
            raise CodeLlamaError("the embedded default model is not installed; pass a checkpoint path")
        path = DEFAULT_MODEL_DIR
    path = resolve_model_path(path)
    dev = resolve_device(device)
    if quantize is not None and str(path).lower().endswith(".gguf"):
        # Re-quantized tensor by tensor as it is decoded: never the whole model in float.
        from .gguf import load_gguf_model
        model = load_gguf_model(Path(path).expanduser(), device=dev, dtype=resolve_dtype(dtype, dev),
                                max_seq_len=max_seq_len, quantize=quantize, group_size=group_size)
    else:
        model = load_model(path, device=dev, dtype=resolve_dtype(dtype, dev), max_seq_len=max_seq_len)
    if quantize is not None and not str(path).lower().endswith(".gguf"):
        from .quantize import is_quantized, quantize_model
        if is_quantized(model):
            raise CodeLlamaError(f"{path} is already quantized; load it without quantize=")
        quantize_model(model, quantize, group_size)
    tok = load_tokenizer(path, tokenizer)
    return CodeLlama(model, tok, name=model.config.name or _label(path), kv_cache_dtype=kv_cache_dtype, draft=draft,
                     speculative_k=speculative_k)
