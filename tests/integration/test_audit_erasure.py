"""Erasure on request (`DELETE /v1/data/{id}`) and by retention (the beat job): content, metadata and per-text
results go, a tombstone and the audit trail stay, and the hash chain still verifies."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, text

from app.config import Settings
from app.db import Database
from app.models import AuditEvent, Submission, Verdict, utcnow
from app.outbox import ERASE_EXPIRED_CONTENT
from app.queue import celery_config
from app.use_cases.audit import verify_chain
from app.use_cases.erasure import erase_expired_content
from app.use_cases.tenants import configure_tenant
from tests.conftest import TenantKey
from tests.integration.conftest import WorkerProcess, submit, wait_final

SECRET_TEXT = "you are a fucking idiot, says jane@example.com"


def moderate_sync(client: FlaskClient, tenant: TenantKey, texts: list[str]) -> str:
    response = client.post("/v1/moderations", json={"input": texts}, headers=tenant.headers)
    assert response.status_code == 200, response.get_json()
    with_prefix: str = response.get_json()["id"]
    return "sub_" + with_prefix.removeprefix("modr-")


def stored(database: Database, submission_id: str) -> dict[str, Any]:
    with database.engine.connect() as connection:
        row = connection.execute(text(
            "SELECT s.content IS NULL AS content_null, s.metadata IS NULL AS metadata_null, s.erased_at, s.status, "
            "s.content_digest, v.results, v.decision, v.category_scores FROM submissions s "
            "LEFT JOIN verdicts v ON v.submission_id = s.id WHERE s.id = :id"), {"id": submission_id}).mappings().one()
        return dict(row)


def events(database: Database, tenant_id: str, action: str | None = None) -> list[AuditEvent]:
    with database.transaction() as session:
        query = select(AuditEvent).where(AuditEvent.chain_id == tenant_id).order_by(AuditEvent.seq)
        if action:
            query = query.where(AuditEvent.action == action)
        return list(session.scalars(query))


def chain_ok(database: Database, tenant_id: str) -> bool:
    with database.transaction() as session:
        return verify_chain(session, tenant_id).ok


def test_erasure_keeps_a_tombstone_and_the_chain(client: FlaskClient, database: Database,
                                                tenant: TenantKey) -> None:
    submission_id = moderate_sync(client, tenant, [SECRET_TEXT, "have a nice day"])
    before = stored(database, submission_id)
    assert not before["content_null"] and len(before["results"]) == 2

    response = client.delete(f"/v1/data/{submission_id}", headers={**tenant.headers, "X-Request-ID": "req-erase"})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["id"] == submission_id and body["status"] == "completed" and body["erased_at"]
    assert body["metadata"] is None
    assert body["verdict"]["decision"] == before["decision"] and body["verdict"]["results"] == []

    after = stored(database, submission_id)
    assert after["content_null"] and after["metadata_null"] and after["erased_at"] is not None
    assert after["results"] == [] and after["decision"] == before["decision"]
    assert after["category_scores"] == before["category_scores"]
    assert after["content_digest"] == before["content_digest"]

    shown = client.get(f"/v1/submissions/{submission_id}", headers=tenant.headers).get_json()
    assert shown["erased_at"] == body["erased_at"] and shown["verdict"]["results"] == []

    (erased,) = events(database, tenant.tenant_id, "data.erased")
    assert (erased.actor, erased.subject_type, erased.subject_id) == (tenant.key_id, "submission", submission_id)
    assert erased.request_id == "req-erase" and erased.content_digest == before["content_digest"]
    assert erased.details == {"reason": "request", "erased": ["content", "metadata", "verdict.results"],
                              "status": "completed"}
    assert chain_ok(database, tenant.tenant_id)
    audit = client.get("/v1/audit/verify", headers=tenant.headers).get_json()
    assert audit["ok"] is True
    # The trail never held the text, so there is nothing in it to erase.
    for event in events(database, tenant.tenant_id):
        rendered = " ".join(str(getattr(event, c.key)) for c in AuditEvent.__table__.columns)
        assert "idiot" not in rendered and "jane@example.com" not in rendered


def test_erasing_again_changes_nothing(client: FlaskClient, database: Database, tenant: TenantKey) -> None:
    submission_id = moderate_sync(client, tenant, ["hello there"])
    first = client.delete(f"/v1/data/{submission_id}", headers=tenant.headers).get_json()
    second = client.delete(f"/v1/data/{submission_id}", headers=tenant.headers)
    assert second.status_code == 200 and second.get_json()["erased_at"] == first["erased_at"]
    assert len(events(database, tenant.tenant_id, "data.erased")) == 1


@pytest.mark.parametrize("path", ["/v1/data/sub_000000000000000000000000", "/v1/data/sub%00x", "/v1/data/x"])
def test_unknown_submissions_are_404(client: FlaskClient, tenant: TenantKey, path: str) -> None:
    response = client.delete(path, headers=tenant.headers)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_another_tenants_submission_cannot_be_erased(client: FlaskClient, database: Database, tenant: TenantKey,
                                                     other_tenant: TenantKey) -> None:
    submission_id = moderate_sync(client, tenant, ["hello there"])
    response = client.delete(f"/v1/data/{submission_id}", headers=other_tenant.headers)
    assert response.status_code == 404
    assert not stored(database, submission_id)["content_null"]
    assert events(database, other_tenant.tenant_id, "data.erased") == []


def test_an_erased_queued_submission_fails_cleanly_when_a_worker_takes_it(
    client: FlaskClient, database: Database, tenant: TenantKey, start_worker: Callable[..., WorkerProcess]
) -> None:
    accepted = submit(client, tenant, {"input": SECRET_TEXT, "metadata": {"email": "jane@example.com"},
                                       "conversation_id": "conv-e", "turn_id": "t-1"})
    erased = client.delete(f"/v1/data/{accepted['id']}", headers=tenant.headers).get_json()
    assert erased["status"] == "queued" and erased["erased_at"]
    start_worker(MODERATION_PROVIDER="local")
    body = wait_final(client, tenant, accepted["id"])
    assert body["status"] == "failed" and body["error"]["code"] == "content_unavailable"
    assert body["verdict"] is None
    actions = [(e.action, e.conversation_id) for e in events(database, tenant.tenant_id)
               if e.subject_id == accepted["id"]]
    assert actions == [("submission.received", "conv-e"), ("data.erased", "conv-e"), ("moderation.failed", "conv-e")]
    assert chain_ok(database, tenant.tenant_id)


# ---- retention -------------------------------------------------------------------------------------------------


def backdate(database: Database, submission_id: str, days: int) -> None:
    with database.engine.begin() as connection:
        connection.execute(text("UPDATE submissions SET created_at = :t WHERE id = :id"),
                           {"t": utcnow() - timedelta(days=days), "id": submission_id})


def aged(client: FlaskClient, database: Database, tenant: TenantKey, days: int) -> str:
    submission_id = moderate_sync(client, tenant, [f"text aged {days} days"])
    backdate(database, submission_id, days)
    return submission_id


def sweep(database: Database, default_days: int = 30, **kwargs: Any) -> Any:
    return erase_expired_content(database, default_days=default_days, time_budget=kwargs.pop("time_budget", 60),
                                 **kwargs)


def is_erased(database: Database, submission_id: str) -> bool:
    return bool(stored(database, submission_id)["content_null"])


def test_retention_erases_only_content_older_than_the_tenants_setting(
    client: FlaskClient, database: Database, tenant: TenantKey, other_tenant: TenantKey
) -> None:
    old, recent = aged(client, database, tenant, 40), aged(client, database, tenant, 10)
    with database.transaction() as session:
        configure_tenant(session, other_tenant.tenant_name, retention_days=5)
    theirs_old, theirs_new = aged(client, database, other_tenant, 6), aged(client, database, other_tenant, 4)

    result = sweep(database, default_days=30)
    assert result.finished and result.erased >= 2
    assert [is_erased(database, s) for s in (old, recent, theirs_old, theirs_new)] == [True, False, True, False]
    (event,) = events(database, tenant.tenant_id, "data.erased")
    assert (event.actor, event.subject_id) == ("retention", old)
    assert event.details == {"reason": "retention", "erased": ["content", "metadata", "verdict.results"],
                             "status": "completed", "retention_days": 30}
    assert events(database, other_tenant.tenant_id, "data.erased")[0].details["retention_days"] == 5
    # Audit events are kept, and both chains still verify.
    assert [e.action for e in events(database, tenant.tenant_id) if e.subject_id == old][:1] == [
        "submission.received"]
    assert chain_ok(database, tenant.tenant_id) and chain_ok(database, other_tenant.tenant_id)
    assert sweep(database, default_days=30).erased == 0  # nothing left to do


def test_retention_zero_keeps_content_forever(client: FlaskClient, database: Database, tenant: TenantKey) -> None:
    with database.transaction() as session:
        configure_tenant(session, tenant.tenant_name, retention_days=0)
    ancient = aged(client, database, tenant, 3000)
    sweep(database, default_days=30)
    assert not is_erased(database, ancient)
    with database.transaction() as session:
        configure_tenant(session, tenant.tenant_name, retention_days=None)  # back to the deployment's default
    sweep(database, default_days=0)
    assert not is_erased(database, ancient)
    sweep(database, default_days=30)
    assert is_erased(database, ancient)
    changes = [e.details["changes"] for e in events(database, tenant.tenant_id, "tenant.updated")]
    assert changes == [{"retention_days": {"from": None, "to": 0}}, {"retention_days": {"from": 0, "to": None}}]


def test_retention_works_in_batches_and_stops_when_out_of_time(client: FlaskClient, database: Database,
                                                               tenant: TenantKey) -> None:
    with database.transaction() as session:
        configure_tenant(session, tenant.tenant_name, retention_days=7)
    ids = [aged(client, database, tenant, 8) for _ in range(5)]
    assert sweep(database, time_budget=0).finished is False
    assert not any(is_erased(database, s) for s in ids)
    assert sweep(database, batch_size=2).finished is True
    assert all(is_erased(database, s) for s in ids)
    assert sorted(e.subject_id for e in events(database, tenant.tenant_id, "data.erased")) == sorted(ids)
    assert chain_ok(database, tenant.tenant_id)


def test_the_retention_job_is_scheduled(settings: Settings) -> None:
    schedule = celery_config(settings)["beat_schedule"]["erase-expired-content"]
    assert schedule == {"task": ERASE_EXPIRED_CONTENT, "schedule": settings.retention_sweep_interval_seconds}


def test_the_beat_job_erases_expired_content_in_a_real_worker(
    client: FlaskClient, database: Database, tenant: TenantKey, start_worker: Callable[..., WorkerProcess]
) -> None:
    with database.transaction() as session:
        configure_tenant(session, tenant.tenant_name, retention_days=1)
    old, fresh = aged(client, database, tenant, 2), aged(client, database, tenant, 0)
    start_worker(MODERATION_PROVIDER="local", RETENTION_SWEEP_INTERVAL_SECONDS="1")
    deadline = time.monotonic() + 60
    while not is_erased(database, old):
        assert time.monotonic() < deadline, "the retention job did not erase expired content"
        time.sleep(0.5)
    assert not is_erased(database, fresh)
    with database.transaction() as session:
        verdict = session.scalars(select(Verdict).where(Verdict.submission_id == old)).one()
        assert verdict.results == []
        assert session.get(Submission, old).erased_at is not None  # type: ignore[union-attr]
    assert chain_ok(database, tenant.tenant_id)
