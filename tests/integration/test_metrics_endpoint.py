"""`GET /metrics` in-process (issue 16 item 1): the Prometheus text format, counters that move with the requests and
submissions that pass, the deployment's gauges read from the database at scrape time, labels that carry no text, no
key and no unbounded value, METRICS_TOKEN's bearer gate against missing, wrong, malformed and hostile credentials, and
per-tenant labels only when turned on. Real PostgreSQL and Redis; no worker (the scrape through real workers is
tests/integration/test_metrics_scrape.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from app import create_app, metrics
from app.config import Settings
from tests.conftest import TenantKey, make_settings

TOKEN = "metrics-token-" + "x" * 24


def scrape(client: FlaskClient, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """{metric family name: {labels tuple: value}} of one scrape, checked to be valid exposition text."""
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type.startswith("text/plain; version=0.0.4")
    families: dict[str, Any] = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            families.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return families


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(v for key, v in families.get(name, {}).items() if wanted <= set(key))


def test_a_scrape_counts_requests_and_submissions_and_reads_the_queue(client: FlaskClient,
                                                                       tenant: TenantKey) -> None:
    before = scrape(client)
    response = client.post("/v1/submissions", headers=tenant.headers,
                           json={"items": [{"input": "first", "role": "output"}, {"input": "second"}]})
    assert response.status_code == 202
    client.get("/no/such/route/" + uuid.uuid4().hex)
    after = scrape(client)

    assert value(after, "verdict_submissions_received_total", role="output", source="async") == value(
        before, "verdict_submissions_received_total", role="output", source="async") + 1
    assert value(after, "verdict_submissions_received_total", role="input", source="async") == value(
        before, "verdict_submissions_received_total", role="input", source="async") + 1
    http = {"method": "POST", "route": "/v1/submissions", "status": "202"}
    assert value(after, "verdict_http_requests_total", **http) == value(before, "verdict_http_requests_total",
                                                                        **http) + 1
    assert value(after, "verdict_http_request_duration_seconds_count", **http) >= 1
    # An unknown URL is one series, whatever the URL was.
    assert value(after, "verdict_http_requests_total", route="unmatched", status="404") >= 1
    assert not any("no/such/route" in str(key) for key in after["verdict_http_requests_total"])
    # Nothing works the queue in this test: both submissions wait there, and the oldest has been due a while.
    assert value(after, "verdict_queue_depth", status="queued") >= 2
    assert value(after, "verdict_queue_oldest_age_seconds") >= 0
    assert value(after, "verdict_audit_events_total", action="submission.received") >= 2
    for gauge in ("verdict_webhook_backlog", "verdict_webhook_dead_deliveries"):
        assert gauge in after


def test_labels_carry_no_text_no_key_and_no_unbounded_value(client: FlaskClient, tenant: TenantKey) -> None:
    marker = f"secret-text-{uuid.uuid4().hex}"
    client.post("/v1/submissions", headers=tenant.headers, json={"input": marker, "metadata": {"m": marker}})
    client.get(f"/v1/submissions/{marker}", headers=tenant.headers)  # a path parameter is not a label either
    client.open("/v1/submissions", method="BREW", headers=tenant.headers)  # nor a made-up method
    text = client.get("/metrics").get_data(as_text=True)
    assert marker not in text
    assert tenant.plaintext not in text and tenant.key_id not in text
    assert tenant.tenant_id not in text  # tenant labels are off by default: the label is empty
    families = scrape(client)
    assert value(families, "verdict_http_requests_total", route="/v1/submissions/<submission_id>") >= 1
    assert value(families, "verdict_http_requests_total", method="other") >= 1
    assert not any(("method", "BREW") in key for key in families["verdict_http_requests_total"])


@pytest.fixture(scope="module")
def guarded_app(database_url: str, redis_url: str) -> Flask:
    flask_app = create_app(make_settings(database_url, redis_url, metrics_token=TOKEN))
    flask_app.config["TESTING"] = True
    return flask_app


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", TOKEN,
    "Bearer \u00e9\u00e8\u0000", "Bearer " + "A" * 8000, f"bearer  {TOKEN[::-1]}",
], ids=["missing", "empty", "scheme-only", "scheme-space", "basic", "longer", "shorter", "no-scheme", "non-ascii",
        "huge", "reversed"])
def test_metrics_token_refuses_everything_but_the_token(guarded_app: Flask, authorization: str | None) -> None:
    client = guarded_app.test_client()
    headers = {} if authorization is None else {"Authorization": authorization}
    try:
        response = client.get("/metrics", headers=headers)
    except ValueError:  # werkzeug refuses to send a header holding a NUL: nothing reached the app
        return
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    error = response.get_json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_metrics_token"
    assert TOKEN not in response.get_data(as_text=True)


def test_metrics_token_opens_the_scrape(guarded_app: Flask) -> None:
    client = guarded_app.test_client()
    for scheme in ("Bearer", "bearer"):
        assert "verdict_queue_depth" in scrape(client, {"Authorization": f"{scheme} {TOKEN}"})


def test_wrong_methods_and_query_strings_are_harmless(client: FlaskClient) -> None:
    assert client.post("/metrics").status_code == 405
    assert client.delete("/metrics").status_code == 405
    assert "verdict_queue_depth" in scrape(client) and client.get("/metrics?x=%00&y=" + "z" * 4000).status_code == 200


@pytest.fixture
def tenant_labels() -> Iterator[None]:
    metrics.configure(tenant_labels=True)
    yield
    metrics.configure(tenant_labels=False)


def test_tenant_labels_only_when_turned_on(client: FlaskClient, tenant: TenantKey, tenant_labels: None) -> None:
    client.post("/v1/submissions", headers=tenant.headers, json={"input": "counted for its tenant"})
    families = scrape(client)
    assert value(families, "verdict_submissions_received_total", tenant=tenant.tenant_id) == 1
    assert value(families, "verdict_audit_events_total", tenant=tenant.tenant_id, action="submission.received") == 1


def test_the_setting_turns_tenant_labels_on(database_url: str, redis_url: str) -> None:
    create_app(make_settings(database_url, redis_url, metrics_tenant_labels=True))
    try:
        assert metrics.tenant_label("ten_1") == "ten_1"
    finally:
        metrics.configure(tenant_labels=False)
    assert metrics.tenant_label("ten_1") == ""
    assert Settings(_env_file=None).metrics_tenant_labels is False  # type: ignore[call-arg]
