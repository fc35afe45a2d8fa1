"""Authentication, scopes, tenant isolation and request ids, on every keyed route.

Bad, unknown, revoked and expired keys get 401 (`authentication_error`, with `WWW-Authenticate`) and change nothing;
a key lacking a scope gets 403; another tenant's submission is indistinguishable from a missing one; every response
carries a well-formed `X-Request-ID` and `X-Processing-Time-Ms`; keys are stored only as a SHA-256 digest.
Runs in-process against real PostgreSQL and Redis; no worker is needed.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from werkzeug.test import TestResponse

from app.db import Database
from app.models import ApiKey, AuditEvent, Submission, utcnow
from app.use_cases.keys import revoke_key
from tests.conftest import TenantKey, issue_key

GENERATED_ID = re.compile(r"^req_[0-9a-f]{32}$")

# (method, path, JSON body): every route that needs a key. `{id}` is filled with a real submission id.
KEYED_ROUTES: list[Any] = [
    pytest.param("POST", "/v1/submissions", {"input": "hello"}, id="post-submissions"),
    pytest.param("GET", "/v1/submissions", None, id="list-submissions"),
    pytest.param("GET", "/v1/submissions/{id}", None, id="get-submission"),
    pytest.param("POST", "/v1/moderations", {"input": "hello"}, id="post-moderations"),
    pytest.param("POST", "/v1/moderate", {"input": "hello"}, id="post-moderate"),
    pytest.param("GET", "/v1/models", None, id="get-models"),
]

BAD_CREDENTIALS = ["missing", "basic", "bearer-empty", "bearer-only", "random-string", "no-scheme",
                   "key-plus-junk", "unknown-key", "wrong-secret", "revoked", "expired"]


def call(client: FlaskClient, method: str, path: str, body: dict[str, Any] | None,
         headers: dict[str, str]) -> TestResponse:
    return client.open(path, method=method, json=body, headers=headers)


def count_submissions(database: Database) -> int:
    with database.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(Submission)) or 0)


def assert_envelope(response: TestResponse, status: int, error_type: str, code: str) -> dict[str, Any]:
    text = response.get_data(as_text=True)
    assert response.status_code == status, text
    body = response.get_json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"type", "message", "param", "code"}
    assert error["type"] == error_type
    assert error["code"] == code
    assert error["message"] and "Traceback" not in text
    return error


def submission_of(client: FlaskClient, tenant: TenantKey, **fields: Any) -> str:
    response = client.post("/v1/submissions", json={"input": "isolation probe", **fields}, headers=tenant.headers)
    assert response.status_code == 202, response.get_json()
    submission_id: str = response.get_json()["id"]
    return submission_id


def fill(path: str, client: FlaskClient, tenant: TenantKey) -> str:
    return path.format(id=submission_of(client, tenant)) if "{id}" in path else path


def authorization_for(case: str, database: Database) -> str | None:
    """The Authorization header of one kind of bad credential (None: send no header)."""
    if case == "missing":
        return None
    if case == "basic":
        return "Basic dXNlcjpwYXNzd29yZA=="
    if case == "bearer-empty":
        return "Bearer "
    if case == "bearer-only":
        return "Bearer"
    if case == "random-string":
        return "Bearer " + secrets.token_urlsafe(24)
    if case == "unknown-key":
        return f"Bearer vk_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
    key = issue_key(database, scopes=("submit", "read"))
    if case == "no-scheme":
        return key.plaintext
    if case == "key-plus-junk":
        return f"Bearer {key.plaintext}x"
    if case == "wrong-secret":
        id_part = key.key_id.removeprefix("key_")
        wrong = f"vk_{id_part}_{secrets.token_urlsafe(32)}"
        assert wrong != key.plaintext
        return f"Bearer {wrong}"
    with database.transaction() as session:
        if case == "revoked":
            revoke_key(session, key.key_id)
        elif case == "expired":
            row = session.get(ApiKey, key.key_id)
            assert row is not None
            row.expires_at = utcnow() - timedelta(seconds=1)
        else:
            raise AssertionError(case)
    return f"Bearer {key.plaintext}"


@pytest.mark.parametrize("case", BAD_CREDENTIALS)
@pytest.mark.parametrize(("method", "path", "body"), KEYED_ROUTES)
def test_bad_credentials_are_401_everywhere(
    client: FlaskClient, database: Database, tenant: TenantKey, case: str, method: str, path: str,
    body: dict[str, Any] | None,
) -> None:
    path = fill(path, client, tenant)
    authorization = authorization_for(case, database)
    headers = {} if authorization is None else {"Authorization": authorization}
    before = count_submissions(database)

    response = call(client, method, path, body, headers)

    assert_envelope(response, 401, "authentication_error", "invalid_api_key")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.headers["X-Request-ID"]
    assert count_submissions(database) == before
    token = (authorization or "").removeprefix("Bearer ").removeprefix("Basic ").strip()
    if len(token) >= 8:
        # Whatever was presented is never echoed back.
        assert token not in response.get_data(as_text=True)


@pytest.mark.parametrize(("method", "path", "body"), KEYED_ROUTES)
def test_valid_key_passes_on_every_route(
    client: FlaskClient, tenant: TenantKey, method: str, path: str, body: dict[str, Any] | None
) -> None:
    # The positive control for the test above: the same requests with a good key are not refused.
    path = fill(path, client, tenant)
    response = call(client, method, path, body, tenant.headers)
    assert response.status_code in (200, 202), response.get_json()


def test_auth_is_checked_before_the_body(client: FlaskClient, database: Database) -> None:
    # A malformed (or oversized) body from an unauthenticated caller learns nothing about validation.
    before = count_submissions(database)
    for data in (b"{not json", b"x" * 2_000_000):
        response = client.post("/v1/submissions", data=data, content_type="application/json")
        assert_envelope(response, 401, "authentication_error", "invalid_api_key")
    assert count_submissions(database) == before


def test_key_expiring_in_the_future_still_works(client: FlaskClient, database: Database) -> None:
    key = issue_key(database, scopes=("read",))
    with database.transaction() as session:
        row = session.get(ApiKey, key.key_id)
        assert row is not None
        row.expires_at = utcnow() + timedelta(hours=1)
    assert client.get("/v1/submissions", headers=key.headers).status_code == 200


def test_lowercase_bearer_scheme_is_accepted(client: FlaskClient, tenant: TenantKey) -> None:
    # RFC 7235: the auth scheme is case-insensitive.
    response = client.get("/v1/models", headers={"Authorization": f"bearer {tenant.plaintext}"})
    assert response.status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_endpoints_need_no_key(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200, response.get_json()
    assert "WWW-Authenticate" not in response.headers


# ---- scopes -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("scopes", "method", "path", "body", "missing"),
    [
        pytest.param(("read",), "POST", "/v1/submissions", {"input": "x"}, "submit", id="read-posts-submission"),
        pytest.param(("read",), "POST", "/v1/moderations", {"input": "x"}, "submit", id="read-posts-moderation"),
        pytest.param(("read",), "POST", "/v1/moderate", {"input": "x"}, "submit", id="read-posts-moderate"),
        pytest.param(("read",), "POST", "/v1/submissions", {"input": 5}, "submit", id="read-posts-bad-body"),
        pytest.param(("submit",), "GET", "/v1/submissions", None, "read", id="submit-lists"),
        pytest.param(("submit",), "GET", "/v1/submissions/{id}", None, "read", id="submit-gets-one"),
        pytest.param(("audit",), "GET", "/v1/submissions", None, "read", id="audit-lists"),
        pytest.param(("audit", "admin"), "POST", "/v1/submissions", {"input": "x"}, "submit", id="admin-posts"),
    ],
)
def test_missing_scope_is_403(
    client: FlaskClient, database: Database, tenant: TenantKey, scopes: tuple[str, ...], method: str, path: str,
    body: dict[str, Any] | None, missing: str,
) -> None:
    limited = issue_key(database, tenant_name=tenant.tenant_name, scopes=scopes)
    path = fill(path, client, tenant)
    before = count_submissions(database)

    response = call(client, method, path, body, limited.headers)

    error = assert_envelope(response, 403, "permission_error", "missing_scope")
    assert f"'{missing}'" in error["message"]
    assert "WWW-Authenticate" not in response.headers
    assert count_submissions(database) == before


@pytest.mark.parametrize(
    ("scopes", "method", "path", "body", "status"),
    [
        pytest.param(("read",), "GET", "/v1/submissions", None, 200, id="read-lists"),
        pytest.param(("read",), "GET", "/v1/submissions/{id}", None, 200, id="read-gets-one"),
        pytest.param(("submit",), "POST", "/v1/submissions", {"input": "x"}, 202, id="submit-posts"),
        pytest.param(("submit",), "POST", "/v1/moderations", {"input": "x"}, 200, id="submit-moderates"),
        pytest.param(("audit",), "GET", "/v1/models", None, 200, id="any-key-lists-models"),
    ],
)
def test_granted_scope_is_enough(
    client: FlaskClient, database: Database, tenant: TenantKey, scopes: tuple[str, ...], method: str, path: str,
    body: dict[str, Any] | None, status: int,
) -> None:
    limited = issue_key(database, tenant_name=tenant.tenant_name, scopes=scopes)
    path = fill(path, client, tenant)
    response = call(client, method, path, body, limited.headers)
    assert response.status_code == status, response.get_json()


# ---- tenant isolation -------------------------------------------------------------------------------------------

def _without_request_ids(response: TestResponse) -> tuple[int, Any, list[tuple[str, str]]]:
    headers = sorted((k, v) for k, v in response.headers.items()
                     if k not in ("X-Request-ID", "X-Processing-Time-Ms", "Content-Length")
                     and not k.startswith("X-RateLimit-Remaining-"))
    return response.status_code, response.get_json(), headers


@pytest.mark.parametrize("wait", ["", "?wait=0"])
def test_other_tenants_submission_looks_missing(
    client: FlaskClient, tenant: TenantKey, other_tenant: TenantKey, wait: str
) -> None:
    foreign = submission_of(client, tenant)
    missing = "sub_" + secrets.token_hex(12)

    theirs = client.get(f"/v1/submissions/{foreign}{wait}", headers=other_tenant.headers)
    absent = client.get(f"/v1/submissions/{missing}{wait}", headers=other_tenant.headers)

    assert_envelope(theirs, 404, "not_found_error", "not_found")
    assert _without_request_ids(theirs) == _without_request_ids(absent)
    assert foreign not in theirs.get_data(as_text=True)
    # The owner still sees it.
    assert client.get(f"/v1/submissions/{foreign}", headers=tenant.headers).status_code == 200


def test_other_tenants_completed_moderation_looks_missing(
    client: FlaskClient, tenant: TenantKey, other_tenant: TenantKey
) -> None:
    response = client.post("/v1/moderations", json={"input": "have a lovely day"}, headers=tenant.headers)
    assert response.status_code == 200
    foreign = "sub_" + response.get_json()["id"].removeprefix("modr-")
    assert client.get(f"/v1/submissions/{foreign}", headers=tenant.headers).status_code == 200
    theirs = client.get(f"/v1/submissions/{foreign}", headers=other_tenant.headers)
    absent = client.get(f"/v1/submissions/sub_{secrets.token_hex(12)}", headers=other_tenant.headers)
    assert _without_request_ids(theirs) == _without_request_ids(absent)


LIST_FILTERS = ["", "status=queued", "status=processing", "status=completed", "status=failed", "decision=allow",
                "decision=review", "decision=block", "role=input", "role=output", "limit=100"]


def test_list_never_shows_another_tenants_submissions(
    client: FlaskClient, tenant: TenantKey, other_tenant: TenantKey
) -> None:
    theirs = {submission_of(client, tenant), submission_of(client, tenant, role="output")}
    for text in ("have a lovely day", "fuck you, you stupid idiot"):
        moderated = client.post("/v1/moderations", json={"input": text}, headers=tenant.headers).get_json()
        theirs.add("sub_" + moderated["id"].removeprefix("modr-"))
    mine = submission_of(client, other_tenant)

    for query in LIST_FILTERS:
        response = client.get(f"/v1/submissions?{query}", headers=other_tenant.headers)
        assert response.status_code == 200, (query, response.get_json())
        ids = {item["id"] for item in response.get_json()["data"]}
        assert not ids & theirs, query
        assert ids <= {mine}, query
    # And the owner sees all of its own: the filters above are not simply empty.
    own = {item["id"] for item in client.get("/v1/submissions", headers=tenant.headers).get_json()["data"]}
    assert own == theirs


def test_cursor_from_another_tenant_does_not_leak(
    client: FlaskClient, tenant: TenantKey, other_tenant: TenantKey
) -> None:
    theirs = {submission_of(client, tenant) for _ in range(3)}
    page = client.get("/v1/submissions?limit=1", headers=tenant.headers).get_json()
    assert page["has_more"] and page["next_cursor"]
    response = client.get(f"/v1/submissions?limit=100&cursor={page['next_cursor']}", headers=other_tenant.headers)
    assert response.status_code == 200
    assert not {item["id"] for item in response.get_json()["data"]} & theirs


def test_tenant_id_cannot_be_chosen_by_the_client(
    client: FlaskClient, tenant: TenantKey, other_tenant: TenantKey
) -> None:
    submission_of(client, tenant)
    response = client.get(f"/v1/submissions?tenant_id={tenant.tenant_id}", headers=other_tenant.headers)
    assert_envelope(response, 400, "invalid_request_error", "extra_forbidden")
    response = client.post("/v1/submissions", json={"input": "x", "tenant_id": tenant.tenant_id},
                           headers=other_tenant.headers)
    assert_envelope(response, 400, "invalid_request_error", "extra_forbidden")


# ---- request ids and timing headers -----------------------------------------------------------------------------

@pytest.mark.parametrize("request_id", ["abc-123", "req_client.42:retry-1", "A" * 128,
                                        "0f8fad5b-d9cb-469f-a165-70867728950e"])
def test_valid_client_request_id_is_echoed(client: FlaskClient, tenant: TenantKey, request_id: str) -> None:
    for response in (client.get("/healthz", headers={"X-Request-ID": request_id}),
                     client.get("/v1/submissions", headers={**tenant.headers, "X-Request-ID": request_id}),
                     client.get("/v1/nope", headers={"X-Request-ID": request_id})):
        assert response.headers["X-Request-ID"] == request_id


@pytest.mark.parametrize(
    "request_id",
    ["has spaces", "A" * 129, "x" * 200, "caf\u00e9", "\u65e5\u672c", "", "a;b", "a\tb", "<script>", "a/b"],
    ids=["spaces", "129-chars", "200-chars", "latin1", "cjk", "empty", "semicolon", "tab", "html", "slash"],
)
def test_invalid_client_request_id_is_replaced(client: FlaskClient, tenant: TenantKey, request_id: str) -> None:
    response = client.get("/v1/submissions", headers={**tenant.headers, "X-Request-ID": request_id})
    assert response.status_code == 200
    assert GENERATED_ID.match(response.headers["X-Request-ID"])


@pytest.mark.parametrize("request_id", ["abc\r\nX-Injected: 1", "abc\nX-Injected: 1", "abc\rdef", "abc\x00def"],
                         ids=["crlf", "lf", "cr", "nul"])
def test_request_id_with_control_characters_is_replaced(client: FlaskClient, request_id: str) -> None:
    # werkzeug's test client refuses newlines in `headers=`, so put the raw value in the WSGI environ, as a
    # lenient front server might.
    response = client.get("/healthz", environ_overrides={"HTTP_X_REQUEST_ID": request_id})
    assert response.status_code == 200
    assert GENERATED_ID.match(response.headers["X-Request-ID"])
    assert "X-Injected" not in response.headers


def test_generated_request_ids_are_unique(client: FlaskClient) -> None:
    ids = {client.get("/healthz").headers["X-Request-ID"] for _ in range(20)}
    assert len(ids) == 20 and all(GENERATED_ID.match(i) for i in ids)


@pytest.mark.parametrize(
    ("method", "path", "body", "keyed", "status"),
    [
        pytest.param("GET", "/healthz", None, False, 200, id="200"),
        pytest.param("POST", "/v1/submissions", {"input": "x"}, True, 202, id="202"),
        pytest.param("POST", "/v1/submissions", {"input": 5}, True, 400, id="400"),
        pytest.param("GET", "/v1/submissions", None, False, 401, id="401"),
        pytest.param("GET", "/v1/submissions/sub_000000000000000000000000", None, True, 404, id="404-object"),
        pytest.param("GET", "/v1/no-such-route", None, False, 404, id="404-route"),
        pytest.param("DELETE", "/v1/submissions", None, True, 405, id="405"),
        pytest.param("POST", "/v1/submissions", {"input": ["y" * 30_000] * 40}, True, 413, id="413"),
        pytest.param("PUT", "/healthz", None, False, 405, id="405-health"),
    ],
)
def test_every_response_carries_request_id_and_timing(
    client: FlaskClient, tenant: TenantKey, method: str, path: str, body: dict[str, Any] | None, keyed: bool,
    status: int,
) -> None:
    response = call(client, method, path, body, tenant.headers if keyed else {})
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert GENERATED_ID.match(response.headers["X-Request-ID"])
    assert float(response.headers["X-Processing-Time-Ms"]) >= 0
    if status >= 400:
        assert set(response.get_json()["error"]) == {"type", "message", "param", "code"}


def test_rejected_request_keeps_the_client_request_id(client: FlaskClient) -> None:
    # The id a client quotes when reporting a failure must be the one it sent, on errors too.
    response = client.get("/v1/submissions", headers={"X-Request-ID": "trace-401"})
    assert response.status_code == 401
    assert response.headers["X-Request-ID"] == "trace-401"


# ---- keys at rest -----------------------------------------------------------------------------------------------

def test_key_is_stored_only_as_a_digest(database: Database, tenant: TenantKey) -> None:
    match = re.fullmatch(r"vk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})", tenant.plaintext)
    assert match is not None and tenant.key_id == f"key_{match.group(1)}"
    secret_part = match.group(2)
    with database.transaction() as session:
        row = session.get(ApiKey, tenant.key_id)
        assert row is not None
        assert re.fullmatch(r"[0-9a-f]{64}", row.secret_hash)
        assert row.secret_hash != tenant.plaintext
        assert row.secret_hash == hashlib.sha256(tenant.plaintext.encode()).hexdigest()
        for column in ApiKey.__table__.columns:
            value = str(getattr(row, column.key))
            assert tenant.plaintext not in value and secret_part not in value, column.key
        events = session.scalars(select(AuditEvent).where(AuditEvent.tenant_id == tenant.tenant_id)).all()
        assert events, "key creation is audited"
        for event in events:
            text = " ".join(str(getattr(event, column.key)) for column in AuditEvent.__table__.columns)
            assert secret_part not in text
            assert tenant.plaintext not in text
