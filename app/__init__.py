"""Verdict: a self-hosted content-safety moderation service. `create_app` builds the Flask app (and its Celery)."""

from __future__ import annotations

from flask import Flask

from app import api, db, rate_limits, request_context
from app.config import Settings
from app.errors import register_error_handlers
from app.logging import configure_logging
from app.moderation.cache import build_cache
from app.moderation.registry import build_provider
from app.queue import celery_init_app


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings()
    configure_logging(settings)
    settings.ensure_var_dir()

    app = Flask(__name__, static_folder=None)  # Verdict serves no static files (the docs page has its own)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["verdict.settings"] = settings

    database = db.Database(settings.database_url)
    db.init_app(app, database)
    app.extensions["verdict.provider"] = build_provider(settings)
    app.extensions["verdict.cache"] = build_cache(settings)
    celery_init_app(app, settings, database)

    register_error_handlers(app)
    request_context.init_app(app)
    rate_limits.init_app(app, settings)
    api.init_app(app)
    return app
