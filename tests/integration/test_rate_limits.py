"""Per-key rate limits: requests and tokens per minute in Redis (shared by every API process), the `X-RateLimit-*`
headers on every keyed response, 429 with `Retry-After` when over, limits per key and per tenant."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from app import create_app
from app.db import Database
from app.models import Submission
from app.use_cases.tenants import configure_tenant
from tests.conftest import TenantKey, issue_key, make_settings
from tests.integration.test_api_auth import assert_envelope

HEADERS = ("X-RateLimit-Limit-RPM", "X-RateLimit-Remaining-RPM", "X-RateLimit-Limit-TPM", "X-RateLimit-Remaining-TPM")


def limited_key(client: FlaskClient, admin: TenantKey, **limits: int) -> dict[str, str]:
    response = client.post("/v1/keys", json={"scopes": ["submit", "read"], **limits}, headers=admin.headers)
    assert response.status_code == 201, response.get_json()
    return {"Authorization": f"Bearer {response.get_json()['secret']}"}


def submissions_of(database: Database, tenant: TenantKey) -> int:
    with database.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(Submission)
                                  .where(Submission.tenant_id == tenant.tenant_id)) or 0)


def test_every_keyed_response_says_where_the_key_stands(client: FlaskClient, tenant: TenantKey,
                                                        settings: Any) -> None:
    first = client.get("/v1/submissions", headers=tenant.headers)
    second = client.get("/v1/submissions/sub_000000000000000000000000", headers=tenant.headers)  # a 404 counts too
    for response in (first, second):
        assert all(name in response.headers for name in HEADERS), dict(response.headers)
    assert first.headers["X-RateLimit-Limit-RPM"] == str(settings.rate_limit_rpm)
    assert first.headers["X-RateLimit-Limit-TPM"] == str(settings.rate_limit_tpm)
    assert int(second.headers["X-RateLimit-Remaining-RPM"]) == int(first.headers["X-RateLimit-Remaining-RPM"]) - 1
    # Unkeyed responses carry none: there is no key to count against.
    assert not any(name in client.get("/healthz").headers for name in HEADERS)


def test_requests_over_the_rpm_get_429_with_retry_after(client: FlaskClient, tenant: TenantKey) -> None:
    headers = limited_key(client, tenant, rate_limit_rpm=3)
    remaining = [client.get("/v1/submissions", headers=headers).headers["X-RateLimit-Remaining-RPM"]
                 for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    refused = client.get("/v1/submissions", headers=headers)
    error = assert_envelope(refused, 429, "rate_limit_error", "rate_limit_requests")
    assert "3 requests per minute" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Remaining-RPM"] == "0"
    # Another key of the same tenant has its own window.
    assert client.get("/v1/submissions", headers=tenant.headers).status_code == 200


def test_tokens_over_the_tpm_get_429_and_store_nothing(client: FlaskClient, tenant: TenantKey,
                                                      database: Database) -> None:
    headers = limited_key(client, tenant, rate_limit_tpm=30)
    ok = client.post("/v1/submissions", json={"input": "x" * 80}, headers=headers)  # 20 tokens
    assert ok.status_code == 202 and ok.headers["X-RateLimit-Remaining-TPM"] == "10"
    before = submissions_of(database, tenant)
    refused = client.post("/v1/submissions", json={"input": ["y" * 40, "z" * 4]}, headers=headers)  # 11 tokens
    assert_envelope(refused, 429, "rate_limit_error", "rate_limit_tokens")
    assert int(refused.headers["Retry-After"]) >= 1
    moderation = client.post("/v1/moderations", json={"input": "w" * 44}, headers=headers)
    assert_envelope(moderation, 429, "rate_limit_error", "rate_limit_tokens")
    assert submissions_of(database, tenant) == before
    # What fits still goes through.
    assert client.post("/v1/moderations", json={"input": "hello"}, headers=headers).status_code == 200


def test_a_request_larger_than_the_whole_tpm_names_the_input(client: FlaskClient, tenant: TenantKey) -> None:
    headers = limited_key(client, tenant, rate_limit_tpm=5)
    response = client.post("/v1/moderations", json={"input": "a" * 400}, headers=headers)
    error = assert_envelope(response, 429, "rate_limit_error", "rate_limit_tokens")
    assert error["param"] == "input" and "Retry-After" in response.headers


def test_tenant_limits_apply_to_its_keys(client: FlaskClient, database: Database) -> None:
    key = issue_key(database, scopes=("read",))
    with database.transaction() as session:
        configure_tenant(session, key.tenant_name, rate_limit_rpm=2, rate_limit_tpm=99)
    response = client.get("/v1/submissions", headers=key.headers)
    assert (response.headers["X-RateLimit-Limit-RPM"], response.headers["X-RateLimit-Limit-TPM"]) == ("2", "99")
    client.get("/v1/submissions", headers=key.headers)
    assert client.get("/v1/submissions", headers=key.headers).status_code == 429


def test_every_api_process_shares_the_window(app: Flask, client: FlaskClient, tenant: TenantKey, database_url: str,
                                            redis_url: str) -> None:
    # A second app (another API process) on the same Redis sees the same count.
    headers = limited_key(client, tenant, rate_limit_rpm=4)
    second = create_app(make_settings(database_url, redis_url)).test_client()
    assert client.get("/v1/submissions", headers=headers).headers["X-RateLimit-Remaining-RPM"] == "3"
    assert second.get("/v1/submissions", headers=headers).headers["X-RateLimit-Remaining-RPM"] == "2"
    assert client.get("/v1/submissions", headers=headers).headers["X-RateLimit-Remaining-RPM"] == "1"
    assert second.get("/v1/submissions", headers=headers).status_code == 200
    assert client.get("/v1/submissions", headers=headers).status_code == 429
    assert second.get("/v1/submissions", headers=headers).status_code == 429


def test_an_unreachable_store_lets_requests_through(database: Database, database_url: str, redis_url: str) -> None:
    # Port 9 (discard) on loopback: nothing listens, so the connection is refused at once.
    app = create_app(make_settings(database_url, redis_url, rate_limit_storage_url="redis://127.0.0.1:9/0"))
    key = issue_key(database, scopes=("read",))
    response = app.test_client().get("/v1/submissions", headers=key.headers)
    assert response.status_code == 200
    assert "X-RateLimit-Limit-RPM" not in response.headers


def test_a_post_counts_its_request_and_its_tokens_in_one_round_trip(
    app: Flask, client: FlaskClient, tenant: TenantKey, monkeypatch: Any
) -> None:
    headers = limited_key(client, tenant, rate_limit_rpm=50, rate_limit_tpm=1000)
    limiter = app.extensions["verdict.rate_limiter"]
    calls: list[int] = []
    hit = limiter.hit
    monkeypatch.setattr(limiter, "hit", lambda *charges, **kw: calls.append(len(charges)) or hit(*charges, **kw))
    first = client.post("/v1/submissions", json={"input": "x" * 80}, headers=headers)  # 20 tokens
    assert first.status_code == 202 and calls == [2]
    second = client.post("/v1/moderations", json={"input": "y" * 40}, headers=headers)  # 10 tokens
    assert second.status_code == 200 and calls == [2, 2]
    assert [r.headers["X-RateLimit-Remaining-RPM"] for r in (first, second)] == ["49", "48"]
    assert [r.headers["X-RateLimit-Remaining-TPM"] for r in (first, second)] == ["980", "970"]
    # A request refused before it charges tokens (a 400) is counted all the same, once.
    refused = client.post("/v1/submissions", json={"input": ""}, headers=headers)
    assert refused.status_code == 400 and calls == [2, 2, 2]
    assert refused.headers["X-RateLimit-Remaining-RPM"] == "47"
    # With an Idempotency-Key the request is counted before its key is claimed: two round trips, as before.
    keyed = client.post("/v1/submissions", json={"input": "z" * 4}, headers={**headers, "Idempotency-Key": "k-1"})
    assert keyed.status_code == 202 and calls == [2, 2, 2, 2, 1]
    assert (keyed.headers["X-RateLimit-Remaining-RPM"], keyed.headers["X-RateLimit-Remaining-TPM"]) == ("46", "969")


def test_a_post_over_the_rpm_is_refused_first_and_charges_no_tokens(client: FlaskClient, tenant: TenantKey,
                                                                     database: Database) -> None:
    headers = limited_key(client, tenant, rate_limit_rpm=2, rate_limit_tpm=1000)
    assert client.post("/v1/submissions", json={"input": "x" * 80}, headers=headers).status_code == 202
    assert client.post("/v1/submissions", json={"input": "x" * 80}, headers=headers).status_code == 202
    before = submissions_of(database, tenant)
    refused = client.post("/v1/submissions", json={"input": "x" * 80}, headers=headers)
    assert_envelope(refused, 429, "rate_limit_error", "rate_limit_requests")
    assert (refused.headers["X-RateLimit-Remaining-RPM"], refused.headers["X-RateLimit-Remaining-TPM"]) == ("0", "960")
    # An invalid body over the RPM: the 429, as when the request was counted before the body was read.
    invalid = client.post("/v1/submissions", json={"input": ""}, headers=headers)
    assert_envelope(invalid, 429, "rate_limit_error", "rate_limit_requests")
    moderation = client.post("/v1/moderations", json={"input": "w" * 44}, headers=headers)
    assert_envelope(moderation, 429, "rate_limit_error", "rate_limit_requests")
    assert submissions_of(database, tenant) == before
