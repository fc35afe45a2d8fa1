"""A verdict's webhooks sent by the moderation command itself, right after the verdict commits (issue 15 item 2;
WEBHOOK_INLINE_SECONDS), in this process against real PostgreSQL and a real receiver: delivered with no message
sent, audited and logged as `deliver` does, however many a chunk raises; a receiver that does not answer within the
budget handed over to the `webhooks` queue unconcluded (and sent nothing inline for a while), and in a large chunk sent
one round of attempts at most; a process that died after the commit and before sending leaving a claim the sweep
recovers.
The same through real worker processes is in test_webhooks_worker.py."""

from __future__ import annotations

import contextlib
import socket
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update
from standardwebhooks import Webhook

from app.config import Settings
from app.db import Database
from app.models import WebhookDelivery, WebhookDeliveryAttempt, utcnow
from app.outbox import DELIVER_WEBHOOK, Message
from app.use_cases import moderation
from app.use_cases import webhook_deliveries as webhooks
from tests.conftest import TenantKey
from tests.integration.webhook_support import (
    api_settings,
    audit_actions,
    create_endpoint,
    deliveries,
    make_due,
    receiver,
)
from tests.webhook_receiver import WebhookReceiver

__all__ = ["api_settings", "receiver"]  # fixtures used by name below

ABUSIVE = "you are a fucking idiot"


@pytest.fixture
def inline(api_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings with inline sending on (a short budget), and this process's memory of slow receivers empty."""
    monkeypatch.setattr(api_settings, "webhook_inline_seconds", 0.5)
    monkeypatch.setattr(webhooks, "_slow_receivers", {})
    return api_settings


@pytest.fixture
def published(database: Database, monkeypatch: pytest.MonkeyPatch) -> list[Message]:
    """What the outbox sends (no worker runs here)."""
    sent: list[Message] = []
    monkeypatch.setattr(database.outbox, "publisher", sent.extend)
    return sent


def submit_and_moderate(app: Flask, client: FlaskClient, tenant: TenantKey, database: Database,
                        settings: Settings, text: str, published: list[Message]) -> str:
    response = client.post("/v1/submissions", json={"input": text}, headers=tenant.headers)
    assert response.status_code == 202, response.get_json()
    submission_id: str = response.get_json()["id"]
    published.clear()  # its moderation message: run here instead
    outcome = moderation.moderate_submissions(database, app.extensions["verdict.provider"], [submission_id],
                                              settings)
    assert outcome == {submission_id: "completed"}
    return submission_id


def delivery_messages(published: list[Message]) -> list[str]:
    return [named for m in published if m.task == DELIVER_WEBHOOK for named in m.args]


def attempts_of(database: Database, delivery_id: str) -> list[WebhookDeliveryAttempt]:
    with database.transaction() as session:
        rows = list(session.scalars(select(WebhookDeliveryAttempt)
                                    .where(WebhookDeliveryAttempt.delivery_id == delivery_id)
                                    .order_by(WebhookDeliveryAttempt.number)))
        session.expunge_all()
        return rows


def row_of(database: Database, delivery_id: str) -> Any:
    with database.transaction() as session:
        return session.execute(select(WebhookDelivery.status, WebhookDelivery.attempt_count,
                                      WebhookDelivery.claim_token, WebhookDelivery.retries)
                               .where(WebhookDelivery.id == delivery_id)).one()


def test_a_verdicts_webhooks_are_sent_by_the_moderation_command_with_no_message(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database, inline: Settings,
    receiver: WebhookReceiver, published: list[Message],
) -> None:
    endpoint_id, secret = create_endpoint(client, tenant, receiver.url)
    submission_id = submit_and_moderate(app, client, tenant, database, inline, ABUSIVE, published)

    # Already received when the command returned: no delivery message was sent for a worker to run.
    assert delivery_messages(published) == []
    received = receiver.requests
    assert sorted(Webhook(secret).verify(r.body, r.headers)["type"] for r in received) == [
        "submission.completed", "submission.flagged"]
    assert {Webhook(secret).verify(r.body, r.headers)["data"]["id"] for r in received} == {submission_id}
    logged = deliveries(client, tenant, endpoint_id)
    assert {d["status"] for d in logged} == {"succeeded"}
    assert [[a["status_code"] for a in d["attempts"]] for d in logged] == [[200], [200]]
    assert {r.webhook_id for r in received} == {d["id"] for d in logged}
    assert sorted(audit_actions(database, tenant.tenant_id)) == sorted(
        [("webhook.created", endpoint_id)] + [("webhook.delivered", d["id"]) for d in logged])
    # A message for them arriving anyway (the sweep, a duplicate) finds nothing to do.
    assert webhooks.deliver(database, [d["id"] for d in logged], inline) == dict.fromkeys(
        (d["id"] for d in logged), "skipped")
    assert len(receiver.requests) == 2


def test_a_receiver_that_does_not_answer_in_time_gets_the_delivery_from_the_webhooks_queue(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database, inline: Settings,
    receiver: WebhookReceiver, published: list[Message],
) -> None:
    endpoint_id, secret = create_endpoint(client, tenant, receiver.url, events=["submission.completed"])
    receiver.hold_next()  # the inline attempt gets no answer within the budget
    try:
        submit_and_moderate(app, client, tenant, database, inline, "have a lovely day", published)
        # The command returned with the attempt unanswered: handed over unconcluded, its message sent.
        [delivery] = deliveries(client, tenant, endpoint_id)
        assert delivery_messages(published) == [delivery["id"]]
        assert row_of(database, delivery["id"]) == ("pending", 0, None, 0)
        assert attempts_of(database, delivery["id"]) == []
        assert audit_actions(database, tenant.tenant_id) == [("webhook.created", endpoint_id)]

        # The `webhooks` worker's attempt, with the full timeout: the first recorded, and it succeeds.
        assert webhooks.deliver(database, [delivery["id"]], inline) == {delivery["id"]: "succeeded"}
        assert [a.number for a in attempts_of(database, delivery["id"])] == [1]
        received = receiver.wait_for(2)
        # At least once: the receiver saw the unanswered inline attempt too, with the same webhook-id.
        assert [r.webhook_id for r in received] == [delivery["id"]] * 2
        Webhook(secret).verify(received[1].body, received[1].headers)

        # That receiver gets nothing inline for a while: the next verdict's delivery goes by message at once.
        published.clear()
        submit_and_moderate(app, client, tenant, database, inline, "thank you so much", published)
        queued = [d for d in deliveries(client, tenant, endpoint_id) if d["id"] != delivery["id"]]
        assert [d["status"] for d in queued] == ["pending"]
        assert delivery_messages(published) == [queued[0]["id"]]
        assert len(receiver.requests) == 2
    finally:
        receiver.release()


def test_a_process_that_died_after_the_commit_and_before_sending_leaves_the_delivery_to_the_sweep(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database, inline: Settings,
    receiver: WebhookReceiver, published: list[Message], monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url, events=["submission.completed"])
    assert delivery_messages(published) == []

    class Died(BaseException):
        """Stands for SIGKILL: nothing after it runs in this process."""

    def die(*args: Any, **kwargs: Any) -> Any:
        raise Died

    response = client.post("/v1/submissions", json={"input": "have a lovely day"}, headers=tenant.headers)
    submission_id = response.get_json()["id"]
    published.clear()
    with monkeypatch.context() as dying, pytest.raises(Died):
        dying.setattr(webhooks, "send_inline", die)
        moderation.moderate_submissions(database, app.extensions["verdict.provider"], [submission_id], inline)

    # The verdict is committed, and its delivery with it, claimed by the dead command: no other worker takes it.
    assert client.get(f"/v1/submissions/{submission_id}", headers=tenant.headers).get_json()["status"] == "completed"
    [delivery] = deliveries(client, tenant, endpoint_id)
    assert row_of(database, delivery["id"])[:2] == ("delivering", 1)
    assert webhooks.deliver(database, [delivery["id"]], inline) == {delivery["id"]: "skipped"}
    webhooks.sweep_deliveries(database, inline)
    assert delivery_messages(published) == []  # within its lease the sweep leaves it alone

    # Once the lease has run out the sweep turns it into a failed attempt, retried on schedule, and sends it then.
    with database.transaction() as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery["id"]).values(
            claimed_at=utcnow() - timedelta(seconds=inline.webhook_lease_seconds + 1)))
    webhooks.sweep_deliveries(database, inline)
    assert row_of(database, delivery["id"]) == ("pending", 1, None, 1)
    make_due(database, delivery["id"])
    webhooks.sweep_deliveries(database, inline)
    assert delivery_messages(published) == [delivery["id"]]
    assert webhooks.deliver(database, [delivery["id"]], inline) == {delivery["id"]: "succeeded"}
    assert [a.error for a in attempts_of(database, delivery["id"])] == [webhooks.ABANDONED_ERROR, None]
    assert [r.webhook_id for r in receiver.wait_for(1)] == [delivery["id"]]


def test_a_chunk_raising_more_than_one_message_holds_is_sent_inline_too(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database, inline: Settings,
    receiver: WebhookReceiver, published: list[Message],
) -> None:
    # 5 endpoints x 2 events (flagged and completed): 10 deliveries, more than the SEND_THREADS sent side by side.
    for _ in range(5):
        create_endpoint(client, tenant, receiver.url)
    submit_and_moderate(app, client, tenant, database, inline, ABUSIVE, published)
    assert delivery_messages(published) == []
    assert len(receiver.requests) == 10 > webhooks.SEND_THREADS
    with database.transaction() as session:
        assert list(session.scalars(select(WebhookDelivery.status)
                                    .where(WebhookDelivery.tenant_id == tenant.tenant_id))) == ["succeeded"] * 10


class Hanging:
    """A receiver that takes connections and never answers (they wait in its accept queue): `connections()` says how
    many were opened to it."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}/hook"
        self._taken: list[socket.socket] = []

    def connections(self) -> int:
        self._socket.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self._taken.append(self._socket.accept()[0])
        return len(self._taken)

    def close(self) -> None:
        for taken in self._taken:
            taken.close()
        self._socket.close()


def test_a_hanging_receiver_in_a_large_chunk_is_sent_at_most_one_round_and_the_rest_is_handed_over(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database, inline: Settings,
    receiver: WebhookReceiver, published: list[Message],
) -> None:
    hanging = Hanging()
    try:
        hanging_id, _ = create_endpoint(client, tenant, hanging.url, events=["submission.completed"])
        healthy_id, _ = create_endpoint(client, tenant, receiver.url, events=["submission.completed"])
        count = webhooks.SEND_THREADS + 4
        ids = []
        for n in range(count):
            response = client.post("/v1/submissions", json={"input": f"have a lovely day {n}"}, headers=tenant.headers)
            assert response.status_code == 202, response.get_json()
            ids.append(response.get_json()["id"])
        published.clear()
        outcome = moderation.moderate_submissions(database, app.extensions["verdict.provider"], ids, inline)
        assert outcome == dict.fromkeys(ids, "completed")

        # One chunk, 2 x `count` deliveries side by side: the hanging receiver got no more attempts than run at once
        # (once one ran out of time the chunk sent it nothing more), none concluded: all handed over, by message.
        assert hanging.connections() <= webhooks.SEND_THREADS < count
        to_hanging = [d["id"] for d in deliveries(client, tenant, hanging_id)]
        assert len(to_hanging) == count
        assert {row_of(database, delivery_id) for delivery_id in to_hanging} == {("pending", 0, None, 0)}
        assert all(attempts_of(database, delivery_id) == [] for delivery_id in to_hanging)
        messaged = delivery_messages(published)
        assert set(to_hanging) <= set(messaged)
        # The healthy receiver's: delivered inline (or, on a very slow machine, handed over too): none lost.
        to_healthy = deliveries(client, tenant, healthy_id)
        assert len(to_healthy) == count
        succeeded = {d["id"] for d in to_healthy if d["status"] == "succeeded"}
        assert succeeded | (set(messaged) - set(to_hanging)) == {d["id"] for d in to_healthy}
        assert {r.webhook_id for r in receiver.requests} >= succeeded
        # Only the receiver that ran out of time is sent nothing inline for a while; not the ones merely not sent.
        assert set(webhooks._slow_receivers) == {hanging_id}
    finally:
        hanging.close()


def test_off_every_delivery_goes_by_message(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database, api_settings: Settings,
    receiver: WebhookReceiver, published: list[Message],
) -> None:
    assert api_settings.webhook_inline_seconds == 0
    create_endpoint(client, tenant, receiver.url, events=["submission.completed"])
    submit_and_moderate(app, client, tenant, database, api_settings, "have a lovely day", published)
    assert len(delivery_messages(published)) == 1
    assert receiver.requests == []


def test_a_failure_while_sending_inline_hands_the_deliveries_over_and_moderation_goes_on(
    app: Flask, client: FlaskClient, tenant: TenantKey, database: Database, inline: Settings,
    receiver: WebhookReceiver, published: list[Message], monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint_id, _ = create_endpoint(client, tenant, receiver.url, events=["submission.completed"])

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the sending")

    monkeypatch.setattr(webhooks, "_send_all", broken)
    submit_and_moderate(app, client, tenant, database, inline, "have a lovely day", published)
    [delivery] = deliveries(client, tenant, endpoint_id)
    assert row_of(database, delivery["id"]) == ("pending", 0, None, 0)
    assert delivery_messages(published) == [delivery["id"]]
