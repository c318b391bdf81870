"""One error mapping per surface. ``/api/v1`` answers with problem details (RFC 9457)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from appliance.errors import ApplianceError

__all__ = ["EXCEPTION_HANDLERS", "PROBLEM_JSON", "http_error_code", "problem"]

PROBLEM_JSON = "application/problem+json"
logger = logging.getLogger("appliance.web")


def problem(
    *, status: int, code: str, title: str, detail: str, hint: str = "", **extra: Any
) -> Response[Any]:
    body: dict[str, Any] = {
        "type": f"urn:appliance:error:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if hint:
        body["hint"] = hint
    body.update(extra)
    return Response(content=body, status_code=status, media_type=PROBLEM_JSON)


# Litestar's own refusals (routing, body size, validation) get stable codes like our errors'.
_HTTP_CODES = {
    400: "invalid_input",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def http_error_code(status: int) -> str:
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


def _appliance_error(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    assert isinstance(exc, ApplianceError)
    return problem(
        status=exc.status, code=exc.code, title=exc.code.replace("_", " "), detail=exc.message, hint=exc.hint
    )


def _http_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    assert isinstance(exc, HTTPException)
    if exc.status_code >= 500:
        logger.error("server error on %s %s", request.method, request.url.path, exc_info=exc)
    extra: dict[str, Any] = {}
    detail = exc.detail
    if isinstance(exc, ValidationException) and exc.extra:
        extra["errors"] = exc.extra
        detail = _validation_detail(exc)
    code = http_error_code(exc.status_code)
    response = problem(
        status=exc.status_code, code=code, title=code.replace("_", " "), detail=detail, **extra
    )
    response.headers.update(exc.headers or {})  # 405's Allow, for one
    return response


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(
        status=500,
        code="internal_error",
        title="internal error",
        detail=f"the appliance failed unexpectedly ({type(exc).__name__})",
        hint="see the server log; please report it",
    )


EXCEPTION_HANDLERS: dict[int | type[Exception], Callable[[Request[Any, Any, Any], Any], Response[Any]]] = {
    ApplianceError: _appliance_error,
    HTTPException: _http_error,
    Exception: _unexpected,
}
