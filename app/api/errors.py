"""The one error shape of the API, `{"error": {"type", "message", "param", "code"}}`, for every failure: the API's
own `ApiError`s, the use cases' domain errors (mapped to their status here and nowhere else), werkzeug's HTTP
errors, pydantic's validation errors, and anything unexpected (logged with its request id, never a stack trace)."""

from __future__ import annotations

from typing import Any

import structlog
from flask import Flask, Response, jsonify
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import HTTPException

from app.schemas.errors import ErrorDetail, ErrorResponse
from app.use_cases.errors import (
    AuthenticationFailed,
    Conflict,
    DomainError,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    Unavailable,
)

log = structlog.get_logger(__name__)

# What a 503 for an unreachable database tells a client to wait: about a restart's length.
DATABASE_RETRY_AFTER_SECONDS = 5

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    412: "precondition_failed",
    413: "request_too_large",
    414: "invalid_request_error",
    415: "invalid_request_error",
    417: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "api_error",
    501: "invalid_request_error",
    503: "service_unavailable",
}
# Each kind of domain error and the status it is answered with.
_STATUS_BY_DOMAIN_ERROR: tuple[tuple[type[DomainError], int], ...] = (
    (InvalidInput, 400),
    (AuthenticationFailed, 401),
    (NotFound, 404),
    (Conflict, 409),
    (PreconditionFailed, 412),
    (Unavailable, 503),
)


class ApiError(Exception):
    """An answer only HTTP has: a missing scope, the wrong media type, a rate limit, an idempotency key misused."""

    def __init__(
        self, status: int, message: str, *, code: str, param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


def api_error(exc: DomainError) -> ApiError:
    """The HTTP answer to a domain error: its status, and the headers that status calls for."""
    status = next((s for kind, s in _STATUS_BY_DOMAIN_ERROR if isinstance(exc, kind)), 400)
    headers: dict[str, str] = {}
    if isinstance(exc, AuthenticationFailed):
        headers["WWW-Authenticate"] = 'Bearer realm="verdict"'
    if isinstance(exc, Unavailable) and exc.retry_after:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return ApiError(status, exc.message, code=exc.code, param=exc.param, headers=headers)


def error_body(status: int, message: str, *, code: str, param: str | None = None) -> dict[str, Any]:
    """The envelope itself, for an answer made outside Flask too (the HTTP server's own, app/http_server.py)."""
    body = ErrorResponse(error=ErrorDetail(type=_TYPE_BY_STATUS.get(status, "api_error"), message=message,
                                           param=param, code=code))
    return body.model_dump(mode="json")


def error_response(
    status: int, message: str, *, code: str, param: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    response = jsonify(error_body(status, message, code=code, param=param))
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def validation_error_response(exc: ValidationError) -> Response:
    """The first problem pydantic found, naming the field the way a client wrote it (`items[3].input`)."""
    first = exc.errors(include_url=False, include_input=False)[0]
    param = _param_path(first["loc"])
    message = first["msg"]
    if first["type"] == "value_error" and "error" in first.get("ctx", {}):
        message = str(first["ctx"]["error"])
    elif first["type"] == "extra_forbidden":
        message = "Unknown field."
    elif first["type"] == "missing":
        message = "This field is required."
    return error_response(400, f"{param}: {message}" if param else message, code=first["type"], param=param)


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list"}


def _param_path(loc: tuple[int | str, ...]) -> str | None:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _UNION_TAGS or "[" in part:
            # pydantic names union members in the location (`str`, `list[str]`); a client never wrote those.
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or None


def _api_error_response(exc: ApiError) -> Response:
    return error_response(exc.status, exc.message, code=exc.code, param=exc.param, headers=exc.headers)


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ApiError, _api_error_response)
    app.register_error_handler(DomainError, lambda exc: _api_error_response(api_error(exc)))
    app.register_error_handler(ValidationError, validation_error_response)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        messages: dict[int, tuple[str, str]] = {
            404: ("Unknown route.", "unknown_route"),
            405: ("Method not allowed on this route.", "method_not_allowed"),
            413: ("The request body is too large.", "request_too_large"),
        }
        message, code = messages.get(status, (exc.description or exc.name, exc.name.lower().replace(" ", "_")))
        headers: dict[str, Any] = {}
        if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return error_response(status, message, code=code, headers=headers)

    @app.errorhandler(sa_exc.OperationalError)
    @app.errorhandler(sa_exc.InterfaceError)
    def _database_unavailable(exc: sa_exc.DBAPIError) -> Response:
        # The database is away (restarting, unreachable, out of connections): a retryable 503, not a 500 with a
        # stack trace (issue 11 item 3). The driver's message may name the host; it is not logged or sent.
        log.warning("database_unavailable", error_type=type(exc.orig).__name__ if exc.orig else type(exc).__name__)
        return error_response(503, "The database is unavailable; retry shortly.", code="database_unavailable",
                              headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)})

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.error("unhandled_error", error_type=type(exc).__name__, exc_info=exc)
        return error_response(500, "Internal error. Quote the X-Request-ID header when reporting it.",
                              code="internal_error")
