"""The objects `create_app` builds once per process (settings, database, provider, cache, Celery), kept on the
Flask app, and how a view or a task finds them. Use cases receive them as arguments instead."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:
    from celery import Celery

    from app.config import Settings
    from app.db import Database
    from app.doorbell import Doorbell
    from app.moderation.cache import VerdictCache
    from app.moderation.providers import ModerationProvider

SETTINGS = "verdict.settings"
DATABASE = "verdict.db"
PROVIDER = "verdict.provider"
CACHE = "verdict.cache"
CELERY = "celery"
DOORBELL = "verdict.doorbell"


def current_settings() -> Settings:
    settings: Settings = current_app.extensions[SETTINGS]
    return settings


def current_database() -> Database:
    database: Database = current_app.extensions[DATABASE]
    return database


def current_provider() -> ModerationProvider:
    provider: ModerationProvider = current_app.extensions[PROVIDER]
    return provider


def current_cache() -> VerdictCache | None:
    cache: VerdictCache | None = current_app.extensions[CACHE]
    return cache


def current_celery() -> Celery:
    celery_app: Celery = current_app.extensions[CELERY]
    return celery_app


def current_doorbell() -> Doorbell | None:
    doorbell: Doorbell | None = current_app.extensions.get(DOORBELL)
    return doorbell
