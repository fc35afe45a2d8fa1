"""Issue 11, item 1: an `Idempotency-Key` survives the API process dying mid-request. A real `verdict api` (gunicorn)
is SIGKILLed while a keyed request is in flight (held by a slow upstream); a retry against a fresh API process is told
409 while the dead request's claim lease runs, and then runs and succeeds, instead of 409 for the key's 24 hours."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import TenantKey
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import openai_worker_env, worker_env
from tests.integration.processes import ApiProcess
from tests.lanes import integration_fixture

LEASE_SECONDS = 4


@integration_fixture
def api_env(database_url: str, redis_url: str, fake_upstream: FakeUpstream) -> Iterator[dict[str, str]]:
    yield worker_env(database_url, redis_url, **openai_worker_env(fake_upstream), UPSTREAM_TIMEOUT_SECONDS="60",
                     IDEMPOTENCY_CLAIM_LEASE_SECONDS=str(LEASE_SECONDS))


def test_a_key_held_by_a_killed_api_is_free_again_after_the_lease(api_env: dict[str, str], tenant: TenantKey,
                                                                  fake_upstream: FakeUpstream,
                                                                  tmp_path: Path) -> None:
    key = str(uuid.uuid4())
    body = {"input": ["held while the API dies", "second"]}
    headers = {**tenant.headers, "Idempotency-Key": key}
    log_path = tmp_path / "api.log"

    first = ApiProcess(api_env, log_path)
    fake_upstream.latency = 30  # the request waits on the upstream while its API process is killed
    outcome: list[object] = []
    sender = threading.Thread(target=lambda: outcome.append(_post(first.base_url, body, headers)), daemon=True)
    sender.start()
    deadline = time.monotonic() + 30
    while not fake_upstream.requests:
        assert time.monotonic() < deadline, "the keyed request never reached the upstream"
        time.sleep(0.05)
    first.kill()
    sender.join(timeout=30)
    assert outcome and isinstance(outcome[0], httpx.TransportError), outcome  # the client saw the crash
    fake_upstream.latency = 0

    second = ApiProcess(api_env, log_path)
    try:
        killed_at = time.monotonic()
        statuses = []
        while True:
            response = httpx.post(f"{second.base_url}/v1/moderations", json=body, headers=headers, timeout=30)
            statuses.append(response.status_code)
            if response.status_code != 409:
                break
            assert response.json()["error"]["code"] == "idempotency_request_in_progress", response.text
            assert time.monotonic() - killed_at < LEASE_SECONDS + 30, f"still 409 long after the lease: {statuses}"
            time.sleep(float(response.headers["Retry-After"]))
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == 2
        # Replayed from now on: the retry's answer is the key's answer.
        again = httpx.post(f"{second.base_url}/v1/moderations", json=body, headers=headers, timeout=30)
        assert again.status_code == 200 and again.headers.get("Idempotent-Replayed") == "true", again.text
        assert again.json() == response.json()
    finally:
        second.kill()


def _post(base_url: str, body: object, headers: dict[str, str]) -> object:
    try:
        return httpx.post(f"{base_url}/v1/moderations", json=body, headers=headers, timeout=60)
    except httpx.TransportError as exc:
        return exc
