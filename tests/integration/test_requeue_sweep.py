"""Issue 11, item 2 (second half): the requeue sweep re-sends only what the queue lost — rows whose message never
reached the broker, rows the broker took but still waiting after REDISPATCH_AFTER_SECONDS, and expired claims — and
leaves a healthy backlog alone. In-process on the test PostgreSQL database, with the outbox's publisher replaced by
a recorder, so the test counts exactly the messages a sweep sends."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import timedelta

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, update

from app.config import Settings
from app.db import Database
from app.models import Submission, SubmissionStatus, utcnow
from app.outbox import MODERATE_SUBMISSION, Message, send_after_commit
from app.use_cases.moderation import requeue_stalled
from tests.conftest import TenantKey


@pytest.fixture
def model() -> Iterator[str]:
    """Rows of a model no other test uses, retired afterwards so no worker or sweep of another test meets them."""
    name = f"requeue-sweep-{uuid.uuid4().hex}"
    yield name


def add_rows(database: Database, tenant: TenantKey, model: str, count: int, *, queued_age_s: float,
             dispatched_age_s: float | None, status: SubmissionStatus = SubmissionStatus.QUEUED,
             claimed_age_s: float | None = None) -> list[str]:
    now = utcnow()
    with database.transaction() as session:
        rows = [Submission(tenant_id=tenant.tenant_id, content=["hello"], content_digest=uuid.uuid4().hex,
                           text_count=1, model=model, status=status.value,
                           created_at=now - timedelta(seconds=queued_age_s),
                           enqueued_at=now - timedelta(seconds=queued_age_s),
                           dispatched_at=None if dispatched_age_s is None
                           else now - timedelta(seconds=dispatched_age_s),
                           claimed_at=None if claimed_age_s is None else now - timedelta(seconds=claimed_age_s),
                           claim_token=None if claimed_age_s is None else "dead-worker-token")
                for _ in range(count)]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def sweep(database: Database, settings: Settings) -> None:
    # As beat runs it, until nothing is left to send (the sweep takes 500 rows at a time).
    while True:
        with database.transaction() as session:
            if requeue_stalled(session, settings) < 500:
                return


def retire(database: Database, model: str) -> None:
    with database.transaction() as session:
        session.execute(update(Submission).where(Submission.model == model)
                        .values(status=SubmissionStatus.FAILED.value, claim_token=None, completed_at=utcnow(),
                                error_code="test_fixture"))


def test_a_healthy_backlog_is_not_resent_and_lost_messages_are(database: Database, settings: Settings,
                                                               tenant: TenantKey, model: str,
                                                               sent: list[Message]) -> None:
    requeue_after, redispatch_after = settings.requeue_after_seconds, settings.redispatch_after_seconds
    assert requeue_after < redispatch_after
    try:
        # Waiting in a healthy queue longer than REQUEUE_AFTER_SECONDS: its messages are in the broker.
        backlog = add_rows(database, tenant, model, 600, queued_age_s=requeue_after + 60,
                           dispatched_age_s=requeue_after + 60)
        # The broker refused the publish (or the row predates dispatch tracking): never dispatched.
        never = add_rows(database, tenant, model, 5, queued_age_s=requeue_after + 5, dispatched_age_s=None)
        # Taken by the broker long ago and still waiting: the broker lost it.
        lost = add_rows(database, tenant, model, 5, queued_age_s=redispatch_after + 30,
                        dispatched_age_s=redispatch_after + 30)
        # Not yet due for any look.
        fresh = add_rows(database, tenant, model, 5, queued_age_s=1, dispatched_age_s=None)
        # A dead worker's claim.
        dead = add_rows(database, tenant, model, 3, queued_age_s=30, dispatched_age_s=30,
                        status=SubmissionStatus.PROCESSING, claimed_age_s=settings.processing_lease_seconds + 5)

        sweep(database, settings)
        mine = [submission_id for m in sent if m.task == MODERATE_SUBMISSION for submission_id in m.args
                if submission_id in {*backlog, *never, *lost, *fresh, *dead}]
        # 613 rows waiting, 13 sent (a provider call's worth per message): only what was lost, each once; nothing of
        # the healthy backlog.
        assert sorted(mine) == sorted([*never, *lost, *dead])
        with database.transaction() as session:
            redispatched = session.scalars(select(Submission.dispatched_at)
                                           .where(Submission.id.in_([*never, *lost]))).all()
        assert all(moment is not None and utcnow() - moment < timedelta(seconds=60) for moment in redispatched)
        # The next sweep has nothing of these to send.
        sent.clear()
        sweep(database, settings)
        assert not [m for m in sent if {*m.args} & {*backlog, *never, *lost, *fresh}]
    finally:
        retire(database, model)


def test_a_refused_publish_marks_the_rows_never_dispatched(database: Database, tenant: TenantKey,
                                                           model: str) -> None:
    (submission_id,) = add_rows(database, tenant, model, 1, queued_age_s=0, dispatched_age_s=0)
    saved = database.outbox.publisher

    def broker_down(messages: Sequence[Message]) -> None:
        raise ConnectionError("broker down")

    database.outbox.publisher = broker_down
    try:
        with database.transaction() as session:
            send_after_commit(session, Message(MODERATE_SUBMISSION, (submission_id,)))
        with database.transaction() as session:
            row = session.get(Submission, submission_id)
            # The sweep re-sends it after REQUEUE_AFTER_SECONDS, not REDISPATCH_AFTER_SECONDS.
            assert row is not None and row.dispatched_at is None and row.status == SubmissionStatus.QUEUED.value
    finally:
        database.outbox.publisher = saved
        retire(database, model)


def test_a_refused_message_of_several_submissions_marks_every_one_never_dispatched(
        database: Database, tenant: TenantKey, model: str) -> None:
    ids = add_rows(database, tenant, model, 3, queued_age_s=0, dispatched_age_s=0)
    saved = database.outbox.publisher

    def broker_down(messages: Sequence[Message]) -> None:
        raise ConnectionError("broker down")

    database.outbox.publisher = broker_down
    try:
        with database.transaction() as session:
            send_after_commit(session, Message(MODERATE_SUBMISSION, tuple(ids)))
        with database.transaction() as session:
            rows = session.scalars(select(Submission).where(Submission.id.in_(ids))).all()
            assert len(rows) == 3
            assert all(row.dispatched_at is None and row.status == SubmissionStatus.QUEUED.value for row in rows)
    finally:
        database.outbox.publisher = saved
        retire(database, model)


def test_submitting_sends_a_provider_calls_worth_per_message(client: FlaskClient, database: Database,
                                                             tenant: TenantKey, sent: list[Message]) -> None:
    response = client.post("/v1/submissions", json={"items": [{"input": f"batch {i}"} for i in range(3)]},
                           headers=tenant.headers)
    assert response.status_code == 202, response.get_json()
    ids = tuple(item["id"] for item in response.get_json()["data"])
    # One message for the three (none is left for a worker to find already taken by another's batch).
    assert [m.args for m in sent if m.task == MODERATE_SUBMISSION] == [ids]


def test_submitting_marks_the_rows_dispatched(client: FlaskClient, database: Database, tenant: TenantKey,
                                              sent: list[Message]) -> None:
    response = client.post("/v1/submissions", json={"input": "dispatch me"}, headers=tenant.headers)
    assert response.status_code == 202
    submission_id = response.get_json()["id"]
    assert [m.args for m in sent if m.task == MODERATE_SUBMISSION] == [(submission_id,)]
    with database.transaction() as session:
        row = session.get(Submission, submission_id)
        assert row is not None and row.dispatched_at is not None and row.dispatched_at == row.enqueued_at
    with database.transaction() as session:
        session.execute(update(Submission).where(Submission.id == submission_id)
                        .values(status=SubmissionStatus.FAILED.value, completed_at=utcnow(), error_code="test_fixture"))


def test_redispatch_bound_cannot_be_below_the_requeue_bound() -> None:
    with pytest.raises(ValueError, match="REDISPATCH_AFTER_SECONDS"):
        Settings(_env_file=None, requeue_after_seconds=60, redispatch_after_seconds=30)  # type: ignore[call-arg]
