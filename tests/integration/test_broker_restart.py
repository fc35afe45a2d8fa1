"""Issue 11, item 4: a broker outage does not kill healthy work. A private `redis-server` (its own port, nothing kept
on disk) is the broker of a real worker and of an API app; it is stopped while tasks run, kept away for longer than
the tasks' soft time limit, and started again. Every submission ends with exactly one verdict; the worker's log shows
no time limit fired, no task cancelled on the connection loss, no task failed on the missing Redis (the circuit
breaker's shared state lives there too) and no pool process lost; the worker reconnects without a restart."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from flask import Flask

from app import create_app
from app.db import Database
from tests.conftest import TenantKey, make_settings
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import WorkerProcess, openai_worker_env
from tests.integration.processes import PrivateRedis
from tests.integration.test_pipeline import submit_batch, wait_all_final
from tests.integration.test_recovery import assert_exactly_once, statuses, texts_for, wait_for
from tests.lanes import integration_fixture

# What a reconnect must never do to a task (Celery's and billiard's own words in the worker's log).
FORBIDDEN = ("SoftTimeLimitExceeded", "TimeLimitExceeded", "Terminating it instead", "WorkerLostError",
             "Process 'ForkPoolWorker", "raised unexpected")


@integration_fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def broker_app(app: Flask, database_url: str, private_redis: PrivateRedis) -> Iterator[Flask]:
    """The API, in-process, on the private broker."""
    flask_app = create_app(make_settings(database_url, private_redis.url))
    flask_app.config["TESTING"] = True
    yield flask_app
    flask_app.extensions["verdict.db"].engine.dispose()
    app.extensions["celery"].set_default()  # create_app made this app's Celery the default


def test_a_broker_restart_mid_task_cancels_nothing_and_loses_nothing(
    broker_app: Flask, tenant: TenantKey, database: Database, private_redis: PrivateRedis,
    fake_upstream: FakeUpstream, start_worker: Callable[..., WorkerProcess],
) -> None:
    # Each upstream call takes 1.5 s, so tasks are running when the broker goes; the outage (8 s) is longer than the
    # tasks' soft time limit (about 4 s with the 10 s lease of the test workers).
    fake_upstream.latency = 1.5
    worker = start_worker(concurrency=2, **openai_worker_env(fake_upstream, BROKER_URL=private_redis.url,
                                                             UPSTREAM_MAX_BATCH="1", BATCH_MAX_WAIT_MS="0"))
    texts = texts_for("broker restart", 8)
    ids = submit_batch(broker_app.test_client(), tenant, texts)
    wait_for(lambda: "processing" in statuses(database, ids).values(), "a task under way", timeout=60)

    private_redis.stop()
    # The API still takes work while the broker is away: the row is the outbox, the sweep sends it later.
    with ThreadPoolExecutor(max_workers=1) as pool:
        during = pool.submit(lambda: broker_app.test_client().post(
            "/v1/submissions", json={"input": "while the broker is away"}, headers=tenant.headers)).result(timeout=30)
    assert during.status_code == 202, during.get_json()
    ids.append(during.get_json()["id"])
    time.sleep(8)
    private_redis.start()

    wait_all_final(database, ids, timeout=120, worker=worker)
    assert_exactly_once(database, ids)
    log = worker.log_path.read_text(errors="replace")
    assert "Connection to broker lost" in log or "consumer: Cannot connect" in log, "the outage never reached it"
    for phrase in FORBIDDEN:
        assert phrase not in log, (phrase, worker.log_tail(80))
    # The same worker process, reconnected: not restarted.
    assert worker.process is not None and worker.process.poll() is None
