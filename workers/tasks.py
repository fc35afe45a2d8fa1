"""Celery tasks. Each is a thin shell over a use case: it takes ids, never objects, and re-reads state itself."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from flask import current_app

from app.config import Settings
from app.db import get_database
from app.queue import MODERATE_SUBMISSION, REQUEUE_STALLED, dispatch_moderation
from app.use_cases import moderation


def _settings() -> Settings:
    settings: Settings = current_app.extensions["verdict.settings"]
    return settings


@shared_task(name=MODERATE_SUBMISSION, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def moderate_submission(self: Any, submission_id: str) -> str:
    outcome = moderation.moderate_submission(
        get_database(), current_app.extensions["verdict.provider"], submission_id, _settings()
    )
    if outcome.retry_in is not None:
        # The row already says `queued` with the retry's due time, so losing this message loses nothing.
        raise self.retry(countdown=outcome.retry_in)
    return outcome.status


@shared_task(name=REQUEUE_STALLED, acks_late=False)
def requeue_stalled() -> int:
    with get_database().session_scope() as session:
        return moderation.requeue_stalled(session, _settings(), dispatch_moderation)
