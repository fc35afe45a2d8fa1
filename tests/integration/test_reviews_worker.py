"""Human review end to end through a real worker: a text the upstream scores in the review band is queued by the
worker in the verdict's transaction, a reviewer claims and decides it over the API, and the client gets the final
decision by poll and by a signed `review.decided` webhook, with every step in the audit trail. (The same loop in a
real browser is tests/integration/test_console_browser.py.)"""

from __future__ import annotations

from collections.abc import Callable

from flask.testing import FlaskClient
from sqlalchemy import select
from standardwebhooks import Webhook

from app.config import Settings
from app.db import Database
from app.models import AuditEvent
from tests.conftest import TenantKey, issue_key
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import WorkerProcess, openai_worker_env, submit, wait_final
from tests.integration.webhook_support import api_settings, create_endpoint, receiver
from tests.webhook_receiver import WebhookReceiver

__all__ = ["api_settings", "receiver"]  # fixtures used by name below

WEBHOOK_ENV = {"WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8", "WEBHOOK_RETRY_SCHEDULE": "1,1,1",
               "WEBHOOK_SWEEP_INTERVAL_SECONDS": "0.5", "WEBHOOK_TIMEOUT_SECONDS": "2"}


def test_a_text_sent_to_review_by_a_worker_is_decided_and_the_client_gets_it_by_poll_and_webhook(
    client: FlaskClient, database: Database, tenant: TenantKey, api_settings: Settings, receiver: WebhookReceiver,
    fake_upstream: FakeUpstream, start_worker: Callable[..., WorkerProcess],
) -> None:
    start_worker(**openai_worker_env(fake_upstream, **WEBHOOK_ENV))
    _, secret = create_endpoint(client, tenant, receiver.url, events=["submission.completed", "review.decided"])
    reviewer = issue_key(database, tenant_name=tenant.tenant_name, scopes=("review",), key_name="Ann")

    accepted = submit(client, tenant, {"input": "that was a stupid answer", "metadata": {"ticket": 9}})
    machine = wait_final(client, tenant, accepted["id"])
    assert machine["verdict"]["decision"] == "review", machine
    assert machine["review"]["status"] == "pending" and machine["final_decision"] is None
    [completed] = receiver.wait_for(1)
    assert Webhook(secret).verify(completed.body, completed.headers)["data"]["review"]["status"] == "pending"

    claimed = client.post("/v1/reviews/claim-next", headers=reviewer.headers)
    assert claimed.status_code == 200, claimed.get_json()
    review_id = claimed.get_json()["id"]
    assert claimed.get_json()["submission_id"] == accepted["id"]
    item = client.get(f"/v1/reviews/{review_id}", headers=reviewer.headers).get_json()
    assert item["text"] == ["that was a stupid answer"]
    decided = client.post(f"/v1/reviews/{review_id}/decision", headers=reviewer.headers,
                          json={"decision": "allow", "reason": "blunt, not abusive"})
    assert decided.status_code == 200, decided.get_json()

    polled = client.get(f"/v1/submissions/{accepted['id']}", headers=tenant.headers).get_json()
    assert polled["final_decision"] == "allow" and polled["verdict"]["decision"] == "review"
    received = receiver.wait_for(2)
    payload = Webhook(secret).verify(received[1].body, received[1].headers)
    assert payload["type"] == "review.decided"
    assert payload["data"] == polled  # the same payload as GET /v1/submissions/{id}
    assert all(b"stupid" not in r.body for r in received)

    with database.transaction() as session:
        trail = [(e.action, e.actor) for e in session.scalars(
            select(AuditEvent).where(AuditEvent.tenant_id == tenant.tenant_id,
                                     AuditEvent.subject_id.in_([accepted["id"], review_id]))
            .order_by(AuditEvent.seq))]
    assert [a for a, _ in trail] == ["submission.received", "moderation.completed", "verdict.decided",
                                     "review.created", "review.claimed", "review.viewed", "review.decided"]
    assert trail[-1] == ("review.decided", reviewer.key_id)
    verified = client.get("/v1/audit/verify", headers=tenant.headers).get_json()
    assert verified["ok"] is True, verified
