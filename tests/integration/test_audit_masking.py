"""PII masking through the real pipeline: what the database stores, what the audit trail digests and what the
upstream provider receives (the fake upstream, called by a real worker process) hold placeholders, never the
identifiers. Masking follows the submission's `mask`, else the tenant's default."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from app.audit_chain import content_digest
from app.db import Database
from app.models import AuditEvent, Submission
from app.use_cases.tenants import configure_tenant
from tests.conftest import TenantKey
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import WorkerProcess, openai_worker_env, submit, wait_final

IDENTIFIERS = {
    "email": "jane.doe@example.com",
    "phone": "+1 415 555 0132",
    "card": "4111 1111 1111 1111",
    "ipv4": "203.0.113.42",
    "ipv6": "2001:db8::8a2e:370:7334",
    "iban": "DE89 3704 0044 0532 0130 00",
    "ssn": "123-45-6789",
}
TEXTS = [
    f"I will kill you, write to {IDENTIFIERS['email']} or call {IDENTIFIERS['phone']}",
    f"pay with {IDENTIFIERS['card']} or to {IDENTIFIERS['iban']}; SSN {IDENTIFIERS['ssn']}",
    f"seen from {IDENTIFIERS['ipv4']} and {IDENTIFIERS['ipv6']}",
]
MASKED = [
    "I will kill you, write to <EMAIL> or call <PHONE>",
    "pay with <CARD> or to <IBAN>; SSN <SSN>",
    "seen from <IP> and <IP>",
]


def stored(database: Database, submission_id: str) -> Submission:
    with database.transaction() as session:
        submission = session.get(Submission, submission_id)
        assert submission is not None
        return submission


def received_event(database: Database, submission_id: str) -> AuditEvent:
    with database.transaction() as session:
        return session.scalars(select(AuditEvent).where(AuditEvent.subject_id == submission_id,
                                                        AuditEvent.action == "submission.received")).one()


def assert_no_identifier(value: Any) -> None:
    rendered = str(value)
    for identifier in IDENTIFIERS.values():
        assert identifier not in rendered, identifier
        assert identifier.replace(" ", "") not in rendered.replace(" ", ""), identifier


def test_masked_submission_never_reaches_the_database_or_the_provider(
    client: FlaskClient, database: Database, tenant: TenantKey, fake_upstream: FakeUpstream,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    start_worker(**openai_worker_env(fake_upstream))
    accepted = submit(client, tenant, {"input": TEXTS, "mask": True})
    body = wait_final(client, tenant, accepted["id"])
    assert body["status"] == "completed"
    assert body["verdict"]["decision"] == "block"  # masking keeps what moderation needs

    assert fake_upstream.texts_seen() == MASKED
    assert_no_identifier(fake_upstream.texts_seen())
    submission = stored(database, accepted["id"])
    assert submission.content == MASKED and submission.mask is True
    assert submission.content_digest == content_digest(MASKED)
    event = received_event(database, accepted["id"])
    assert event.content_digest == content_digest(MASKED)
    assert event.details["mask"] is True
    assert event.details["masked"] == {"card": 1, "email": 1, "iban": 1, "ip": 2, "phone": 1, "ssn": 1}
    with database.transaction() as session:
        for event in session.scalars(select(AuditEvent).where(AuditEvent.subject_id == accepted["id"])):
            assert_no_identifier([getattr(event, c.key) for c in AuditEvent.__table__.columns])


def test_an_unmasked_submission_is_stored_as_sent(client: FlaskClient, database: Database,
                                                  tenant: TenantKey) -> None:
    accepted = submit(client, tenant, {"input": TEXTS})
    assert stored(database, accepted["id"]).content == TEXTS
    assert received_event(database, accepted["id"]).details["mask"] is False


@pytest.mark.parametrize(("tenant_default", "requested", "masked"), [
    pytest.param(True, None, True, id="tenant-default-on"),
    pytest.param(True, False, False, id="submission-overrides-tenant"),
    pytest.param(False, True, True, id="submission-asks-tenant-off"),
    pytest.param(None, None, False, id="deployment-default-off"),
])
def test_the_tenant_default_applies_when_the_submission_does_not_say(
    client: FlaskClient, database: Database, tenant: TenantKey, tenant_default: bool | None,
    requested: bool | None, masked: bool,
) -> None:
    with database.transaction() as session:
        configure_tenant(session, tenant.tenant_name, mask_by_default=tenant_default)
    body: dict[str, Any] = {"items": [{"input": TEXTS[0]} if requested is None else {"input": TEXTS[0],
                                                                                     "mask": requested}]}
    accepted = submit(client, tenant, body)["data"][0]
    submission = stored(database, accepted["id"])
    assert submission.content == ([MASKED[0]] if masked else [TEXTS[0]])
    assert submission.mask is masked


def test_the_openai_endpoint_masks_for_a_tenant_that_masks_by_default(client: FlaskClient, database: Database,
                                                                      tenant: TenantKey) -> None:
    with database.transaction() as session:
        configure_tenant(session, tenant.tenant_name, mask_by_default=True)
    response = client.post("/v1/moderations", json={"input": TEXTS}, headers=tenant.headers)
    assert response.status_code == 200
    submission_id = "sub_" + response.get_json()["id"].removeprefix("modr-")
    submission = stored(database, submission_id)
    assert submission.content == MASKED and submission.mask is True
    assert received_event(database, submission_id).details["masked"]["ip"] == 2


def test_mask_must_be_a_boolean(client: FlaskClient, tenant: TenantKey) -> None:
    response = client.post("/v1/submissions", json={"input": "hi", "mask": "yes"}, headers=tenant.headers)
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "mask"
