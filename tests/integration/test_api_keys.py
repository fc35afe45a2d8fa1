"""`/v1/keys` over HTTP: create (the secret once), list (never a secret), revoke; expiry, last use, rotation, tenant
isolation, the `admin` scope, and the audit trail. In-process against real PostgreSQL and Redis."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from app.db import Database
from app.models import ApiKey, AuditEvent, utcnow
from tests.conftest import TenantKey, issue_key
from tests.integration.test_api_auth import assert_envelope


def create(client: FlaskClient, admin: TenantKey, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/keys", json={"scopes": ["read"], **body}, headers=admin.headers)
    assert response.status_code == 201, response.get_json()
    created: dict[str, Any] = response.get_json()
    assert response.headers["Location"] == f"/v1/keys/{created['id']}"
    return created


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_create_shows_the_secret_once_and_it_works(client: FlaskClient, tenant: TenantKey, database: Database) -> None:
    created = create(client, tenant, scopes=["submit", "read"], name="ci deploy")
    assert created["object"] == "api_key" and created["scopes"] == ["read", "submit"]
    assert created["secret"].startswith(created["prefix"] + "_") and created["name"] == "ci deploy"
    assert created["last_used_at"] is None and created["revoked_at"] is None

    assert client.get("/v1/submissions", headers=bearer(created["secret"])).status_code == 200

    listing = client.get("/v1/keys", headers=tenant.headers)
    assert listing.status_code == 200
    text = listing.get_data(as_text=True)
    assert created["secret"] not in text and '"secret"' not in text
    listed = {k["id"]: k for k in listing.get_json()["data"]}
    assert set(listed) == {tenant.key_id, created["id"]}
    assert listed[created["id"]]["last_used_at"] is not None  # recorded by the use above
    with database.transaction() as session:
        row = session.get(ApiKey, created["id"])
        assert row is not None and row.secret_hash != created["secret"] and created["secret"] not in str(row.scopes)


def test_revoke_refuses_the_key_at_once_and_is_audited(client: FlaskClient, tenant: TenantKey,
                                                      database: Database) -> None:
    created = create(client, tenant)
    response = client.delete(f"/v1/keys/{created['id']}", headers={**tenant.headers, "X-Request-ID": "revoke-1"})
    assert response.status_code == 200
    assert response.get_json()["revoked_at"] is not None and "secret" not in response.get_json()
    refused = client.get("/v1/submissions", headers=bearer(created["secret"]))
    assert_envelope(refused, 401, "authentication_error", "invalid_api_key")
    # Revoking again changes nothing and writes no second event.
    again = client.delete(f"/v1/keys/{created['id']}", headers=tenant.headers)
    assert again.status_code == 200 and again.get_json()["revoked_at"] == response.get_json()["revoked_at"]
    with database.transaction() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.subject_id == created["id"])
                                 .order_by(AuditEvent.seq)).all()
        # The refused use of the revoked key is audited too.
        assert [e.action for e in events] == ["key.created", "key.revoked", "auth.failed"]
        assert [e.actor for e in events[:2]] == [tenant.key_id, tenant.key_id]
        assert events[1].request_id == "revoke-1" and events[2].details["reason"] == "revoked"
        assert all(created["secret"] not in str(e.details) for e in events)


def test_rotation_is_create_then_revoke(client: FlaskClient, tenant: TenantKey) -> None:
    old = create(client, tenant, scopes=["submit"])
    new = create(client, tenant, scopes=["submit"])
    for key in (old, new):  # both work while the new one is deployed
        assert client.post("/v1/submissions", json={"input": "hi"}, headers=bearer(key["secret"])).status_code == 202
    assert client.delete(f"/v1/keys/{old['id']}", headers=tenant.headers).status_code == 200
    assert client.post("/v1/submissions", json={"input": "hi"}, headers=bearer(old["secret"])).status_code == 401
    assert client.post("/v1/submissions", json={"input": "hi"}, headers=bearer(new["secret"])).status_code == 202


def test_key_expires(client: FlaskClient, tenant: TenantKey, database: Database) -> None:
    expires = (utcnow() + timedelta(hours=1)).isoformat()
    created = create(client, tenant, expires_at=expires)
    assert created["expires_at"] is not None
    assert client.get("/v1/submissions", headers=bearer(created["secret"])).status_code == 200
    with database.transaction() as session:
        row = session.get(ApiKey, created["id"])
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
    # A change made in the database directly reaches an API process within API_KEY_CACHE_SECONDS (test_key_cache.py);
    # this test does not wait for it.
    client.application.extensions["verdict.key_cache"].forget(created["id"])
    response = client.get("/v1/submissions", headers=bearer(created["secret"]))
    error = assert_envelope(response, 401, "authentication_error", "invalid_api_key")
    assert "expired" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param({"scopes": []}, "scopes", id="no-scopes"),
        pytest.param({"scopes": ["root"]}, "scopes[0]", id="unknown-scope"),
        pytest.param({"scopes": "read"}, "scopes", id="scopes-not-a-list"),
        pytest.param({"scopes": ["read"], "expires_at": "2001-01-01T00:00:00Z"}, "expires_at", id="past"),
        pytest.param({"scopes": ["read"], "expires_at": "2099-01-01T00:00:00"}, "expires_at", id="no-zone"),
        pytest.param({"scopes": ["read"], "expires_at": 4102444800}, "expires_at", id="unix-seconds"),
        pytest.param({"scopes": ["read"], "name": ""}, "name", id="empty-name"),
        pytest.param({"scopes": ["read"], "rate_limit_rpm": 0}, "rate_limit_rpm", id="zero-rpm"),
        pytest.param({"scopes": ["read"], "rate_limit_rpm": 10**6}, "rate_limit_rpm", id="above-tenant-rpm"),
        pytest.param({"scopes": ["read"], "rate_limit_tpm": 10**9}, "rate_limit_tpm", id="above-tenant-tpm"),
        pytest.param({"scopes": ["read"], "tenant_id": "ten_x"}, "tenant_id", id="tenant-not-choosable"),
        pytest.param({"scopes": ["read"], "rate_limit_tpm": 2**31}, "rate_limit_tpm", id="tpm-beyond-int32"),
    ],
)
def test_bad_create_requests_name_the_field_and_create_nothing(
    client: FlaskClient, tenant: TenantKey, database: Database, body: dict[str, Any], param: str
) -> None:
    response = client.post("/v1/keys", json=body, headers=tenant.headers)
    error = assert_envelope(response, 400, "invalid_request_error", error_code(response))
    assert error["param"] == param
    with database.transaction() as session:
        assert session.scalars(select(ApiKey.id).where(ApiKey.tenant_id == tenant.tenant_id)).all() == [tenant.key_id]


def error_code(response: Any) -> str:
    code: str = response.get_json()["error"]["code"]
    return code


def test_another_tenants_key_is_not_found(client: FlaskClient, tenant: TenantKey, other_tenant: TenantKey) -> None:
    theirs = create(client, tenant)
    missing = f"key_{secrets.token_hex(8)}"
    foreign = client.delete(f"/v1/keys/{theirs['id']}", headers=other_tenant.headers)
    absent = client.delete(f"/v1/keys/{missing}", headers=other_tenant.headers)
    assert_envelope(foreign, 404, "not_found_error", "not_found")
    assert foreign.get_json() == absent.get_json()
    listed = client.get("/v1/keys", headers=other_tenant.headers).get_json()["data"]
    assert theirs["id"] not in {k["id"] for k in listed}
    assert client.get("/v1/submissions", headers=bearer(theirs["secret"])).status_code == 200  # still alive


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/keys"), ("GET", "/v1/keys"),
                                              ("DELETE", "/v1/keys/key_0000000000000000")])
def test_keys_need_the_admin_scope(client: FlaskClient, database: Database, method: str, path: str) -> None:
    limited = issue_key(database, scopes=("submit", "read", "audit"))
    response = client.open(path, method=method, json={"scopes": ["read"]} if method == "POST" else None,
                           headers=limited.headers)
    error = assert_envelope(response, 403, "permission_error", "missing_scope")
    assert "'admin'" in error["message"]


def test_a_key_may_narrow_its_rate_limits(client: FlaskClient, tenant: TenantKey) -> None:
    created = create(client, tenant, rate_limit_rpm=7, rate_limit_tpm=500)
    assert (created["rate_limit_rpm"], created["rate_limit_tpm"]) == (7, 500)
    response = client.get("/v1/submissions", headers=bearer(created["secret"]))
    assert response.headers["X-RateLimit-Limit-RPM"] == "7"
    assert response.headers["X-RateLimit-Limit-TPM"] == "500"


def test_a_key_cannot_mint_a_stronger_key(client: FlaskClient, tenant: TenantKey, database: Database) -> None:
    """Issue 17 item 3: an admin key that expires in an hour and may make 20 requests a minute used to create a key
    with no expiry and the tenant's full limits. Its own expiry and limits are now the new key's ceiling and default."""
    limited = create(client, tenant, scopes=["admin"], rate_limit_rpm=20, rate_limit_tpm=5000,
                     expires_at=(utcnow() + timedelta(hours=1)).isoformat())
    headers = bearer(limited["secret"])

    inherited = client.post("/v1/keys", json={"scopes": ["read"]}, headers=headers)
    assert inherited.status_code == 201, inherited.get_json()
    minted = inherited.get_json()
    assert minted["expires_at"] == limited["expires_at"]
    assert (minted["rate_limit_rpm"], minted["rate_limit_tpm"]) == (20, 5000)

    later = (utcnow() + timedelta(days=365)).isoformat()
    for body, param in (({"expires_at": later}, "expires_at"), ({"rate_limit_rpm": 21}, "rate_limit_rpm"),
                        ({"rate_limit_tpm": 5001}, "rate_limit_tpm")):
        refused = client.post("/v1/keys", json={"scopes": ["read"], **body}, headers=headers)
        error = assert_envelope(refused, 400, "invalid_request_error", "above_creator_limit")
        assert error["param"] == param

    narrower = client.post("/v1/keys", json={"scopes": ["read"], "rate_limit_rpm": 5}, headers=headers)
    assert narrower.status_code == 201 and narrower.get_json()["rate_limit_rpm"] == 5

    with database.transaction() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "key.created",
                                                         AuditEvent.subject_id == minted["id"])).one()
    assert event.details["creator"] == {"key_id": limited["id"], "expires_at": event.details["expires_at"],
                                        "rate_limits": {"rpm": 20, "tpm": 5000}}
    assert event.details["rate_limits"] == {"rpm": 20, "tpm": 5000}


def test_a_key_that_never_expires_mints_keys_that_never_expire(client: FlaskClient, tenant: TenantKey) -> None:
    minted = create(client, tenant)
    assert minted["expires_at"] is None
