"""Issue 11, item 2: a batch takes rows whose claim expired (their worker died) ahead of the queued backlog, so they
are worked again about a lease after the death however long the queue is. Run on the test PostgreSQL database,
in-process: the batch gatherer is called as a worker calls it, with rows of a model no other test uses."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import update

from app.config import Settings
from app.db import Database
from app.models import Submission, SubmissionStatus, utcnow
from app.use_cases.moderation import _claim_more, _load_work
from app.use_cases.verdicts import claim_submission
from tests.conftest import TenantKey


def _row(tenant: TenantKey, model: str, status: SubmissionStatus, *, age_s: float, claimed_age_s: float | None = None,
         ) -> Submission:
    now = utcnow()
    return Submission(tenant_id=tenant.tenant_id, content=["hello"], content_digest=uuid.uuid4().hex, text_count=1,
                      model=model, status=status.value, created_at=now - timedelta(seconds=age_s),
                      enqueued_at=now - timedelta(seconds=age_s),
                      claimed_at=None if claimed_age_s is None else now - timedelta(seconds=claimed_age_s),
                      claim_token=None if claimed_age_s is None else "dead-worker-token")


def test_expired_claims_are_taken_ahead_of_the_backlog(database: Database, settings: Settings,
                                                       tenant: TenantKey) -> None:
    model = f"claim-order-{uuid.uuid4().hex}"
    lease = settings.processing_lease_seconds
    with database.transaction() as session:
        first = _row(tenant, model, SubmissionStatus.QUEUED, age_s=600)
        backlog = [_row(tenant, model, SubmissionStatus.QUEUED, age_s=500 - i) for i in range(20)]
        dead = _row(tenant, model, SubmissionStatus.PROCESSING, age_s=10, claimed_age_s=lease + 5)
        live = _row(tenant, model, SubmissionStatus.PROCESSING, age_s=10, claimed_age_s=1)
        session.add_all([first, *backlog, dead, live])
        session.flush()
        ids = {"first": first.id, "dead": dead.id, "live": live.id, "backlog": [row.id for row in backlog]}
    with database.transaction() as session:
        claim = claim_submission(session, ids["first"], lease_seconds=lease)
        assert claim is not None
        work = _load_work(session, claim)
        assert work is not None
        taken, any_queued = _claim_more(session, work.model, room=3, settings=settings)
        taken_ids = [w.submission_id for w in taken]
        # The dead worker's row first, then the two oldest of the backlog; never the live claim.
        assert taken_ids == [ids["dead"], *ids["backlog"][:2]]
        assert any_queued
    with database.transaction() as session:  # leave nothing for another test's worker or sweep to pick up
        session.execute(update(Submission).where(Submission.model == model)
                        .values(status=SubmissionStatus.FAILED.value, claim_token=None, completed_at=utcnow(),
                                error_code="test_fixture"))
