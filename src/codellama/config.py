"""Model hyper-parameters: the released Code Llama sizes, Meta ``params.json`` and HF ``config.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from .config_validation import check_config_values, clean_name, derived_ffn_hidden, read_json_object, shown
from .errors import CodeLlamaError


@dataclass
class ModelConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None means n_heads (no grouped-query attention)
    vocab_size: int = 32016
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    # Code Llama is trained on 16k sequences and is stable well beyond; callers may raise this at load time,
    # as Meta's reference does with its ``max_seq_len`` build argument.
    max_seq_len: int = 16384
    # Explicit FFN width, for configs (HF, GGUF) that state it rather than derive it.
    hidden_dim: int | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Every construction (files, code, ``dataclasses.replace``) goes through the same checks.
        checked = check_config_values({f.name: getattr(self, f.name) for f in fields(self)})
        for key, value in checked.items():
            setattr(self, key, value)
        self.name = clean_name(self.name)

    @classmethod
    def checked(cls, source: str, values: Mapping[str, Any], keys: Mapping[str, str] | None = None) -> "ModelConfig":
        """A config from values read out of ``source`` (a file name, for messages); ``keys`` maps our field
        names to the source's, so that a refused value is named as the file spells it."""
        defaults = {f.name: f.default for f in fields(cls)}
        try:
            checked = check_config_values(defaults | dict(values), keys)
        except CodeLlamaError as e:
            raise CodeLlamaError(f"{source}: {e}") from None
        return cls(**checked)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        return derived_ffn_hidden(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    # ---- sizes -------------------------------------------------------------------------------------
    def num_params(self) -> int:
        d, hd, h = self.dim, self.head_dim, self.ffn_hidden
        attention = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        layer = attention + 3 * d * h + 2 * d
        return 2 * self.vocab_size * d + self.n_layers * layer + d

    def kv_cache_bytes(self, context: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        per_token = 2 * self.n_layers * self.n_kv_heads * self.head_dim
        return per_token * context * batch * _itemsize(dtype)

    def memory_estimate(self, context: int | None = None, batch: int = 1,
                        dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
        """Bytes for the weights and a KV cache of ``context`` tokens per sequence (activations excluded)."""
        context = self.max_seq_len if context is None else context
        weights = self.num_params() * _itemsize(dtype)
        kv = self.kv_cache_bytes(context, batch, dtype)
        return {"weights": weights, "kv_cache": kv, "total": weights + kv}

    # ---- released checkpoints ---------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        key = _normalise_name(name)
        if key not in RELEASED:
            known = ", ".join(sorted(RELEASED))
            raise CodeLlamaError(f"unknown model name {name!r}; known: {known}")
        return replace(RELEASED[key], name=key)

    # ---- Meta params.json ---------------------------------------------------------------------------
    @classmethod
    def from_params(cls, params: dict[str, Any] | str | Path, *, source: str = "params.json",
                    **overrides: Any) -> "ModelConfig":
        params, source = _mapping_or_file(params, "params", source)
        kwargs = {k: v for k, v in params.items() if k in _PARAMS_KEYS}
        if kwargs.get("vocab_size", -1) in (-1, None):
            kwargs.pop("vocab_size", None)  # Llama 1/2 params.json say -1: the tokenizer decides
        if "rope_theta" not in kwargs:
            kwargs["rope_theta"] = 10_000.0  # Llama 2 params.json has no rope_theta
        kwargs.update(overrides)
        return cls.checked(source, kwargs)

    def to_params(self) -> dict[str, Any]:
        multiple_of, multiplier = self.multiple_of, self.ffn_dim_multiplier
        derived = derived_ffn_hidden(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.hidden_dim is not None and derived != self.hidden_dim:
            # Express an explicit width in params.json terms: rounding up to a multiple of itself is the identity.
            base = int(2 * 4 * self.dim / 3)
            multiple_of = self.hidden_dim
            multiplier = self.hidden_dim / base if self.hidden_dim < base else None
        params: dict[str, Any] = {
            "dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
            "norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "vocab_size": self.vocab_size,
        }
        if self.n_kv_heads != self.n_heads:
            params["n_kv_heads"] = self.n_kv_heads
        if multiplier is None:
            del params["ffn_dim_multiplier"]
        return params

    # ---- HF config.json -----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, config: dict[str, Any] | str | Path, *, source: str = "config.json",
                **overrides: Any) -> "ModelConfig":
        config, source = _mapping_or_file(config, "config", source)

        def fail(message: str) -> CodeLlamaError:
            return CodeLlamaError(f"{source}: {message}")

        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise fail(f"unsupported HF model_type {shown(model_type)}: only 'llama' checkpoints are Code Llama")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            if config.get(key) is None:
                raise fail(f"not a Llama config.json: it lacks {key!r}")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise fail(f"hidden_act {shown(act)} is not supported (Llama uses 'silu')")

        def optional(key: str, default: Any) -> Any:  # an explicit null means "not stated", as in HF
            value = config.get(key)
            return default if value is None else value

        kwargs = dict(
            dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"], n_kv_heads=config.get("num_key_value_heads"),
            vocab_size=config["vocab_size"], norm_eps=optional("rms_norm_eps", 1e-5),
            rope_theta=_hf_rope_theta(config, fail), max_seq_len=optional("max_position_embeddings", 16384),
            hidden_dim=config["intermediate_size"],
        )
        checked = cls.checked(source, kwargs | overrides, _HF_KEYS)  # types and ranges before any arithmetic
        kwargs.update(_params_style_ffn(checked.dim, checked.ffn_hidden))
        kwargs.update(overrides)
        return cls.checked(source, kwargs, _HF_KEYS)

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "intermediate_size": self.ffn_hidden,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
        }

    def _fields(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()}


_PARAMS_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "max_seq_len", "hidden_dim"}
# Our field -> HF config.json key, for messages.
_HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "norm_eps": "rms_norm_eps",
            "rope_theta": "rope_theta", "max_seq_len": "max_position_embeddings", "hidden_dim": "intermediate_size"}


def _params_style_ffn(dim: int, hidden: int) -> dict[str, Any]:
    """Express an HF ``intermediate_size`` the way the released params.json do (Llama's default rounding, or a
    released size's multiplier and multiple_of), so HF -> Meta conversion writes the original params.json;
    other widths stay explicit."""
    candidates = [(c.multiple_of, c.ffn_dim_multiplier) for c in RELEASED.values() if c.dim == dim] + [(256, None)]
    for multiple_of, multiplier in candidates:
        if derived_ffn_hidden(dim, multiple_of, multiplier) == hidden:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier, "hidden_dim": None}
    return {"hidden_dim": hidden}


def _mapping_or_file(value: Mapping[str, Any] | str | Path, what: str,
                     source: str) -> tuple[Mapping[str, Any], str]:
    """A config given as a mapping (named ``source`` in messages) or as a JSON file (named by its path)."""
    if isinstance(value, Mapping):
        return value, source
    if not isinstance(value, (str, Path)):
        raise CodeLlamaError(f"{what} must be a mapping or a path, got {type(value).__name__}")
    return read_json_object(value), str(value)


def _hf_rope_theta(config: Mapping[str, Any], fail) -> Any:
    """θ from ``rope_theta`` or, in transformers 5, ``rope_parameters``; RoPE scaling variants are refused,
    since loading them with plain RoPE would give a model that runs but answers wrongly."""
    theta = config.get("rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        rope = config.get(key)
        if rope is None:
            continue
        if not isinstance(rope, Mapping):
            raise fail(f"{key} must be an object or null, got {shown(rope)}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in (None, "default"):
            raise fail(f"RoPE scaling {shown(kind)} ({key}) is not supported (Code Llama uses none)")
        if theta is None:
            theta = rope.get("rope_theta")
    return 10_000.0 if theta is None else theta


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _normalise_name(name: str) -> str:
    key = name.strip().split("/")[-1]
    key = key.removesuffix("-hf").lower()
    return key


def _released() -> dict[str, ModelConfig]:
    sizes = {
        "7b": dict(dim=4096, n_layers=32, n_heads=32),
        "13b": dict(dim=5120, n_layers=40, n_heads=40),
        "34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.0),
        "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    }
    out: dict[str, ModelConfig] = {}
    for size, shape in sizes.items():
        for variant in ("", "-python", "-instruct"):
            vocab = 32000 if (size == "34b" or variant == "-python") else 32016
            theta, context = 1_000_000.0, 16384
            if size == "70b" and variant:
                theta, context = 10_000.0, 4096
            key = f"codellama-{size}{variant}"
            out[key] = ModelConfig(**shape, vocab_size=vocab, rope_theta=theta, max_seq_len=context, name=key)
    return out


RELEASED = _released()
