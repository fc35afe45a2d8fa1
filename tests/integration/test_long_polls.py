"""Issue 17, item 1: open long-polls (`GET /v1/submissions/{id}?wait=`) are bounded per key, per tenant and per
process; past a bound the current state is answered at once with `Verdict-Wait: refused`, so waiting requests can
never hold every request thread.

In-process here (the Flask app, real PostgreSQL and Redis, request threads of the test's own); the real gunicorn
server with more long-polls than threads is tests/integration/test_long_polls_server.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import update

from app import cli, create_app
from app.api.long_polls import Bounds, LongPolls, current_long_polls, process_bound
from app.db import Database
from app.models import Submission, SubmissionStatus, utcnow
from tests.conftest import BROKER_KEY_PREFIX, TenantKey, issue_key, make_settings

WAIT = 20  # long enough that a request which waits is still waiting when the test looks


@dataclass
class Poller:
    """A long-poll in a thread of its own, as a request thread of the server would hold it."""

    app: Flask
    key: TenantKey
    submission_id: str
    result: list[tuple[int, str | None, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        response = self.app.test_client().get(f"/v1/submissions/{self.submission_id}?wait={WAIT}",
                                              headers=self.key.headers)
        self.result.append((response.status_code, response.headers.get("Verdict-Wait"),
                            response.get_json()["status"]))


@pytest.fixture
def bounded_app(database_url: str, redis_url: str) -> Flask:
    app = create_app(make_settings(database_url, redis_url, long_poll_max_per_key=1, long_poll_max_per_tenant=2,
                                   long_poll_max_per_process=3))
    app.config["TESTING"] = True
    return app


@pytest.fixture
def finish(bounded_app: Flask) -> Iterator[Callable[..., None]]:
    """Ends submissions (failed), so the long-polls waiting on them return."""
    finished: list[str] = []
    database: Database = bounded_app.extensions["verdict.db"]

    def complete(*submission_ids: str) -> None:
        finished.extend(submission_ids)
        with database.transaction() as session:
            session.execute(update(Submission).where(Submission.id.in_(submission_ids))
                            .values(status=SubmissionStatus.FAILED.value, completed_at=utcnow(),
                                    error_code="ended_by_the_test"))

    yield complete


def submit(app: Flask, key: TenantKey) -> str:
    response = app.test_client().post("/v1/submissions", json={"input": "hello"}, headers=key.headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    submission_id: str = response.get_json()["id"]
    return submission_id


def open_polls(app: Flask) -> int:
    with app.app_context():
        return current_long_polls().open_here


def wait_open(app: Flask, count: int) -> None:
    deadline = time.monotonic() + 10
    while open_polls(app) != count:
        assert time.monotonic() < deadline, f"{open_polls(app)} long-polls open, expected {count}"
        time.sleep(0.02)


def poll_now(app: Flask, key: TenantKey, submission_id: str, wait: float = WAIT) -> tuple[int, str | None, str]:
    response = app.test_client().get(f"/v1/submissions/{submission_id}?wait={wait}", headers=key.headers)
    return response.status_code, response.headers.get("Verdict-Wait"), response.get_json()["status"]


def test_past_each_bound_a_long_poll_is_answered_at_once(bounded_app: Flask, database: Database,
                                                         finish: Callable[..., None]) -> None:
    first = issue_key(database)
    second_of_tenant = issue_key(database, tenant_name=first.tenant_name)
    third_of_tenant = issue_key(database, tenant_name=first.tenant_name)
    other, another = issue_key(database), issue_key(database)
    mine, theirs, yours = submit(bounded_app, first), submit(bounded_app, other), submit(bounded_app, another)

    holding = [Poller(bounded_app, first, mine)]
    wait_open(bounded_app, 1)
    # The key holds its one long-poll: a second is answered at once, still queued, and says so.
    assert poll_now(bounded_app, first, mine) == (200, "refused", "queued")
    holding.append(Poller(bounded_app, second_of_tenant, mine))
    wait_open(bounded_app, 2)
    # The tenant holds its two, through two keys: its third key is refused too.
    assert poll_now(bounded_app, third_of_tenant, mine) == (200, "refused", "queued")
    holding.append(Poller(bounded_app, other, theirs))
    wait_open(bounded_app, 3)
    # The process holds its three: a tenant that holds none is refused as well.
    assert poll_now(bounded_app, another, yours) == (200, "refused", "queued")
    # A read that does not ask to wait needs no slot, and says nothing about one.
    assert poll_now(bounded_app, another, yours, wait=0) == (200, None, "queued")
    assert all(not poller.result for poller in holding), "a long-poll within the bounds stopped waiting"

    finish(mine, theirs)
    for poller in holding:
        poller.thread.join(timeout=10)
        assert poller.result == [(200, None, "failed")]
    assert open_polls(bounded_app) == 0
    # Every slot was given back: the key may wait again.
    again = Poller(bounded_app, first, mine)  # final now: answered at once, with no need to wait
    again.thread.join(timeout=10)
    assert again.result == [(200, None, "failed")]
    holding = [Poller(bounded_app, another, yours)]
    wait_open(bounded_app, 1)
    finish(yours)
    holding[0].thread.join(timeout=10)
    assert holding[0].result == [(200, None, "failed")]


def test_a_refused_long_poll_on_a_final_submission_says_nothing(bounded_app: Flask, database: Database,
                                                                finish: Callable[..., None]) -> None:
    key = issue_key(database)
    queued, done = submit(bounded_app, key), submit(bounded_app, key)
    finish(done)
    holding = Poller(bounded_app, key, queued)
    wait_open(bounded_app, 1)
    # Nothing was cut short: the answer is final, exactly as a wait would have ended.
    assert poll_now(bounded_app, key, done) == (200, None, "failed")
    finish(queued)
    holding.thread.join(timeout=10)


def test_slots_in_redis_are_shared_between_processes_and_expire(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    bounds = Bounds(per_process=10, per_key=1, per_tenant=10)
    one, two = (LongPolls(bounds, redis_client=client, prefix=BROKER_KEY_PREFIX) for _ in range(2))
    slot_key = f"{BROKER_KEY_PREFIX}verdict-longpoll:key:k-shared"
    try:
        with one.slot("k-shared", "t-shared", 3) as refused:
            assert refused is None
            # Another API process (here: another LongPolls on the same Redis) sees the key's slot taken.
            with two.slot("k-shared", "t-shared", 3) as refused_there:
                assert refused_there == "key"
            # The slot carries an expiry of its wait and a margin, so a process that dies holding it frees it.
            assert 0 < client.pttl(slot_key) <= (3 + 5) * 1000
            # A shorter wait taken beside it (another key of the tenant) does not shorten the tenant's set.
            with one.slot("k-other", "t-shared", 0.1) as beside:
                assert beside is None
                assert client.pttl(f"{BROKER_KEY_PREFIX}verdict-longpoll:tenant:t-shared") > 6000
        with two.slot("k-shared", "t-shared", 3) as refused:
            assert refused is None  # given back when the first ended
        # A slot left by a dead process, already past its expiry, does not count.
        client.zadd(slot_key, {"left-by-a-dead-process": 1})
        with two.slot("k-shared", "t-shared", 3) as refused:
            assert refused is None
    finally:
        client.delete(slot_key, f"{BROKER_KEY_PREFIX}verdict-longpoll:tenant:t-shared",
                      f"{BROKER_KEY_PREFIX}verdict-longpoll:key:k-other")
        client.close()


def test_without_redis_the_process_counts_alone_and_redis_down_leaves_the_process_bound() -> None:
    local = LongPolls(Bounds(per_process=2, per_key=1, per_tenant=5))
    with local.slot("k", "t", 1) as first, local.slot("k", "t", 1) as second, local.slot("k2", "t", 1) as third:
        assert (first, second, third) == (None, "key", None)
        with local.slot("k3", "t", 1) as fourth:
            assert fourth == "process"
    assert local.open_here == 0
    down = LongPolls(Bounds(per_process=1, per_key=1, per_tenant=1),
                     redis_client=redis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=1))
    with down.slot("k", "t", 1) as first, down.slot("k", "t", 1) as second:
        assert (first, second) == (None, "process")


def test_the_process_bound_is_half_the_servers_threads_unless_set(database_url: str, redis_url: str) -> None:
    assert process_bound(make_settings(database_url, redis_url), 8) == 4
    assert process_bound(make_settings(database_url, redis_url), 1) == 0
    assert process_bound(make_settings(database_url, redis_url), None) == 4
    assert process_bound(make_settings(database_url, redis_url, long_poll_max_per_process=6), 8) == 6


def test_verdict_api_refuses_a_process_bound_that_leaves_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONG_POLL_MAX_PER_PROCESS", "4")
    result = CliRunner().invoke(cli.main, ["api", "--threads", "4", "--bind", "127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert "LONG_POLL_MAX_PER_PROCESS (4) must be below --threads (4)" in result.output
