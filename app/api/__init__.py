"""The HTTP API (v1): thin views that parse, open their transaction, call a use case, and shape the answer; and the
HTTP-only concerns beside them (the auth gate, idempotency, rate limits, errors, request context, body parsing)."""

from __future__ import annotations

from flask import Flask

from app.api import (
    audit,
    auth,
    data,
    health,
    keys,
    metrics,
    moderations,
    openapi,
    policies,
    reviews,
    submissions,
    webhooks,
)


def init_app(app: Flask) -> None:
    auth.init_app(app)
    for module in (health, metrics, submissions, moderations, audit, data, webhooks, keys, policies, reviews, openapi):
        app.register_blueprint(module.bp)
