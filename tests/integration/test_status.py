"""`verdict status` and its use case (issue 16 item 4): the queue's counts and oldest due age, webhook deliveries by
status and the audit heads, read from PostgreSQL in-process; the command on the embedded default (SQLite files, a
broker without remote control), as JSON and as lines, and its refusal when the database does not answer. The command
against PostgreSQL, Redis and a live worker runs in tests/integration/test_metrics_scrape.py."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from sqlalchemy import update

from app.db import Database
from app.models import Submission, utcnow
from app.moderation.local_engine import LocalEngine
from app.use_cases.status import audit_heads, deployment_status, queue_status, upstream_status
from tests.conftest import TenantKey
from tests.integration.test_cli import VERDICT, base_env
from tests.lanes import integration_fixture


def test_the_queue_counts_and_ages_what_is_due(client: FlaskClient, tenant: TenantKey, database: Database) -> None:
    ids = [client.post("/v1/submissions", headers=tenant.headers, json={"input": f"text {n}"}).get_json()["id"]
           for n in range(2)]
    now = utcnow()
    with database.transaction() as session:
        before = queue_status(session, now)
        # One waited an hour; the other is a retry due tomorrow, which is queued but not yet waiting.
        session.execute(update(Submission).where(Submission.id == ids[0]).values(enqueued_at=now - timedelta(hours=1)))
        session.execute(update(Submission).where(Submission.id == ids[1]).values(enqueued_at=now + timedelta(days=1)))
        after = queue_status(session, now)
        heads = {head.chain_id: head.seq for head in audit_heads(session)}
        snapshot = deployment_status(session, LocalEngine(), shared=True)
    assert after.queued == before.queued >= 2
    assert after.oldest_queued_age_seconds is not None and after.oldest_queued_age_seconds >= 3600
    assert heads[tenant.tenant_id] >= 3  # key.created, and one submission.received each
    assert snapshot.upstream.provider == "local" and snapshot.upstream.circuit is None
    assert snapshot.webhooks.dead >= 0 and snapshot.queue.queued >= 2


def test_a_local_provider_has_no_upstream_to_show() -> None:
    status = upstream_status(LocalEngine(), shared=False)
    assert (status.circuit, status.budget, status.note) == (None, None, None)


@integration_fixture
def embedded(tmp_path: Path) -> dict[str, str]:
    env = base_env(VAR_DIR=str(tmp_path / "var"))
    for args in (["migrate"], ["keys", "create", "--tenant", "status-tenant"]):
        result = subprocess.run([VERDICT, *args], cwd=tmp_path, env=env, capture_output=True, text=True,  # noqa: S603
                                timeout=120, check=False)
        assert result.returncode == 0, result.stderr
    return env


def test_status_on_the_embedded_default(embedded: dict[str, str], tmp_path: Path) -> None:
    run = subprocess.run([VERDICT, "status", "--json"], cwd=tmp_path, env=embedded,  # noqa: S603
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    assert status["database"].startswith("sqlite:///") and status["broker"].startswith("sqla+sqlite:///")
    assert status["workers"] is None  # the SQLite broker has no remote control: unknown, not "0 alive"
    assert status["queue"] == {"queued": 0, "processing": 0, "oldest_queued_age_seconds": None}
    assert status["webhooks"] == {"pending": 0, "delivering": 0, "dead": 0}
    assert status["upstream"] == {"provider": "local", "circuit": None, "note": None, "budget": None}
    assert status["audit"] == [{"tenant": "status-tenant", "chain": status["audit"][0]["chain"], "last_seq": 2}]
    lines = subprocess.run([VERDICT, "status"], cwd=tmp_path, env=embedded,  # noqa: S603
                           capture_output=True, text=True, timeout=120, check=False)
    assert lines.returncode == 0, lines.stderr
    assert "queue:    0 queued, 0 processing, oldest queued none" in lines.stdout
    assert "workers:  unknown" in lines.stdout and "status-tenant 2" in lines.stdout


@pytest.mark.integration
def test_status_fails_when_the_database_does_not_answer(tmp_path: Path) -> None:
    env = base_env(DATABASE_URL="postgresql+psycopg://nobody:secret-password@127.0.0.1:1/verdict",
                   BROKER_URL="redis://127.0.0.1:1/0")
    run = subprocess.run([VERDICT, "status"], cwd=tmp_path, env=env, capture_output=True, text=True,  # noqa: S603
                         timeout=120, check=False)
    assert run.returncode == 1
    assert "the database did not answer" in run.stderr and "secret-password" not in run.stderr + run.stdout
