"""The HTTP API (v1): thin views that parse, call a use case, and shape the answer."""

from __future__ import annotations

from flask import Flask

from app.api import audit, data, health, keys, moderations, openapi, submissions, webhooks


def init_app(app: Flask) -> None:
    for module in (health, submissions, moderations, audit, data, webhooks, keys, openapi):
        app.register_blueprint(module.bp)
