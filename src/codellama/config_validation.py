"""The one gate every model config passes through, whatever file it came from (Meta ``params.json``, HF
``config.json``, our native layout, GGUF metadata, a quantized folder) and however it is built in code.

Hostile or broken files must not reach the model builder: a string where a number belongs, zero heads, a
billion layers or an FFN width of 10^12 would otherwise surface as a raw ``TypeError`` /
``ZeroDivisionError``, a crash at the first forward, or a loader allocating memory without end. So every
hyper-parameter is checked for type and range here, against limits far above any released Llama but far
below what would exhaust a machine, and every message is one short line naming the key and the value.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import CodeLlamaError


@dataclass(frozen=True)
class ConfigLimits:
    """Upper bounds for hyper-parameters. The largest Llama-family models ever released use dim 16384,
    126 layers, 128 heads, an FFN width of 53248 and a 256k vocabulary; these limits leave ample headroom."""

    max_dim: int = 65536
    max_layers: int = 1024
    max_vocab: int = 2**20
    max_ffn: int = 2**20
    max_multiple_of: int = 2**20
    max_seq_len: int = 2**24
    max_ffn_multiplier: float = 16.0
    max_rope_theta: float = 1e12
    # A trillion parameters: 14x the 70B model. Beyond that a config is a typo or an attack, not a Code Llama.
    max_params: int = 10**12


LIMITS = ConfigLimits()
# Config files are a few hundred bytes; anything this large is not a config and must not be read whole.
MAX_CONFIG_FILE_BYTES = 16 * 2**20
MAX_MESSAGE_VALUE_CHARS = 40
MAX_NAME_CHARS = 200


def shown(value: Any, limit: int = MAX_MESSAGE_VALUE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages that must stay one short line."""
    try:
        text = repr(value)
    except Exception:  # a hostile object's __repr__ must not take the error path down with it
        text = f"<{type(value).__name__}>"
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def shown_name(text: Any, limit: int = 80) -> str:
    """A name from a file (a tensor, a key), printable and cut to ``limit`` characters, without quotes."""
    text = text if isinstance(text, str) else repr(text)
    text = "".join(c if c.isprintable() else "?" for c in text[:limit + 1])
    return text if len(text) <= limit else text[:limit - 1] + "…"


def clean_name(value: Any) -> str:
    """A model name safe to print: a string without control characters, at most ``MAX_NAME_CHARS`` long."""
    text = value if isinstance(value, str) else ""
    text = "".join(c if c.isprintable() else "?" for c in text[:MAX_NAME_CHARS])
    return text


def _integer(value: Any, key: str, low: int, high: int) -> int:
    # bool is an int subclass in Python; ``"n_heads": true`` is a broken file, not 1 head.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CodeLlamaError(f"{key} must be an integer, got {shown(value)}")
    value = int(value)
    if not low <= value <= high:
        raise CodeLlamaError(f"{key} = {shown(value)} is out of range ({low}..{high})")
    return value


def _real(value: Any, key: str, low: float, high: float, *, low_inclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CodeLlamaError(f"{key} must be a number, got {shown(value)}")
    try:
        value = float(value)
    except (OverflowError, ValueError):  # an integer too large for a float
        raise CodeLlamaError(f"{key} = {shown(value)} is out of range") from None
    above_low = value >= low if low_inclusive else value > low
    if not (math.isfinite(value) and above_low and value <= high):
        bracket = "[" if low_inclusive else "("
        raise CodeLlamaError(f"{key} = {shown(value)} is out of range ({bracket}{low:g}, {high:g}])")
    return value


def derived_ffn_hidden(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """Llama's FFN width from ``dim``: 8/3 dim, scaled by ``multiplier``, rounded up to ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def check_config_values(values: Mapping[str, Any], keys: Mapping[str, str] | None = None,
                        limits: ConfigLimits = LIMITS) -> dict[str, Any]:
    """Check the ``ModelConfig`` fields in ``values`` and return them normalised (plain ints and floats).

    ``keys`` maps our field names to the names the source file uses (``n_layers`` -> ``num_hidden_layers``),
    so messages name what the user can find in their file."""
    keys = keys or {}

    def key(field: str) -> str:
        return keys.get(field, field)

    out = dict(values)
    out["dim"] = dim = _integer(values["dim"], key("dim"), 1, limits.max_dim)
    out["n_layers"] = _integer(values["n_layers"], key("n_layers"), 1, limits.max_layers)
    out["n_heads"] = n_heads = _integer(values["n_heads"], key("n_heads"), 1, dim)
    kv = values.get("n_kv_heads")
    out["n_kv_heads"] = n_kv = n_heads if kv is None else _integer(kv, key("n_kv_heads"), 1, n_heads)
    out["vocab_size"] = _integer(values["vocab_size"], key("vocab_size"), 1, limits.max_vocab)
    out["multiple_of"] = multiple_of = _integer(values["multiple_of"], key("multiple_of"), 1,
                                                limits.max_multiple_of)
    multiplier = values.get("ffn_dim_multiplier")
    if multiplier is not None:
        multiplier = _real(multiplier, key("ffn_dim_multiplier"), 0.0, limits.max_ffn_multiplier)
    out["ffn_dim_multiplier"] = multiplier
    out["norm_eps"] = _real(values["norm_eps"], key("norm_eps"), 0.0, 1.0)
    out["rope_theta"] = _real(values["rope_theta"], key("rope_theta"), 0.0, limits.max_rope_theta)
    out["max_seq_len"] = _integer(values["max_seq_len"], key("max_seq_len"), 1, limits.max_seq_len)
    hidden = values.get("hidden_dim")
    if hidden is not None:
        hidden = _integer(hidden, key("hidden_dim"), 1, limits.max_ffn)
    out["hidden_dim"] = hidden

    if dim % n_heads:
        raise CodeLlamaError(f"dim {dim} is not divisible by n_heads {n_heads}")
    if n_heads % n_kv:
        raise CodeLlamaError(f"n_heads {n_heads} is not divisible by n_kv_heads {n_kv}")
    if (dim // n_heads) % 2:
        # RoPE rotates pairs of features: an odd head size would fail at the first forward.
        raise CodeLlamaError(f"head size dim / n_heads = {dim // n_heads} must be even for rotary embeddings")
    ffn = hidden if hidden is not None else derived_ffn_hidden(dim, multiple_of, multiplier)
    if not 1 <= ffn <= limits.max_ffn:
        raise CodeLlamaError(f"FFN width {ffn} (from dim, multiple_of and ffn_dim_multiplier) is out of range "
                             f"(1..{limits.max_ffn})")
    params = parameter_count(dim, out["n_layers"], n_heads, n_kv, ffn, out["vocab_size"])
    if params > limits.max_params:
        raise CodeLlamaError(f"the config implies {params:,} parameters, more than the limit of "
                             f"{limits.max_params:,}: not a plausible Code Llama")
    return out


def parameter_count(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn: int, vocab: int) -> int:
    head_dim = dim // n_heads
    attention = dim * n_heads * head_dim * 2 + dim * n_kv_heads * head_dim * 2
    layer = attention + 3 * dim * ffn + 2 * dim
    return 2 * vocab * dim + n_layers * layer + dim


def read_json_object(path: str | Path, what: str | None = None) -> dict[str, Any]:
    """A small JSON file that must hold an object: bounded in size, one-line errors for anything else."""
    path = Path(path)
    what = what or str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_FILE_BYTES + 1)
    except FileNotFoundError:
        raise CodeLlamaError(f"config file not found: {path}") from None
    except OSError as e:
        raise CodeLlamaError(f"cannot read {what}: {e.strerror or type(e).__name__}") from None
    if len(data) > MAX_CONFIG_FILE_BYTES:
        raise CodeLlamaError(f"{what} is larger than {MAX_CONFIG_FILE_BYTES // 2**20} MiB: not a config file")
    try:
        value = json.loads(data)
    except json.JSONDecodeError as e:
        raise CodeLlamaError(f"{what} is not valid JSON: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # Invalid UTF-8, integers of thousands of digits, or nesting deep enough to exhaust the parser.
        raise CodeLlamaError(f"{what} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise CodeLlamaError(f"{what} must hold a JSON object, not a {type(value).__name__}")
    return value


__all__ = ["ConfigLimits", "LIMITS", "check_config_values", "derived_ffn_hidden", "parameter_count",
           "read_json_object", "shown", "shown_name", "clean_name"]
