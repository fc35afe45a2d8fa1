"""Integration fixtures: real Celery worker processes (with the beat sweep embedded) and the fake upstream.

A worker runs exactly as in production (`celery -A workers.entry worker`), in its own process group so a test can
SIGKILL the whole of it, against the same PostgreSQL database and Redis broker as the in-process API.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import update

from app.db import Database
from app.models import Submission, SubmissionStatus, utcnow
from app.outbox import Message
from tests.conftest import BROKER_KEY_PREFIX, TenantKey, flush_redis
from tests.fake_upstream import FakeUpstream
from tests.integration.processes import WorkerProcess
from tests.lanes import integration_fixture

ROOT = Path(__file__).resolve().parents[2]
FINAL = {"completed", "failed"}

# Short timings so recovery paths run within a test; production defaults are in .env.example.
WORKER_ENV = {
    "PROCESSING_LEASE_SECONDS": "10",
    "REQUEUE_AFTER_SECONDS": "3",
    # Messages the broker took but lost (the tests that empty Redis) are re-sent after this long.
    "REDISPATCH_AFTER_SECONDS": "6",
    "SWEEP_INTERVAL_SECONDS": "1",
    "MODERATION_MAX_RETRIES": "2",
    "MODERATION_RETRY_BACKOFF_MAX": "1",
    "UPSTREAM_TIMEOUT_SECONDS": "2",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "INFO",
}


def worker_env(database_url: str, redis_url: str, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPSTREAM_", "MODERATION_"))}
    env.update(WORKER_ENV)
    env.update({"DATABASE_URL": database_url, "BROKER_URL": redis_url, "BROKER_KEY_PREFIX": BROKER_KEY_PREFIX,
                "PYTHONPATH": str(ROOT)})
    env.update(overrides)
    return env


def retire_leftovers(database: Database) -> None:
    """Submissions that earlier tests left queued (they ran no worker) are not this test's: a worker gathers every
    queued row into its batches, so they would reach this test's upstream. They are marked failed, as abandoned."""
    with database.transaction() as session:
        session.execute(update(Submission)
                        .where(Submission.status.in_([SubmissionStatus.QUEUED.value,
                                                      SubmissionStatus.PROCESSING.value]))
                        .values(status=SubmissionStatus.FAILED.value, claim_token=None, completed_at=utcnow(),
                                error_code="abandoned_by_an_earlier_test"))


@integration_fixture(serial=True)
def start_worker(database_url: str, redis_url: str, database: Database,
                 tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes with the given environment overrides; all are stopped when the test ends."""
    started: list[WorkerProcess] = []
    flush_redis(redis_url)  # messages left by earlier tests must not reach this test's upstream
    retire_leftovers(database)  # nor rows they left queued

    def _start(concurrency: int = 2, queues: str | None = None, **overrides: str) -> WorkerProcess:
        worker = WorkerProcess(worker_env(database_url, redis_url, **overrides),
                               tmp_path / f"worker-{len(started)}.log", concurrency=concurrency, queues=queues)
        started.append(worker)
        return worker.start()

    yield _start
    for worker in started:
        worker.stop()


@pytest.fixture
def sent(database: Database) -> Iterator[list[Message]]:
    """Every message published while the test runs, in order (nothing reaches the broker)."""
    recorded: list[Message] = []
    saved = database.outbox.publisher
    database.outbox.publisher = recorded.extend
    yield recorded
    database.outbox.publisher = saved


@integration_fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key="sk-upstream-test") as upstream:
        yield upstream


def openai_worker_env(upstream: FakeUpstream, **extra: str) -> dict[str, str]:
    return {"MODERATION_PROVIDER": "openai", "UPSTREAM_BASE_URL": upstream.base_url,
            "UPSTREAM_API_KEY": "sk-upstream-test", "UPSTREAM_MODEL": "omni-moderation-latest", **extra}


def submit(client: FlaskClient, tenant: TenantKey, body: dict[str, Any]) -> Any:
    response = client.post("/v1/submissions", json=body, headers=tenant.headers)
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def wait_final(client: FlaskClient, tenant: TenantKey, submission_id: str, timeout: float = 60) -> dict[str, Any]:
    """Poll until the submission is completed or failed (long-poll in slices, so a stuck pipeline fails the test)."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/submissions/{submission_id}?wait=2", headers=tenant.headers)
        assert response.status_code == 200, response.get_json()
        body: dict[str, Any] = response.get_json()
        if body["status"] in FINAL:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"submission {submission_id} still {body['status']} after {timeout}s")
