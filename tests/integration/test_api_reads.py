"""The read side of the API and its errors: one submission (with long-poll), the paginated and filtered list, the
model list, health and readiness, and the error envelope for unknown routes, wrong methods and unexpected failures.

Completed submissions come from the synchronous `POST /v1/moderations` (local engine), queued ones from
`POST /v1/submissions` with no worker running. Runs in-process against real PostgreSQL and Redis.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from app import create_app
from app.config import Settings
from app.db import Database
from tests.conftest import TenantKey, issue_key, make_settings

CATEGORIES = [
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
    "violence/graphic",
]
BLOCK_TEXT = "fuck you, you stupid idiot"
ALLOW_TEXT = "have a lovely day"


def assert_error(response: TestResponse, status: int, error_type: str, code: str | None = None,
                 param: str | None = None) -> dict[str, Any]:
    text = response.get_data(as_text=True)
    assert response.status_code == status, text
    assert response.mimetype == "application/json", text
    body = response.get_json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"type", "message", "param", "code"}
    assert error["type"] == error_type, error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
        if status == 400:
            assert param in error["message"], error  # a bad input is named in the message
    assert error["message"]
    for leak in ("Traceback", 'File "', "<html", "<!doctype", "psycopg", "sqlalchemy"):
        assert leak.lower() not in text.lower(), text
    assert response.headers["X-Request-ID"]
    return error


def moderate(client: FlaskClient, tenant: TenantKey, text: str) -> str:
    response = client.post("/v1/moderations", json={"input": text}, headers=tenant.headers)
    assert response.status_code == 200, response.get_json()
    return "sub_" + str(response.get_json()["id"]).removeprefix("modr-")


def submit(client: FlaskClient, tenant: TenantKey, **fields: Any) -> str:
    response = client.post("/v1/submissions", json={"input": "queued text", **fields}, headers=tenant.headers)
    assert response.status_code == 202, response.get_json()
    submission_id: str = response.get_json()["id"]
    return submission_id


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@contextmanager
def separate_app(settings: Settings, shared: Flask) -> Iterator[Flask]:
    """A new app (never the shared session one), with its engine and Celery closed afterwards."""
    new_app = create_app(settings)
    try:
        yield new_app
    finally:
        database: Database = new_app.extensions["verdict.db"]
        database.engine.dispose()
        new_app.extensions["celery"].close()
        shared.extensions["celery"].set_default()  # create_app made the new Celery the default; give it back


# ---- one submission ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "submission_id",
    ["sub_" + "0" * 24, "sub_does_not_exist", "x" * 2000, "%F0%9F%98%80", "sub_%00", "%ED%A0%80",
     "sub_'%20OR%20'1'='1", "sub_%0d%0aX-Injected:%201"],
    ids=["well-formed", "short", "2000-chars", "emoji", "nul", "surrogate-bytes", "sql", "crlf"],
)
def test_unknown_submission_is_404(client: FlaskClient, tenant: TenantKey, submission_id: str) -> None:
    response = client.get(f"/v1/submissions/{submission_id}", headers=tenant.headers)
    assert_error(response, 404, "not_found_error", "not_found", "id")
    assert "X-Injected" not in response.headers


@pytest.mark.parametrize("wait", ["abc", "-1", "31", "30.01", "nan", "inf", "-inf", "", "1e400", "0x10", "true"])
def test_bad_wait_is_400(client: FlaskClient, tenant: TenantKey, wait: str) -> None:
    submission_id = submit(client, tenant)
    response = client.get(f"/v1/submissions/{submission_id}?wait={wait}", headers=tenant.headers)
    assert_error(response, 400, "invalid_request_error", param="wait")


def test_unknown_query_parameter_on_one_submission_is_400(client: FlaskClient, tenant: TenantKey) -> None:
    submission_id = submit(client, tenant)
    response = client.get(f"/v1/submissions/{submission_id}?include=content", headers=tenant.headers)
    assert_error(response, 400, "invalid_request_error", "extra_forbidden", "include")


@pytest.mark.parametrize("wait", ["0", "0.5"])
def test_wait_on_a_queued_submission_returns_it_still_queued(
    client: FlaskClient, tenant: TenantKey, wait: str
) -> None:
    submission_id = submit(client, tenant, role="output", metadata={"k": "v"})
    response = client.get(f"/v1/submissions/{submission_id}?wait={wait}", headers=tenant.headers)
    assert response.status_code == 200
    body = response.get_json()
    assert body["id"] == submission_id and body["object"] == "submission"
    assert body["status"] == "queued"  # no worker runs in these tests
    assert body["verdict"] is None and body["error"] is None and body["completed_at"] is None
    assert body["role"] == "output" and body["metadata"] == {"k": "v"}
    assert body["links"] == {"self": f"/v1/submissions/{submission_id}"}


def test_completed_submission_shows_its_verdict(client: FlaskClient, tenant: TenantKey) -> None:
    submission_id = moderate(client, tenant, BLOCK_TEXT)
    body = client.get(f"/v1/submissions/{submission_id}?wait=5", headers=tenant.headers).get_json()
    assert body["status"] == "completed" and body["completed_at"]
    verdict = body["verdict"]
    assert verdict["decision"] == "block" and verdict["flagged"] is True
    assert verdict["provider"] == "local" and verdict["policy"] == "default"
    assert verdict["category_scores"]["harassment"] >= 0.8
    # Not judged by the local engine (docs/engine.md): reported as such, never as zero.
    assert set(verdict["not_judged"]) == {"harassment/threatening", "self-harm/intent", "self-harm/instructions",
                                          "sexual/minors"}
    assert verdict["category_scores"]["sexual/minors"] is None
    assert BLOCK_TEXT not in json.dumps(body)


# ---- the list ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("query", "param", "code"),
    [
        pytest.param("limit=0", "limit", "greater_than_equal", id="limit-0"),
        pytest.param("limit=-1", "limit", "greater_than_equal", id="limit-negative"),
        pytest.param("limit=101", "limit", "less_than_equal", id="limit-101"),
        pytest.param("limit=x", "limit", "int_parsing", id="limit-x"),
        pytest.param("limit=1.5", "limit", "int_parsing", id="limit-fraction"),
        pytest.param("limit=", "limit", "int_parsing", id="limit-empty"),
        pytest.param("limit=" + "9" * 5000, "limit", None, id="limit-huge"),
        pytest.param("foo=1", "foo", "extra_forbidden", id="unknown-param"),
        pytest.param("flagged=maybe", "flagged", None, id="unknown-filter"),
        pytest.param("status=bogus", "status", "literal_error", id="status-bogus"),
        pytest.param("status=QUEUED", "status", "literal_error", id="status-case"),
        pytest.param("decision=maybe", "decision", "literal_error", id="decision-bogus"),
        pytest.param("role=admin", "role", "literal_error", id="role-admin"),
        pytest.param("cursor=" + "a" * 201, "cursor", "string_too_long", id="cursor-too-long"),
    ],
)
def test_bad_list_query_is_400(client: FlaskClient, tenant: TenantKey, query: str, param: str,
                               code: str | None) -> None:
    response = client.get(f"/v1/submissions?{query}", headers=tenant.headers)
    assert_error(response, 400, "invalid_request_error", code, param)


@pytest.mark.parametrize("created_at", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
                                        "2024-01-01T00:00:00+00:00"])
def test_cursor_at_the_edges_of_time_is_not_a_500(client: FlaskClient, tenant: TenantKey, created_at: str) -> None:
    submit(client, tenant)
    cursor = b64(json.dumps([created_at, "sub_" + "f" * 24]).encode())
    response = client.get("/v1/submissions", query_string={"cursor": cursor}, headers=tenant.headers)
    if response.status_code != 200:
        assert_error(response, 400, "invalid_request_error", "invalid_cursor", "cursor")


@pytest.mark.parametrize(
    "cursor",
    [
        "!!!not-base64!!!",
        b64(b"garbage"),
        b64(b"\xff\xfe\xfd\xfc"),
        b64(b"[1, 2]"),
        b64(b'["x"]'),
        b64(b'{"a": 1, "b": 2}'),
        b64(b'"ab"'),
        b64(b'["2024-01-01T00:00:00", "sub_x"]'),
        b64(b'["2024-01-01T00:00:00+00:00", 5]'),
        b64(b'["2024-01-01T00:00:00+00:00", "sub_\\u0000"]'),
        b64(b'["2024-01-01T00:00:00+00:00", "sub_\\ud800"]'),
        b64(b'["not a date", "sub_x"]'),
        b64(b"[" * 140),
    ],
    ids=["not-base64", "base64-garbage", "base64-binary", "numbers", "one-element", "object", "string", "naive-time",
         "id-not-string", "id-with-nul", "id-with-surrogate", "bad-date", "deep"],
)
def test_bad_cursor_is_400(client: FlaskClient, tenant: TenantKey, cursor: str) -> None:
    response = client.get("/v1/submissions", query_string={"cursor": cursor}, headers=tenant.headers)
    assert_error(response, 400, "invalid_request_error", "invalid_cursor", "cursor")


@pytest.fixture
def populated(client: FlaskClient, database: Database) -> tuple[TenantKey, list[str], dict[str, str]]:
    """A fresh tenant with 5 completed submissions (mixed verdicts) then 3 queued ones; ids in creation order,
    and the decision the engine actually gave each completed one."""
    owner = issue_key(database)
    texts = [ALLOW_TEXT, BLOCK_TEXT, "thank you for your help with the report", "you are a fucking idiot",
             "the weather is nice today"]
    created = [moderate(client, owner, text) for text in texts]
    decisions = {sid: client.get(f"/v1/submissions/{sid}", headers=owner.headers).get_json()["verdict"]["decision"]
                 for sid in created}
    created += [submit(client, owner, role=role) for role in ("output", "input", "output")]
    return owner, created, decisions


def page_through(client: FlaskClient, tenant: TenantKey, query: str, limit: int) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(50):
        params: dict[str, Any] = {"limit": limit}
        if query:
            params.update(dict(part.split("=") for part in query.split("&")))
        if cursor:
            params["cursor"] = cursor
        response = client.get("/v1/submissions", query_string=params, headers=tenant.headers)
        assert response.status_code == 200, response.get_json()
        page = response.get_json()
        assert page["object"] == "list"
        assert len(page["data"]) <= limit
        seen.extend(page["data"])
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return seen
        assert page["next_cursor"] and len(page["data"]) == limit
        cursor = page["next_cursor"]
    raise AssertionError("pagination did not end")


def test_pagination_sees_every_submission_once_newest_first(
    client: FlaskClient, populated: tuple[TenantKey, list[str], dict[str, str]]
) -> None:
    owner, created, _ = populated
    first = client.get("/v1/submissions?limit=3", headers=owner.headers).get_json()
    assert len(first["data"]) == 3 and first["has_more"] is True

    items = page_through(client, owner, "", limit=3)
    ids = [item["id"] for item in items]
    assert len(ids) == len(set(ids)) == 8
    assert ids == list(reversed(created))  # newest first
    stamps = [datetime.fromisoformat(item["created_at"]) for item in items]
    assert stamps == sorted(stamps, reverse=True)
    # A page size that divides the total evenly still ends cleanly, and one big page holds everything.
    assert [i["id"] for i in page_through(client, owner, "", limit=4)] == ids
    assert [i["id"] for i in page_through(client, owner, "", limit=100)] == ids


@pytest.mark.parametrize("limit", [1, 2, 100])
def test_filters_select_the_right_submissions(
    client: FlaskClient, populated: tuple[TenantKey, list[str], dict[str, str]], limit: int
) -> None:
    owner, created, decisions = populated
    completed, queued = created[:5], created[5:]
    newest_first = list(reversed(created))

    def ids(query: str) -> list[str]:
        return [item["id"] for item in page_through(client, owner, query, limit=limit)]

    def expected(chosen: set[str]) -> list[str]:
        return [sid for sid in newest_first if sid in chosen]

    allowed = {sid for sid, decision in decisions.items() if decision == "allow"}
    blocked = {sid for sid, decision in decisions.items() if decision == "block"}
    assert created[0] in allowed and created[1] in blocked  # the engine scores these two as expected

    assert ids("status=completed") == expected(set(completed))
    assert ids("status=queued") == expected(set(queued))
    assert ids("status=processing") == []
    assert ids("status=failed") == []
    assert ids("decision=allow") == expected(allowed)
    assert ids("decision=block") == expected(blocked)
    assert ids("decision=review") == expected({s for s, d in decisions.items() if d == "review"})
    assert ids("role=output") == [created[7], created[5]]
    assert ids("role=input") == expected(set(completed) | {created[6]})
    assert ids("status=queued&role=output") == [created[7], created[5]]
    assert ids("status=queued&decision=allow") == []


def test_list_items_have_the_submission_shape(
    client: FlaskClient, populated: tuple[TenantKey, list[str], dict[str, str]]
) -> None:
    owner, created, decisions = populated
    data = {item["id"]: item for item in client.get("/v1/submissions?limit=100", headers=owner.headers)
            .get_json()["data"]}
    for sid in created[:5]:
        assert data[sid]["status"] == "completed"
        assert data[sid]["verdict"]["decision"] == decisions[sid]
    for sid in created[5:]:
        assert data[sid]["status"] == "queued" and data[sid]["verdict"] is None
    assert all(item["links"]["self"] == f"/v1/submissions/{sid}" for sid, item in data.items())


def test_empty_list(client: FlaskClient, tenant: TenantKey) -> None:
    body = client.get("/v1/submissions", headers=tenant.headers).get_json()
    assert body == {"object": "list", "data": [], "has_more": False, "next_cursor": None}


# ---- models -----------------------------------------------------------------------------------------------------

def test_models_lists_the_local_engine(client: FlaskClient, tenant: TenantKey) -> None:
    response = client.get("/v1/models", headers=tenant.headers)
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "list"
    local = [m for m in body["data"] if m["provider"] == "local"]
    assert len(local) == 1
    model = local[0]
    assert model["object"] == "model" and model["id"]
    not_judged = {"harassment/threatening", "self-harm/intent", "self-harm/instructions", "sexual/minors"}
    # In taxonomy order, and between them the whole taxonomy, each category once.
    assert model["judged_categories"] == [c for c in CATEGORIES if c not in not_judged]
    assert model["not_judged_categories"] == [c for c in CATEGORIES if c in not_judged]


# ---- routes, methods, unexpected failures -----------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/v1", "/v1/nope", "/v2/submissions", "/v1/submissions/sub_x/extra",
                                  "/V1/SUBMISSIONS", "/v1/submissions/", "/%00", "/static/x.js"])
def test_unknown_route_is_a_json_404(client: FlaskClient, tenant: TenantKey, path: str) -> None:
    response = client.get(path, headers=tenant.headers)
    assert_error(response, 404, "not_found_error", "unknown_route")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/v1/submissions", {"GET", "POST"}),
        ("PUT", "/v1/submissions", {"GET", "POST"}),
        ("PATCH", "/v1/submissions/sub_x", {"GET"}),
        ("DELETE", "/v1/submissions/sub_x", {"GET"}),
        ("GET", "/v1/moderations", {"POST"}),
        ("GET", "/v1/moderate", {"POST"}),
        ("POST", "/v1/models", {"GET"}),
        ("POST", "/healthz", {"GET"}),
    ],
)
def test_wrong_method_is_a_json_405_with_allow(
    client: FlaskClient, tenant: TenantKey, method: str, path: str, allowed: set[str]
) -> None:
    response = client.open(path, method=method, headers=tenant.headers)
    assert_error(response, 405, "invalid_request_error", "method_not_allowed")
    allow = {m.strip() for m in response.headers["Allow"].split(",")}
    assert allowed <= allow and method not in allow


def test_unexpected_exception_is_a_500_without_internals(app: Flask, settings: Settings) -> None:
    with separate_app(settings, app) as throwaway:
        @throwaway.get("/boom")
        def boom() -> str:
            raise RuntimeError("secret internal detail: /etc/verdict/db-password")

        response = throwaway.test_client().get("/boom", headers={"X-Request-ID": "trace-500"})

    error = assert_error(response, 500, "api_error", "internal_error")
    assert error["param"] is None
    text = response.get_data(as_text=True)
    assert "secret internal detail" not in text and "RuntimeError" not in text and "boom" not in text
    assert response.headers["X-Request-ID"] == "trace-500"
    assert "X-Request-ID" in error["message"]


# ---- health and readiness ---------------------------------------------------------------------------------------

def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_checks_database_and_broker(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}


@pytest.mark.parametrize("down", ["broker", "database"])
def test_readyz_is_503_when_a_dependency_is_down(app: Flask, database_url: str, redis_url: str, down: str) -> None:
    closed_database = "postgresql+psycopg://postgres@127.0.0.1:1/verdict"
    settings = make_settings(closed_database if down == "database" else database_url,
                             "redis://127.0.0.1:1/0" if down == "broker" else redis_url)
    with separate_app(settings, app) as broken:
        response = broken.test_client().get("/readyz")
    error = assert_error(response, 503, "service_unavailable", "not_ready")
    assert down in error["message"]
    assert ("broker" if down == "database" else "database") not in error["message"]
    assert "127.0.0.1" not in error["message"] and "redis://" not in error["message"]

