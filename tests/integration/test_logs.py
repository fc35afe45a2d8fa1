"""The logs of a full request cycle — keys created and used, a refused key, content submitted and judged by a real
worker, synchronous moderation, a webhook secret — are structured JSON carrying request id, tenant, key id, route,
status and latency, and never hold a key, a secret or moderated text."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Callable, Iterator

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from app.db import Database
from app.models import AuditEvent
from tests.conftest import TenantKey
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import WorkerProcess, openai_worker_env, wait_final


@pytest.fixture
def api_log() -> Iterator[io.StringIO]:
    """Everything the API process logs during the test, through the formatter Verdict configured."""
    root = logging.getLogger()
    formatter = next(h.formatter for h in root.handlers if h.formatter is not None)
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    yield buffer
    root.removeHandler(handler)


def test_a_full_cycle_logs_ids_and_never_secrets_or_text(
    client: FlaskClient, tenant: TenantKey, api_log: io.StringIO, start_worker: Callable[..., WorkerProcess],
    fake_upstream: FakeUpstream, database: Database,
) -> None:
    worker = start_worker(**openai_worker_env(fake_upstream))
    marker = uuid.uuid4().hex[:12]
    texts = [f"zebra {marker} you are a stupid idiot", f"quartz {marker} lovely weather", f"opal {marker} hi"]

    created = client.post("/v1/keys", json={"scopes": ["submit", "read"]}, headers=tenant.headers).get_json()
    key_headers = {"Authorization": f"Bearer {created['secret']}"}
    signer = client.post("/v1/webhooks/callback-secret", headers=tenant.headers).get_json()
    wrong = created["secret"][:-6] + "AAAAAA"
    assert client.get("/v1/submissions", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
    request_id = f"trace-{uuid.uuid4().hex[:12]}"
    response = client.post("/v1/submissions", json={"input": texts[:2], "metadata": {"note": texts[2]}},
                           headers={**key_headers, "X-Request-ID": request_id})
    assert response.status_code == 202
    submission_id = response.get_json()["id"]
    final = wait_final(client, TenantKey(tenant.tenant_name, tenant.tenant_id, created["id"], created["secret"]),
                       submission_id)
    assert final["status"] == "completed"
    moderated = client.post("/v1/moderations", json={"input": f"onyx {marker} sync text"}, headers=key_headers)
    assert moderated.status_code == 200
    worker.stop()

    # A key is vk_<id>_<secret>, and the secret (token_urlsafe) may hold "_" itself: split after the id, not at the
    # last "_" (which made the "secret" a character or two long, found in any log, now and then).
    secrets_ = [tenant.plaintext, created["secret"], created["secret"].split("_", 2)[2], wrong, signer["secret"],
                signer["secret"].removeprefix("whsec_")]
    api_lines = api_log.getvalue().splitlines()
    worker_text = worker.log_path.read_text(errors="replace")
    assert api_lines and worker_text
    for text in [*texts, f"onyx {marker} sync text", marker, *secrets_]:
        assert text not in api_log.getvalue(), f"API log holds {text[:12]}…"
        assert text not in worker_text, f"worker log holds {text[:12]}…"

    events = [json.loads(line) for line in api_lines]  # every API line is one JSON object
    requests = [e for e in events if e["event"] == "request"]
    submitted = next(e for e in requests if e["request_id"] == request_id)
    assert submitted == {**submitted, "method": "POST", "route": "/v1/submissions", "status": 202,
                         "tenant_id": tenant.tenant_id, "key_id": created["id"], "level": "info"}
    assert isinstance(submitted["latency_ms"], float) and submitted["timestamp"]
    refused = [e for e in requests if e["status"] == 401]
    assert refused and refused[0]["key_id"] is None  # a refused key is not named as the actor
    assert all(e.get("request_id") for e in events)

    worker_events = [json.loads(line) for line in worker_text.splitlines() if line.startswith("{")]
    verdict = next(e for e in worker_events if e.get("event") == "verdict_recorded")
    assert verdict["submission_id"] == submission_id and verdict["request_id"] == request_id
    # And the audit trail: every event about the submission, the worker's included, names the same request.
    with database.transaction() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.subject_id == submission_id)).all()
        assert {e.action for e in events} >= {"submission.received", "moderation.completed", "verdict.decided"}
        assert {e.request_id for e in events} == {request_id}
