"""Hostile, malformed, wrong-typed and oversized input to the write endpoints.

`POST /v1/submissions` (single and batch) and the OpenAI-compatible `POST /v1/moderations` / `POST /v1/moderate`.
Every refusal must use the one error envelope with the right status, name the field in `param` and the message,
carry no stack trace, and leave the database exactly as it was (submissions and audit events counted before/after).
Runs in-process against real PostgreSQL and Redis; no worker is needed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from werkzeug.test import EnvironBuilder, TestResponse, run_wsgi_app
from werkzeug.wrappers import Request

from app.config import Settings
from app.db import Database
from app.models import AuditEvent, Submission
from tests.conftest import TenantKey

WRITE_ENDPOINTS = ("/v1/submissions", "/v1/moderations", "/v1/moderate")
MODERATION_ENDPOINTS = ("/v1/moderations", "/v1/moderate")
JSON = "application/json"

# OpenAI's moderation taxonomy, as the spec names it (§3); written out so a change to the code cannot hide here.
CATEGORIES = {
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
    "violence/graphic",
}

ERROR_TYPES = {400: "invalid_request_error", 413: "request_too_large", 415: "invalid_request_error"}


def assert_error(response: TestResponse, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    """The one envelope, with the expected status, type, code and (if asked) param; no trace of internals."""
    text = response.get_data(as_text=True)
    assert response.status_code == status, text
    assert response.mimetype == JSON
    body = response.get_json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"type", "message", "param", "code"}, error
    assert error["type"] == ERROR_TYPES[status]
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"]
    if error["param"]:
        # The message names the field the client wrote (`items[7].input` → "input").
        assert error["param"].split(".")[-1].split("[")[0].lower() in error["message"].lower(), error
    for leak in ("Traceback", 'File "', "pydantic", "sqlalchemy", "psycopg"):
        assert leak not in text, text
    assert response.headers["X-Request-ID"]
    return error


def stored(database: Database, tenant: TenantKey) -> tuple[int, int]:
    """(submissions, audit events) of the tenant: a refused request must change neither."""
    with database.transaction() as session:
        submissions = session.scalar(
            select(func.count()).select_from(Submission).where(Submission.tenant_id == tenant.tenant_id))
        events = session.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.tenant_id == tenant.tenant_id))
        return int(submissions or 0), int(events or 0)


def post_raw(client: FlaskClient, tenant: TenantKey, path: str, data: bytes | str | None,
             content_type: str | None = JSON) -> TestResponse:
    headers = dict(tenant.headers)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return client.post(path, data=data, headers=headers)


# ---- the body itself: media type, emptiness, syntax, encoding, nesting, characters ------------------------------

DEEP = "[" * 100_000
BODY_CASES: list[Any] = [
    # (raw body, content type, status, code, param)
    pytest.param(None, None, 415, "unsupported_media_type", None, id="no-body-no-content-type"),
    pytest.param(None, JSON, 400, "empty_body", None, id="no-body"),
    pytest.param(b"", JSON, 400, "empty_body", None, id="empty-body"),
    pytest.param(b" \r\n\t ", JSON, 400, "empty_body", None, id="whitespace-body"),
    pytest.param(b'{"input": ', JSON, 400, "invalid_json", None, id="truncated-json"),
    pytest.param(b"{'input': 'x'}", JSON, 400, "invalid_json", None, id="single-quotes"),
    pytest.param(b'{"input": "x",}', JSON, 400, "invalid_json", None, id="trailing-comma"),
    pytest.param(b'{"input": "a\nb"}', JSON, 400, "invalid_json", None, id="raw-control-char"),
    pytest.param(b'{"input": "x"} {"input": "y"}', JSON, 400, "invalid_json", None, id="two-documents"),
    pytest.param(b'{"input": "x"}', "text/plain", 415, "unsupported_media_type", None, id="text-plain"),
    pytest.param(b"input=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type", None, id="form"),
    pytest.param(b'{"input": "x"}', "application/jsonx", 415, "unsupported_media_type", None, id="json-lookalike"),
    pytest.param(b'[{"input": "x"}]', JSON, 400, "invalid_body", None, id="json-list"),
    pytest.param(b'"input"', JSON, 400, "invalid_body", None, id="json-string"),
    pytest.param(b"42", JSON, 400, "invalid_body", None, id="json-number"),
    pytest.param(b"null", JSON, 400, "invalid_body", None, id="json-null"),
    pytest.param(b'{"input": "caf\xe9"}', JSON, 400, "invalid_utf8", None, id="latin1-bytes"),
    pytest.param(b'{"input": "\xff\xfe\xfd"}', JSON, 400, "invalid_utf8", None, id="invalid-utf8"),
    pytest.param('{"input": "x"}'.encode("utf-16"), JSON, 400, "invalid_utf8", None, id="utf16"),
    pytest.param(b'{"input": "x", "n": NaN}', JSON, 400, "invalid_json", None, id="nan"),
    pytest.param(b'{"input": "x", "n": Infinity}', JSON, 400, "invalid_json", None, id="infinity"),
    pytest.param(b'{"input": "x", "n": -Infinity}', JSON, 400, "invalid_json", None, id="minus-infinity"),
    pytest.param(b'{"input": "x", "n": 1e999}', JSON, 400, "invalid_json", None, id="float-overflow"),
    pytest.param(b'{"input": "x", "n": ' + b"9" * 5000 + b"}", JSON, 400, "invalid_json", None, id="huge-int"),
    pytest.param(DEEP.encode(), JSON, 400, "too_deep", None, id="100k-open-brackets"),
    pytest.param(('{"input": ' + DEEP + "]" * 100_000 + "}").encode(), JSON, 400, "too_deep", None,
                 id="100k-nested-input"),
    pytest.param(b'{"input": "a\\u0000b"}', JSON, 400, "invalid_text", "input", id="nul-in-text"),
    pytest.param(b'{"input": ["ok", "a\\u0000"]}', JSON, 400, "invalid_text", "input[1]", id="nul-in-list"),
    pytest.param(b'{"input": "\\ud800"}', JSON, 400, "invalid_text", "input", id="lone-surrogate"),
    pytest.param(b'{"input": "x\\udfff"}', JSON, 400, "invalid_text", "input", id="lone-low-surrogate"),
    pytest.param(b'{"input": "x", "\\ud800": 1}', JSON, 400, "invalid_text", None, id="surrogate-in-key"),
]


@pytest.mark.parametrize("path", WRITE_ENDPOINTS)
@pytest.mark.parametrize(("data", "content_type", "status", "code", "param"), BODY_CASES)
def test_malformed_body_is_refused_and_stores_nothing(
    client: FlaskClient, database: Database, tenant: TenantKey, path: str, data: bytes | None,
    content_type: str | None, status: int, code: str, param: str | None,
) -> None:
    before = stored(database, tenant)
    response = post_raw(client, tenant, path, data, content_type)
    assert_error(response, status, code, param)
    assert stored(database, tenant) == before


def test_nul_inside_metadata_names_the_nested_field(
    client: FlaskClient, database: Database, tenant: TenantKey
) -> None:
    before = stored(database, tenant)
    response = post_raw(client, tenant, "/v1/submissions", b'{"input": "x", "metadata": {"a": ["ok", "\\u0000"]}}')
    assert_error(response, 400, "invalid_text", "metadata.a[1]")
    assert stored(database, tenant) == before


@pytest.mark.parametrize("path", WRITE_ENDPOINTS)
def test_json_with_charset_parameter_is_accepted(client: FlaskClient, tenant: TenantKey, path: str) -> None:
    response = post_raw(client, tenant, path, json.dumps({"input": "hello there"}), "application/json; charset=utf-8")
    assert response.status_code in (200, 202), response.get_json()


# ---- wrong types and values in a submission --------------------------------------------------------------------

WRONG_FIELDS: list[Any] = [
    # (body, param, code; None: any code)
    pytest.param({}, "input", "missing", id="input-missing"),
    pytest.param({"input": 42}, "input", "value_error", id="input-number"),
    pytest.param({"input": None}, "input", "value_error", id="input-null"),
    pytest.param({"input": True}, "input", "value_error", id="input-bool"),
    pytest.param({"input": {"text": "x"}}, "input", "value_error", id="input-object"),
    pytest.param({"input": ["ok", 3]}, "input", "value_error", id="input-list-with-number"),
    pytest.param({"input": [["nested"]]}, "input", "value_error", id="input-list-of-lists"),
    pytest.param({"input": "x", "mask": "true"}, "mask", "bool_type", id="mask-string"),
    pytest.param({"input": "x", "mask": 1}, "mask", "bool_type", id="mask-int"),
    pytest.param({"input": "x", "role": "admin"}, "role", "literal_error", id="role-admin"),
    pytest.param({"input": "x", "role": "INPUT"}, "role", "literal_error", id="role-case"),
    pytest.param({"input": "x", "role": 1}, "role", "literal_error", id="role-number"),
    pytest.param({"input": "x", "metadata": ["a"]}, "metadata", "dict_type", id="metadata-list"),
    pytest.param({"input": "x", "metadata": "k=v"}, "metadata", "dict_type", id="metadata-string"),
    pytest.param({"input": "x", "conversation_id": "has spaces"}, "conversation_id", "string_pattern_mismatch",
                 id="conversation-id-spaces"),
    pytest.param({"input": "x", "conversation_id": "c" * 129}, "conversation_id", "string_too_long",
                 id="conversation-id-129"),
    pytest.param({"input": "x", "conversation_id": ""}, "conversation_id", "string_too_short",
                 id="conversation-id-empty"),
    pytest.param({"input": "x", "conversation_id": "caf\u00e9"}, "conversation_id", "string_pattern_mismatch",
                 id="conversation-id-unicode"),
    pytest.param({"input": "x", "conversation_id": 7}, "conversation_id", "string_type", id="conversation-id-int"),
    pytest.param({"input": "x", "turn_id": "a\r\nb"}, "turn_id", "string_pattern_mismatch", id="turn-id-crlf"),
    pytest.param({"input": "x", "policy": "no-such-policy"}, "policy", "unknown_policy", id="policy-unknown"),
    pytest.param({"input": "x", "policy": ""}, "policy", "string_too_short", id="policy-empty"),
    pytest.param({"input": "x", "policy": "p" * 65}, "policy", "string_too_long", id="policy-65"),
    pytest.param({"input": "x", "model": 5}, "model", "string_type", id="model-int"),
    pytest.param({"input": "x", "model": ""}, "model", "string_too_short", id="model-empty"),
    pytest.param({"input": "x", "callback_url": "ftp://x"}, "callback_url", None, id="callback-ftp"),
    pytest.param({"input": "x", "callback_url": "not a url"}, "callback_url", None, id="callback-text"),
    pytest.param({"input": "x", "callback_url": "http://"}, "callback_url", None, id="callback-no-host"),
    pytest.param({"input": "x", "callback_url": "http://[::1"}, "callback_url", None,
                 id="callback-broken-ipv6"),
    pytest.param({"input": "x", "callback_url": "javascript:alert(1)"}, "callback_url", None,
                 id="callback-javascript"),
    pytest.param({"input": "x", "callback_url": "https://x.test/" + "a" * 2048}, "callback_url", "string_too_long",
                 id="callback-too-long"),
    pytest.param({"input": "x", "callback_url": 80}, "callback_url", "string_type", id="callback-int"),
    pytest.param({"input": "x", "inputs": "y"}, "inputs", "extra_forbidden", id="unknown-field"),
    pytest.param({"input": "x", "tenant_id": "ten_other"}, "tenant_id", "extra_forbidden", id="tenant-id-field"),
    pytest.param({"input": "x", "items": [{"input": "y"}]}, "input", "extra_forbidden", id="input-and-items"),
    pytest.param({"items": "x"}, "items", "list_type", id="items-string"),
    pytest.param({"items": [1]}, "items[0]", "model_type", id="items-number"),
    pytest.param({"items": None}, "items", "list_type", id="items-null"),
]


@pytest.mark.parametrize(("body", "param", "code"), WRONG_FIELDS)
def test_wrong_field_is_named_and_stores_nothing(
    client: FlaskClient, database: Database, tenant: TenantKey, body: dict[str, Any], param: str, code: str | None
) -> None:
    before = stored(database, tenant)
    response = client.post("/v1/submissions", json=body, headers=tenant.headers)
    assert_error(response, 400, code or response.get_json()["error"]["code"], param)
    assert stored(database, tenant) == before


@pytest.mark.parametrize("value", ["", "   ", "\n\t", [], ["ok", ""], [" "]],
                         ids=["empty", "spaces", "whitespace", "empty-list", "list-with-empty", "list-with-blank"])
def test_empty_input_is_refused(client: FlaskClient, database: Database, tenant: TenantKey, value: Any) -> None:
    before = stored(database, tenant)
    response = client.post("/v1/submissions", json={"input": value}, headers=tenant.headers)
    assert_error(response, 400, "value_error", "input")
    assert stored(database, tenant) == before


# ---- sizes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", WRITE_ENDPOINTS)
def test_one_megabyte_text_is_refused_and_stores_nothing(
    client: FlaskClient, database: Database, tenant: TenantKey, path: str
) -> None:
    before = stored(database, tenant)
    response = client.post(path, json={"input": "a" * 1_000_000}, headers=tenant.headers)
    # ~1 MB of JSON is just under MAX_REQUEST_BYTES, so the text limit refuses it (413 would be acceptable too).
    if response.status_code == 413:
        assert_error(response, 413, "request_too_large")
    else:
        param, code = ("input", "value_error") if path == "/v1/submissions" else ("input[0]", "text_too_long")
        assert_error(response, 400, code, param)
    assert stored(database, tenant) == before


@pytest.mark.parametrize("path", WRITE_ENDPOINTS)
def test_body_over_max_request_bytes_is_413(
    client: FlaskClient, database: Database, tenant: TenantKey, settings: Settings, path: str
) -> None:
    before = stored(database, tenant)
    texts = ["b" * 30_000] * 40  # ~1.2 MB of otherwise well-formed JSON
    data = json.dumps({"input": texts})
    assert len(data) > settings.max_request_bytes
    response = post_raw(client, tenant, path, data)
    assert_error(response, 413, "request_too_large", None)
    assert stored(database, tenant) == before


CHUNKED_BODIES = {
    # The first MiB is a whole valid object: cut there, it was accepted and the rest dropped (issue 17, item 4).
    "valid-first-mib-then-more": lambda limit: _padded(limit) + b"x" * (4 * limit),
    # Cut at the limit, it was a JSON error "at column 1048577" instead of 413.
    "one-long-text": lambda limit: b'{"input": "' + b"a" * (limit + 300_000) + b'"}',
    "one-byte-over": lambda limit: _padded(limit + 1),
}


def _padded(size: int) -> bytes:
    head = b'{"input": "no stated length"}'
    return head + b" " * (size - len(head))


def _post_chunked(client: FlaskClient, tenant: TenantKey, path: str, data: bytes) -> TestResponse:
    # No Content-Length, and the input terminated by the server: how gunicorn presents a chunked body. (The test
    # client would count the bytes and set the length, so the environment is made by hand.)
    environ = EnvironBuilder(path=path, method="POST", headers=tenant.headers, content_type="application/json",
                             data=data).get_environ()
    del environ["CONTENT_LENGTH"]
    environ["wsgi.input_terminated"] = True
    app_iter, status, headers = run_wsgi_app(client.application, environ, buffered=True)
    return TestResponse(app_iter, status, headers, request=Request(environ))


@pytest.mark.parametrize("body", CHUNKED_BODIES.values(), ids=CHUNKED_BODIES.keys())
@pytest.mark.parametrize("path", WRITE_ENDPOINTS)
def test_a_body_of_no_stated_length_over_max_request_bytes_is_413_never_cut(
    client: FlaskClient, database: Database, tenant: TenantKey, settings: Settings, path: str,
    body: Callable[[int], bytes],
) -> None:
    before = stored(database, tenant)
    response = _post_chunked(client, tenant, path, body(settings.max_request_bytes))
    assert_error(response, 413, "request_too_large", None)
    assert stored(database, tenant) == before


def test_a_body_of_no_stated_length_of_exactly_max_request_bytes_is_read_whole(
    client: FlaskClient, tenant: TenantKey, settings: Settings
) -> None:
    response = _post_chunked(client, tenant, "/v1/submissions", _padded(settings.max_request_bytes))
    assert response.status_code == 202, response.get_json()


def test_text_of_exactly_max_chars_is_accepted_and_one_more_refused(
    client: FlaskClient, database: Database, tenant: TenantKey, settings: Settings
) -> None:
    limit = settings.max_text_chars
    accepted = client.post("/v1/submissions", json={"input": "a" * limit}, headers=tenant.headers)
    assert accepted.status_code == 202, accepted.get_json()
    before = stored(database, tenant)
    for value in ("a" * (limit + 1), ["ok", "a" * (limit + 1)]):
        refused = client.post("/v1/submissions", json={"input": value}, headers=tenant.headers)
        error = assert_error(refused, 400, "value_error", "input")
        assert str(limit) in error["message"]
    assert stored(database, tenant) == before


def test_texts_per_submission_limit(
    client: FlaskClient, database: Database, tenant: TenantKey, settings: Settings
) -> None:
    most = settings.max_texts_per_submission
    assert most == 32
    accepted = client.post("/v1/submissions", json={"input": [f"text {i}" for i in range(most)]},
                           headers=tenant.headers)
    assert accepted.status_code == 202, accepted.get_json()
    before = stored(database, tenant)
    refused = client.post("/v1/submissions", json={"input": [f"text {i}" for i in range(most + 1)]},
                          headers=tenant.headers)
    assert_error(refused, 400, "value_error", "input")
    assert stored(database, tenant) == before


def _nest(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("metadata", "ok"),
    [
        pytest.param({"k": "x" * 4088}, True, id="4096-bytes"),
        pytest.param({"k": "x" * 4089}, False, id="4097-bytes"),
        pytest.param({f"k{i}": i for i in range(1000)}, False, id="many-keys"),
        pytest.param(_nest(5), True, id="depth-5"),
        pytest.param(_nest(6), False, id="depth-6"),
        pytest.param({"a": [[[[1]]]]}, True, id="lists-depth-5"),
        pytest.param({"a": [[[[[1]]]]]}, False, id="lists-depth-6"),
        pytest.param(_nest(600), False, id="depth-600"),
    ],
)
def test_metadata_size_and_depth(
    client: FlaskClient, database: Database, tenant: TenantKey, metadata: dict[str, Any], ok: bool
) -> None:
    before = stored(database, tenant)
    response = client.post("/v1/submissions", json={"input": "x", "metadata": metadata}, headers=tenant.headers)
    if ok:
        assert response.status_code == 202, response.get_json()
        got = client.get(response.headers["Location"], headers=tenant.headers).get_json()
        assert got["metadata"] == metadata
    else:
        assert_error(response, 400, "value_error", "metadata")
        assert stored(database, tenant) == before


# ---- batches ----------------------------------------------------------------------------------------------------

def _items(count: int) -> list[dict[str, Any]]:
    return [{"input": f"batch text {i}", "metadata": {"i": i}} for i in range(count)]


def test_batch_of_100_is_accepted(client: FlaskClient, database: Database, tenant: TenantKey) -> None:
    before, _ = stored(database, tenant)
    response = client.post("/v1/submissions", json={"items": _items(100)}, headers=tenant.headers)
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["object"] == "list"
    data = body["data"]
    assert len(data) == 100
    assert len({item["id"] for item in data}) == 100
    for item in data:
        assert item["status"] == "queued"
        assert item["object"] == "submission"
        assert item["links"]["self"] == f"/v1/submissions/{item['id']}"
    assert stored(database, tenant)[0] == before + 100
    # Ids come back in the order the items were sent.
    assert client.get(data[42]["links"]["self"], headers=tenant.headers).get_json()["metadata"] == {"i": 42}


BAD_BATCHES: list[Any] = [
    pytest.param({"items": _items(101)}, "items", "value_error", id="101-items"),
    pytest.param({"items": []}, "items", "value_error", id="no-items"),
    pytest.param({"items": [*_items(7), {"input": 5}, *_items(3)]}, "items[7].input", "value_error",
                 id="bad-input-at-7"),
    pytest.param({"items": [*_items(7), {"input": ""}, *_items(3)]}, "items[7].input", "value_error",
                 id="empty-input-at-7"),
    pytest.param({"items": [*_items(7), {"input": "x", "role": "admin"}]}, "items[7].role", "literal_error",
                 id="bad-role-at-7"),
    pytest.param({"items": [*_items(7), {"input": "x", "bogus": 1}]}, "items[7].bogus", "extra_forbidden",
                 id="unknown-field-at-7"),
    pytest.param({"items": [*_items(7), {"input": "x", "policy": "nope"}]}, "items[7].policy", "unknown_policy",
                 id="unknown-policy-at-7"),
    pytest.param({"items": [*_items(7), {"input": "a\u0000b"}]}, "items[7].input", "invalid_text",
                 id="nul-at-7"),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD_BATCHES)
def test_bad_batch_stores_nothing(
    client: FlaskClient, database: Database, tenant: TenantKey, body: dict[str, Any], param: str, code: str
) -> None:
    before = stored(database, tenant)
    response = client.post("/v1/submissions", json=body, headers=tenant.headers)
    assert_error(response, 400, code, param)
    assert stored(database, tenant) == before


# ---- a valid submission -----------------------------------------------------------------------------------------

def test_valid_submission_round_trip_never_echoes_the_text(
    client: FlaskClient, database: Database, tenant: TenantKey
) -> None:
    secret_text = "the quick brown fox 8c1f2e jumps"
    before, _ = stored(database, tenant)
    sent = {"input": secret_text, "role": "output", "conversation_id": "conv-42", "turn_id": "turn:7",
            "metadata": {"user": "u-1", "tags": ["a", "b"], "n": 1.5}, "mask": True}
    response = client.post("/v1/submissions", json=sent, headers=tenant.headers)
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["status"] == "queued" and body["object"] == "submission"
    assert body["id"].startswith("sub_")
    assert response.headers["Location"] == body["links"]["self"] == f"/v1/submissions/{body['id']}"
    assert stored(database, tenant)[0] == before + 1

    got = client.get(body["links"]["self"], headers=tenant.headers)
    assert got.status_code == 200
    item = got.get_json()
    assert item["id"] == body["id"]
    assert item["role"] == "output"
    assert item["conversation_id"] == "conv-42"
    assert item["turn_id"] == "turn:7"
    assert item["metadata"] == sent["metadata"]
    assert item["text_count"] == 1
    assert item["policy"] == "default"
    listed = client.get("/v1/submissions", headers=tenant.headers)
    for answer in (response, got, listed):
        assert "8c1f2e" not in answer.get_data(as_text=True)


# ---- OpenAI-compatible synchronous moderation -------------------------------------------------------------------

@pytest.mark.parametrize("path", MODERATION_ENDPOINTS)
@pytest.mark.parametrize(
    ("value", "count"),
    [
        pytest.param("have a lovely day", 1, id="string"),
        pytest.param(["have a lovely day", "you stupid idiot"], 2, id="list-of-strings"),
        pytest.param([{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}], 2, id="text-parts"),
    ],
)
def test_moderation_answers_in_openai_shape(
    client: FlaskClient, database: Database, tenant: TenantKey, path: str, value: Any, count: int
) -> None:
    before, _ = stored(database, tenant)
    response = client.post(path, json={"input": value, "model": "omni-moderation-latest"}, headers=tenant.headers)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["id"].startswith("modr-")
    assert isinstance(body["model"], str) and body["model"]
    assert len(body["results"]) == count
    for result in body["results"]:
        assert isinstance(result["flagged"], bool)
        assert set(result["categories"]) == CATEGORIES
        assert set(result["category_scores"]) == CATEGORIES
        assert set(result["category_applied_input_types"]) == CATEGORIES
        assert all(isinstance(v, bool) for v in result["categories"].values())
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in result["category_scores"].values())
        assert result["decision"] in ("allow", "review", "block")
    # Stored (and audited) like an async submission, already completed.
    assert stored(database, tenant)[0] == before + 1
    submission_id = "sub_" + body["id"].removeprefix("modr-")
    got = client.get(f"/v1/submissions/{submission_id}", headers=tenant.headers).get_json()
    assert got["status"] == "completed" and got["verdict"] is not None and got["text_count"] == count


@pytest.mark.parametrize("path", MODERATION_ENDPOINTS)
def test_moderation_ignores_unknown_top_level_fields(client: FlaskClient, tenant: TenantKey, path: str) -> None:
    response = client.post(path, json={"input": "hello", "user": "u-1", "extra": {"nested": [1, 2]}},
                           headers=tenant.headers)
    assert response.status_code == 200, response.get_json()
    assert len(response.get_json()["results"]) == 1


BAD_MODERATIONS: list[Any] = [
    # (body, code, param)
    pytest.param({"input": [{"type": "text", "text": "ok"}, {"type": "image_url",
                                                            "image_url": {"url": "https://x.test/a.png"}}]},
                 "image_not_supported", "input[1]", id="image-part"),
    pytest.param({"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                 "image_not_supported", "input[0]", id="only-image"),
    pytest.param({"input": []}, "empty_input", "input", id="empty-list"),
    pytest.param({"input": ""}, "empty_input", "input[0]", id="empty-string"),
    pytest.param({"input": ["ok", "   "]}, "empty_input", "input[1]", id="blank-in-list"),
    pytest.param({"input": 42}, "invalid_input", "input", id="number"),
    pytest.param({"input": None}, "invalid_input", "input", id="null"),
    pytest.param({"input": {"text": "x"}}, "invalid_input", "input", id="object"),
    pytest.param({"input": ["ok", 1]}, "invalid_input", "input", id="list-with-number"),
    pytest.param({"input": ["ok", {"type": "text", "text": "x"}]}, "invalid_input", "input", id="mixed-list"),
    pytest.param({"input": [{"type": "text"}]}, "invalid_input", "input", id="part-without-text"),
    pytest.param({"input": [{"type": "audio", "audio": "x"}]}, "invalid_input", "input", id="unknown-part"),
    pytest.param({}, "invalid_input", "input", id="input-missing"),
    pytest.param({"input": [f"t{i}" for i in range(33)]}, "too_many_texts", "input", id="33-texts"),
    pytest.param({"input": "a" * 32_769}, "text_too_long", "input[0]", id="too-long"),
    pytest.param({"input": ["ok", "a" * 32_769]}, "text_too_long", "input[1]", id="too-long-in-list"),
    pytest.param({"input": "ok", "model": 5}, "string_type", "model", id="model-int"),
    pytest.param({"input": "ok", "model": ""}, "string_too_short", "model", id="model-empty"),
]


@pytest.mark.parametrize("path", MODERATION_ENDPOINTS)
@pytest.mark.parametrize(("body", "code", "param"), BAD_MODERATIONS)
def test_bad_moderation_request_is_refused_and_stores_nothing(
    client: FlaskClient, database: Database, tenant: TenantKey, path: str, body: dict[str, Any], code: str,
    param: str,
) -> None:
    before = stored(database, tenant)
    response = client.post(path, json=body, headers=tenant.headers)
    assert_error(response, 400, code, param)
    assert stored(database, tenant) == before


def test_moderation_text_of_exactly_max_chars_is_accepted(
    client: FlaskClient, tenant: TenantKey, settings: Settings
) -> None:
    assert settings.max_text_chars == 32_768  # the refusals above are written against this default
    response = client.post("/v1/moderations", json={"input": "a" * settings.max_text_chars}, headers=tenant.headers)
    assert response.status_code == 200, response.get_json()
