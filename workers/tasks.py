"""Celery tasks. Each is a thin shell over a use case: it takes ids, never objects, and re-reads state itself."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from flask import current_app

from app.config import Settings
from app.db import get_database
from app.queue import (
    DELIVER_WEBHOOK,
    DISPATCH_WEBHOOKS,
    ERASE_EXPIRED_CONTENT,
    MODERATE_SUBMISSION,
    PURGE_IDEMPOTENCY_KEYS,
    REQUEUE_STALLED,
    dispatch_moderation,
    dispatch_webhook_deliveries,
)
from app.use_cases import erasure, idempotency, moderation, webhooks


def _settings() -> Settings:
    settings: Settings = current_app.extensions["verdict.settings"]
    return settings


@shared_task(name=MODERATE_SUBMISSION, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def moderate_submission(self: Any, submission_id: str) -> str:
    outcome = moderation.moderate_submission(
        get_database(), current_app.extensions["verdict.provider"], submission_id, _settings(),
        cache=current_app.extensions["verdict.cache"],
    )
    # The other submissions of the batch that go back to the queue: their own messages were (or will be) consumed
    # as duplicates, so each gets a new one, due when its retry is.
    for other_id, countdown in outcome.retries:
        dispatch_moderation([other_id], countdown=countdown)
    if outcome.retry_in is not None:
        # The row already says `queued` with the retry's due time, so losing this message loses nothing.
        raise self.retry(countdown=outcome.retry_in)
    return outcome.status


@shared_task(name=REQUEUE_STALLED, acks_late=False)
def requeue_stalled() -> int:
    with get_database().session_scope() as session:
        return moderation.requeue_stalled(session, _settings(), dispatch_moderation)


@shared_task(name=DELIVER_WEBHOOK, acks_late=True, reject_on_worker_lost=True)
def deliver_webhook(delivery_id: str) -> str:
    # No Celery retries: a failed attempt goes back to the row with its next due time, and the sweep sends it then.
    return webhooks.deliver(get_database(), delivery_id, _settings())


@shared_task(name=DISPATCH_WEBHOOKS, acks_late=False)
def dispatch_due_webhooks() -> int:
    with get_database().session_scope() as session:
        return webhooks.dispatch_due(session, _settings(), dispatch_webhook_deliveries)


@shared_task(name=ERASE_EXPIRED_CONTENT, bind=True, acks_late=False)
def erase_expired_content(self: Any) -> int:
    settings = _settings()
    with get_database().session_scope() as session:
        # Half the task's time limit: a sweep ends cleanly between batches, long before it could be killed.
        sweep = erasure.erase_expired_content(session, default_days=settings.content_retention_days,
                                              time_budget=settings.task_time_limit / 2)
    if not sweep.finished:
        self.apply_async()  # a backlog (retention just switched on) is worked off now, not one slice per interval
    return sweep.erased


@shared_task(name=PURGE_IDEMPOTENCY_KEYS, acks_late=False)
def purge_idempotency_keys() -> int:
    with get_database().session_scope() as session:
        return idempotency.purge_expired(session)
