"""Pydantic models of the OpenAI request bodies (``/v1/completions``, ``/v1/chat/completions``), strict as the
OpenAI API is: ``"3"`` is not an integer, ``1`` is not a boolean, numbers are finite.

The body is first read by ``schema.read_json`` (strict JSON, depth limit, no lone surrogates); ``models.parse``
validates it here and turns the first error into an OpenAI-style 400 naming the field. Limits that depend on
the server (``n`` at most ``--max-n``, ``max_tokens`` at most the cap) are checked by ``sampling`` below, and
requests this server refuses rather than ignores (``logit_bias``, tools) by ``schema.refuse_unsupported``.
The non-streamed replies are models too (``CompletionResponse``, ``ChatCompletionResponse``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_core import PydanticCustomError

from .errors import APIError
from .models import MAX_STOP_STRINGS, Strict, check_seed
from .schema import SamplingRequest, bad, show


class StreamOptions(Strict):
    include_usage: bool = False


class OpenAISampling(Strict):
    """The generation options both endpoints share (OpenAI's defaults; ``top_k``, ``min_p`` and
    ``repetition_penalty`` are vLLM's extensions)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=-1)  # -1: no limit (llama.cpp's convention)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # -1 or 0: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    seed: int | None = None  # [0, 2**64); -1: random
    stop: list[str] | str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    user: str | None = None

    _seed = field_validator("seed")(check_seed)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str] | str | None) -> list[str]:
        v = [] if v is None else [v] if isinstance(v, str) else v
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings")
        return v

    @property
    def include_usage(self) -> bool:
        """``stream_options.include_usage``: only meaningful when streaming."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(OpenAISampling):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids or a list of
    id lists; ``suffix`` makes it infilling."""

    prompt: Any = Field(None, validate_default=True)
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, prompt: Any) -> list[str | list[int]]:
        return completion_prompts(prompt)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(OpenAISampling):
    """``POST /v1/chat/completions``: text messages only (parts of type ``text`` are joined)."""

    messages: list[ChatMessage] = Field(None, min_length=1, validate_default=True)  # type: ignore[assignment]
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=-1)

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, messages: Any) -> Any:
        if messages is None:
            raise PydanticCustomError("missing", "messages is required")
        return messages

    def chat_messages(self) -> list[dict[str, str]]:
        """The {"role", "content"} dicts ``chat_tokens`` takes (``developer`` is the newer name of ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms, as a list of prompts (a string each, or a list of token ids each)."""
    if prompt is None:
        raise PydanticCustomError("missing", "prompt is required")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise ValueError("prompt must be a string, a list of strings or a list of token ids (non-empty)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def sampling(req: OpenAISampling, *, cap: int, max_n: int, max_tokens: int | None, max_tokens_default: int | None,
             max_tokens_name: str = "max_tokens") -> SamplingRequest:
    """The engine's sampling for a validated request, with the server's limits: ``max_tokens`` at most ``cap``
    (a default beyond it is the cap: the client asked for nothing; -1 is "no limit": the cap), ``n`` at most
    ``max_n``, ``best_of`` only equal to ``n``."""
    given = max_tokens is not None and max_tokens != -1
    if max_tokens == -1:
        max_tokens = cap
    elif max_tokens is None:
        max_tokens = cap if max_tokens_default is None else min(max_tokens_default, cap)
    if max_tokens > cap:
        raise APIError(400, f"{max_tokens_name} is too large: {show(max_tokens)}; this server generates at most "
                       f"{cap} tokens per request", param=max_tokens_name, code="max_tokens_exceeded")
    if req.n > max_n:
        raise bad("n", f"n must be in [1, {max_n}], got {show(req.n)}")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported_parameter")
    return SamplingRequest(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                           top_k=max(0, req.top_k), seed=req.seed, stop=list(req.stop or []), n=req.n,
                           max_tokens_given=given, repetition_penalty=req.repetition_penalty,
                           presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                           min_p=req.min_p)


# ==== replies (non-streamed; stream chunks are the same objects with ``delta``s, built as plain dicts) ====
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: dict | None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
