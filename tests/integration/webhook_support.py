"""Helpers shared by the webhook tests: a receiver fixture, loopback allowed for the in-process API, and short-cuts
for creating endpoints, reading deliveries and the audit trail."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update

from app.config import Settings
from app.db import Database
from app.models import AuditEvent, WebhookDelivery, utcnow
from tests.conftest import TenantKey
from tests.lanes import integration_fixture
from tests.webhook_receiver import WebhookReceiver

ALL_EVENTS = ["submission.completed", "submission.flagged", "submission.failed"]


@integration_fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


@pytest.fixture
def api_settings(app: Flask, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The in-process app's settings with loopback allowed (the receivers listen there), and no inline sending: these
    tests run `deliver` by hand for the messages a worker would get (the inline path has tests of its own,
    test_webhooks_inline.py); restored after the test."""
    settings: Settings = app.extensions["verdict.settings"]
    monkeypatch.setattr(settings, "webhook_allowed_networks", "127.0.0.0/8")
    monkeypatch.setattr(settings, "webhook_inline_seconds", 0.0)
    return settings


def create_endpoint(client: FlaskClient, tenant: TenantKey, url: str,
                    events: list[str] | None = None) -> tuple[str, str]:
    """(endpoint id, secret)."""
    response = client.post("/v1/webhooks", json={"url": url, "events": events or ALL_EVENTS},
                           headers=tenant.headers)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    return body["id"], body["secret"]


def create_callback_secret(client: FlaskClient, tenant: TenantKey) -> tuple[str, str]:
    """(signer id, secret)."""
    response = client.post("/v1/webhooks/callback-secret", headers=tenant.headers)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    return body["id"], body["secret"]


def deliveries(client: FlaskClient, tenant: TenantKey, endpoint_id: str, **query: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/webhooks/{endpoint_id}/deliveries", query_string=query, headers=tenant.headers)
    assert response.status_code == 200, response.get_json()
    data: list[dict[str, Any]] = response.get_json()["data"]
    return data


def audit_actions(database: Database, tenant_id: str, prefix: str = "webhook.") -> list[tuple[str, str | None]]:
    """(action, subject id) of the tenant's audit events whose action starts with `prefix`, oldest first."""
    with database.transaction() as session:
        rows = session.execute(
            select(AuditEvent.action, AuditEvent.subject_id)
            .where(AuditEvent.tenant_id == tenant_id, AuditEvent.action.startswith(prefix))
            .order_by(AuditEvent.id)
        ).all()
        return [(row.action, row.subject_id) for row in rows]


def make_due(database: Database, delivery_id: str) -> None:
    """Bring a scheduled retry forward to now (instead of waiting for it)."""
    with database.transaction() as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                        .values(next_attempt_at=utcnow()))


def delivery_row(database: Database, delivery_id: str) -> WebhookDelivery:
    with database.transaction() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        session.expunge(row)
        return row
