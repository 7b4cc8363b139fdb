"""Pydantic models of the llama.cpp request bodies (``/completion``, ``/infill``, ``/tokenize``,
``/detokenize``) and of its reply's ``timings``, with llama.cpp's field names and defaults; and what the
OpenAI models (``openai_models.py``) share with them: ``Strict``, ``check_seed`` and ``parse``.

The body is first read by ``schema.read_json`` (strict JSON: no ``NaN``, depth limit, no lone surrogates), then
validated here in strict mode (``"3"`` is not an integer, ``1`` is not a boolean, ``null`` is "not sent"); a
failure becomes the same OpenAI-style 400 as every other bad input (``invalid_value``, or
``missing_required_parameter``; ``param`` the top-level field, the message the exact place). Unknown fields
are ignored, as llama.cpp does (clients send options of newer llama.cpp versions)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo

from ..sampling import SEED_LIMIT
from .errors import APIError
from .schema import show

# llama.cpp's sampler names (``--samplers``): those this server applies, and those it accepts as no-ops
# because their parameters are off unless set (dry, xtc, typ_p, top_n_sigma) or because Code Llama's
# infilling ends at <EOT> without them (infill).
SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature", "infill")
MAX_STOP_STRINGS = 16


class Strict(BaseModel):
    """Strict types; unknown fields ignored (clients send options of newer servers); finite numbers only
    ("1e999" is valid JSON that parses as inf)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def check_seed(cls, v: int | None) -> int | None:
    """``seed``: an integer in [0, 2**64) (choice i samples with seed + i, mod 2**64); -1 or null: random
    (llama.cpp's convention)."""
    if v is None or v == -1:
        return None
    if not 0 <= v < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**64) or -1 for random, got {show(v)}")
    return v


class LlamaCppSampling(Strict):
    """The generation options shared by ``/completion`` and ``/infill`` (llama.cpp defaults)."""

    n_predict: int = Field(-1, ge=-1)  # -1: up to the end of the context
    stream: bool = False
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_k: int = Field(40, ge=-1)  # <= 0: off
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = None  # -1 or null: random
    stop: list[str] | str = Field(default_factory=list)
    repeat_penalty: float = Field(1.0, gt=0.0, le=100.0)
    repeat_last_n: int | None = Field(None, ge=-1)
    penalty_last_n: int | None = Field(None, ge=-1)  # Tabby's name for repeat_last_n
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    samplers: list[str] | str | None = None
    cache_prompt: bool = True
    id_slot: int = Field(-1, ge=-1)
    t_max_prompt_ms: float = Field(-1, ge=-1)  # <= 0: no limit
    t_max_predict_ms: float = Field(-1, ge=-1)
    n_indent: int = Field(0, ge=0)
    response_fields: list[str] | None = None

    _seed = field_validator("seed")(check_seed)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str] | str) -> list[str]:
        v = [v] if isinstance(v, str) else v
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings")
        return v

    @field_validator("samplers")
    @classmethod
    def _samplers(cls, v: list[str] | str | None) -> tuple[str, ...] | None:
        if v is None:
            return None
        # llama.cpp also takes a string of one-letter codes ("kpt"); names are what the clients send.
        names = v.split(";") if isinstance(v, str) else v
        unknown = [n for n in names if n not in SAMPLERS]
        if unknown:
            raise ValueError(f"unknown sampler {unknown[0][:40]!r}; known: {', '.join(SAMPLERS)}")
        return tuple(names)

    @property
    def last_n(self) -> int:
        """The penalty window: ``repeat_last_n`` (llama.cpp's name) before ``penalty_last_n``; default 64."""
        for v in (self.repeat_last_n, self.penalty_last_n):
            if v is not None:
                return v
        return 64


class CompletionBody(LlamaCppSampling):
    """``POST /completion``: ``prompt`` is a string or a list of token ids (llama.cpp also mixes the two)."""

    prompt: str | list[int | str]


class InputExtra(Strict):
    filename: str = ""
    text: str = ""


class InfillBody(LlamaCppSampling):
    """``POST /infill`` (llama.vscode, llama.vim): the text around the cursor, other files as context and the
    text already typed after the prefix (``prompt``)."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InputExtra] = Field(default_factory=list)
    prompt: str = ""


class TokenizeBody(Strict):
    content: str
    add_special: bool = False  # llama.cpp: prepend BOS
    with_pieces: bool = False


class DetokenizeBody(Strict):
    tokens: list[int]


class Timings(BaseModel):
    """llama.cpp's ``timings`` object."""

    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float


Body = TypeVar("Body", bound=BaseModel)

_TYPE_NAMES = {"int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
               "float_type": "a number", "finite_number": "a finite number", "bool_type": "true or false",
               "string_type": "a string", "list_type": "a list", "model_type": "an object", "dict_type": "an object",
               "model_attributes_type": "an object"}


def parse(model: type[Body], body: dict[str, Any]) -> Body:
    """``body`` as ``model``: a field sent as null is a field not sent (its default), as clients send nulls for
    "not set". The first validation error becomes a 400 naming the top-level field, with a one-line message
    naming the exact place (``messages[0].content must be a string, got 3``)."""
    try:
        return model.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        loc = tuple(first.get("loc", ()))
        top = loc[0] if loc and isinstance(loc[0], str) else None
        raise APIError(400, _message(model, first, loc), param=top,
                       code="missing_required_parameter" if first.get("type") == "missing" else "invalid_value") \
            from None


def _message(model: type[BaseModel], error: dict, loc: tuple) -> str:
    path, kind, value = field_path(loc), error.get("type", ""), error.get("input")
    if kind == "missing":  # pydantic's own "Field required", or a validator's "prompt is required"
        message = str(error.get("msg", ""))
        return message if message.endswith(" is required") else f"{path} is required"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and len(loc) == 1:
        return f"{path} must be in {_bounds(model.model_fields[loc[0]])}, got {show(value)}"
    if kind in _TYPE_NAMES:
        return f"{path} must be {_TYPE_NAMES[kind]}, got {show(value)}"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return message if message.startswith(str(loc[0]) if loc else "\0") else f"{path}: {message}"


def _bounds(info: FieldInfo) -> str:
    """A field's range as ``[lo, hi]`` / ``(lo, hi]`` from its constraints."""
    lo, hi, lo_open, hi_open = "-inf", "inf", False, False
    for c in info.metadata:
        for name in ("ge", "gt", "le", "lt"):
            v = getattr(c, name, None)
            if v is not None:
                if name in ("ge", "gt"):
                    lo, lo_open = f"{v:g}" if isinstance(v, float) else str(v), name == "gt"
                else:
                    hi, hi_open = f"{v:g}" if isinstance(v, float) else str(v), name == "lt"
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


_TYPE_PARTS = {"str", "int", "float", "bool", "none", "list", "dict"}


def field_path(loc: tuple) -> str:
    """Pydantic's error location as a path: the union members it names (``list[str]``, ``str``,
    ``TextPart``, ``function-after[...]``) are dropped, field names (lower case) and indices kept."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (isinstance(part, str) and part and part not in _TYPE_PARTS and not part[0].isupper()
              and not any(c in part for c in "[]|-(")):
            out += f".{part}" if out else part
    return out
