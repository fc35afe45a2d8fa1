"""Issue 17, item 1, against the real server: `verdict api` (gunicorn, gthread, one worker of 4 threads) is sent more
long-polls than it has threads, all on a submission that stays queued (no Celery worker runs). `/healthz` and a new
submission still answer within the client's timeout, because at most half the threads may wait; the other long-polls
are answered at once with `Verdict-Wait: refused`. Before the bound, every thread waited its 30 s and nothing else
was served."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.conftest import TenantKey
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import openai_worker_env, worker_env
from tests.integration.processes import ApiProcess

THREADS = 4
POLLS = 3 * THREADS
# Well below the 30 s a long-poll holds its thread: a request queued behind held threads would miss it.
CLIENT_TIMEOUT = 10.0


def test_more_long_polls_than_threads_leave_healthz_and_submissions_answering(
        database_url: str, redis_url: str, fake_upstream: FakeUpstream, tenant: TenantKey, tmp_path: Path) -> None:
    # The per-key and per-tenant bounds are lifted, so one key meets the process bound (half the threads: 2).
    env = worker_env(database_url, redis_url, **openai_worker_env(fake_upstream), LONG_POLL_MAX_PER_KEY="100",
                     LONG_POLL_MAX_PER_TENANT="100")
    server = ApiProcess(env, tmp_path / "api.log", "--workers", "1", "--threads", str(THREADS))
    try:
        with httpx.Client(base_url=server.base_url, headers=tenant.headers, timeout=CLIENT_TIMEOUT) as client:
            created = client.post("/v1/submissions", json={"input": "stays queued: no worker runs"})
            assert created.status_code == 202, created.text
            submission_id = created.json()["id"]

        answers: list[httpx.Response | Exception] = []
        lock = threading.Lock()

        def long_poll() -> None:
            try:
                response: httpx.Response | Exception = httpx.get(
                    f"{server.base_url}/v1/submissions/{submission_id}?wait=30", headers=tenant.headers, timeout=60)
            except httpx.HTTPError as exc:
                response = exc
            with lock:
                answers.append(response)

        polls = [threading.Thread(target=long_poll, daemon=True) for _ in range(POLLS)]
        for poll in polls:
            poll.start()
        # Those past the bound come back at once, still queued, saying the wait was refused.
        refused = POLLS - THREADS // 2
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while len(answers) < refused and time.monotonic() < deadline:
            time.sleep(0.05)
        with lock:
            early = list(answers)
        assert len(early) == refused, f"{len(early)} of {POLLS} long-polls answered early, expected {refused}"
        for response in early:
            assert isinstance(response, httpx.Response), response
            assert response.status_code == 200 and response.headers.get("Verdict-Wait") == "refused", response.text
            assert response.json()["status"] == "queued"

        # The held long-polls take half the threads; the rest serve everything else.
        with httpx.Client(base_url=server.base_url, headers=tenant.headers, timeout=CLIENT_TIMEOUT) as client:
            for _ in range(3):
                assert client.get("/healthz").status_code == 200
            accepted = client.post("/v1/submissions", json={"input": "still accepted"})
            assert accepted.status_code == 202, accepted.text
            assert client.get(f"/v1/submissions/{submission_id}").json()["status"] == "queued"
        assert sum(poll.is_alive() for poll in polls) == THREADS // 2  # and those still wait
    finally:
        server.kill()
