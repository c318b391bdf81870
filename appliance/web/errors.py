"""The one error mapping of the three HTTP surfaces.

``describe`` decides, for any exception, the status, stable code, message, hint and extra
headers (Retry-After for EngineBusy and BlobFetching, Allow for a 405); a renderer per surface
gives it that surface's shape: problem details (RFC 9457) for ``/api/v1``, OpenAI's
``{"error": {...}}`` for ``/v1``, Anthropic's ``{"type": "error", "error": {...}}`` for
``/v1/messages``, Ollama's ``{"error": "..."}`` for ``/api``. A stream whose headers already went
out says its error in the stream instead, through ``error_tail``, the same way for SSE and NDJSON.

Imports: ``appliance.errors`` and the web layer's body parsing only.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from appliance.errors import ApplianceError, BodyTooLarge, Unauthorized
from appliance.web.bodies import InvalidField

__all__ = [
    "ANTHROPIC_HANDLERS",
    "OLLAMA_HANDLERS",
    "OPENAI_HANDLERS",
    "PROBLEM_HANDLERS",
    "PROBLEM_JSON",
    "ErrorInfo",
    "anthropic_body",
    "describe",
    "error_tail",
    "ollama_body",
    "openai_body",
    "problem",
    "problem_body",
]

PROBLEM_JSON = "application/problem+json"
logger = logging.getLogger("appliance.web")
T = TypeVar("T")

# Litestar's own refusals (routing, body size, validation) get stable codes like our errors'.
_HTTP_CODES = {
    400: "invalid_input",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


@dataclass(frozen=True)
class ErrorInfo:
    """What every surface says about one error; only the shape differs."""

    status: int
    code: str
    message: str
    hint: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None  # the body field at fault, where known (OpenAI's errors carry it)
    errors: list[Any] | None = None  # a validation failure's full list

    @property
    def text(self) -> str:
        """Message and hint in one line, for the shapes that have one string only."""
        return f"{self.message} ({self.hint})" if self.hint else self.message


def _http_code(status: int) -> str:
    return _HTTP_CODES.get(status, "internal_error" if status >= 500 else f"http_{status}")


def _validation_detail(exc: ValidationException) -> str:
    """The first problem, with where it is, rather than Litestar's "Validation failed for POST ..."."""
    first = exc.extra[0] if isinstance(exc.extra, list) and exc.extra else None
    if not isinstance(first, dict) or not first.get("message"):
        return exc.detail
    if first.get("key") == "data" and first.get("source") == "body":
        return "missing request body: send a JSON object"  # Litestar says only "'data'"
    where = first.get("key") or "body"
    return f"invalid request: {where}: {first['message']}"


def describe(exc: BaseException, *, where: str) -> ErrorInfo:
    """The one decision: status, code, message, hint and headers for ``exc``. Server faults are
    logged here (``where`` says what was being served), so no surface forgets to."""
    if isinstance(exc, ApplianceError):
        headers = {}
        retry_after = getattr(exc, "retry_after", None)  # EngineBusy, BlobFetching, TooManyAttempts
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = 'Bearer realm="appliance"'
        param = exc.param if isinstance(exc, InvalidField) else None
        return ErrorInfo(exc.status, exc.code, exc.message, exc.hint, headers, param=param)
    if isinstance(exc, HTTPException):
        if exc.status_code >= 500 and exc.status_code != 501:
            logger.error("server error on %s", where, exc_info=exc)
        if isinstance(exc, ValidationException) and exc.extra:
            errors = exc.extra if isinstance(exc.extra, list) else [exc.extra]
            detail = _validation_detail(exc)
        else:
            errors, detail = None, exc.detail
        code = _http_code(exc.status_code)
        return ErrorInfo(exc.status_code, code, detail, headers=dict(exc.headers or {}), errors=errors)
    logger.error("unexpected error on %s", where, exc_info=exc)
    return ErrorInfo(
        500,
        "internal_error",
        f"the appliance failed unexpectedly ({type(exc).__name__})",
        "see the server log; please report it",
    )


# -- the three shapes --------------------------------------------------------------------------


def problem_body(info: ErrorInfo) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": f"urn:appliance:error:{info.code}",
        "title": info.code.replace("_", " "),
        "status": info.status,
        "detail": info.message,
        "code": info.code,
    }
    if info.hint:
        body["hint"] = info.hint
    if info.errors is not None:
        body["errors"] = info.errors
    return body


def openai_body(info: ErrorInfo) -> dict[str, Any]:
    kind = "server_error" if info.status >= 500 else "invalid_request_error"
    return {"error": {"message": info.text, "type": kind, "param": info.param, "code": info.code}}


def ollama_body(info: ErrorInfo) -> dict[str, Any]:
    return {"error": info.text}


# Anthropic's error types by status; its 529 "overloaded" is our 503 with Retry-After.
_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_body(info: ErrorInfo) -> dict[str, Any]:
    fallback = "api_error" if info.status >= 500 else "invalid_request_error"
    kind = _ANTHROPIC_TYPES.get(info.status, fallback)
    return {"type": "error", "error": {"type": kind, "message": info.text}}


def problem(info: ErrorInfo) -> Response[Any]:
    return Response(
        content=problem_body(info), status_code=info.status, media_type=PROBLEM_JSON, headers=info.headers
    )


Handlers = dict[int | type[Exception], Callable[[Request[Any, Any, Any], Any], Response[Any]]]


def _handlers(render: Callable[[ErrorInfo], Response[Any]]) -> Handlers:
    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        if isinstance(exc, RequestEntityTooLarge):  # Litestar's says no limit; ours names it
            limit = request.route_handler.resolve_request_max_body_size()
            exc = BodyTooLarge(limit) if limit else exc
        return render(describe(exc, where=f"{request.method} {request.url.path}"))

    return {ApplianceError: handle, HTTPException: handle, Exception: handle}


PROBLEM_HANDLERS = _handlers(problem)
OPENAI_HANDLERS = _handlers(
    lambda info: Response(openai_body(info), status_code=info.status, headers=info.headers)
)
ANTHROPIC_HANDLERS = _handlers(
    lambda info: Response(anthropic_body(info), status_code=info.status, headers=info.headers)
)
OLLAMA_HANDLERS = _handlers(
    lambda info: Response(ollama_body(info), status_code=info.status, headers=info.headers)
)


# -- streams -----------------------------------------------------------------------------------


async def error_tail(
    items: AsyncIterator[T], render: Callable[[ErrorInfo], T], *, where: str
) -> AsyncIterator[T]:
    """``items`` as they come; an error after the headers went out becomes one last item, the
    only place left to say it. Closing this closes ``items`` (which frees what they hold)."""
    async with aclosing(items) as source:  # type: ignore[type-var]
        try:
            async for item in source:
                yield item
        except Exception as exc:
            yield render(describe(exc, where=where))
