"""Reading and checking request bodies, by hand, so that every bad input gets the 4xx status and error object
the OpenAI API would give, never a 500.

What a body may be: strict JSON (no ``NaN`` / ``Infinity``), an object, nested at most ``MAX_JSON_DEPTH``
deep, with no lone UTF-16 surrogate (``"\\ud800"``) in any string or key — such text cannot be encoded as
UTF-8, so it could neither be tokenized nor echoed; it is refused with a 400 naming the field. It must
arrive within the body timeout (else 408) and be at most the size limit (else 413)."""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from ..sampling import SEED_LIMIT
from .errors import APIError, ClientGone

# Real requests nest a handful of levels (messages -> content parts -> text); refusing deeper bodies up front
# keeps every later walk over them cheap and far from Python's recursion limit.
MAX_JSON_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


# ==== the body ==========================================================================================
async def read_json(request: Request, limit: int, timeout_s: float | None = None) -> dict:
    """The JSON object in the body; 413 beyond ``limit`` bytes (checked before and while reading), 408 if
    it takes longer than ``timeout_s`` to arrive, 400 if it is not a clean JSON object. A client that
    hangs up mid-body raises ``ClientGone``."""
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and (len(length) > 18 or int(length) > limit):
        raise APIError(413, f"request body is {length[:20]} bytes; the limit is {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    try:
        # One deadline for the whole body: a client trickling a byte at a time must not hold its connection
        # (and a --max-connections slot) for ever.
        async with asyncio.timeout(timeout_s if timeout_s is not None and math.isfinite(timeout_s) else None):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ClientGone() from None
    body = parse_json(b"".join(chunks))
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """Strict JSON, checked for depth and lone surrogates (see the module docstring)."""
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise APIError(400, f"the body is nested more than {MAX_JSON_DEPTH} levels deep",
                       code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {_short(str(e), 200)}", code="invalid_json") from None
    _check_tree(body)
    return body


def _check_tree(body: Any) -> None:
    # Iterative, so that the depth check itself cannot recurse too deep.
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the body is nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json")
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise _surrogate(path or "body")
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                if _SURROGATE.search(key):
                    raise _surrogate(f"{path or 'body'} (a key)")
                stack.append((item, where, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _surrogate(param: str) -> APIError:
    param = _short(param, 80)
    return APIError(400, f"{param} contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not valid Unicode "
                    "text", param=param, code="invalid_value")


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _show(v: Any) -> str:
    """A value for an error message: short (a 4 MiB string or a 4,000-digit integer is not echoed)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**30:
        return f"an integer of {len(str(abs(v)))} digits"
    return _short(repr(v), 60)


# ==== fields ==============================================================================================
def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_field(body: dict, name: str, default: int | None, lo: int | None = None,
              hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if not is_int(v):
        raise bad(name, f"{name} must be an integer, got {_show(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(name, f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {_show(v)}")
    return v


def number_field(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or (is_int(v) and abs(v) > 2**53) \
            or not math.isfinite(v):
        raise bad(name, f"{name} must be a number, got {_show(v)}")
    if v > hi or v < lo or (lo_open and v == lo):
        raise bad(name, f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {_show(v)}")
    return float(v)


def bool_field(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"{name} must be true or false, got {_show(v)}")
    return v


def str_field(body: dict, name: str, default: str | None) -> str | None:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise bad(name, f"{name} must be a string, got {type(v).__name__}")
    return v


def stop_field(body: dict, name: str = "stop") -> list[str]:
    v = body.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and len(v) <= 16 and all(isinstance(s, str) for s in v):
        return v
    raise bad(name, f"{name} must be a string or a list of at most 16 strings")


def seed_field(body: dict) -> int | None:
    """``seed``: an integer in [0, 2**64) (choice i samples with seed + i, mod 2**64); -1 or null: random
    (llama.cpp's convention)."""
    seed = body.get("seed")
    if seed is None or (is_int(seed) and seed == -1):
        return None
    if not is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise bad("seed", f"seed must be an integer in [0, 2**64) or -1 for random, got {_show(seed)}")
    return seed


def include_usage(body: dict, stream: bool) -> bool:
    """``stream_options.include_usage``: only meaningful when streaming; ``stream_options`` must be an
    object (or null)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad("stream_options", f"stream_options must be an object, got {type(options).__name__}")
    return bool_field(options, "include_usage") and stream


def refuse_unsupported(body: dict) -> None:
    # Accepted when they ask for nothing (clients send defaults), refused otherwise rather than ignored.
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    if body.get("logit_bias") not in (None, {}):
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias",
                       code="unsupported_parameter")
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "tools / function calling is not supported by this server", param="tools",
                       code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt not in (None, {}) and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise APIError(400, "only response_format type 'text' is supported", param="response_format",
                       code="unsupported_parameter")


@dataclass
class SamplingRequest:
    """The generation parameters of one request, checked."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    n: int


def sampling_request(body: dict, *, cap: int, max_n: int, max_tokens_default: int | None,
                     temperature_default: float = 1.0, top_p_default: float = 1.0, top_k_default: int = 0,
                     max_tokens_name: str = "max_tokens") -> SamplingRequest:
    """The sampling fields of ``body``; ``max_tokens`` may not exceed ``cap`` (its default is at most ``cap``)."""
    refuse_unsupported(body)
    max_tokens = int_field(body, max_tokens_name, None, lo=0)
    if max_tokens is None:  # a default beyond the server's cap is the cap: the client asked for nothing
        max_tokens = cap if max_tokens_default is None else min(max_tokens_default, cap)
    if max_tokens > cap:
        raise APIError(400, f"{max_tokens_name} is too large: {_show(max_tokens)}; this server generates at most "
                       f"{cap} tokens per request", param=max_tokens_name, code="max_tokens_exceeded")
    n = int_field(body, "n", 1, lo=1, hi=max_n)
    best_of = int_field(body, "best_of", None, lo=1)
    if best_of is not None and best_of != n:
        raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported_parameter")
    top_k = int_field(body, "top_k", top_k_default, lo=-1)  # -1: off (vLLM), as 0
    return SamplingRequest(max_tokens=max_tokens,
                           temperature=number_field(body, "temperature", temperature_default, 0.0, 2.0),
                           top_p=number_field(body, "top_p", top_p_default, 0.0, 1.0, lo_open=True),
                           top_k=max(0, top_k), seed=seed_field(body), stop=stop_field(body), n=n)


# ==== prompts ==============================================================================================
def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, a list of id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings or a list of token ids (non-empty)",
                   param="prompt", code="invalid_value" if prompt is not None else "missing_required_parameter")


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI messages → the {"role", "content"} dicts ``chat_tokens`` takes (text parts joined;
    ``developer`` is the newer name of ``system``)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages",
                       code="invalid_value" if messages is not None else "missing_required_parameter")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad("messages", f"messages[{i}] must be an object with a role")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad("messages", f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad("messages", f"messages[{i}].content must be a string or a list of text parts")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def infill_extra(extra: Any) -> list[dict]:
    """llama.cpp's ``input_extra``: a list of {"filename": str, "text": str} (other files as context)."""
    extra = extra or []
    if not isinstance(extra, list) or not all(isinstance(c, dict) and isinstance(c.get("text", ""), str)
                                              and isinstance(c.get("filename", ""), str) for c in extra):
        raise bad("input_extra", "input_extra must be a list of {\"filename\": str, \"text\": str}")
    return extra
