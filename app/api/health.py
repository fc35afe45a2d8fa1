"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: the database and the broker answer)."""

from __future__ import annotations

from typing import Any

import structlog
from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from app.api.errors import error_response
from app.extensions import current_celery, current_database
from app.schemas.health import HealthOut, ReadinessOut

bp = Blueprint("health", __name__)
log = structlog.get_logger(__name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify(HealthOut().model_dump(mode="json"))


@bp.get("/readyz")
def readyz() -> Response:
    checks: dict[str, str] = {"database": _check_database(), "broker": _check_broker()}
    failing = [name for name, state in checks.items() if state != "ok"]
    if failing:
        return error_response(503, f"Not ready: {', '.join(failing)} unavailable.", code="not_ready")
    return jsonify(ReadinessOut(checks={name: "ok" for name in checks}).model_dump(mode="json"))


def _check_database() -> str:
    try:
        with current_database().engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        log.warning("readiness_database_failed", error_type=type(exc).__name__)
        return "unavailable"
    return "ok"


def _check_broker() -> str:
    celery_app = current_celery()
    try:
        connection: Any
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        log.warning("readiness_broker_failed", error_type=type(exc).__name__)
        return "unavailable"
    return "ok"
