"""Celery tasks: each a thin shell over a use case. A task takes ids, never objects, re-reads state itself, and
opens its transactions (or runs a command that opens its own); its messages leave through the outbox."""

from __future__ import annotations

from collections import Counter
from typing import Any

from celery import shared_task

from app.extensions import current_cache, current_database, current_doorbell, current_provider, current_settings
from app.outbox import (
    DELIVER_WEBHOOK,
    DISPATCH_WEBHOOKS,
    ERASE_EXPIRED_CONTENT,
    MODERATE_QUEUED,
    MODERATE_SUBMISSION,
    PURGE_IDEMPOTENCY_KEYS,
    RELEASE_EXPIRED_CLAIMS,
    REQUEUE_BACKTESTS,
    REQUEUE_STALLED,
    RUN_BACKTEST,
    SUMMARIZE_AUTH_FAILURES,
)
from app.use_cases import audit, erasure, idempotency, moderation, policies, reviews, webhook_deliveries


@shared_task(name=MODERATE_SUBMISSION, acks_late=True, reject_on_worker_lost=True)
def moderate_submission(submission_id: str, *more_ids: str) -> str:
    # One message names a provider call's worth of submissions (one id in messages queued before that).
    # No Celery retries: a submission that must be tried again goes back to its row, due later, and its new
    # message is sent once that is committed (app/use_cases/verdicts.py, release_for_retry).
    return _summary(moderation.moderate_submissions(current_database(), current_provider(), [submission_id, *more_ids],
                                                    current_settings(), cache=current_cache()))


@shared_task(name=MODERATE_QUEUED, acks_late=True, reject_on_worker_lost=True)
def moderate_queued() -> str:
    # The doorbell (app/doorbell.py): claim what is queued, a provider call's worth, after answering the doorbell.
    doorbell = current_doorbell()
    return _summary(moderation.moderate_submissions(
        current_database(), current_provider(), [], current_settings(), cache=current_cache(),
        answer_doorbell=None if doorbell is None else doorbell.answer))


def _summary(outcomes: dict[str, str]) -> str:
    """What became of a message's ids, as the worker logs it: the one outcome of a message with one id."""
    if not outcomes:
        return "nothing"  # a doorbell that found nothing queued
    if len(outcomes) == 1:
        return next(iter(outcomes.values()))
    counts = Counter(outcomes.values())
    return " ".join(f"{outcome}={counts[outcome]}" for outcome in sorted(counts))


@shared_task(name=REQUEUE_STALLED, acks_late=False)
def requeue_stalled() -> int:
    with current_database().transaction() as session:
        return moderation.requeue_stalled(session, current_settings())


@shared_task(name=DELIVER_WEBHOOK, acks_late=True, reject_on_worker_lost=True)
def deliver_webhook(delivery_id: str, *more_ids: str) -> str:
    # One message names up to DELIVERIES_PER_MESSAGE deliveries (one id in messages queued before that).
    # No Celery retries: a failed attempt goes back to the row with its next due time, and the sweep sends it then.
    return _summary(webhook_deliveries.deliver(current_database(), [delivery_id, *more_ids], current_settings()))


@shared_task(name=DISPATCH_WEBHOOKS, acks_late=False)
def dispatch_due_webhooks() -> int:
    return webhook_deliveries.sweep_deliveries(current_database(), current_settings())


@shared_task(name=ERASE_EXPIRED_CONTENT, bind=True, acks_late=False)
def erase_expired_content(self: Any) -> int:
    settings = current_settings()
    # Half the task's time limit: a sweep ends cleanly between batches, long before it could be killed.
    sweep = erasure.erase_expired_content(current_database(), default_days=settings.content_retention_days,
                                          time_budget=settings.task_time_limit / 2)
    if not sweep.finished:
        self.apply_async()  # a backlog (retention just switched on) is worked off now, not one slice per interval
    return sweep.erased


@shared_task(name=PURGE_IDEMPOTENCY_KEYS, acks_late=False)
def purge_idempotency_keys() -> int:
    with current_database().transaction() as session:
        return idempotency.purge_expired(session)


@shared_task(name=SUMMARIZE_AUTH_FAILURES, acks_late=False)
def summarize_auth_failures() -> int:
    with current_database().transaction() as session:
        return audit.summarize_auth_failures(session, window_seconds=current_settings().auth_failure_window_seconds)


@shared_task(name=RUN_BACKTEST, acks_late=True, reject_on_worker_lost=True)
def run_backtest(backtest_id: str) -> str:
    return policies.run_backtest(current_database(), backtest_id)


@shared_task(name=REQUEUE_BACKTESTS, acks_late=False)
def requeue_backtests() -> int:
    settings = current_settings()
    with current_database().transaction() as session:
        # A running backtest older than a task may live was abandoned by a dead worker.
        return policies.requeue_backtests(session, queued_for=settings.requeue_after_seconds,
                                          running_for=settings.task_time_limit + settings.requeue_after_seconds)


@shared_task(name=RELEASE_EXPIRED_CLAIMS, acks_late=False)
def release_expired_claims() -> int:
    with current_database().transaction() as session:
        return reviews.release_expired_claims(session)
