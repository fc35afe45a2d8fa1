"""The API processes' key cache (API_KEY_CACHE_SECONDS): a key checked lately is not read again, yet a key revoked
elsewhere is refused within the cache's seconds (at once by the process that revoked it), a wrong secret for a cached
key is still refused and audited, an expiry passing is exact, and a tenant's changed limits arrive within the same
seconds. Runs in-process against real PostgreSQL and Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event

from app.db import Database
from app.models import ApiKey, utcnow
from app.use_cases.authentication import KeyCache, Principal, hash_key
from app.use_cases.keys import create_key, revoke_key
from app.use_cases.tenants import configure_tenant
from tests.conftest import issue_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(app: Flask) -> Clock:
    ticking = Clock()
    cache: KeyCache = app.extensions["verdict.key_cache"]
    cache._clock = ticking  # noqa: SLF001 - the test moves the cache's time instead of sleeping
    return ticking


@pytest.fixture
def statements(database: Database) -> Iterator[list[str]]:
    sent: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    event.listen(database.engine, "before_cursor_execute", count)
    yield sent
    event.remove(database.engine, "before_cursor_execute", count)


def test_a_key_checked_lately_is_not_read_again(client: FlaskClient, database: Database, clock: Clock,
                                                statements: list[str]) -> None:
    key = issue_key(database, scopes=("read",))
    assert client.get("/v1/models", headers=key.headers).status_code == 200
    assert any("api_keys" in s for s in statements)
    statements.clear()
    clock.now += 4
    assert client.get("/v1/models", headers=key.headers).status_code == 200
    assert statements == []  # nothing at all was sent to authenticate


def test_a_key_revoked_elsewhere_is_refused_within_the_cache_seconds(app: Flask, client: FlaskClient,
                                                                     database: Database, clock: Clock) -> None:
    seconds = app.extensions["verdict.settings"].api_key_cache_seconds
    assert seconds == 5
    key = issue_key(database, scopes=("read",))
    assert client.get("/v1/models", headers=key.headers).status_code == 200
    with database.transaction() as session:  # another process (the CLI, another API process) revokes it
        revoke_key(session, key.key_id)
    clock.now += seconds - 0.5
    assert client.get("/v1/models", headers=key.headers).status_code == 200  # still trusted, as documented
    clock.now += 1
    refused = client.get("/v1/models", headers=key.headers)
    assert refused.status_code == 401 and "revoked" in refused.get_json()["error"]["message"]


def test_the_process_that_revokes_a_key_refuses_it_at_once(client: FlaskClient, database: Database,
                                                           clock: Clock) -> None:
    admin = issue_key(database)
    created = client.post("/v1/keys", json={"scopes": ["read"]}, headers=admin.headers).get_json()
    headers = {"Authorization": f"Bearer {created['secret']}"}
    assert client.get("/v1/models", headers=headers).status_code == 200
    assert client.delete(f"/v1/keys/{created['id']}", headers=admin.headers).status_code == 200
    assert client.get("/v1/models", headers=headers).status_code == 401


def test_a_wrong_secret_for_a_cached_key_is_refused(client: FlaskClient, database: Database, clock: Clock) -> None:
    key = issue_key(database, scopes=("read",))
    assert client.get("/v1/models", headers=key.headers).status_code == 200
    wrong = key.plaintext[:-4] + ("AAAA" if not key.plaintext.endswith("AAAA") else "BBBB")
    refused = client.get("/v1/models", headers={"Authorization": f"Bearer {wrong}"})
    assert refused.status_code == 401


def test_tenant_changes_arrive_within_the_cache_seconds(client: FlaskClient, database: Database,
                                                        clock: Clock) -> None:
    key = issue_key(database, scopes=("read",))
    assert client.get("/v1/models", headers=key.headers).headers["X-RateLimit-Limit-RPM"] == "600"
    with database.transaction() as session:
        configure_tenant(session, key.tenant_name, rate_limit_rpm=7)
    clock.now += 1
    assert client.get("/v1/models", headers=key.headers).headers["X-RateLimit-Limit-RPM"] == "600"
    clock.now += 5
    assert client.get("/v1/models", headers=key.headers).headers["X-RateLimit-Limit-RPM"] == "7"


def test_a_cached_key_expiring_is_refused_at_once(client: FlaskClient, database: Database, clock: Clock) -> None:
    with database.transaction() as session:
        issued = create_key(session, tenant_name=f"tenant-{uuid.uuid4().hex[:12]}", scopes=("read",),
                            expires_at=utcnow() + timedelta(seconds=1.5))
    headers = {"Authorization": f"Bearer {issued.plaintext}"}
    assert client.get("/v1/models", headers=headers).status_code == 200
    time.sleep(1.6)  # the cache's own clock stands still: only the expiry has passed
    refused = client.get("/v1/models", headers=headers)
    assert refused.status_code == 401 and "expired" in refused.get_json()["error"]["message"]


def test_only_a_matching_secret_is_answered_and_nothing_is_kept_at_zero_seconds() -> None:
    token = "vk_0123456789abcdef_" + "A" * 43
    key = ApiKey(id="key_0123456789abcdef", secret_hash=hash_key(token), expires_at=None)
    principal = Principal(key_id=key.id, tenant_id="ten_x", scopes=frozenset())
    kept = KeyCache(5)
    kept.remember(key, principal)
    assert kept.principal_for(key.id, token) == principal
    assert kept.principal_for(key.id, token[:-1] + "B") is None
    off = KeyCache(0)
    off.remember(key, principal)
    assert off.principal_for(key.id, token) is None
