"""`GET /metrics`: every process's counters and the deployment's gauges in the Prometheus text format, behind
METRICS_TOKEN when one is set. What is counted, and where: app/metrics.py."""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, request

from app import metrics
from app.api.errors import ApiError
from app.api.transactions import request_session, transaction
from app.extensions import current_provider, current_settings
from app.use_cases.status import deployment_status

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
@transaction
def scrape() -> Response:
    settings = current_settings()
    if settings.metrics_token is not None:
        _require_token(settings.metrics_token.get_secret_value())
    session = request_session()
    provider = current_provider()
    shared = settings.shared_redis_url is not None
    text = metrics.scrape(settings.metrics_directory, lambda: deployment_status(
        session, provider, shared=shared, with_audit_heads=settings.metrics_tenant_labels))
    return Response(text, status=200, content_type=metrics.CONTENT_TYPE)


def _require_token(token: str) -> None:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    # Compared in constant time, as bytes: a header may hold any character.
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
        raise ApiError(401, "GET /metrics needs `Authorization: Bearer <METRICS_TOKEN>`.", code="invalid_metrics_token",
                       headers={"WWW-Authenticate": 'Bearer realm="verdict-metrics"'})
