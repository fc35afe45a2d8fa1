"""Erasing submitted content and personal data, on request (`DELETE /v1/data/{id}`) or when the tenant's retention
period runs out (the beat sweep); a tombstone and the audit trail stay. See docs/compliance.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import Database
from app.models import ReviewItem, Submission, Tenant, Verdict, utcnow
from app.use_cases.audit import record_event
from app.use_cases.submissions import get_submission
from app.use_cases.webhook_deliveries import erase_delivery_payloads

RETENTION_ACTOR = "retention"
ERASED_FIELDS = ["content", "metadata", "verdict.results"]


def erase_submission(
    session: Session, tenant_id: str, submission_id: str, *, actor: str, request_id: str | None
) -> Submission:
    """Erase one submission of the tenant (404 for anyone else's), in the caller's transaction; the submission is
    returned as it now stands. Erasing it again changes nothing."""
    submission = get_submission(session, tenant_id, submission_id)
    if submission.erased_at is None:
        _erase(session, tenant_id, [submission.id], actor=actor, request_id=request_id, reason="request")
        session.expire_all()  # the UPDATEs bypassed the loaded objects
        submission = get_submission(session, tenant_id, submission_id)
    return submission


@dataclass(frozen=True)
class RetentionSweep:
    erased: int
    # False when the time budget ran out with content still due; the caller runs another sweep soon.
    finished: bool


def retention_days(tenant_days: int | None, default_days: int) -> int:
    """The tenant's retention in days (None: the deployment's CONTENT_RETENTION_DAYS); 0 keeps content forever."""
    return default_days if tenant_days is None else tenant_days


def erase_expired_content(
    database: Database, *, default_days: int, time_budget: float, batch_size: int = 500,
) -> RetentionSweep:
    """Erase content older than each tenant's retention, until done or out of time.

    A command: a batch of one tenant's submissions per transaction, so a sweep that stops (out of time, or killed)
    keeps what it erased, and the tenant's audit chain is locked only briefly.
    """
    deadline = time.monotonic() + time_budget
    now = utcnow()
    with database.session() as session:
        with session.begin():
            tenants = session.execute(select(Tenant.id, Tenant.retention_days).order_by(Tenant.id)).all()
        erased = 0
        for tenant_id, tenant_days in tenants:
            days = retention_days(tenant_days, default_days)
            if days <= 0:
                continue
            cutoff = now - timedelta(days=days)
            while True:
                if time.monotonic() > deadline:
                    return RetentionSweep(erased=erased, finished=False)
                with session.begin():
                    ids = list(session.scalars(
                        select(Submission.id)
                        .where(Submission.tenant_id == tenant_id, Submission.erased_at.is_(None),
                               Submission.created_at < cutoff)
                        .order_by(Submission.created_at).limit(batch_size)
                        # Two sweeps at once (a slow one and the next beat) take different rows instead of waiting.
                        .with_for_update(skip_locked=True)
                    ))
                    erased += _erase(session, tenant_id, ids, actor=RETENTION_ACTOR, request_id=None,
                                     reason="retention", details={"retention_days": days}) if ids else 0
                if len(ids) < batch_size:
                    break
    return RetentionSweep(erased=erased, finished=True)


def _erase(
    session: Session, tenant_id: str, submission_ids: Sequence[str], *, actor: str, request_id: str | None,
    reason: str, details: dict[str, object] | None = None, now: datetime | None = None,
) -> int:
    now = now or utcnow()
    # Conditional on `erased_at IS NULL`, so two erasures of one submission write one event.
    erased = session.execute(
        update(Submission)
        .where(Submission.id.in_(submission_ids), Submission.tenant_id == tenant_id, Submission.erased_at.is_(None))
        .values(content=sa.null(), client_metadata=sa.null(), erased_at=now, updated_at=now)
        .returning(Submission.id, Submission.status, Submission.content_digest, Submission.conversation_id,
                   Submission.turn_id)
        .execution_options(synchronize_session=False)
    ).all()
    if not erased:
        return 0
    session.execute(
        update(Verdict).where(Verdict.submission_id.in_([row.id for row in erased])).values(results=[])
        .execution_options(synchronize_session=False)
    )
    # A reviewer's reason may quote the text it judged.
    session.execute(
        update(ReviewItem).where(ReviewItem.submission_id.in_([row.id for row in erased]))
        .values(reason=sa.null(), override_reason=sa.null()).execution_options(synchronize_session=False)
    )
    # The bodies of the submission's webhook deliveries carry its metadata and per-text results too.
    erase_delivery_payloads(session, [row.id for row in erased], now)
    for row in sorted(erased, key=lambda r: r.id):
        record_event(
            session, tenant_id=tenant_id, action="data.erased", actor=actor, subject_type="submission",
            subject_id=row.id, request_id=request_id, content_digest=row.content_digest,
            conversation_id=row.conversation_id, turn_id=row.turn_id,
            details={"reason": reason, "erased": ERASED_FIELDS, "status": row.status, **(details or {})},
        )
    return len(erased)
