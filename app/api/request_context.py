"""Per-request bookkeeping: the request id (the client's, if well-formed, or a new one), timing headers, and one
structured log line per request."""

from __future__ import annotations

import re
import time
import uuid

import structlog
from flask import Flask, Response, g, request

from app import metrics

log = structlog.get_logger("verdict.request")

# Anything else (CR/LF, spaces, unicode, over-long) is replaced, so a client cannot inject into headers or logs.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# The metrics' `method` label: any other token a client sends is `other`, so it cannot add series.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The `route` label of a request that matched no route (a 404 for an unknown URL is never its own series).
UNMATCHED = "unmatched"


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
        route = request.url_rule.rule if request.url_rule else None
        labels = (request.method if request.method in _METHODS else "other", route or UNMATCHED,
                  str(response.status_code))
        metrics.HTTP_REQUESTS.labels(*labels).inc()
        metrics.HTTP_LATENCY.labels(*labels).observe(elapsed_ms / 1000)
        log.info(
            "request",
            method=request.method,
            route=route,
            status=response.status_code,
            latency_ms=round(elapsed_ms, 1),
            tenant_id=principal.tenant_id if principal else None,
            key_id=principal.key_id if principal else None,
        )
        return response
