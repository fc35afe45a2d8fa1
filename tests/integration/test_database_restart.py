"""Issue 11, item 3: a PostgreSQL restart under load. The test makes its own cluster (initdb in a temporary folder,
a free port, the machine's PostgreSQL binaries), runs the pipeline on it — the API in-process, a real worker with
beat — and stops it with `-m immediate` (a crash: connections cut, nothing flushed politely) while tasks run. While it
is gone the API answers 503 `database_unavailable` in the JSON envelope, at once (no hung request, no 500); the
worker reconnects without a restart; after it is back every accepted submission has exactly one verdict."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from app import create_app
from app.cli import migrate_database
from app.config import Settings
from app.db import Database
from tests.conftest import issue_key, make_settings
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import WorkerProcess, openai_worker_env
from tests.integration.processes import PrivatePostgres
from tests.integration.test_api_auth import assert_envelope
from tests.integration.test_pipeline import submit_batch, wait_all_final
from tests.integration.test_recovery import assert_exactly_once, statuses, texts_for, wait_for
from tests.lanes import integration_fixture


@integration_fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.init()
        migrate_database(Settings(_env_file=None, database_url=server.url))  # type: ignore[call-arg]
        yield server
    finally:
        server.remove()


@pytest.fixture
def pg_app(app: Flask, private_postgres: PrivatePostgres, redis_url: str) -> Iterator[Flask]:
    """The API, in-process, on the private cluster (and the run's Redis)."""
    flask_app = create_app(make_settings(private_postgres.url, redis_url))
    flask_app.config["TESTING"] = True
    yield flask_app
    flask_app.extensions["verdict.db"].engine.dispose()
    app.extensions["celery"].set_default()  # create_app made this app's Celery the default


def answered_within(seconds: float, call: Callable[[], TestResponse]) -> TestResponse:
    """The response, which must come back before `seconds` (a hung request fails the test instead of the run)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(call).result(timeout=seconds)


def test_a_postgresql_restart_under_load_answers_503_and_loses_nothing(
    pg_app: Flask, private_postgres: PrivatePostgres, fake_upstream: FakeUpstream,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    database: Database = pg_app.extensions["verdict.db"]
    tenant = issue_key(database)
    client: FlaskClient = pg_app.test_client()
    fake_upstream.latency = 0.5
    worker = start_worker(concurrency=2, **openai_worker_env(fake_upstream, DATABASE_URL=private_postgres.url,
                                                             UPSTREAM_MAX_BATCH="2"))
    accepted = submit_batch(client, tenant, texts_for("pg restart", 12))
    wait_for(lambda: "processing" in statuses(database, accepted).values(), "a task under way", timeout=60)

    private_postgres.stop()
    try:
        submitted = answered_within(30, lambda: client.post("/v1/submissions", json={"input": "while it is gone"},
                                                            headers=tenant.headers))
        error = assert_envelope(submitted, 503, "service_unavailable", "database_unavailable")
        assert "Traceback" not in submitted.get_data(as_text=True) and "127.0.0.1" not in error["message"]
        assert submitted.headers["Retry-After"] == "5"
        read = answered_within(30, lambda: client.get(f"/v1/submissions/{accepted[0]}", headers=tenant.headers))
        assert_envelope(read, 503, "service_unavailable", "database_unavailable")
        assert answered_within(30, lambda: client.get("/readyz")).status_code == 503
        assert answered_within(30, lambda: client.get("/healthz")).status_code == 200
        time.sleep(3)
    finally:
        private_postgres.start()

    # Back: the API takes new work again, and the worker (not restarted) finishes everything that was accepted.
    accepted += submit_batch(client, tenant, texts_for("pg restarted", 4))
    wait_all_final(database, accepted, timeout=150, worker=worker)
    assert_exactly_once(database, accepted)
    assert worker.process is not None and worker.process.poll() is None
