"""Verdict: a self-hosted content-safety moderation service. `create_app` builds the Flask app (and its Celery).
See docs/architecture.md for how the parts fit."""

from __future__ import annotations

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from app import db, extensions, metrics, secrets_at_rest
from app.config import Settings
from app.logging import configure_logging
from app.moderation.cache import build_cache
from app.moderation.registry import build_provider
from app.queue import celery_init_app


def create_app(settings: Settings | None = None, *, server_threads: int | None = None, http: bool = True) -> Flask:
    """The app; `server_threads` is the request threads of the server that runs it, when it says (`verdict api`).
    `http=False` (a Celery worker, which serves no requests): the routes, request hooks and console, and the
    libraries only they use, are not loaded (issue 15 item 4)."""
    settings = settings or Settings()
    configure_logging(settings)
    settings.ensure_var_dir()
    metrics.configure(tenant_labels=settings.metrics_tenant_labels)

    app = Flask(__name__, static_folder=None)  # Verdict serves no static files (the docs page has its own)
    if settings.trusted_proxy_count:
        # The client's address and scheme as the trusted proxies saw them (werkzeug reads the last N hops only).
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.trusted_proxy_count, x_proto=settings.trusted_proxy_count)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[extensions.SETTINGS] = settings

    # Webhook secrets are encrypted at rest; every process that reads or writes them has the key before it starts.
    secrets_at_rest.configure(secrets_at_rest.load_box(settings))
    database = db.Database(settings.database_url)
    app.extensions[extensions.DATABASE] = database
    app.extensions[extensions.PROVIDER] = build_provider(settings)
    app.extensions[extensions.CACHE] = build_cache(settings)
    celery_init_app(app, settings, database)
    if http:
        _serve_http(app, settings, server_threads)
    return app


def _serve_http(app: Flask, settings: Settings, server_threads: int | None) -> None:
    from app import api, console  # noqa: PLC0415 - see create_app's `http`
    from app.api import body, errors, long_polls, rate_limits, request_context, transactions  # noqa: PLC0415

    body.init_app(app)
    errors.register_error_handlers(app)
    request_context.init_app(app)
    transactions.init_app(app)
    rate_limits.init_app(app, settings)
    long_polls.init_app(app, settings, server_threads=server_threads)
    api.init_app(app)
    console.init_app(app)
