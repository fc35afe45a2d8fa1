"""Verdict: a self-hosted content-safety moderation service. `create_app` builds the Flask app (and its Celery).
See docs/architecture.md for how the parts fit."""

from __future__ import annotations

from flask import Flask

from app import api, console, db, extensions
from app.api import errors, rate_limits, request_context, transactions
from app.config import Settings
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
    app.extensions[extensions.SETTINGS] = settings

    database = db.Database(settings.database_url)
    app.extensions[extensions.DATABASE] = database
    app.extensions[extensions.PROVIDER] = build_provider(settings)
    app.extensions[extensions.CACHE] = build_cache(settings)
    celery_init_app(app, settings, database)

    errors.register_error_handlers(app)
    request_context.init_app(app)
    transactions.init_app(app)
    rate_limits.init_app(app, settings)
    api.init_app(app)
    console.init_app(app)
    return app
