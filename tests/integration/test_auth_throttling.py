"""Failed authentication is throttled and summarised (issue 11 item 5, issue 17 item 2): past AUTH_FAILURES_PER_MINUTE
failures from one client address, or for one key id, a failing request gets 429 with Retry-After; a valid key is never
refused for others' failures; and a flood writes the window's first `auth.failed` event plus one summary with the
count, first and last time, not one event per request."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from app import create_app
from app.audit_chain import SYSTEM_CHAIN
from app.db import Database
from app.models import AuditEvent, AuthFailureWindow, utcnow
from app.use_cases.audit import summarize_auth_failures, verify_chain, window_start
from tests.conftest import TenantKey, make_settings
from tests.integration.test_api_auth import assert_envelope

LIMIT = 5
# Long windows, so a flood of a second or two almost never straddles two; the assertions allow for it when it does.
WINDOW = 3600


@pytest.fixture(scope="module")
def throttled_app(database_url: str, redis_url: str) -> Iterator[Flask]:
    flask_app = create_app(make_settings(database_url, redis_url, auth_failures_per_minute=LIMIT,
                                         auth_failure_window_seconds=WINDOW))
    flask_app.config["TESTING"] = True
    yield flask_app


def address() -> str:
    # The documentation prefix (RFC 3849), one fresh address per client: other tests' windows never mix in.
    return f"2001:db8::{secrets.token_hex(2)}:{secrets.token_hex(2)}:{secrets.token_hex(2)}"


def client_at(flask_app: Flask, remote_addr: str) -> FlaskClient:
    client = flask_app.test_client()
    client.environ_base["REMOTE_ADDR"] = remote_addr
    return client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def unknown_key() -> str:
    return f"vk_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


def forged(tenant: TenantKey) -> str:
    return f"vk_{tenant.key_id.removeprefix('key_')}_{secrets.token_urlsafe(32)}"


def auth_failed(database: Database, chain_id: str) -> list[AuditEvent]:
    with database.transaction() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.chain_id == chain_id,
                                                             AuditEvent.action == "auth.failed")
                                    .order_by(AuditEvent.seq)))


def chain_length(database: Database, chain_id: str) -> int:
    with database.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEvent)
                                  .where(AuditEvent.chain_id == chain_id)) or 0)


def close_windows(database: Database) -> int:
    """Run the summary sweep as beat would once every window open now has closed."""
    with database.transaction() as session:
        return summarize_auth_failures(session, window_seconds=WINDOW, now=utcnow() + timedelta(seconds=WINDOW + 10))


def assert_throttled(statuses: list[int], started: datetime, finished: datetime) -> None:
    """LIMIT 401s, then 429s. The window slides (app/api/rate_limits.py): no clock minute lets more than LIMIT
    through, so a flood that crosses a minute boundary (a loaded machine, or a start just before one) may see up to
    LIMIT more in each further minute it touches, never more."""
    minutes = int(finished.timestamp() // 60) - int(started.timestamp() // 60) + 1
    if minutes == 1:
        assert statuses[:LIMIT + 1] == [401] * LIMIT + [429], statuses[:LIMIT + 1]
    else:
        assert statuses[:LIMIT] == [401] * LIMIT, statuses[:LIMIT + 1]
    assert set(statuses) == {401, 429}
    assert statuses.count(401) <= LIMIT * minutes


def windows_between(start: datetime, end: datetime) -> int:
    return len({window_start(start, WINDOW), window_start(end, WINDOW)})


def assert_summarised(firsts: list[AuditEvent], summaries: list[AuditEvent], total: int, windows: int) -> None:
    """One event at once per window, and one summary per window that saw more; the counts add up to `total`."""
    assert len(firsts) == windows, [e.details for e in firsts]
    assert 1 <= len(summaries) <= windows
    assert sum(s.details["count"] for s in summaries) + (windows - len(summaries)) == total
    for summary in summaries:
        details: dict[str, Any] = summary.details
        assert details["summary"] is True and details["window_seconds"] == WINDOW
        assert details["window_start"] <= details["first_at"] <= details["last_at"]


def test_a_flood_of_bad_keys_from_one_address_is_throttled_and_summarised(throttled_app: Flask, database: Database,
                                                                          tenant: TenantKey) -> None:
    remote = address()
    client = client_at(throttled_app, remote)
    flood = 60
    started = utcnow()
    statuses = [client.get("/v1/submissions", headers=bearer(unknown_key())).status_code for _ in range(flood)]
    refused = client.get("/v1/submissions", headers=bearer(unknown_key()))
    finished = utcnow()
    assert_throttled(statuses, started, finished)
    error = assert_envelope(refused, 429, "rate_limit_error", "rate_limit_auth_failures")
    assert f"{LIMIT} per minute" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # The throttled address's valid key still gets in: only failing requests are refused.
    assert client.get("/v1/submissions", headers=tenant.headers).status_code == 200

    def mine(events: list[AuditEvent]) -> list[AuditEvent]:
        return [e for e in events if remote in (e.subject_id, (e.details or {}).get("client_address"))]

    windows = windows_between(started, finished)
    firsts = mine(auth_failed(database, SYSTEM_CHAIN))
    assert len(firsts) == windows
    assert firsts[0].details == {"reason": "unknown_key", "method": "GET", "route": "/v1/submissions",
                                 "client_address": remote}
    assert firsts[0].subject_id is None  # an id that names no key is never recorded
    close_windows(database)
    events = mine(auth_failed(database, SYSTEM_CHAIN))
    summaries = [e for e in events if (e.details or {}).get("summary")]
    assert all((s.subject_type, s.subject_id) == ("client_address", remote) for s in summaries)
    assert_summarised([e for e in events if e not in summaries], summaries, flood + 1, windows)
    # A second sweep finds nothing left to say; the system chain still verifies.
    close_windows(database)
    assert len(mine(auth_failed(database, SYSTEM_CHAIN))) == len(events)
    with database.transaction() as session:
        assert verify_chain(session, SYSTEM_CHAIN).ok


def test_a_flood_behind_one_key_id_from_many_addresses_writes_o_windows_events(
        throttled_app: Flask, database: Database, tenant: TenantKey) -> None:
    flood = 500
    before = chain_length(database, tenant.tenant_id)  # the tenant's and its key's creation
    started = utcnow()
    statuses = [client_at(throttled_app, address()).get("/v1/submissions", headers=bearer(forged(tenant))).status_code
                for _ in range(flood)]
    finished = utcnow()
    # Each address failed once only: it is the key id's window that throttles.
    assert_throttled(statuses, started, finished)
    # The key's owner is not locked out, from a new address or from one that just failed.
    assert client_at(throttled_app, address()).get("/v1/submissions", headers=tenant.headers).status_code == 200
    windows = windows_between(started, finished)
    firsts = auth_failed(database, tenant.tenant_id)
    assert len(firsts) == windows
    assert (firsts[0].subject_type, firsts[0].subject_id) == ("api_key", tenant.key_id)
    assert firsts[0].details["reason"] == "wrong_secret"
    with database.transaction() as session:
        counted = session.scalar(select(func.sum(AuthFailureWindow.count))
                                 .where(AuthFailureWindow.chain_id == tenant.tenant_id))
    assert counted == flood
    close_windows(database)
    events = auth_failed(database, tenant.tenant_id)
    summaries = [e for e in events if e.details.get("summary")]
    assert all((s.subject_type, s.subject_id) == ("api_key", tenant.key_id) for s in summaries)
    assert_summarised([e for e in events if e not in summaries], summaries, flood, windows)
    # Hundreds of refusals, a handful of rows: the chain and the window table stay O(windows).
    assert chain_length(database, tenant.tenant_id) - before == len(events) <= 2 * windows
    with database.transaction() as session:
        assert session.scalar(select(func.count()).select_from(AuthFailureWindow)
                              .where(AuthFailureWindow.chain_id == tenant.tenant_id)) == 0
        assert verify_chain(session, tenant.tenant_id).ok


def test_an_unknown_key_id_is_throttled_exactly_like_a_real_one(throttled_app: Flask) -> None:
    # If only ids of real keys were counted, the 429 would tell an attacker which ids exist.
    unknown_id = secrets.token_hex(8)
    statuses = [client_at(throttled_app, address()).get(
        "/v1/submissions", headers=bearer(f"vk_{unknown_id}_{secrets.token_urlsafe(32)}")).status_code
        for _ in range(LIMIT + 3)]
    assert statuses == [401] * LIMIT + [429] * 3


@pytest.mark.parametrize("authorization", [
    "Basic dXNlcjpwYXNzd29yZA==", "Bearer ", "Bearer x", "vk_nobearer", "Bearer " + "A" * 4000,
    "Bearer vk_0123456789abcdef_" + "x" * 43 + "\u00e9", "bearer\tvk_abc",
])
def test_hostile_authorization_headers_count_against_the_address(throttled_app: Flask, authorization: str) -> None:
    client = client_at(throttled_app, address())
    responses = [client.get("/v1/submissions", headers={"Authorization": authorization}) for _ in range(LIMIT + 2)]
    for response in responses[:LIMIT]:
        assert_envelope(response, 401, "authentication_error", "invalid_api_key")
    for response in responses[LIMIT:]:
        assert_envelope(response, 429, "rate_limit_error", "rate_limit_auth_failures")
        assert "Traceback" not in response.get_data(as_text=True)


def test_requests_without_a_key_are_refused_but_not_counted(throttled_app: Flask, database: Database) -> None:
    remote = address()
    client = client_at(throttled_app, remote)
    for _ in range(3 * LIMIT):
        assert_envelope(client.get("/v1/submissions"), 401, "authentication_error", "invalid_api_key")
    assert client.get("/v1/submissions", headers=bearer(unknown_key())).status_code == 401
    with database.transaction() as session:
        assert session.scalar(select(AuthFailureWindow.count).where(AuthFailureWindow.subject_id == remote)) == 1


def test_a_good_key_from_another_address_is_unaffected(throttled_app: Flask, tenant: TenantKey) -> None:
    attacker = client_at(throttled_app, address())
    for _ in range(LIMIT + 5):
        attacker.get("/v1/submissions", headers=bearer(unknown_key()))
    assert attacker.get("/v1/submissions", headers=bearer(unknown_key())).status_code == 429
    response = client_at(throttled_app, address()).get("/v1/submissions", headers=tenant.headers)
    assert response.status_code == 200
    assert response.headers["X-RateLimit-Limit-RPM"]  # counted against the key's own window as usual


def test_with_the_rate_limit_store_down_a_bad_key_still_gets_401(database_url: str, tenant: TenantKey) -> None:
    flask_app = create_app(make_settings(database_url, "memory://", rate_limit_storage_url="redis://127.0.0.1:1/0",
                                         auth_failures_per_minute=1))
    client = client_at(flask_app, address())
    for _ in range(3):
        assert_envelope(client.get("/v1/submissions", headers=bearer(unknown_key())), 401, "authentication_error",
                        "invalid_api_key")


def test_windows_are_aligned_and_a_window_still_open_is_not_summarised(database: Database) -> None:
    moment = datetime.fromisoformat("2026-12-03T07:59:59.999+00:00")
    assert window_start(moment, 60) == datetime.fromisoformat("2026-12-03T07:59:00+00:00")
    assert window_start(moment, 3600) == datetime.fromisoformat("2026-12-03T07:00:00+00:00")
    assert window_start(moment + timedelta(milliseconds=1), 3600) == datetime.fromisoformat("2026-12-03T08:00:00+00:00")
    now = utcnow()
    key = (SYSTEM_CHAIN, "client_address", address(), window_start(now, 60))
    with database.transaction() as session:
        session.add(AuthFailureWindow(chain_id=key[0], subject_type=key[1], subject_id=key[2], window_start=key[3],
                                      count=3, first_at=now, last_at=now))
    # Nothing still open, or closed only within the clocks' grace, is summarised or deleted...
    with database.transaction() as session:
        summarize_auth_failures(session, window_seconds=60, now=key[3] + timedelta(seconds=62))
    with database.transaction() as session:
        assert session.get(AuthFailureWindow, key) is not None
    # ... and once closed it is.
    with database.transaction() as session:
        assert summarize_auth_failures(session, window_seconds=60, now=key[3] + timedelta(seconds=66)) >= 1
    with database.transaction() as session:
        assert session.get(AuthFailureWindow, key) is None


@pytest.mark.parametrize("trusted", [0, 1])
def test_the_throttle_sees_the_address_trusted_proxies_forwarded_and_no_other(database_url: str, redis_url: str,
                                                                              database: Database,
                                                                              trusted: int) -> None:
    """Behind one proxy (TRUSTED_PROXY_COUNT=1) every client arrives from the proxy's address: the throttle must count
    each forwarded client on its own, or one client's bad keys lock everyone out. With no trusted proxy the header is
    the client's own word, so it is ignored: a flood cannot escape the throttle by forging X-Forwarded-For."""
    flask_app = create_app(make_settings(database_url, redis_url, auth_failures_per_minute=LIMIT,
                                         auth_failure_window_seconds=WINDOW, trusted_proxy_count=trusted))
    flask_app.config["TESTING"] = True
    proxy_address = address()
    proxy = client_at(flask_app, proxy_address)
    flooder, bystander = address(), address()

    def from_client(client_address: str) -> int:
        forged_hop = address()  # what a client may put in front of the header itself
        headers = {**bearer(unknown_key()), "X-Forwarded-For": f"{forged_hop}, {client_address}"}
        return proxy.get("/v1/submissions", headers=headers).status_code

    flood = [from_client(flooder) for _ in range(LIMIT + 3)]
    assert flood[:LIMIT + 1] == [401] * LIMIT + [429], flood
    # Another client behind the same proxy: its own window when the proxy is trusted, the flooder's when it is not.
    assert from_client(bystander) == (401 if trusted else 429)
    # The audit trail names the address the throttle counted: the forwarded client's, or the connection's.
    recorded = {(e.details or {}).get("client_address") for e in auth_failed(database, SYSTEM_CHAIN)}
    if trusted:
        assert {flooder, bystander} <= recorded and proxy_address not in recorded
    else:
        assert proxy_address in recorded and flooder not in recorded and bystander not in recorded
