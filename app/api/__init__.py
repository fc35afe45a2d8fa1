"""The HTTP API (v1): thin views that parse, call a use case, and shape the answer."""

from __future__ import annotations

from flask import Flask

from app.api import health, moderations, submissions


def init_app(app: Flask) -> None:
    for module in (health, submissions, moderations):
        app.register_blueprint(module.bp)
