"""Where the server turns exceptions into responses: the one place, so that every failure gets an
OpenAI-style error object (``{"error": {"message", "type", "param", "code"}}``).

- ``APIError`` (raised by the endpoints and request parsing) carries its own status;
- ``CodeLlamaError`` (bad input found by the library) and request validation are 400s
  (``QueueFull`` / ``EngineStopped`` are 503s with ``Retry-After``);
- a client that went away while sending its body is one short log line, no traceback;
- anything else is a bug: one logged traceback and a generic 500 that names no internals. Bad input must
  never get there (the fuzz tests post random bodies and check that it does not).

The catch-all is a plain ASGI middleware rather than a Starlette ``Exception`` handler because Starlette
re-raises after calling such a handler, and uvicorn would log the same traceback a second time."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import CodeLlamaError
from .scheduler import EngineStopped, QueueFull

log = logging.getLogger("codellama.serve")

# The status of the (unsent) answer to a client that hung up, as nginx logs it.
CLIENT_CLOSED_REQUEST = 499

_STATUS_TYPES = {401: ("authentication_error", "invalid_api_key"), 404: ("invalid_request_error", "not_found"),
                 405: ("invalid_request_error", "method_not_allowed"),
                 408: ("invalid_request_error", "request_timeout"), 413: ("invalid_request_error", "body_too_large"),
                 503: ("server_error", "overloaded")}


# Error messages quote the client's own values (a role, a field name): they are cut to this length and
# their control characters escaped, so that every message is one short line whatever was sent.
MAX_MESSAGE_CHARS = 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def one_line(text: str, limit: int) -> str:
    text = _CONTROL.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), str(text))
    return text if len(text) <= limit else text[:limit - 3] + "..."


class APIError(Exception):
    """An error the client caused (or a busy server): becomes an OpenAI-style error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        message, param = one_line(message, MAX_MESSAGE_CHARS), one_line(param, 100) if param is not None else None
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client disconnected before its request was read: there is nobody to answer."""


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def busy_error(exc: CodeLlamaError, retry_after_s: int) -> APIError:
    """The 503 for a full queue or a stopped engine."""
    code = "overloaded" if isinstance(exc, QueueFull) else "unavailable"
    message = f"{exc}; retry after {retry_after_s} s" if isinstance(exc, QueueFull) else str(exc)
    return APIError(503, message, type="server_error", code=code, headers={"Retry-After": str(retry_after_s)})


def install_error_handling(app: FastAPI, retry_after_s: int = 1) -> None:
    """Register the handlers and the catch-all middleware on ``app`` (before any other middleware, so that
    middleware added later, such as the metrics, sees the 500 it sends)."""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(CodeLlamaError)
    async def _library_error(request, exc: CodeLlamaError):
        if isinstance(exc, (QueueFull, EngineStopped)):
            return error_response(busy_error(exc, retry_after_s))
        return error_response(APIError(400, str(exc)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        first = exc.errors()[:1]
        where = ".".join(str(p) for p in first[0].get("loc", ())) if first else None
        message = first[0].get("msg", "invalid request") if first else "invalid request"
        return error_response(APIError(400, f"invalid request: {message}", param=where or None,
                                       code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        type_, code = _STATUS_TYPES.get(exc.status_code, ("invalid_request_error", None))
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                          str(exc.detail))
        return error_response(APIError(exc.status_code, message, type=type_, code=code))

    async def _client_gone(request, exc: Exception):
        log.info("client %s disconnected while sending %s %s", _client(request.scope), request.method,
                 request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # uvicorn drops it: the connection is gone

    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_middleware(_InternalErrorMiddleware)


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


class _InternalErrorMiddleware:
    """Pure ASGI: an exception nothing else handled is a bug; log its traceback once and answer a generic
    500 (or, if the response has started, e.g. mid-stream, end it: the status line is already out)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)
        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("internal error on %s %s", scope.get("method", ""), scope.get("path", ""))
            if not started:
                response = error_response(APIError(500, "internal server error", type="server_error",
                                                   code="internal_error"))
                await response(scope, receive, send)
