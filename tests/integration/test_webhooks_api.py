"""The webhook API: endpoints, the callback secret, the delivery log and redelivery, and `callback_url` on
submissions. Malformed, wrong-typed, unknown and oversized input; SSRF refusals; other tenants (404) and missing
scopes (403); secrets shown once; audit events. In-process against real PostgreSQL; no worker is needed."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from werkzeug.test import TestResponse

from app.config import Settings
from app.db import Database
from app.models import Submission, WebhookDelivery, WebhookEndpoint
from app.use_cases.webhook_endpoints import MAX_ENDPOINTS_PER_TENANT
from tests.conftest import TenantKey, issue_key
from tests.integration.webhook_support import (
    ALL_EVENTS,
    api_settings,
    audit_actions,
    create_callback_secret,
    create_endpoint,
    deliveries,
    receiver,
)
from tests.webhook_receiver import WebhookReceiver

__all__ = ["api_settings", "receiver"]  # fixtures used by name below

SECRET = re.compile(r"^whsec_[A-Za-z0-9+/]{43}=$")
PUBLIC_FIELDS = {"id", "object", "url", "events", "description", "status", "disabled_reason", "created_at",
                 "secret_rotated_at", "previous_secret_expires_at", "links"}


def assert_error(response: TestResponse, status: int, code: str | None = None, param: str | None = None) -> None:
    body = response.get_json()
    assert response.status_code == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
        assert param.split(".")[-1].split("[")[0] in body["error"]["message"], body
    assert "Traceback" not in response.get_data(as_text=True)


def endpoint_count(database: Database, tenant: TenantKey) -> int:
    with database.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(WebhookEndpoint)
                                  .where(WebhookEndpoint.tenant_id == tenant.tenant_id)) or 0)


# ---- creating, reading, deleting --------------------------------------------------------------------------------


def test_create_shows_the_secret_once(client: FlaskClient, tenant: TenantKey, database: Database,
                                      receiver: WebhookReceiver, api_settings: Settings) -> None:
    response = client.post("/v1/webhooks", json={"url": receiver.url, "events": ["submission.flagged"],
                                                 "description": "ops pager"}, headers=tenant.headers)
    assert response.status_code == 201, response.get_json()
    created = response.get_json()
    assert SECRET.match(created["secret"])
    assert set(created) == PUBLIC_FIELDS | {"secret"}
    assert created["url"] == receiver.url and created["events"] == ["submission.flagged"]
    assert created["status"] == "enabled" and created["description"] == "ops pager"
    assert response.headers["Location"] == f"/v1/webhooks/{created['id']}"

    shown = client.get(f"/v1/webhooks/{created['id']}", headers=tenant.headers)
    listed = client.get("/v1/webhooks", headers=tenant.headers)
    assert shown.status_code == 200 and set(shown.get_json()) == PUBLIC_FIELDS
    assert [e["id"] for e in listed.get_json()["data"]] == [created["id"]]
    for response in (shown, listed):
        assert created["secret"] not in response.get_data(as_text=True)
    assert audit_actions(database, tenant.tenant_id) == [("webhook.created", created["id"])]


def test_delete_removes_the_endpoint_and_is_audited(client: FlaskClient, tenant: TenantKey, database: Database,
                                                    receiver: WebhookReceiver, api_settings: Settings) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers)
    response = client.delete(f"/v1/webhooks/{endpoint_id}", headers=tenant.headers)
    assert response.status_code == 200
    assert response.get_json() == {"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}
    assert_error(client.get(f"/v1/webhooks/{endpoint_id}", headers=tenant.headers), 404)
    assert_error(client.delete(f"/v1/webhooks/{endpoint_id}", headers=tenant.headers), 404)
    with database.transaction() as session:
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)
                              .where(WebhookDelivery.endpoint_id == endpoint_id)) == 0
    assert ("webhook.deleted", endpoint_id) in audit_actions(database, tenant.tenant_id)


def test_rotation_returns_a_new_secret_once_and_keeps_the_old_one_in_grace(
    client: FlaskClient, tenant: TenantKey, database: Database, receiver: WebhookReceiver, api_settings: Settings,
) -> None:
    endpoint_id, first = create_endpoint(client, tenant, receiver.url)
    response = client.post(f"/v1/webhooks/{endpoint_id}/rotate-secret", headers=tenant.headers)
    assert response.status_code == 200, response.get_json()
    rotated = response.get_json()
    assert SECRET.match(rotated["secret"]) and rotated["secret"] != first
    assert rotated["secret_rotated_at"] is not None and rotated["previous_secret_expires_at"] is not None
    with database.transaction() as session:
        row = session.get(WebhookEndpoint, endpoint_id)
        assert row is not None and row.secret == rotated["secret"] and row.previous_secret == first
    shown = client.get(f"/v1/webhooks/{endpoint_id}", headers=tenant.headers).get_data(as_text=True)
    assert rotated["secret"] not in shown and first not in shown
    assert ("webhook.secret_rotated", endpoint_id) in audit_actions(database, tenant.tenant_id)
    # An empty JSON object is an acceptable body too.
    assert client.post(f"/v1/webhooks/{endpoint_id}/rotate-secret", json={},
                       headers=tenant.headers).status_code == 200


def test_test_event_is_queued_as_a_delivery(client: FlaskClient, tenant: TenantKey, database: Database,
                                            receiver: WebhookReceiver, api_settings: Settings) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    response = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers)
    assert response.status_code == 202, response.get_json()
    delivery = response.get_json()
    assert delivery["event_type"] == "webhook.test" and delivery["status"] == "pending"
    assert delivery["id"].startswith("msg_") and delivery["webhook_id"] == endpoint_id
    assert delivery["payload"]["type"] == "webhook.test"
    assert delivery["payload"]["data"]["webhook_id"] == endpoint_id
    assert [d["id"] for d in deliveries(client, tenant, endpoint_id)] == [delivery["id"]]
    assert ("webhook.test_requested", delivery["id"]) in audit_actions(database, tenant.tenant_id)


def test_a_tenant_has_a_bounded_number_of_endpoints(client: FlaskClient, tenant: TenantKey, database: Database,
                                                    receiver: WebhookReceiver, api_settings: Settings) -> None:
    for _ in range(MAX_ENDPOINTS_PER_TENANT):
        create_endpoint(client, tenant, receiver.url)
    response = client.post("/v1/webhooks", json={"url": receiver.url, "events": ALL_EVENTS},
                           headers=tenant.headers)
    assert_error(response, 409, "webhook_limit_reached")
    assert endpoint_count(database, tenant) == MAX_ENDPOINTS_PER_TENANT


def test_duplicate_events_are_stored_once(client: FlaskClient, tenant: TenantKey, receiver: WebhookReceiver,
                                          api_settings: Settings) -> None:
    response = client.post("/v1/webhooks", headers=tenant.headers, json={
        "url": receiver.url, "events": ["submission.failed", "submission.failed"]})
    assert response.status_code == 201 and response.get_json()["events"] == ["submission.failed"]


# ---- refused input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"events": ALL_EVENTS}, "url", "missing"),
    ({"url": "https://hooks.example.com/x"}, "events", "missing"),
    ({"url": 42, "events": ALL_EVENTS}, "url", "string_type"),
    ({"url": ["https://a"], "events": ALL_EVENTS}, "url", "string_type"),
    ({"url": "https://hooks.example.com/x", "events": "submission.completed"}, "events", "list_type"),
    ({"url": "https://hooks.example.com/x", "events": []}, "events", "too_short"),
    ({"url": "https://hooks.example.com/x", "events": [1]}, "events[0]", "literal_error"),
    ({"url": "https://hooks.example.com/x", "events": ["submission.exploded"]}, "events[0]", "literal_error"),
    ({"url": "https://hooks.example.com/x", "events": ["webhook.test"]}, "events[0]", "literal_error"),
    ({"url": "https://hooks.example.com/x", "events": ALL_EVENTS, "description": 5}, "description",
     "string_type"),
    ({"url": "https://hooks.example.com/x", "events": ALL_EVENTS, "description": "d" * 501}, "description",
     "string_too_long"),
    ({"url": "https://hooks.example.com/" + "a" * 2030, "events": ALL_EVENTS}, "url", "string_too_long"),
    ({"url": "https://hooks.example.com/a b", "events": ALL_EVENTS}, "url", "string_pattern_mismatch"),
    ({"url": "https://hooks.example.com/\r\nX-Evil: 1", "events": ALL_EVENTS}, "url", "string_pattern_mismatch"),
    ({"url": "", "events": ALL_EVENTS}, "url", "string_too_short"),
    ({"url": "https://hooks.example.com/x", "events": ALL_EVENTS, "secret": "whsec_mine"}, "secret",
     "extra_forbidden"),
    ({"url": "ftp://hooks.example.com/x", "events": ALL_EVENTS}, "url", "invalid_url"),
    ({"url": "https://user:pw@hooks.example.com/x", "events": ALL_EVENTS}, "url", "invalid_url"),
    ({"url": "https://nowhere.invalid/x", "events": ALL_EVENTS}, "url", "unresolvable_host"),
])
def test_malformed_endpoints_are_refused(client: FlaskClient, tenant: TenantKey, database: Database,
                                         body: dict[str, Any], param: str, code: str) -> None:
    assert_error(client.post("/v1/webhooks", json=body, headers=tenant.headers), 400, code, param)
    assert endpoint_count(database, tenant) == 0
    assert audit_actions(database, tenant.tenant_id) == []


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/hook",
    "http://[::1]:8080/hook",
    "http://[::ffff:10.0.0.1]/hook",
    "http://localhost:8080/hook",
    "http://0.0.0.0:8080/hook",
])
def test_ssrf_targets_are_refused_at_registration(client: FlaskClient, tenant: TenantKey, database: Database,
                                                  url: str) -> None:
    assert_error(client.post("/v1/webhooks", json={"url": url, "events": ALL_EVENTS}, headers=tenant.headers),
                 400, "unsafe_url", "url")
    assert endpoint_count(database, tenant) == 0


def test_allowing_loopback_opens_127_0_0_0_8_only(client: FlaskClient, tenant: TenantKey,
                                                  api_settings: Settings) -> None:
    assert client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": ALL_EVENTS},
                       headers=tenant.headers).status_code == 201
    for url in ("http://[::1]:9/hook", "http://169.254.169.254/", "http://10.0.0.1/"):
        assert_error(client.post("/v1/webhooks", json={"url": url, "events": ALL_EVENTS},
                                 headers=tenant.headers), 400, "unsafe_url", "url")


@pytest.mark.parametrize(("data", "content_type", "status", "code"), [
    (b"", "application/json", 400, "empty_body"),
    (b"{not json", "application/json", 400, "invalid_json"),
    (b"[]", "application/json", 400, "invalid_body"),
    (b'{"url": "x"}', "text/plain", 415, "unsupported_media_type"),
    (b'{"url": "\\u0000"}', "application/json", 400, "invalid_text"),
])
def test_bodies_that_are_not_json_objects_are_refused(client: FlaskClient, tenant: TenantKey, data: bytes,
                                                      content_type: str, status: int, code: str) -> None:
    response = client.post("/v1/webhooks", data=data, headers={**tenant.headers, "Content-Type": content_type})
    assert_error(response, status, code)


def test_oversized_bodies_are_refused(client: FlaskClient, tenant: TenantKey, settings: Settings,
                                      database: Database) -> None:
    body = {"url": "https://hooks.example.com/x", "events": ALL_EVENTS,
            "description": "d" * (settings.max_request_bytes + 1)}
    assert_error(client.post("/v1/webhooks", json=body, headers=tenant.headers), 413)
    assert endpoint_count(database, tenant) == 0


@pytest.mark.parametrize("action", ["rotate-secret", "test"])
def test_actions_take_no_fields(client: FlaskClient, tenant: TenantKey, receiver: WebhookReceiver,
                                api_settings: Settings, action: str) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    assert_error(client.post(f"/v1/webhooks/{endpoint_id}/{action}", json={"grace": 1}, headers=tenant.headers),
                 400, "extra_forbidden", "grace")
    assert_error(client.post(f"/v1/webhooks/{endpoint_id}/{action}", data=b"nope",
                             headers={**tenant.headers, "Content-Type": "application/json"}), 400, "invalid_json")


@pytest.mark.parametrize(("query", "param"), [
    ({"status": "lost"}, "status"),
    ({"limit": "0"}, "limit"),
    ({"limit": "101"}, "limit"),
    ({"limit": "many"}, "limit"),
    ({"cursor": "not-a-cursor"}, "cursor"),
    ({"cursor": "c" * 201}, "cursor"),
    ({"sort": "asc"}, "sort"),
])
def test_bad_delivery_queries_are_refused(client: FlaskClient, tenant: TenantKey, receiver: WebhookReceiver,
                                          api_settings: Settings, query: dict[str, str], param: str) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    response = client.get(f"/v1/webhooks/{endpoint_id}/deliveries", query_string=query, headers=tenant.headers)
    assert_error(response, 400, param=param)


def test_delivery_log_filters_and_paginates(client: FlaskClient, tenant: TenantKey, database: Database,
                                            receiver: WebhookReceiver, api_settings: Settings) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    sent = [client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
            for _ in range(5)]
    with database.transaction() as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == sent[0]).values(status="dead"))
    seen: list[str] = []
    cursor: str | None = None
    while True:
        query = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/webhooks/{endpoint_id}/deliveries", query_string=query,
                          headers=tenant.headers).get_json()
        seen += [d["id"] for d in page["data"]]
        cursor = page["next_cursor"]
        assert page["has_more"] == (cursor is not None)
        if cursor is None:
            break
    assert sorted(seen) == sorted(sent) and len(seen) == 5
    assert [d["id"] for d in deliveries(client, tenant, endpoint_id, status="dead")] == [sent[0]]


# ---- tenants and scopes ----------------------------------------------------------------------------------------


def test_another_tenants_webhooks_and_deliveries_are_not_found(
    client: FlaskClient, tenant: TenantKey, other_tenant: TenantKey, database: Database,
    receiver: WebhookReceiver, api_settings: Settings,
) -> None:
    endpoint_id, secret = create_endpoint(client, tenant, receiver.url)
    delivery_id = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    signer_id, _ = create_callback_secret(client, tenant)
    intruder = other_tenant.headers
    for response in (
        client.get(f"/v1/webhooks/{endpoint_id}", headers=intruder),
        client.delete(f"/v1/webhooks/{endpoint_id}", headers=intruder),
        client.post(f"/v1/webhooks/{endpoint_id}/rotate-secret", headers=intruder),
        client.post(f"/v1/webhooks/{endpoint_id}/test", headers=intruder),
        client.get(f"/v1/webhooks/{endpoint_id}/deliveries", headers=intruder),
        client.get(f"/v1/webhooks/{signer_id}/deliveries", headers=intruder),
        client.post(f"/v1/deliveries/{delivery_id}/redeliver", headers=intruder),
        client.get("/v1/webhooks/callback-secret", headers=intruder),
        client.post("/v1/webhooks/callback-secret/rotate", headers=intruder),
    ):
        assert_error(response, 404)
        assert secret not in response.get_data(as_text=True)
    assert client.get("/v1/webhooks", headers=intruder).get_json()["data"] == []
    with database.transaction() as session:
        row = session.get(WebhookEndpoint, endpoint_id)
        assert row is not None and row.secret == secret


@pytest.mark.parametrize("bad_id", ["wh_missing", "x" * 300, "wh_\x00"])
def test_unknown_ids_are_not_found(client: FlaskClient, tenant: TenantKey, bad_id: str) -> None:
    assert_error(client.get(f"/v1/webhooks/{bad_id}", headers=tenant.headers), 404)
    assert_error(client.get(f"/v1/webhooks/{bad_id}/deliveries", headers=tenant.headers), 404)
    assert_error(client.post(f"/v1/deliveries/{bad_id}/redeliver", headers=tenant.headers), 404)


def test_the_callback_signer_is_not_an_endpoint(client: FlaskClient, tenant: TenantKey) -> None:
    signer_id, _ = create_callback_secret(client, tenant)
    assert client.get("/v1/webhooks", headers=tenant.headers).get_json()["data"] == []
    assert_error(client.get(f"/v1/webhooks/{signer_id}", headers=tenant.headers), 404)
    assert_error(client.delete(f"/v1/webhooks/{signer_id}", headers=tenant.headers), 404)
    assert deliveries(client, tenant, signer_id) == []


def test_scopes(client: FlaskClient, tenant: TenantKey, database: Database, receiver: WebhookReceiver,
                api_settings: Settings) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    delivery_id = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    reader = issue_key(database, tenant_name=tenant.tenant_name, scopes=("read",)).headers
    submitter = issue_key(database, tenant_name=tenant.tenant_name, scopes=("submit", "audit")).headers
    admin_only = [
        ("POST", "/v1/webhooks"), ("GET", "/v1/webhooks"), ("GET", f"/v1/webhooks/{endpoint_id}"),
        ("DELETE", f"/v1/webhooks/{endpoint_id}"), ("POST", f"/v1/webhooks/{endpoint_id}/rotate-secret"),
        ("POST", f"/v1/webhooks/{endpoint_id}/test"), ("POST", f"/v1/deliveries/{delivery_id}/redeliver"),
        ("GET", "/v1/webhooks/callback-secret"), ("POST", "/v1/webhooks/callback-secret"),
        ("POST", "/v1/webhooks/callback-secret/rotate"),
    ]
    for headers in (reader, submitter):
        for method, path in admin_only:
            assert_error(client.open(path, method=method, headers=headers), 403, "missing_scope")
    assert_error(client.get(f"/v1/webhooks/{endpoint_id}/deliveries", headers=submitter), 403, "missing_scope")
    assert [d["id"] for d in deliveries(client, issue_key(
        database, tenant_name=tenant.tenant_name, scopes=("read",)), endpoint_id)] == [delivery_id]
    assert_error(client.get("/v1/webhooks"), 401)
    assert endpoint_count(database, tenant) == 1


# ---- the callback secret and callback_url ----------------------------------------------------------------------


def test_callback_secret_is_created_once_shown_once_and_rotated(client: FlaskClient, tenant: TenantKey,
                                                                database: Database) -> None:
    assert_error(client.get("/v1/webhooks/callback-secret", headers=tenant.headers), 404)
    signer_id, secret = create_callback_secret(client, tenant)
    assert SECRET.match(secret)
    assert_error(client.post("/v1/webhooks/callback-secret", headers=tenant.headers), 409,
                 "callback_secret_exists")
    shown = client.get("/v1/webhooks/callback-secret", headers=tenant.headers)
    assert shown.status_code == 200 and shown.get_json()["id"] == signer_id
    assert "secret" not in shown.get_json() and secret not in shown.get_data(as_text=True)
    rotated = client.post("/v1/webhooks/callback-secret/rotate", headers=tenant.headers).get_json()
    assert SECRET.match(rotated["secret"]) and rotated["secret"] != secret
    assert rotated["previous_secret_expires_at"] is not None
    assert audit_actions(database, tenant.tenant_id) == [("webhook.created", signer_id),
                                                         ("webhook.secret_rotated", signer_id)]


def submission_count(database: Database, tenant: TenantKey) -> int:
    with database.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(Submission)
                                  .where(Submission.tenant_id == tenant.tenant_id)) or 0)


def test_callback_url_needs_a_callback_secret(client: FlaskClient, tenant: TenantKey, database: Database,
                                              receiver: WebhookReceiver, api_settings: Settings) -> None:
    response = client.post("/v1/submissions", json={"input": "hello", "callback_url": receiver.url},
                           headers=tenant.headers)
    assert_error(response, 400, "callback_secret_missing", "callback_url")
    assert submission_count(database, tenant) == 0
    create_callback_secret(client, tenant)
    response = client.post("/v1/submissions", json={"input": "hello", "callback_url": receiver.url},
                           headers=tenant.headers)
    assert response.status_code == 202, response.get_json()


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/cb", "http://169.254.169.254/latest/", "http://10.0.0.1/",
                                 "http://[::1]/cb", "http://localhost/cb"])
def test_callback_url_is_guarded_like_endpoints(client: FlaskClient, tenant: TenantKey, database: Database,
                                                url: str) -> None:
    create_callback_secret(client, tenant)
    response = client.post("/v1/submissions", json={"input": "hello", "callback_url": url}, headers=tenant.headers)
    assert_error(response, 400, "unsafe_url", "callback_url")
    batch = {"items": [{"input": "one"}, {"input": "two", "callback_url": url}]}
    assert_error(client.post("/v1/submissions", json=batch, headers=tenant.headers), 400, "unsafe_url",
                 "items[1].callback_url")
    assert submission_count(database, tenant) == 0


# ---- redelivery ------------------------------------------------------------------------------------------------


def test_redelivery_rearms_a_dead_delivery_and_refuses_one_in_flight(
    client: FlaskClient, tenant: TenantKey, database: Database, receiver: WebhookReceiver, api_settings: Settings,
) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    delivery_id = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    with database.transaction() as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                        .values(status="delivering", claim_token="t" * 32))
    assert_error(client.post(f"/v1/deliveries/{delivery_id}/redeliver", headers=tenant.headers), 409,
                 "delivery_in_progress")
    with database.transaction() as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                        .values(status="dead", claim_token=None, retries=6))
    assert_error(client.post(f"/v1/deliveries/{delivery_id}/redeliver", json={"now": True},
                             headers=tenant.headers), 400, "extra_forbidden", "now")
    response = client.post(f"/v1/deliveries/{delivery_id}/redeliver", headers=tenant.headers)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["status"] == "pending" and response.get_json()["id"] == delivery_id
    with database.transaction() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None and row.retries == 0 and row.completed_at is None
    assert ("webhook.redelivery_requested", delivery_id) in audit_actions(database, tenant.tenant_id)


# ---- issue 17, item 7: least privilege in reads, callback hosts, ports --------------------------------------------


def test_a_read_key_sees_the_delivery_log_but_not_the_endpoints_url(client: FlaskClient, tenant: TenantKey,
                                                                     database: Database,
                                                                     api_settings: Settings) -> None:
    url = "http://127.0.0.1:9/private-receiver?token=hidden"
    endpoint_id, _ = create_endpoint(client, tenant, url)
    assert client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).status_code == 202
    reader = issue_key(database, tenant_name=tenant.tenant_name, scopes=("read",))
    assert_error(client.get(f"/v1/webhooks/{endpoint_id}", headers=reader.headers), 403, "missing_scope")
    seen = client.get(f"/v1/webhooks/{endpoint_id}/deliveries", headers=reader.headers)
    assert seen.status_code == 200
    assert [d["url"] for d in seen.get_json()["data"]] == [None]
    assert "private-receiver" not in seen.get_data(as_text=True)
    # The admin key that may see the endpoint sees where its deliveries go.
    assert [d["url"] for d in deliveries(client, tenant, endpoint_id)] == [url]


@pytest.mark.parametrize("url", ["http://93.184.216.34:8443/cb", "https://93.184.216.34:22/", "http://8.8.8.8:6379/"])
def test_a_public_callback_or_endpoint_on_another_port_than_80_or_443_is_refused(
        client: FlaskClient, tenant: TenantKey, database: Database, url: str) -> None:
    create_callback_secret(client, tenant)
    response = client.post("/v1/submissions", json={"input": "hello", "callback_url": url}, headers=tenant.headers)
    assert_error(response, 400, "unsafe_port", "callback_url")
    assert_error(client.post("/v1/webhooks", json={"url": url, "events": ALL_EVENTS}, headers=tenant.headers), 400,
                 "unsafe_port", "url")
    assert submission_count(database, tenant) == 0


class _Dns:
    """socket.getaddrinfo answering 127.0.0.1 for names under `.callbacks.test` (counting each lookup), and holding
    those starting with `slow` until released; every other name is looked up for real."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.lookups: list[str] = []
        self.release = threading.Event()

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if not str(host).endswith(".callbacks.test"):
            return self.real(host, port, *args, **kwargs)
        self.lookups.append(str(host))
        if str(host).startswith("slow"):
            self.release.wait(20)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port)))]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Dns]:
    fake = _Dns(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    yield fake
    fake.release.set()


def test_callback_hosts_are_looked_up_once_each(client: FlaskClient, tenant: TenantKey, database: Database,
                                                api_settings: Settings, dns: _Dns) -> None:
    create_callback_secret(client, tenant)
    # 100 items, 100 different URLs, on 3 hosts: before, one lookup per URL, one after another.
    items = [{"input": f"item {i}", "callback_url": f"http://h{i % 3}.callbacks.test:9/cb/{i}"} for i in range(100)]
    response = client.post("/v1/submissions", json={"items": items}, headers=tenant.headers)
    assert response.status_code == 202, response.get_json()
    assert sorted(dns.lookups) == ["h0.callbacks.test", "h1.callbacks.test", "h2.callbacks.test"]
    assert submission_count(database, tenant) == 100


def test_callback_host_lookups_are_bounded_in_time_all_together(client: FlaskClient, tenant: TenantKey,
                                                                database: Database, api_settings: Settings,
                                                                dns: _Dns, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_settings, "callback_resolve_timeout_seconds", 0.5)
    create_callback_secret(client, tenant)
    items = [{"input": "fast", "callback_url": "http://fast.callbacks.test:9/cb"},
             *({"input": f"slow {i}", "callback_url": f"http://slow{i}.callbacks.test:9/cb"} for i in range(20))]
    response = client.post("/v1/submissions", json={"items": items}, headers=tenant.headers)
    assert_error(response, 400, "unresolvable_host", "items[1].callback_url")
    assert "in time" in response.get_json()["error"]["message"]
    # Before the bound, 20 slow lookups one after another held the request for 20 x 20 s; now it answered while every
    # slow lookup is still unanswered.
    assert not dns.release.is_set()
    assert submission_count(database, tenant) == 0
