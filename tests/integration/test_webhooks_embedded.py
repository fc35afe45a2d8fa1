"""Webhooks on the embedded default: `verdict dev` (SQLite, kombu's SQLAlchemy broker on SQLite, the local engine)
delivers a verdict's events to a real receiver, signed so the `standardwebhooks` library verifies them. This is the
SQLite path of the claim (a conditional UPDATE; SQLite has no SKIP LOCKED) and of the `webhooks` queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from standardwebhooks import Webhook

from app.config import Settings
from tests.integration.processes import free_port, wait_healthy
from tests.lanes import integration_fixture
from tests.webhook_receiver import WebhookReceiver

VERDICT = str(Path(sys.executable).parent / "verdict")
ROOT = Path(__file__).resolve().parents[2]


@integration_fixture(serial=True)
def embedded(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], Path]]:
    """(base URL, environment, log) of a running `verdict dev` whose files live in tmp_path."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update({"VAR_DIR": str(tmp_path / "var"), "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
                "WEBHOOK_SWEEP_INTERVAL_SECONDS": "0.5", "LOG_FORMAT": "json"})
    port = free_port()
    log_path = tmp_path / "dev.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([VERDICT, "dev", "--port", str(port)], cwd=tmp_path, env=env,  # noqa: S603
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, base_url, log_path)
        yield base_url, env, log_path
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def test_embedded_default_delivers_signed_events(embedded: tuple[str, dict[str, str], Path]) -> None:
    base_url, env, log_path = embedded
    created = subprocess.run([VERDICT, "keys", "create", "--tenant", "acme"], cwd=log_path.parent, env=env,  # noqa: S603
                             capture_output=True, text=True, check=True, timeout=60)
    key = created.stdout.strip().splitlines()[-1]
    with WebhookReceiver() as receiver, httpx.Client(base_url=base_url, timeout=30,
                                                     headers={"Authorization": f"Bearer {key}"}) as api:
        response = api.post("/v1/webhooks", json={"url": receiver.url, "events": ["submission.completed",
                                                                                   "submission.flagged"]})
        assert response.status_code == 201, response.text
        secret = response.json()["secret"]
        submission = api.post("/v1/submissions", json={"input": "you are a fucking idiot"}).json()
        received = receiver.wait_for(2, timeout=90)
        payloads = [Webhook(secret).verify(r.body, r.headers) for r in received]
        assert sorted(p["type"] for p in payloads) == ["submission.completed", "submission.flagged"]
        assert {p["data"]["id"] for p in payloads} == {submission["id"]}
        assert all(p["data"]["verdict"]["decision"] == "block" for p in payloads)
        endpoint_id = response.json()["id"]
        deadline = time.monotonic() + 30
        while {d["status"] for d in api.get(f"/v1/webhooks/{endpoint_id}/deliveries").json()["data"]} != {
                "succeeded"}:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    log = log_path.read_text(errors="replace")
    assert secret not in log and key not in log and "idiot" not in log
