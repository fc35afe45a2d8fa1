"""Webhook delivery, driven in-process step by step against real receivers and real PostgreSQL: what is raised by a
verdict (in its transaction), what is sent and how it is signed, retries on schedule, dead, redelivery, 410, the
SSRF guard at delivery time, rotation, claims and abandoned attempts. The same paths run under real worker
processes in test_webhooks_worker.py."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from standardwebhooks import Webhook, WebhookVerificationError

from app.config import Settings
from app.db import Database
from app.models import Submission, Verdict, WebhookDelivery, WebhookDeliveryAttempt, WebhookEndpoint, utcnow
from app.moderation.providers import ProviderError, ProviderResult
from app.outbox import DELIVER_WEBHOOK, Message, send_after_commit
from app.use_cases import moderation, verdicts
from app.use_cases import webhook_deliveries as webhooks
from app.webhooks.sender import AttemptResult
from tests.conftest import TenantKey
from tests.integration.webhook_support import (
    api_settings,
    audit_actions,
    create_callback_secret,
    create_endpoint,
    deliveries,
    delivery_row,
    make_due,
    receiver,
)
from tests.webhook_receiver import Answer, WebhookReceiver

__all__ = ["api_settings", "receiver"]  # fixtures used by name below

ABUSIVE = "you are a fucking idiot"


def submit(client: FlaskClient, tenant: TenantKey, body: dict[str, Any]) -> str:
    response = client.post("/v1/submissions", json=body, headers=tenant.headers)
    assert response.status_code == 202, response.get_json()
    submission_id: str = response.get_json()["id"]
    return submission_id


def moderate(app: Flask, database: Database, settings: Settings, submission_id: str,
             provider: Any = None) -> str:
    """What a worker does with the submission, in this process."""
    return moderation.moderate_submissions(database, provider or app.extensions["verdict.provider"], [submission_id],
                                           settings)[submission_id]


def deliver_one(database: Database, delivery_id: str, settings: Settings, **kwargs: Any) -> str:
    """What a worker does with a message naming the one delivery, in this process."""
    return webhooks.deliver(database, [delivery_id], settings, **kwargs)[delivery_id]


def deliver_all(database: Database, settings: Settings, ids: Sequence[str]) -> list[str]:
    return [deliver_one(database, delivery_id, settings) for delivery_id in ids]


class RefusingProvider:
    name = "refusing"
    max_batch = 32

    def models(self) -> list[Any]:
        return []

    def moderate(self, texts: Sequence[str], model: str | None = None) -> ProviderResult:
        raise ProviderError("upstream_refused", "the provider refused the request")


def attempts(database: Database, delivery_id: str) -> list[WebhookDeliveryAttempt]:
    with database.transaction() as session:
        rows = list(session.scalars(select(WebhookDeliveryAttempt)
                                    .where(WebhookDeliveryAttempt.delivery_id == delivery_id)
                                    .order_by(WebhookDeliveryAttempt.number)))
        session.expunge_all()
        return rows


# ---- what a verdict raises -------------------------------------------------------------------------------------


def test_a_flagged_verdict_is_delivered_signed_with_the_verdict_and_without_the_text(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database, api_settings: Settings,
    receiver: WebhookReceiver,
) -> None:
    endpoint_id, secret = create_endpoint(client, tenant, receiver.url)
    with WebhookReceiver() as callback_receiver:
        signer_id, callback_secret = create_callback_secret(client, tenant)
        submission_id = submit(client, tenant, {"input": ABUSIVE, "role": "output", "metadata": {"user": "u-7"},
                                                "conversation_id": "c-1", "callback_url": callback_receiver.url})
        assert moderate(app, database, api_settings, submission_id) == "completed"

        to_endpoint = deliveries(client, tenant, endpoint_id)
        to_callback = deliveries(client, tenant, signer_id)
        assert sorted(d["event_type"] for d in to_endpoint) == ["submission.completed", "submission.flagged"]
        assert sorted(d["event_type"] for d in to_callback) == ["submission.completed", "submission.flagged"]
        assert {d["url"] for d in to_callback} == {callback_receiver.url}
        outcomes = deliver_all(database, api_settings, [d["id"] for d in to_endpoint + to_callback])
        assert outcomes == ["succeeded"] * 4

        for server, key, other in ((receiver, secret, callback_secret),
                                   (callback_receiver, callback_secret, secret)):
            received = server.wait_for(2)
            assert len(received) == 2
            for request in received:
                payload = Webhook(key).verify(request.body, request.headers)
                with pytest.raises(WebhookVerificationError):
                    Webhook(other).verify(request.body, request.headers)
                assert payload["type"] in {"submission.completed", "submission.flagged"}
                data = payload["data"]
                assert data["id"] == submission_id and data["status"] == "completed"
                assert data["metadata"] == {"user": "u-7"} and data["conversation_id"] == "c-1"
                assert data["verdict"]["decision"] == "block" and data["verdict"]["flagged"] is True
                assert data["verdict"]["category_scores"]["harassment"] > 0.8
                assert b"idiot" not in request.body and b"fucking" not in request.body
    ids = {d["id"] for d in to_endpoint + to_callback}
    assert {subject for action, subject in audit_actions(database, tenant.tenant_id)
            if action == "webhook.delivered"} == ids
    assert {request.webhook_id for request in receiver.requests} == {d["id"] for d in to_endpoint}


def test_an_allowed_verdict_raises_completed_only(app: Flask, client: FlaskClient, tenant: TenantKey,
                                                  database: Database, api_settings: Settings,
                                                  receiver: WebhookReceiver) -> None:
    everything, _ = create_endpoint(client, tenant, receiver.url)
    flagged_only, _ = create_endpoint(client, tenant, receiver.url, events=["submission.flagged"])
    submission_id = submit(client, tenant, {"input": "have a lovely day"})
    assert moderate(app, database, api_settings, submission_id) == "completed"
    assert [d["event_type"] for d in deliveries(client, tenant, everything)] == ["submission.completed"]
    assert deliveries(client, tenant, flagged_only) == []


def test_a_failed_submission_raises_failed_with_its_error(app: Flask, client: FlaskClient, tenant: TenantKey,
                                                          database: Database, api_settings: Settings,
                                                          receiver: WebhookReceiver) -> None:
    endpoint_id, secret = create_endpoint(client, tenant, receiver.url)
    submission_id = submit(client, tenant, {"input": "some text"})
    assert moderate(app, database, api_settings, submission_id, RefusingProvider()) == "failed"
    [delivery] = deliveries(client, tenant, endpoint_id)
    assert delivery["event_type"] == "submission.failed"
    assert deliver_one(database, delivery["id"], api_settings) == "succeeded"
    payload = Webhook(secret).verify(receiver.wait_for(1)[0].body, receiver.requests[0].headers)
    assert payload["type"] == "submission.failed"
    assert payload["data"]["status"] == "failed" and payload["data"]["verdict"] is None
    assert payload["data"]["error"]["code"] == "upstream_refused"


def test_deliveries_commit_with_the_verdict_or_not_at_all(app: Flask, client: FlaskClient, tenant: TenantKey,
                                                          database: Database, api_settings: Settings,
                                                          receiver: WebhookReceiver,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    create_endpoint(client, tenant, receiver.url)
    submission_id = submit(client, tenant, {"input": "have a lovely day"})

    def broken_audit(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the audit write failed")

    # The audit events are written after the deliveries, in the same transaction: failing them must undo both.
    monkeypatch.setattr(verdicts, "record_event", broken_audit)
    with pytest.raises(RuntimeError):
        moderate(app, database, api_settings, submission_id)
    with database.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Verdict)
                              .where(Verdict.submission_id == submission_id)) == 0
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)
                              .where(WebhookDelivery.submission_id == submission_id)) == 0
        submission = session.get(Submission, submission_id)
        assert submission is not None and submission.status == "processing"


def test_synchronous_moderations_raise_no_webhooks(client: FlaskClient, tenant: TenantKey, database: Database,
                                                   api_settings: Settings, receiver: WebhookReceiver) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    response = client.post("/v1/moderations", json={"input": ABUSIVE}, headers=tenant.headers)
    assert response.status_code == 200, response.get_json()
    assert deliveries(client, tenant, endpoint_id) == []


# ---- retries, dead, redelivery, 410 ----------------------------------------------------------------------------


def test_retries_on_schedule_then_dead_then_redelivered_by_hand(
    client: FlaskClient, tenant: TenantKey, database: Database, api_settings: Settings, receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(api_settings, "webhook_retry_schedule", "5,300")
    endpoint_id, secret = create_endpoint(client, tenant, receiver.url)
    delivery_id = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    receiver.status = 500

    assert deliver_one(database, delivery_id, api_settings) == "retry"
    row = delivery_row(database, delivery_id)
    assert row.status == "pending" and row.retries == 1 and row.last_status_code == 500
    assert row.next_attempt_at is not None and row.next_attempt_at - row.updated_at == timedelta(seconds=5)
    # Not due yet: a duplicate or early task does nothing.
    assert deliver_one(database, delivery_id, api_settings) == "skipped"
    assert len(receiver.requests) == 1

    make_due(database, delivery_id)
    assert deliver_one(database, delivery_id, api_settings) == "retry"
    row = delivery_row(database, delivery_id)
    assert row.next_attempt_at is not None and row.next_attempt_at - row.updated_at == timedelta(seconds=300)
    make_due(database, delivery_id)
    assert deliver_one(database, delivery_id, api_settings) == "dead"
    assert delivery_row(database, delivery_id).status == "dead"
    assert ("webhook.dead", delivery_id) in audit_actions(database, tenant.tenant_id)
    logged = attempts(database, delivery_id)
    assert [(a.number, a.status_code, a.error) for a in logged] == [(n, 500, "HTTP 500") for n in (1, 2, 3)]
    assert all(a.latency_ms is not None for a in logged)

    receiver.status = 200
    assert client.post(f"/v1/deliveries/{delivery_id}/redeliver", headers=tenant.headers).status_code == 202
    assert deliver_one(database, delivery_id, api_settings) == "succeeded"
    [shown] = deliveries(client, tenant, endpoint_id)
    assert shown["status"] == "succeeded" and shown["attempt_count"] == 4
    assert [a["status_code"] for a in shown["attempts"]] == [500, 500, 500, 200]
    received = receiver.wait_for(4)
    assert {r.webhook_id for r in received} == {delivery_id}
    assert len({r.body for r in received}) == 1
    Webhook(secret).verify(received[-1].body, received[-1].headers)
    assert ("webhook.delivered", delivery_id) in audit_actions(database, tenant.tenant_id)


def test_410_kills_the_delivery_and_disables_the_endpoint(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database, api_settings: Settings,
    receiver: WebhookReceiver,
) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    first = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    second = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    receiver.script(Answer(410, body=b"gone for good"))

    assert deliver_one(database, first, api_settings) == "dead"
    shown = client.get(f"/v1/webhooks/{endpoint_id}", headers=tenant.headers).get_json()
    assert shown["status"] == "disabled" and "410" in shown["disabled_reason"]
    assert attempts(database, first)[0].response_excerpt == "gone for good"
    actions = audit_actions(database, tenant.tenant_id)
    assert ("webhook.disabled", endpoint_id) in actions and ("webhook.dead", first) in actions

    # What was already queued for it is not sent; nothing new is raised for it; tests and redeliveries are refused.
    assert deliver_one(database, second, api_settings) == "dead"
    assert attempts(database, second)[0].error == "not sent: the endpoint is disabled"
    assert len(receiver.requests) == 1
    submission_id = submit(client, tenant, {"input": ABUSIVE})
    moderate(app, database, api_settings, submission_id)
    assert {d["id"] for d in deliveries(client, tenant, endpoint_id)} == {first, second}
    assert client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).status_code == 409
    assert client.post(f"/v1/deliveries/{first}/redeliver", headers=tenant.headers).status_code == 409


# ---- the SSRF guard at delivery time ---------------------------------------------------------------------------


def test_delivery_rechecks_the_url(client: FlaskClient, tenant: TenantKey, database: Database,
                                   api_settings: Settings, receiver: WebhookReceiver,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    delivery_id = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    monkeypatch.setattr(api_settings, "webhook_allowed_networks", "")  # the operator closed loopback since
    assert deliver_one(database, delivery_id, api_settings) == "retry"
    assert receiver.requests == []
    error = attempts(database, delivery_id)[0].error
    assert error is not None and error.startswith("refused:") and "loopback" in error


def test_a_name_rebound_to_a_private_address_is_not_contacted(client: FlaskClient, tenant: TenantKey,
                                                             database: Database, api_settings: Settings,
                                                             receiver: WebhookReceiver) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    delivery_id = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    outcome = deliver_one(database, delivery_id, api_settings, resolve=lambda host, port: ["169.254.169.254"])
    assert outcome == "retry" and receiver.requests == []
    error = attempts(database, delivery_id)[0].error
    assert error is not None and "cloud metadata" in error


# ---- rotation --------------------------------------------------------------------------------------------------


def test_during_rotation_both_secrets_sign_until_the_grace_period_ends(
    client: FlaskClient, tenant: TenantKey, database: Database, api_settings: Settings, receiver: WebhookReceiver,
) -> None:
    endpoint_id, old = create_endpoint(client, tenant, receiver.url)
    new = client.post(f"/v1/webhooks/{endpoint_id}/rotate-secret", headers=tenant.headers).get_json()["secret"]
    first = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    assert deliver_one(database, first, api_settings) == "succeeded"
    request = receiver.wait_for(1)[0]
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(request.body, request.headers)
    Webhook(new).verify(request.body, request.headers)

    with database.transaction() as session:
        session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id)
                        .values(previous_secret_expires_at=utcnow() - timedelta(seconds=1)))
    second = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    assert deliver_one(database, second, api_settings) == "succeeded"
    request = receiver.wait_for(2)[1]
    assert len(request.headers["webhook-signature"].split(" ")) == 1
    Webhook(new).verify(request.body, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(request.body, request.headers)


# ---- claims, abandoned attempts and the sweep ------------------------------------------------------------------


def test_one_claim_wins_and_a_stale_claim_records_nothing(client: FlaskClient, tenant: TenantKey,
                                                          database: Database, api_settings: Settings,
                                                          receiver: WebhookReceiver) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    delivery_id = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    with database.transaction() as one:
        claim = webhooks.claim_delivery(one, delivery_id)
    assert claim is not None and claim.attempt == 1
    with database.transaction() as two:
        assert webhooks.claim_delivery(two, delivery_id) is None
    stale = webhooks.DeliveryClaim(delivery_id=delivery_id, token="0" * 32, attempt=1)
    ok = AttemptResult(status_code=200, latency_ms=1, error=None, response_excerpt=None)
    with database.transaction() as two:
        assert webhooks.conclude_attempt(two, stale, ok, started_at=utcnow(), settings=api_settings) == "lost"
    with database.transaction() as one:
        assert webhooks.conclude_attempt(one, claim, ok, started_at=utcnow(), settings=api_settings) == "succeeded"
    assert len(attempts(database, delivery_id)) == 1
    assert deliver_one(database, delivery_id, api_settings) == "skipped"
    assert receiver.requests == []


def test_the_sweep_turns_an_abandoned_claim_into_a_retry_and_resends_lost_tasks(
    client: FlaskClient, tenant: TenantKey, database: Database, api_settings: Settings, receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    delivery_id = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    published: list[Message] = []
    monkeypatch.setattr(database.outbox, "publisher", published.extend)  # no worker runs: keep what is sent

    def sent() -> list[str]:
        return [named for m in published if m.task == DELIVER_WEBHOOK for named in m.args]

    # The API sent its task a moment ago: the sweep leaves it to that task.
    webhooks.sweep_deliveries(database, api_settings)
    assert delivery_id not in sent()

    # A worker claimed it and died: the claim outlives its lease.
    with database.transaction() as session:
        assert webhooks.claim_delivery(session, delivery_id) is not None
    with database.transaction() as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(
            claimed_at=utcnow() - timedelta(seconds=api_settings.webhook_lease_seconds + 1)))
    webhooks.sweep_deliveries(database, api_settings)
    row = delivery_row(database, delivery_id)
    assert row.status == "pending" and row.retries == 1 and row.claim_token is None
    [abandoned] = attempts(database, delivery_id)
    assert abandoned.error == webhooks.ABANDONED_ERROR and abandoned.number == 1

    make_due(database, delivery_id)
    webhooks.sweep_deliveries(database, api_settings)
    webhooks.sweep_deliveries(database, api_settings)
    # Sent once it was due, and not again while that task may still be queued.
    assert sent().count(delivery_id) == 1
    assert deliver_one(database, delivery_id, api_settings) == "succeeded"
    assert [r.webhook_id for r in receiver.wait_for(1)] == [delivery_id]
    assert [a.number for a in attempts(database, delivery_id)] == [1, 2]


# ---- erasure ---------------------------------------------------------------------------------------------------


def test_erasing_a_submission_erases_its_delivery_bodies(app: Flask, client: FlaskClient, tenant: TenantKey,
                                                            database: Database, api_settings: Settings,
                                                            receiver: WebhookReceiver) -> None:
    endpoint_id, secret = create_endpoint(client, tenant, receiver.url)
    submission_id = submit(client, tenant, {"input": ABUSIVE, "metadata": {"email": "a@example.com"}})
    moderate(app, database, api_settings, submission_id)
    kept = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    assert client.delete(f"/v1/data/{submission_id}", headers=tenant.headers).status_code == 200
    for delivery in deliveries(client, tenant, endpoint_id):
        data = delivery["payload"]["data"]
        if delivery["id"] == kept:
            assert data["object"] == "webhook_test"
            continue
        assert data["metadata"] is None and data["verdict"]["results"] == [] and data["erased_at"]
        assert data["verdict"]["decision"] == "block"  # the tombstone keeps the overall verdict
        assert deliver_one(database, delivery["id"], api_settings) == "succeeded"
    for request in receiver.wait_for(2):
        payload = Webhook(secret).verify(request.body, request.headers)
        assert payload["data"]["metadata"] is None and b"a@example.com" not in request.body


# ---- tasks are sent after the commit ---------------------------------------------------------------------------


def test_delivery_tasks_are_sent_once_committed_and_never_for_a_rollback(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database, api_settings: Settings,
    receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch,
) -> None:
    published: list[list[Message]] = []
    monkeypatch.setattr(database.outbox, "publisher", lambda messages: published.append(list(messages)))

    def sent() -> list[list[str]]:
        return [[delivery_id for m in batch for delivery_id in m.args] for batch in published
                if batch and all(m.task == DELIVER_WEBHOOK for m in batch)]

    endpoint_id, _ = create_endpoint(client, tenant, receiver.url)
    test_id = client.post(f"/v1/webhooks/{endpoint_id}/test", headers=tenant.headers).get_json()["id"]
    assert sent() == [[test_id]]

    submission_id = submit(client, tenant, {"input": ABUSIVE})
    moderate(app, database, api_settings, submission_id)
    raised = {d["id"] for d in deliveries(client, tenant, endpoint_id)} - {test_id}
    assert len(raised) == 2 and len(sent()) == 2 and set(sent()[1]) == raised  # one batch, after the verdict commit

    with database.session() as session:
        session.begin()
        send_after_commit(session, Message(DELIVER_WEBHOOK, ("msg_rolled_back",)))
        session.rollback()
        with session.begin():
            pass  # a later transaction of the same session commits; the rolled-back message stays unsent
    assert all("msg_rolled_back" not in ids for ids in sent())


def test_one_message_delivers_several_each_concluded_on_its_own(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database, api_settings: Settings,
    receiver: WebhookReceiver,
) -> None:
    with WebhookReceiver() as failing:
        failing.status = 500
        ok_endpoint, _ = create_endpoint(client, tenant, receiver.url)
        failing_endpoint, _ = create_endpoint(client, tenant, failing.url)
        submission_id = submit(client, tenant, {"input": "have a lovely day"})
        assert moderate(app, database, api_settings, submission_id) == "completed"
        (ok,) = [d["id"] for d in deliveries(client, tenant, ok_endpoint)]
        (bad,) = [d["id"] for d in deliveries(client, tenant, failing_endpoint)]

        # Both in one message (as a verdict chunk sends them): sent side by side, each concluded by its own answer.
        assert webhooks.deliver(database, [ok, bad], api_settings) == {ok: "succeeded", bad: "retry"}
        assert len(receiver.wait_for(1)) == 1 and len(failing.wait_for(1)) == 1
    assert [a.status_code for a in attempts(database, ok)] == [200]
    assert [a.status_code for a in attempts(database, bad)] == [500]
    assert delivery_row(database, ok).status == "succeeded"
    assert delivery_row(database, bad).status == "pending" and delivery_row(database, bad).retries == 1
    delivered = [subject for action, subject in audit_actions(database, tenant.tenant_id)
                 if action == "webhook.delivered"]
    assert ok in delivered and bad not in delivered
    # The message again (a redelivery): the one done and the one not yet due are both left alone.
    assert webhooks.deliver(database, [ok, bad], api_settings) == {ok: "skipped", bad: "skipped"}
