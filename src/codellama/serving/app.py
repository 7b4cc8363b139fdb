"""The HTTP app: one router per protocol on top of the continuous-batching engine.

- ``openai_api``: ``/v1/completions`` (``suffix`` = infilling), ``/v1/chat/completions``, ``/v1/models``, also
  without ``/v1`` (as llama.cpp serves them);
- ``llamacpp_api``: llama.cpp's native ``/completion``, ``/infill``, ``/tokenize``, ``/detokenize``, ``/props``,
  ``/slots``, ``/health``, ``/v1/health``, ``/metrics``.

Both share ``core.Serving``: how a request's jobs become engine sequences and how their events come back.
Every request becomes one or more engine ``Sequence``s (``sequences.py``); the handler waits on an asyncio queue
that the engine thread feeds. OpenAI bodies are read and checked by ``schema.py``, llama.cpp bodies by the
pydantic models of ``models.py``; every exception becomes a response in one place, ``errors.py`` (OpenAI-style
error objects, 4xx for bad input, never a 500 with a traceback); ``metrics.py`` counts (``prometheus_client``);
``server.py`` runs it with uvicorn."""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from typing import Any

try:
    import prometheus_client  # noqa: F401  (metrics.py; checked here for the one-line message)
    from fastapi import Depends, FastAPI, Request
except ImportError as e:  # pragma: no cover - depends on the environment
    from ..errors import CodeLlamaError
    raise CodeLlamaError("serving needs fastapi, uvicorn and prometheus_client: pip install 'codellama[serve]'") from e

from .core import Serving
from .errors import APIError, install_error_handling
from .llamacpp_api import llamacpp_router, probes_router
from .metrics import Metrics, MetricsMiddleware
from .openai_api import openai_router
from .scheduler import Engine
from .server import ServerConfig, running_server, serve

__all__ = ["APIError", "ServerConfig", "Serving", "create_app", "running_server", "serve"]


def create_app(llama, *, engine: Engine | None = None, config: ServerConfig | None = None,
               **engine_kwargs: Any) -> FastAPI:
    """The FastAPI app serving ``llama``. The engine (created from ``engine_kwargs`` unless given) starts
    with the app's lifespan and stops with it."""
    config = config or ServerConfig(model_name=llama.name or "codellama")
    if getattr(config, "kv_cache_dtype", None) is not None:
        engine_kwargs.setdefault("kv_cache_dtype", config.kv_cache_dtype)
    engine = engine or Engine(llama, **engine_kwargs)
    serving = Serving(llama=llama, engine=engine, config=config, metrics=Metrics(engine))

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="codellama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.config, app.state.serving = engine, serving.metrics, config, serving
    # Errors first: middleware added later wraps it, so the metrics count the 500s it sends.
    install_error_handling(app, retry_after_s=config.retry_after_s)
    app.add_middleware(MetricsMiddleware, metrics=serving.metrics)

    async def auth(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        # Constant time, on bytes (compare_digest refuses non-ASCII str).
        if not hmac.compare_digest(given.encode("utf-8"), config.api_key.encode("utf-8")):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    guarded = [Depends(auth)]
    app.include_router(openai_router(serving), dependencies=guarded)
    app.include_router(llamacpp_router(serving), dependencies=guarded)
    app.include_router(probes_router(serving))  # health probes need no key
    return app
