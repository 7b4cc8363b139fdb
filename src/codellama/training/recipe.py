"""Training recipes: the ``TrainConfig`` of a run, its validation, and reading it from TOML files.

A recipe is input we did not write (a file from a tutorial, a colleague, the internet), so every value is checked
once, here, for type and range: a bad value is a one-line ``CodeLlamaError`` naming the key and the value, never
a crash deep inside the loop minutes later."""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import CodeLlamaError
from .corpus import CorpusConfig
from .data import DataConfig
from .mixture import MIX_BLOCK

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "default"
MAX_RECIPE_BYTES = 1 << 20  # recipes are a few hundred lines; a bigger file is a mistake, not a recipe
MAX_BASE_DEPTH = 8
# The linear layers of a block LoRA can adapt (model.py names; lora.py maps them to their modules). Spelled out
# here rather than imported, so reading a recipe does not import torch.
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
BASE_DTYPES = ("fp32", "bf16", "int8", "int4")
# Data mixtures: a handful of sources (the paper's have 3 and 4); their names are directory names under data_dir.
MAX_SOURCES = 16
SOURCE_KEYS = ("name", "corpus", "dialogs", "weight", "extensions")
_SOURCE_NAME = re.compile(r"[a-z0-9_-]{1,64}")


@dataclass
class TrainConfig:
    name: str = "run"
    out_dir: str = ""  # default: runs/<name>
    # ---- data
    data_dir: str = ""  # prepared-data cache; default: runs/data/<name>
    corpus: list[str] = field(default_factory=lambda: ["stdlib"])
    tokenizer: str = ""  # existing tokenizer.model; empty: train one with vocab_size pieces
    vocab_size: int = 4096
    seq_len: int = 256
    fim_rate: float = 0.9
    fim_spm_rate: float = 0.5
    doc_chars: int = 1200  # 0: whole files are documents
    data_passes: int = 1
    align_documents: bool = True  # windows start at document starts (see data.py); False: back to back
    # A data mixture (mixture.py): [[sources]] tables of name, corpus, weight and optional extensions; empty: one
    # source, ``corpus`` above (which a mixture ignores)
    sources: list[dict] = field(default_factory=list)
    # ---- model (ignored when init_from is set, except rope_theta and seq_len, which can change a checkpoint's)
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 0  # 0: no grouped-query attention
    multiple_of: int = 32
    ffn_dim_multiplier: float = 0.0  # 0: none
    norm_eps: float = 1e-5
    rope_theta: float = 0.0  # 0: the starting checkpoint's θ (10,000 for a fresh model, Llama 2's)
    init_from: str = ""  # a training run directory or a checkpoint directory to continue from (LCFT)
    # ---- optimisation
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 0.0  # 0: lr / 30, as in the paper
    warmup_steps: int = 100  # 0: no warm-up
    max_steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    # ---- LoRA (training/lora.py): only low-rank adapters train; the export holds the merged weights
    lora_rank: int = 0  # 0: off (full fine-tuning)
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # How the frozen base weights are held under LoRA: fp32, bf16, or our int8 / int4 (quantize.py), QLoRA-style
    base_dtype: str = "fp32"
    # ---- memory
    activation_checkpointing: bool = False  # recompute each transformer block in the backward pass
    # ---- bookkeeping
    eval_interval: int = 100
    eval_batches: int = 20
    ckpt_interval: int = 100
    log_interval: int = 10
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 (bf16 autocast); auto: bf16 where the hardware has it natively
    num_threads: int = 0  # 0: torch's default
    progress: bool = True

    def __post_init__(self) -> None:
        validate(self)
        if self.init_from == "default":  # the embedded model (what tiny-instruct fine-tunes)
            self.init_from = str(DEFAULT_MODEL_DIR)
        self.out_dir = self.out_dir or f"runs/{self.name}"
        self.data_dir = self.data_dir or f"runs/data/{self.name}"

    @property
    def final_lr(self) -> float:
        return self.min_lr or self.lr / 30

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def data_config(self) -> DataConfig:
        return DataConfig(corpus=CorpusConfig(roots=list(self.corpus)), tokenizer=self.tokenizer,
                          vocab_size=self.vocab_size, fim_rate=self.fim_rate, fim_spm_rate=self.fim_spm_rate,
                          doc_chars=self.doc_chars, passes=self.data_passes, seed=self.seed)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                           n_kv_heads=self.n_kv_heads or None, vocab_size=vocab_size, multiple_of=self.multiple_of,
                           ffn_dim_multiplier=self.ffn_dim_multiplier or None, norm_eps=self.norm_eps,
                           rope_theta=self.rope_theta or 10_000.0, max_seq_len=self.seq_len, name=self.name)


# ---- validation --------------------------------------------------------------------------------------------
# Sizes far beyond any run this trainer can do, small enough for the 32-bit integers torch and numpy take.
MAX_SIZE = 2**31 - 1
# 256 byte pieces (byte fallback) + unk, bos, eos + the 4 FIM pieces: the smallest vocabulary a tokenizer can have.
MIN_VOCAB = 263

_AT_LEAST_ONE = ("seq_len", "data_passes", "dim", "n_layers", "n_heads", "multiple_of", "batch_size",
                 "grad_accum", "max_steps", "eval_interval", "eval_batches", "ckpt_interval", "log_interval")
_AT_LEAST_ZERO = ("doc_chars", "n_kv_heads", "warmup_steps", "num_threads", "lora_rank")
_POSITIVE = ("lr", "norm_eps", "lora_alpha")
_NON_NEGATIVE = ("min_lr", "ffn_dim_multiplier", "weight_decay", "grad_clip", "rope_theta")
_UNIT_INTERVAL = ("fim_rate", "fim_spm_rate")  # [0, 1]
_BETAS = ("beta1", "beta2")  # [0, 1): beta = 1 never forgets, Adam's moments then stop tracking the gradient
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,4})?")


def _bad(key: str, requirement: str, value: Any) -> CodeLlamaError:
    return CodeLlamaError(f"recipe: {key} must be {requirement}, got {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."  # one readable line, whatever was pasted in


def _check_type(config: TrainConfig, kind: str, key: str) -> None:
    """Types as TOML gives them: an integer where a float is asked is fine (``lr = 1``) and becomes a float."""
    value = getattr(config, key)
    if kind == "bool":
        if not isinstance(value, bool):
            raise _bad(key, "true or false", value)
    elif kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(key, "an integer", value)
        if value > MAX_SIZE and key != "seed":  # too small is each key's own range check, below
            raise _bad(key, f"at most {MAX_SIZE}", value)
    elif kind == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _bad(key, "a number", value)
        if (isinstance(value, int) and abs(value) > 1e300) or not math.isfinite(value):  # float() of 10**400 fails
            raise _bad(key, "a finite number", value)
        setattr(config, key, float(value))
    elif kind == "str":
        if not isinstance(value, str):
            raise _bad(key, "a string", value)
        if "\0" in value:
            raise _bad(key, "a string without NUL characters", value)
    elif kind == "list[str]":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v and "\0" not in v
                                                                for v in value):
            raise _bad(key, 'a non-empty list of non-empty strings (e.g. ["stdlib", "path/to/dir"])', value)
    elif kind == "list[dict]":
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise _bad(key, "a list of tables ([[sources]] entries)", value)
    else:  # a new field with a new type: make whoever adds it decide how it is checked
        raise AssertionError(f"TrainConfig.{key}: no validation for type {kind}")


def validate(config: TrainConfig) -> None:
    """Check every field of ``config`` (types first, then ranges); raise on the first bad one."""
    for f in fields(config):
        _check_type(config, str(f.type), f.name)
    c = config
    if not c.name or c.name in (".", "..") or "/" in c.name or "\\" in c.name:
        raise _bad("name", "a non-empty name without path separators (out_dir says where the run goes)", c.name)
    for key in _AT_LEAST_ONE:
        if getattr(c, key) < 1:
            raise _bad(key, "an integer >= 1", getattr(c, key))
    for key in _AT_LEAST_ZERO:
        if getattr(c, key) < 0:
            raise _bad(key, "an integer >= 0", getattr(c, key))
    if not MIN_VOCAB <= c.vocab_size:
        raise _bad("vocab_size", f"at least {MIN_VOCAB} (256 byte pieces + 7 special pieces)", c.vocab_size)
    if not 0 <= c.seed <= 2**63 - 1:
        raise _bad("seed", "an integer in [0, 2**63)", c.seed)
    for key in _POSITIVE:
        if getattr(c, key) <= 0:
            raise _bad(key, "a number > 0", getattr(c, key))
    for key in _NON_NEGATIVE:
        if getattr(c, key) < 0:
            raise _bad(key, "a number >= 0 (0 disables it)" if key == "grad_clip" else "a number >= 0",
                       getattr(c, key))
    for key in _UNIT_INTERVAL:
        if not 0 <= getattr(c, key) <= 1:
            raise _bad(key, "in [0, 1]", getattr(c, key))
    for key in _BETAS:
        if not 0 <= getattr(c, key) < 1:
            raise _bad(key, "in [0, 1)", getattr(c, key))
    if c.min_lr > c.lr:
        raise _bad("min_lr", f"at most lr ({c.lr}): the schedule decays from lr to min_lr", c.min_lr)
    if c.dim % c.n_heads or (c.dim // c.n_heads) % 2:
        raise _bad("dim", f"a multiple of 2 * n_heads ({2 * c.n_heads}: rotary embeddings turn pairs)", c.dim)
    if c.n_kv_heads and c.n_heads % c.n_kv_heads:
        raise _bad("n_kv_heads", f"0 or a divisor of n_heads ({c.n_heads})", c.n_kv_heads)
    if not 0 <= c.lora_dropout < 1:
        raise _bad("lora_dropout", "in [0, 1)", c.lora_dropout)
    unknown = [t for t in c.lora_targets if t not in LORA_TARGETS]
    if unknown or len(set(c.lora_targets)) != len(c.lora_targets):
        raise _bad("lora_targets", f"distinct names among {', '.join(LORA_TARGETS)}", c.lora_targets)
    if c.base_dtype not in BASE_DTYPES:
        raise _bad("base_dtype", ", ".join(BASE_DTYPES), c.base_dtype)
    if c.base_dtype != "fp32" and not c.lora_rank:
        raise _bad("base_dtype", "fp32 unless LoRA is on (lora_rank > 0): full fine-tuning trains float32 "
                   "master weights", c.base_dtype)
    _check_sources(c.sources)
    if c.precision not in ("auto", "fp32", "bf16"):
        raise _bad("precision", "auto, fp32 or bf16", c.precision)
    if not _DEVICE.fullmatch(c.device):
        raise _bad("device", "auto, cpu, cuda, cuda:N or mps", c.device)


def _check_sources(sources: list[dict]) -> None:
    """Each ``[[sources]]`` entry: a unique name (a directory under data_dir), corpus roots, a weight > 0 (the
    weights are normalised to sum to 1) and optionally the file extensions to collect."""
    if len(sources) > MAX_SOURCES:
        raise _bad("sources", f"at most {MAX_SOURCES} entries", f"{len(sources)} entries")
    names: set[str] = set()
    for i, source in enumerate(sources):
        at = f"sources[{i}]"
        unknown = sorted(set(source) - set(SOURCE_KEYS))
        if unknown:
            raise _bad(f"{at}.{unknown[0]}", f"absent: a source has only the keys {', '.join(SOURCE_KEYS)}",
                       source[unknown[0]])
        for key in ("name", "weight"):
            if key not in source:
                raise CodeLlamaError(f"recipe: {at}.{key} is missing (every source has a name, a corpus or "
                                     "dialogs, and a weight)")
        if ("corpus" in source) == ("dialogs" in source):
            raise CodeLlamaError(f"recipe: {at} needs exactly one of corpus (text and code to collect) or dialogs "
                                 "(instruction JSONL files)")
        name = source["name"]
        if not isinstance(name, str) or not _SOURCE_NAME.fullmatch(name):
            raise _bad(f"{at}.name", "1-64 characters of a-z, 0-9, _ and -", name)
        if name in names:
            raise _bad(f"{at}.name", "unique among the sources", name)
        names.add(name)
        key = "corpus" if "corpus" in source else "dialogs"
        roots = source[key]
        if not isinstance(roots, list) or not roots or not all(isinstance(v, str) and v and "\0" not in v
                                                                for v in roots):
            example = '["stdlib", "path/to/dir"]' if key == "corpus" else '["instruct:mbpp-train", "my.jsonl"]'
            raise _bad(f"{at}.{key}", f"a non-empty list of non-empty strings (e.g. {example})", roots)
        weight = source["weight"]
        if (not isinstance(weight, (int, float)) or isinstance(weight, bool)
                or (isinstance(weight, int) and abs(weight) > 1e300) or not math.isfinite(weight) or weight <= 0):
            raise _bad(f"{at}.weight", "a finite number > 0", weight)
        extensions = source.get("extensions", [".py"])
        if (not isinstance(extensions, list) or not extensions
                or not all(isinstance(e, str) and re.fullmatch(r"(\.[A-Za-z0-9_+-]{1,16})?", e) for e in extensions)):
            raise _bad(f"{at}.extensions", 'a non-empty list of file suffixes (e.g. [".py"]; "" for none)',
                       extensions)
    # A block of the mixed stream holds each source's share of its MIX_BLOCK positions (mixture.py): a share
    # below one position a block would never be drawn.
    total = math.fsum(float(s["weight"]) for s in sources)
    for i, source in enumerate(sources):
        if source["weight"] / total < 1 / MIX_BLOCK:
            raise _bad(f"sources[{i}].weight", f"at least 1/{MIX_BLOCK} of the weights' sum ({total:g})",
                       source["weight"])


# ---- recipes -----------------------------------------------------------------------------------------------
_FIELD_NAMES = frozenset(f.name for f in fields(TrainConfig))


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file path, or the name of a bundled recipe (``tiny-pretrain``)."""
    path = Path(name_or_path)
    candidates = [path, RECIPES_DIR / f"{name_or_path}.toml", RECIPES_DIR / str(name_or_path)]
    for candidate in candidates:
        try:
            if candidate.is_file():
                return candidate
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a file either
            continue
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
    shown = str(name_or_path) if str(name_or_path).isprintable() else _show(str(name_or_path))
    raise CodeLlamaError(f"recipe not found: {shown[:200]} (a .toml path or one of: {known})")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise CodeLlamaError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise CodeLlamaError(f"{path}: a recipe is at most {MAX_RECIPE_BYTES} bytes; this file is larger")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CodeLlamaError(f"{path}: invalid TOML: the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise CodeLlamaError(f"{path}: invalid TOML: {e}") from None


def _recipe_keys(path: Path, depth: int = 0) -> dict[str, Any]:
    """The flat keys of a recipe file, on top of those of its ``base`` recipe (if it names one)."""
    raw = _read_toml(path)
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        # A table is a section, unless it is named after a field: then it is that field's (wrong) value.
        items = value.items() if isinstance(value, dict) and key not in _FIELD_NAMES else [(key, value)]
        for k, v in items:
            if k in flat:
                raise CodeLlamaError(f"{path}: key {k!r} given twice")
            flat[k] = v
    _resolve_file_relative_paths(path, flat)
    base = flat.pop("base", None)
    if base is None:
        return flat
    if not isinstance(base, str) or not base or "\0" in base:
        raise CodeLlamaError(f"{path}: base must be a recipe name or path (a string), got {_show(base)}")
    if depth >= MAX_BASE_DEPTH:
        raise CodeLlamaError(f"{path}: recipe bases nest more than {MAX_BASE_DEPTH} deep (a cycle?)")
    beside = path.parent / base
    try:
        base_path = beside if beside.is_file() else find_recipe(base)
    except (OSError, ValueError):
        base_path = find_recipe(base)
    inherited = _recipe_keys(base_path, depth + 1)
    return {**inherited, **flat}


# Inputs and caches a recipe names by path: a relative one is relative to the recipe file that names it (as
# ``base`` is), so a run does not depend on the directory it was started from. The bundled recipes are the
# exception: the package directory is no workspace, so their paths (``runs/data/...``) stay relative to the
# current directory, like ``out_dir`` (an output, as ``--out-dir`` on the command line) in every recipe.
_FILE_RELATIVE_KEYS = ("data_dir", "tokenizer")


def _resolve_file_relative_paths(path: Path, keys: dict[str, Any]) -> None:
    try:
        bundled = path.resolve().parent == RECIPES_DIR
    except (OSError, RuntimeError):
        bundled = False
    if bundled:
        return

    def beside(value: Any) -> Any:
        if isinstance(value, str) and value and "\0" not in value and ":" not in value \
                and not Path(value).expanduser().is_absolute():
            return str(path.parent / value)
        return value

    for key in _FILE_RELATIVE_KEYS:
        if isinstance(keys.get(key), str) and ":" not in keys[key]:
            keys[key] = beside(keys[key])
    sources = keys.get("sources")
    for source in sources if isinstance(sources, list) else []:  # dialog files too ("instruct:NAME": bundled)
        if isinstance(source, dict) and isinstance(source.get("dialogs"), list):
            source["dialogs"] = [beside(v) for v in source["dialogs"]]


def load_recipe(name_or_path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a TOML recipe. Sections (``[data]``, ``[model]``, ``[optim]``, ``[run]``) are for the reader only:
    keys are the ``TrainConfig`` fields and must be unique across them. ``base = "other-recipe"`` starts from the
    keys of another recipe (a path beside this one or a bundled name), which this one's keys override — how a
    later stage shares an earlier stage's data settings without repeating them. A relative ``data_dir`` or
    ``tokenizer`` is relative to the recipe file that sets it (bundled recipes: to the current directory);
    ``out_dir`` is relative to the current directory."""
    path = find_recipe(name_or_path)
    flat = _recipe_keys(path)
    unknown = sorted(set(flat) - _FIELD_NAMES)
    if unknown:
        names = ", ".join(k if k.isidentifier() else repr(k) for k in unknown)  # a quoted key may hold a newline
        raise CodeLlamaError(f"{path}: unknown recipe keys: {names if len(names) <= 200 else names[:197] + '...'}")
    flat.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**flat)
    except TypeError as e:  # an override that is not a field (a caller's bug, not the recipe's)
        raise CodeLlamaError(f"{path}: {e}") from None
    except CodeLlamaError as e:
        raise CodeLlamaError(f"{path}: {str(e).removeprefix('recipe: ')}") from None
