"""Security, route by route: every keyed route of the app (read from its URL map, so a new route cannot escape)
refuses a missing, wrong, revoked or expired key with 401, a key lacking its scope with 403, and answers another
tenant's objects exactly as missing ones; hostile headers and bodies are refused cleanly; and the key check's work
does not depend on how much of a guess matches."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

import app.use_cases.authentication as auth
from app.db import Database
from app.models import ApiKey, Backtest, ReviewItem, WebhookDelivery, WebhookEndpoint
from app.use_cases.authentication import SCOPES, authenticate
from app.use_cases.errors import AuthenticationFailed
from tests.conftest import TenantKey, issue_key
from tests.integration.test_api_auth import BAD_CREDENTIALS, assert_envelope, authorization_for

PATH_ARGUMENT = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")


def keyed_routes(app: Flask) -> list[tuple[str, str, str | None]]:
    """(method, rule, required scope) of every route behind `require_scope`."""
    routes = []
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        if getattr(view, "keyed", False):
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                routes.append((method, rule.rule, view.required_scope))  # type: ignore[attr-defined]
    return sorted(routes)


def fill(rule: str, ids: dict[str, str] | None = None) -> str:
    return PATH_ARGUMENT.sub(lambda m: (ids or {}).get(m.group(1), "x"), rule)


def test_every_v1_route_is_keyed(app: Flask) -> None:
    # A /v1 route without `require_scope` would be open to anyone: there is none.
    unkeyed = [rule.rule for rule in app.url_map.iter_rules()
               if rule.rule.startswith("/v1") and not getattr(app.view_functions[rule.endpoint], "keyed", False)]
    assert unkeyed == []
    assert len(keyed_routes(app)) >= 24


@pytest.mark.parametrize("case", BAD_CREDENTIALS)
def test_every_keyed_route_refuses_bad_credentials(app: Flask, client: FlaskClient, database: Database,
                                                   case: str) -> None:
    headers: dict[str, str] = {}
    for number, (method, rule, _scope) in enumerate(keyed_routes(app)):
        if number % 20 == 0:
            # A fresh credential and client address every 20 routes: failed authentications are throttled per
            # address and key id (AUTH_FAILURES_PER_MINUTE, 30 by default), and this test is not about the throttle.
            authorization = authorization_for(case, database)
            headers = {} if authorization is None else {"Authorization": authorization}
            client.environ_base["REMOTE_ADDR"] = f"2001:db8:fffe::{number}:{secrets.token_hex(2)}"
        response = client.open(fill(rule), method=method, json={} if method == "POST" else None, headers=headers)
        assert_envelope(response, 401, "authentication_error", "invalid_api_key")
        assert "X-RateLimit-Limit-RPM" not in response.headers, (method, rule)


def test_every_keyed_route_requires_its_scope(app: Flask, client: FlaskClient, database: Database,
                                              tenant: TenantKey) -> None:
    checked = 0
    for method, rule, scope in keyed_routes(app):
        if scope is None:
            continue
        others = tuple(s for s in SCOPES if s != scope)
        limited = issue_key(database, tenant_name=tenant.tenant_name, scopes=others)
        response = client.open(fill(rule), method=method, json={} if method == "POST" else None,
                               headers=limited.headers)
        error = assert_envelope(response, 403, "permission_error", "missing_scope")
        assert f"'{scope}'" in error["message"], (method, rule)
        # The positive control: the full key is let past the guard (whatever the placeholder id then gets).
        allowed = client.open(fill(rule), method=method, json={} if method == "POST" else None,
                              headers=tenant.headers)
        assert allowed.status_code not in (401, 403), (method, rule, allowed.get_json())
        checked += 1
    assert checked >= 20


@pytest.fixture
def tenant(database: Database) -> TenantKey:
    """Here the tenants' keys hold every scope, `review` included, so every route is reached."""
    return issue_key(database, scopes=SCOPES)


@pytest.fixture
def other_tenant(database: Database) -> TenantKey:
    return issue_key(database, scopes=SCOPES)


@pytest.fixture
def owned(client: FlaskClient, database: Database, tenant: TenantKey) -> Iterator[dict[str, str]]:
    """Real ids of objects the `tenant` owns, one for each kind of path parameter."""
    submission_id = client.post("/v1/submissions", json={"input": "owned"}, headers=tenant.headers).get_json()["id"]
    key_id = client.post("/v1/keys", json={"scopes": ["read"]}, headers=tenant.headers).get_json()["id"]
    with database.transaction() as session:
        endpoint = WebhookEndpoint(tenant_id=tenant.tenant_id, url="https://hooks.example.com/owned",
                                   events=["submission.completed"], secret="whsec_" + secrets.token_urlsafe(24))
        session.add(endpoint)
        session.flush()
        delivery = WebhookDelivery(tenant_id=tenant.tenant_id, endpoint_id=endpoint.id, event_type="webhook.test",
                                   url=endpoint.url or "", payload="{}", status="succeeded")
        session.add(delivery)
        session.flush()
        review = ReviewItem(tenant_id=tenant.tenant_id, submission_id=submission_id, role="input", priority=0.6,
                            categories=["harassment"])
        session.add(review)
        session.flush()
        backtest = Backtest(tenant_id=tenant.tenant_id, policy_name="owned-policy", status="completed",
                            request={"version": 1, "start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z",
                                     "verdicts": "policy"}, result=None)
        session.add(backtest)
        session.flush()
        ids = {"submission_id": submission_id, "key_id": key_id, "webhook_id": endpoint.id,
               "delivery_id": delivery.id, "review_id": review.id, "backtest_id": backtest.id,
               "name": "owned-policy", "version": "1"}
    assert client.post("/v1/policies", json={"name": "owned-policy"}, headers=tenant.headers).status_code == 201
    for kind in ("blocklists", "allowlists"):
        assert client.put(f"/v1/{kind}/owned-policy", json={"terms": ["owned"]}, headers=tenant.headers).status_code \
            == 200
    yield ids


def comparable(response: Any) -> tuple[int, Any]:
    return response.status_code, response.get_json()


def test_another_tenants_objects_answer_as_missing_ones(app: Flask, client: FlaskClient, tenant: TenantKey,
                                                        other_tenant: TenantKey, owned: dict[str, str]) -> None:
    checked = 0
    for method, rule, _scope in keyed_routes(app):
        arguments = PATH_ARGUMENT.findall(rule)
        if not arguments or (method, rule) in CREATE_OR_REPLACE:
            continue
        body = {} if method == "POST" else None
        theirs = client.open(fill(rule, owned), method=method, json=body, headers=other_tenant.headers)
        missing = {name: owned[name][:-4] + "0000" for name in arguments}
        absent = client.open(fill(rule, missing), method=method, json=body, headers=other_tenant.headers)
        assert theirs.status_code == 404, (method, rule, theirs.get_json())
        assert comparable(theirs) == comparable(absent), (method, rule)
        for value in owned.values():
            assert value not in theirs.get_data(as_text=True)
        checked += 1
    assert checked >= 9
    # Nothing of theirs was touched: the owner still finds each object as it was.
    assert client.get(f"/v1/submissions/{owned['submission_id']}", headers=tenant.headers).status_code == 200
    assert client.get(f"/v1/webhooks/{owned['webhook_id']}", headers=tenant.headers).status_code == 200
    assert client.get(f"/v1/reviews/{owned['review_id']}", headers=tenant.headers).get_json()["status"] == "pending"
    listed = client.get("/v1/keys", headers=tenant.headers).get_json()["data"]
    assert next(k for k in listed if k["id"] == owned["key_id"])["revoked_at"] is None
    assert client.get("/v1/policies/owned-policy", headers=tenant.headers).get_json()["retired_at"] is None


# Term lists are named within each tenant: another tenant's PUT of the same name makes a list of its own.
CREATE_OR_REPLACE = {("PUT", "/v1/blocklists/<name>"), ("PUT", "/v1/allowlists/<name>")}


def test_a_term_list_of_the_same_name_is_another_tenants_own(client: FlaskClient, tenant: TenantKey,
                                                              other_tenant: TenantKey, owned: dict[str, str]) -> None:
    for kind in ("blocklists", "allowlists"):
        theirs = client.put(f"/v1/{kind}/{owned['name']}", json={"terms": ["theirs"]}, headers=other_tenant.headers)
        assert theirs.status_code == 200 and theirs.get_json()["version"] == 1
        mine = client.get(f"/v1/{kind}/{owned['name']}", headers=tenant.headers).get_json()
        assert mine["terms"] == ["owned"] and mine["version"] == 1


# ---- hostile headers ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["abc\r\nX-Injected: 1", "abc\nSet-Cookie: a=b", "abc\rdef", "a\x00b"],
                         ids=["crlf", "lf-cookie", "cr", "nul"])
def test_header_injection_is_refused_everywhere(client: FlaskClient, tenant: TenantKey, value: str) -> None:
    # The raw values go into the WSGI environ, as a lenient front server might pass them on.
    response = client.get("/v1/submissions", headers=tenant.headers, environ_overrides={"HTTP_X_REQUEST_ID": value})
    assert response.status_code == 200
    assert re.fullmatch(r"req_[0-9a-f]{32}", response.headers["X-Request-ID"])
    assert "X-Injected" not in response.headers and "Set-Cookie" not in response.headers
    idempotent = client.post("/v1/submissions", json={"input": "x"}, headers=tenant.headers,
                             environ_overrides={"HTTP_IDEMPOTENCY_KEY": value})
    error = assert_envelope(idempotent, 400, "invalid_request_error", "invalid_idempotency_key")
    assert error["param"] == "Idempotency-Key"
    broken_auth = client.get("/v1/submissions", environ_overrides={"HTTP_AUTHORIZATION": f"Bearer {value}"})
    assert_envelope(broken_auth, 401, "authentication_error", "invalid_api_key")


# ---- hostile bodies on every route that takes one ------------------------------------------------------------------

HOSTILE_BODIES: list[Any] = [
    pytest.param(b"[" * 100_000, "application/json", 400, "too_deep", id="100k-deep"),
    pytest.param(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "application/json", 400, "too_deep", id="50k-deep-objects"),
    pytest.param(b'{"scopes": ["r\xe9ad"]}', "application/json", 400, "invalid_utf8", id="latin1"),
    pytest.param(b'\xef\xbb\xbf{"input": "x"}', "application/json", 400, "invalid_json", id="utf8-bom"),
    pytest.param(b'{"input": "x"}', "application/json; charset=latin-1", 415, "unsupported_charset",
                 id="declared-latin1"),
    pytest.param(b'{"input": "x"}', "application/json; charset=utf-16", 415, "unsupported_charset",
                 id="declared-utf16"),
]


@pytest.mark.parametrize(("data", "content_type", "status", "code"), HOSTILE_BODIES)
def test_hostile_bodies_are_refused_on_every_post(app: Flask, client: FlaskClient, tenant: TenantKey, data: bytes,
                                                  content_type: str, status: int, code: str) -> None:
    posts = [rule for method, rule, _ in keyed_routes(app) if method == "POST"]
    checked = 0
    for rule in posts:
        response = client.post(fill(rule), data=data, headers={**tenant.headers, "Content-Type": content_type})
        if response.status_code == 404 and PATH_ARGUMENT.search(rule):
            continue  # a placeholder id: the object is looked up before an action's (optional) body is read
        assert_envelope(response, status, "invalid_request_error", code)
        checked += 1
    assert checked >= 6  # submissions, moderations, moderate, keys, webhooks, callback-secret at least




# ---- the key check ---------------------------------------------------------------------------------------------

class _Spy:
    def __init__(self) -> None:
        self.compared: list[tuple[str, str]] = []

    def compare_digest(self, a: str, b: str) -> bool:
        self.compared.append((a, b))
        import hmac

        return hmac.compare_digest(a, b)


def test_key_check_work_does_not_depend_on_how_much_matches(monkeypatch: pytest.MonkeyPatch, database: Database,
                                                            tenant: TenantKey) -> None:
    spy = _Spy()
    monkeypatch.setattr(auth, "hmac", spy)
    looked_up: list[Any] = []
    original_get = Session.get

    def get(self: Session, entity: Any, ident: Any, **kwargs: Any) -> Any:
        if entity is ApiKey:
            looked_up.append(ident)
        return original_get(self, entity, ident, **kwargs)

    monkeypatch.setattr(Session, "get", get)
    id_part, secret_part = tenant.plaintext.removeprefix("vk_").split("_", 1)
    guesses = [f"vk_{id_part}_{secret_part[:n]}{'A' * (43 - n) if secret_part[n:n + 1] != 'A' else 'B' * (43 - n)}"
               for n in (0, 1, 21, 42)]
    guesses.append(f"vk_{secrets.token_hex(8)}_{secret_part}")  # the right secret under an unknown id
    with database.transaction() as session:
        for guess in guesses:
            assert guess != tenant.plaintext
            with pytest.raises(AuthenticationFailed):
                authenticate(session, guess)
        authenticate(session, tenant.plaintext)
    # One constant-time comparison per attempt, always of two SHA-256 digests: the same work whatever matched, and a
    # digest of a near-miss shares no prefix with the right one.
    assert len(spy.compared) == len(guesses) + 1
    for presented, stored in spy.compared:
        assert re.fullmatch(r"[0-9a-f]{64}", presented) and re.fullmatch(r"[0-9a-f]{64}", stored)
    right = spy.compared[-1][1]
    assert spy.compared[-1][0] == right and all(presented != right for presented, _ in spy.compared[:-1])
    # The row is found by the key's non-secret id part only; the secret never reaches the database.
    assert all(isinstance(ident, str) and re.fullmatch(r"key_[0-9a-f]{16}", ident) for ident in looked_up)
    assert secret_part not in " ".join(map(str, looked_up))
