"""Per-request bookkeeping: the request id (the client's, if well-formed, or a new one), timing headers, and one
structured log line per request."""

from __future__ import annotations

import re
import time
import uuid

import structlog
from flask import Flask, Response, g, request

log = structlog.get_logger("verdict.request")

# Anything else (CR/LF, spaces, unicode, over-long) is replaced, so a client cannot inject into headers or logs.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def current_request_id() -> str | None:
    request_id: str | None = g.get("request_id")
    return request_id


def init_app(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        supplied = request.headers.get("X-Request-ID", "")
        g.request_id = supplied if _REQUEST_ID.match(supplied) else f"req_{uuid.uuid4().hex}"
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=g.request_id)

    @app.after_request
    def _finish(response: Response) -> Response:
        elapsed_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        request_id = g.get("request_id") or f"req_{uuid.uuid4().hex}"
        response.headers["X-Request-ID"] = request_id
        response.headers["X-Processing-Time-Ms"] = f"{elapsed_ms:.1f}"
        principal = g.get("principal")
        log.info(
            "request",
            method=request.method,
            route=request.url_rule.rule if request.url_rule else None,
            status=response.status_code,
            latency_ms=round(elapsed_ms, 1),
            tenant_id=principal.tenant_id if principal else None,
            key_id=principal.key_id if principal else None,
        )
        return response
