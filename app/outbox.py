"""The outbox: queue messages a transaction sends once it commits (never before, never after a rollback), and the
stable task names they address. See docs/architecture.md ("The outbox")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

log = structlog.get_logger(__name__)

# Task names: the contract between whoever sends a message and the worker that runs it. Messages already queued
# name their task by these strings, so they never change when a Python function is renamed.
MODERATE_SUBMISSION = "moderation.moderate_submission"
# The doorbell (app/doorbell.py): a moderation message that names no ids, "claim what is queued".
MODERATE_QUEUED = "moderation.moderate_queued"
REQUEUE_STALLED = "moderation.requeue_stalled"
DELIVER_WEBHOOK = "webhooks.deliver"
DISPATCH_WEBHOOKS = "webhooks.dispatch_due"
ERASE_EXPIRED_CONTENT = "retention.erase_expired"
PURGE_IDEMPOTENCY_KEYS = "retention.purge_idempotency_keys"
SUMMARIZE_AUTH_FAILURES = "audit.summarize_auth_failures"
RUN_BACKTEST = "policies.run_backtest"
REQUEUE_BACKTESTS = "policies.requeue_stalled"
RELEASE_EXPIRED_CLAIMS = "reviews.release_expired_claims"

_PENDING = "verdict.outbox"


@dataclass(frozen=True)
class Message:
    """One task message: the task's name, its arguments (ids, never objects) and an optional delay in seconds,
    which the sender keeps below the broker's visibility timeout. `ring`: a doorbell may stand for it (new
    submissions' moderation messages, app/doorbell.py); where there is no doorbell (a broker that is not Redis) it is
    sent as it is."""

    task: str
    args: tuple[str, ...]
    countdown: float | None = None
    ring: bool = False


Publisher = Callable[[Sequence[Message]], None]


def send_after_commit(session: Session, *messages: Message) -> None:
    """Send `messages` once the session's current transaction commits; forget them if it rolls back."""
    if not session.in_transaction():
        raise RuntimeError("send_after_commit needs a transaction under way (`with session.begin():`)")
    session.info.setdefault(_PENDING, []).extend(messages)


class Outbox:
    """What the sessions of one Database send after they commit, and the publisher that sends it.

    The rows are the durable record (a submission `queued`, a delivery `pending`): a message only says "look now".
    So a publish that fails is logged, never raised, and the beat sweeps send what was not sent; without a publisher
    (a script with no queue), nothing is sent and the sweeps do the same.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.publisher: Publisher | None = None
        # Told which messages the broker refused, so their rows can say they were never dispatched (app/queue.py
        # installs app/use_cases/moderation.py's mark_undispatched).
        self.on_publish_failure: Callable[[Sequence[Message]], object] | None = None
        event.listen(sessions, "after_commit", self._publish)
        event.listen(sessions, "after_transaction_end", self._forget)

    def _publish(self, session: Session) -> None:
        messages: list[Message] = session.info.pop(_PENDING, [])
        if not messages:
            return
        if self.publisher is None:
            log.info("outbox_not_published", count=len(messages), reason="no publisher")
            return
        try:
            self.publisher(messages)
        except Exception as exc:  # noqa: BLE001 - any broker failure means the same: the sweeps send them later
            log.warning("outbox_publish_failed", count=len(messages), tasks=sorted({m.task for m in messages}),
                        error_type=type(exc).__name__)
            if self.on_publish_failure is not None:
                try:
                    self.on_publish_failure(messages)
                except Exception as record_exc:  # noqa: BLE001 - the rows are then re-sent after the longer bound
                    log.warning("outbox_failure_not_recorded", count=len(messages),
                                error_type=type(record_exc).__name__)

    @staticmethod
    def _forget(session: Session, transaction: SessionTransaction) -> None:
        # Runs after `_publish` on a commit (nothing left then) and alone on a rollback, which drops the messages.
        if transaction.parent is None:
            session.info.pop(_PENDING, None)
