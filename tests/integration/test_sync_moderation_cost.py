"""What one synchronous moderation writes and costs (issue 15 item 3), counted, never timed: nothing is written before
the provider answers, then everything in one transaction; a database failure at the end leaves nothing half written;
the statements and Redis round trips of a call stay bounded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis.connection
from flask import Flask
from sqlalchemy import event, func, select

from app.db import Database
from app.models import AuditEvent, Submission, Verdict
from app.use_cases import sync_moderation
from tests.conftest import TenantKey
from tests.fake_upstream import FakeUpstream
from tests.integration.test_policies_api import create
from tests.integration.test_sync_moderation import UPSTREAM_KEY, openai_app
from tests.lanes import integration_fixture

# At most one key lookup (authentication: the key cache answers a warm key), then the call's own writes: the
# submission (created completed: no settling UPDATE), the verdict, the audit chain's head (locked; it moves in the
# events' INSERT, a data-modifying CTE) and the events (one INSERT).
MAX_STATEMENTS = 5
# The key's rate limits (app/api/rate_limits.py: requests and tokens in one script call) and the call's own: cache
# lookup, circuit state (with its failure count: a success with none counted writes nothing), upstream budget,
# cache fill.
MAX_REDIS_ROUND_TRIPS = 5


@integration_fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY) as fake:
        yield fake


class Seen:
    def __init__(self) -> None:
        self.statements: list[tuple[int, str]] = []  # (transaction number, statement)
        self.transactions = 0
        self.redis_round_trips = 0

    def writes(self) -> list[tuple[int, str]]:
        return [(t, s) for t, s in self.statements if s.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))]


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Seen:
    counted = Seen()
    original: Any = redis.connection.AbstractConnection.send_packed_command

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        counted.redis_round_trips += 1  # one per round trip: a pipeline sends its commands packed together
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", send)
    return counted


def watch(flask_app: Flask, counted: Seen) -> Iterator[None]:
    engine = flask_app.extensions["verdict.db"].engine

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        counted.statements.append((counted.transactions, statement))

    def on_begin(_conn: Any) -> None:
        counted.transactions += 1

    event.listen(engine, "before_cursor_execute", on_statement)
    event.listen(engine, "begin", on_begin)
    counted.redis_round_trips = 0
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)
        event.remove(engine, "begin", on_begin)


def stored(database: Database, tenant: TenantKey) -> tuple[int, int, int]:
    with database.session() as session, session.begin():
        return (session.scalar(select(func.count()).select_from(Submission).where(Submission.tenant_id
                                                                                 == tenant.tenant_id)) or 0,
                session.scalar(select(func.count()).select_from(Verdict).where(Verdict.tenant_id
                                                                              == tenant.tenant_id)) or 0,
                session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.tenant_id
                                                                                 == tenant.tenant_id)) or 0)


def test_a_sync_call_writes_once_after_the_answer_in_bounded_statements(
        database_url: str, redis_url: str, upstream: FakeUpstream, tenant: TenantKey, seen: Seen) -> None:
    flask_app = openai_app(database_url, redis_url, upstream, moderation_fallback_provider="local")
    client = flask_app.test_client()
    # Warm: the connection pool, the key's last-used stamp, the script cache.
    assert client.post("/v1/moderations", json={"input": "warm"}, headers=tenant.headers).status_code == 200
    watcher = watch(flask_app, seen)
    next(watcher)
    try:
        response = client.post("/v1/moderations", json={"input": "have a lovely day"}, headers=tenant.headers)
    finally:
        next(watcher, None)
    assert response.status_code == 200, response.get_json()
    writes = seen.writes()
    # Every write in one transaction, and nothing written before the provider was asked.
    assert writes and len({transaction for transaction, _ in writes}) == 1
    assert len(seen.statements) <= MAX_STATEMENTS, [s for _, s in seen.statements]
    assert seen.redis_round_trips <= MAX_REDIS_ROUND_TRIPS
    # What is stored is a whole call: the submission, completed, its verdict and its three events.
    submission_id = "sub_" + response.get_json()["id"].removeprefix("modr-")
    database: Database = flask_app.extensions["verdict.db"]
    with database.session() as session, session.begin():
        submission = session.get(Submission, submission_id)
        assert submission is not None and submission.verdict is not None
        assert (submission.status, submission.source, submission.attempts, submission.claim_token) == (
            "completed", "sync", 1, None)
        assert submission.claimed_at is not None and submission.completed_at is not None
        actions = session.scalars(select(AuditEvent.action).where(AuditEvent.subject_id == submission_id)
                                  .order_by(AuditEvent.seq)).all()
    assert actions == ["submission.received", "moderation.completed", "verdict.decided"]


def test_a_database_failure_after_the_answer_leaves_nothing_half_written(
        database_url: str, redis_url: str, upstream: FakeUpstream, tenant: TenantKey,
        monkeypatch: pytest.MonkeyPatch) -> None:
    flask_app = openai_app(database_url, redis_url, upstream)
    flask_app.config["TESTING"] = False  # the failure is answered (500), not raised into the test
    database: Database = flask_app.extensions["verdict.db"]
    client = flask_app.test_client()
    assert client.post("/v1/moderations", json={"input": "warm"}, headers=tenant.headers).status_code == 200
    before = stored(database, tenant)
    real = getattr(sync_moderation, "record_verdict")  # noqa: B009 - imported there, not exported

    def record_then_fail(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise RuntimeError("the database went away mid-transaction")

    monkeypatch.setattr(sync_moderation, "record_verdict", record_then_fail)
    response = client.post("/v1/moderations", json={"input": "have a lovely day"}, headers=tenant.headers)
    assert response.status_code == 500
    calls = [r for r in upstream.requests if r.path == "/v1/moderations"]
    assert len(calls) == 2  # the provider did answer
    # No submission left processing (or anything else) for a call that got no answer.
    assert stored(database, tenant) == before


def test_a_failed_call_is_stored_failed_in_one_transaction(
        database_url: str, redis_url: str, upstream: FakeUpstream, tenant: TenantKey, seen: Seen) -> None:
    flask_app = openai_app(database_url, redis_url, upstream)
    client = flask_app.test_client()
    database: Database = flask_app.extensions["verdict.db"]
    assert client.post("/v1/moderations", json={"input": "warm"}, headers=tenant.headers).status_code == 200
    upstream.fail_next(500, count=3)
    submissions, verdicts, events = stored(database, tenant)
    watcher = watch(flask_app, seen)
    next(watcher)
    try:
        response = client.post("/v1/moderations", json={"input": "thank you"}, headers=tenant.headers)
    finally:
        next(watcher, None)
    assert response.status_code == 503
    assert len({transaction for transaction, _ in seen.writes()}) == 1
    # The failed call is kept, as before: its submission (failed) and its two events, no verdict.
    assert stored(database, tenant) == (submissions + 1, verdicts, events + 2)
    with database.session() as session, session.begin():
        failed = session.scalars(select(Submission).where(Submission.tenant_id == tenant.tenant_id)
                                 .order_by(Submission.created_at.desc()).limit(1)).one()
        assert (failed.status, failed.error_code, failed.attempts, failed.claim_token) == (
            "failed", "upstream_error", 1, None)


def test_a_tenant_default_policy_is_read_before_and_decides(
        database_url: str, redis_url: str, upstream: FakeUpstream, tenant: TenantKey, seen: Seen) -> None:
    flask_app = openai_app(database_url, redis_url, upstream)
    client = flask_app.test_client()
    create(client, tenant)
    assert client.put("/v1/default-policy", json={"policy": "kids"}, headers=tenant.headers).status_code == 200
    watcher = watch(flask_app, seen)
    next(watcher)
    try:
        response = client.post("/v1/moderations", json={"input": "have a lovely day"}, headers=tenant.headers)
    finally:
        next(watcher, None)
    assert response.status_code == 200, response.get_json()
    # The policy is read (a read-only transaction) before the provider is asked; the writes are one transaction.
    writes = {transaction for transaction, _ in seen.writes()}
    reads = {transaction for transaction, statement in seen.statements if "policy_versions" in statement}
    assert len(writes) == 1 and reads and max(reads) < min(writes)
    database: Database = flask_app.extensions["verdict.db"]
    submission_id = "sub_" + response.get_json()["id"].removeprefix("modr-")
    with database.session() as session, session.begin():
        submission = session.get(Submission, submission_id)
        assert submission is not None and submission.verdict is not None
        assert submission.policy_name == submission.verdict.policy_name == "kids"
