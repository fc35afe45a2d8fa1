"""`Idempotency-Key` on POSTs: a retry gets the first response and creates nothing; the key with another body is
refused; identical requests racing create once; secrets are never kept for a replay."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from app.db import Database
from app.models import ApiKey, IdempotencyRecord, Submission, utcnow
from app.use_cases.idempotency import purge_expired
from tests.conftest import TenantKey
from tests.integration.test_api_auth import assert_envelope


def count(database: Database, model: Any, tenant: TenantKey) -> int:
    with database.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(model)
                                  .where(model.tenant_id == tenant.tenant_id)) or 0)


def post(client: FlaskClient, tenant: TenantKey, path: str, body: Any, key: str) -> Any:
    return client.post(path, json=body, headers={**tenant.headers, "Idempotency-Key": key})


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/v1/submissions", {"input": "hello there", "metadata": {"n": 1}}, 202),
    ("/v1/submissions", {"items": [{"input": "one"}, {"input": "two"}]}, 202),
    ("/v1/moderations", {"input": ["first", "second"]}, 200),
])
def test_a_retry_gets_the_first_response_and_creates_nothing(
    client: FlaskClient, database: Database, tenant: TenantKey, path: str, body: dict[str, Any], status: int
) -> None:
    key = str(uuid.uuid4())
    first = post(client, tenant, path, body, key)
    assert first.status_code == status
    created = count(database, Submission, tenant)
    for _ in range(2):
        again = post(client, tenant, path, body, key)
        assert again.status_code == status
        assert again.get_json() == first.get_json()  # same ids
        assert again.headers.get("Location") == first.headers.get("Location")
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["X-Request-ID"] != first.headers["X-Request-ID"]  # each request its own id
    assert "Idempotent-Replayed" not in first.headers
    assert count(database, Submission, tenant) == created
    # Without the header, the same body is a new request.
    assert client.post(path, json=body, headers=tenant.headers).get_json() != first.get_json()


def test_the_same_key_with_another_body_is_refused(client: FlaskClient, database: Database,
                                                   tenant: TenantKey) -> None:
    key = str(uuid.uuid4())
    assert post(client, tenant, "/v1/submissions", {"input": "a"}, key).status_code == 202
    before = count(database, Submission, tenant)
    for path, body in (("/v1/submissions", {"input": "b"}), ("/v1/moderations", {"input": "a"})):
        response = post(client, tenant, path, body, key)
        error = assert_envelope(response, 422, "invalid_request_error", "idempotency_key_reused")
        assert error["param"] == "Idempotency-Key"
    assert count(database, Submission, tenant) == before


def test_keys_belong_to_the_tenant(client: FlaskClient, database: Database, tenant: TenantKey,
                                   other_tenant: TenantKey) -> None:
    key = str(uuid.uuid4())
    mine = post(client, tenant, "/v1/submissions", {"input": "a"}, key)
    theirs = post(client, other_tenant, "/v1/submissions", {"input": "a"}, key)
    assert mine.status_code == theirs.status_code == 202
    assert mine.get_json()["id"] != theirs.get_json()["id"]
    assert "Idempotent-Replayed" not in theirs.headers


def test_an_error_response_is_replayed_too(client: FlaskClient, tenant: TenantKey) -> None:
    key = str(uuid.uuid4())
    first = post(client, tenant, "/v1/submissions", {"input": 5}, key)
    assert first.status_code == 400
    again = post(client, tenant, "/v1/submissions", {"input": 5}, key)
    assert (again.status_code, again.get_json()) == (400, first.get_json())


@pytest.mark.parametrize("key", ["", "a" * 256, "has space", "caf\u00e9"], ids=["empty", "too-long", "space", "latin1"])
def test_a_malformed_key_is_refused(client: FlaskClient, database: Database, tenant: TenantKey, key: str) -> None:
    before = count(database, Submission, tenant)
    headers = {**tenant.headers, "Idempotency-Key": key.encode().decode("latin-1")}
    response = client.post("/v1/submissions", json={"input": "a"}, headers=headers)
    error = assert_envelope(response, 400, "invalid_request_error", "invalid_idempotency_key")
    assert error["param"] == "Idempotency-Key"
    assert count(database, Submission, tenant) == before


def test_identical_requests_racing_create_once(app: Flask, database: Database, tenant: TenantKey) -> None:
    key, body = str(uuid.uuid4()), {"input": "racing", "metadata": {"attempt": 1}}
    barrier = threading.Barrier(8)
    responses: list[Any] = []

    def send() -> None:
        client = app.test_client()
        barrier.wait()
        responses.append(post(client, tenant, "/v1/submissions", body, key))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(responses) == 8
    assert count(database, Submission, tenant) == 1
    accepted = [r for r in responses if r.status_code == 202]
    in_progress = [r for r in responses if r.status_code == 409]
    assert len(accepted) + len(in_progress) == 8 and accepted
    assert len({r.get_json()["id"] for r in accepted}) == 1
    for response in in_progress:
        assert_envelope(response, 409, "conflict_error", "idempotency_request_in_progress")
        assert response.headers["Retry-After"] == "1"


def test_a_new_keys_secret_is_never_kept_for_a_replay(client: FlaskClient, database: Database,
                                                      tenant: TenantKey) -> None:
    key = str(uuid.uuid4())
    first = post(client, tenant, "/v1/keys", {"scopes": ["read"]}, key)
    assert first.status_code == 201
    secret = first.get_json()["secret"]
    again = post(client, tenant, "/v1/keys", {"scopes": ["read"]}, key)
    error = assert_envelope(again, 409, "conflict_error", "idempotency_secret_not_replayed")
    assert first.get_json()["id"] in error["message"] and secret not in again.get_data(as_text=True)
    assert count(database, ApiKey, tenant) == 2  # the tenant's first key and the one created
    with database.transaction() as session:
        record = session.get(IdempotencyRecord, (tenant.tenant_id, key))
        assert record is not None and secret not in (record.response_body or "")


def test_an_expired_key_runs_again_and_is_purged(client: FlaskClient, database: Database, tenant: TenantKey) -> None:
    key = str(uuid.uuid4())
    first = post(client, tenant, "/v1/submissions", {"input": "a"}, key)
    with database.transaction() as session:
        record = session.get(IdempotencyRecord, (tenant.tenant_id, key))
        assert record is not None
        record.expires_at = utcnow() - timedelta(seconds=1)
    again = post(client, tenant, "/v1/submissions", {"input": "a"}, key)
    assert again.status_code == 202 and again.get_json()["id"] != first.get_json()["id"]
    with database.transaction() as session:
        record = session.get(IdempotencyRecord, (tenant.tenant_id, key))
        assert record is not None
        record.expires_at = utcnow() - timedelta(seconds=1)
    with database.transaction() as session:
        assert purge_expired(session) >= 1
    with database.transaction() as session:
        assert session.get(IdempotencyRecord, (tenant.tenant_id, key)) is None


class _GoneAfterTheView:
    """The request's database, except that every transaction run_once opens after its claim fails, as when
    PostgreSQL goes away just after the view committed (what the chaos run saw: issue 11 item 9)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.opened = 0

    def transaction(self) -> Any:
        self.opened += 1
        if self.opened > 1:
            raise OperationalError("UPDATE idempotency_records", None, ConnectionError("server closed the connection"))
        return self.database.transaction()


def test_a_success_is_kept_with_what_it_created_so_an_outage_after_the_commit_cannot_run_it_twice(
    client: FlaskClient, database: Database, tenant: TenantKey, monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = str(uuid.uuid4())
    body = {"items": [{"input": "kept with the view"}, {"input": "and its sibling"}]}
    monkeypatch.setattr("app.api.idempotency.current_database", lambda: _GoneAfterTheView(database))
    first = client.post("/v1/submissions", json=body, headers={**tenant.headers, "Idempotency-Key": key})
    # Before the fix the answer was kept in a third transaction: it failed, the client got 503 for submissions that
    # existed, and its retry (once the claim's lease ran out) created them a second time.
    assert first.status_code == 202, first.get_json()
    monkeypatch.undo()
    again = client.post("/v1/submissions", json=body, headers={**tenant.headers, "Idempotency-Key": key})
    assert again.status_code == 202 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.get_json() == first.get_json()
    assert count(database, Submission, tenant) == 2
