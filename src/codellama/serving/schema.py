"""Reading request bodies so that every bad input gets the 4xx status and error object the OpenAI API would
give, never a 500 (the fields are then checked by the pydantic models of ``openai_models.py`` and
``models.py``); ``SamplingRequest`` is what the endpoints hand the engine.

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


def show(v: Any) -> str:
    """A value for an error message: short (a 4 MiB string or a 4,000-digit integer is not echoed)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**30:
        return f"an integer of {len(str(abs(v)))} digits"
    return _short(repr(v), 60)


# ==== fields ==============================================================================================
def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def refuse_unsupported(body: dict) -> None:
    # Accepted when they ask for nothing (clients send defaults), refused otherwise rather than ignored.
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
    # Whether the client named max_tokens: then a prompt that leaves too little room is a 400 (as OpenAI and
    # vLLM answer), rather than a shorter completion.
    max_tokens_given: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0

    def max_tokens_for(self, room: int) -> int:
        """The tokens to generate after a prompt that leaves ``room`` in the context (no more than asked)."""
        return min(self.max_tokens, room)
