"""Running the app with uvicorn: the server's limits (``ServerConfig``), binding, ``serve`` (the CLI's,
blocking) and ``running_server`` (a loopback server in a thread, for tests and benchmarks).

Connection limits live here because uvicorn enforces them: ``max_connections`` becomes uvicorn's
``limit_concurrency`` (beyond it, new requests get a 503 while the held connections keep working); the body
timeout is enforced by the app itself when it reads a body (see ``schema.read_json``)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..errors import CodeLlamaError

DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_MAX_CONNECTIONS = 512


@dataclass
class ServerConfig:
    """Limits and identity of the server (the engine has its own: batch size, queue, context)."""

    model_name: str = "codellama"
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    max_tokens_cap: int | None = None  # None: the engine's context
    max_n: int = 16
    retry_after_s: int = 1
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # a request body must arrive within this (else 408)
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS  # open connections + requests at once (else 503)
    # The engine's KV cache storage (None: the model's dtype; "int8": about half of bfloat16's bytes). The engine
    # is what allocates the cache: build it with Engine(..., kv_cache_dtype=...) or load(kv_cache_dtype=...),
    # as ``codellama serve --kv-cache-dtype`` does; this field records it and checks the value.
    kv_cache_dtype: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.body_timeout_s, (int, float)) and self.body_timeout_s > 0):
            raise CodeLlamaError(f"body timeout must be > 0 seconds, got {self.body_timeout_s!r}")
        if self.max_connections is not None and (not isinstance(self.max_connections, int)
                                                 or self.max_connections < 1):
            raise CodeLlamaError(f"max connections must be an integer >= 1, got {self.max_connections!r}")
        if self.kv_cache_dtype is not None:
            import torch

            from ..generation_admission import resolve_kv_cache_dtype
            resolve_kv_cache_dtype(self.kv_cache_dtype, torch.float32)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CodeLlamaError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app: Any, log_level: str, graceful_s: int):
    import uvicorn

    config = getattr(app.state, "config", None)
    return uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_s,
                          limit_concurrency=getattr(config, "max_connections", None))


def serve(app: Any, host: str = "127.0.0.1", port: int = 8080, *, log_level: str = "info",
          on_ready: Callable[[str], None] | None = None) -> None:
    """Run ``app`` with uvicorn until interrupted. ``port=0`` picks a free port; ``on_ready`` gets the URL."""
    import uvicorn

    sock = _bind(host, port)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    server = uvicorn.Server(_uvicorn_config(app, log_level, 5))
    if on_ready is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets=sockets)
            on_ready(url)
        server.startup = startup
    server.run(sockets=[sock])


@contextmanager
def running_server(app: Any, host: str = "127.0.0.1", log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread (tests, benchmarks); yields the base URL and shuts
    the server (and the engine, via the lifespan) down on exit."""
    import uvicorn

    sock = _bind(host, 0)
    server = uvicorn.Server(_uvicorn_config(app, log_level, 2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise CodeLlamaError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
