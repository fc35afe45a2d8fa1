"""Issue 16, items 1, 2 and 4, end to end: a running Verdict — `verdict api` (gunicorn, two processes) and `verdict
worker --metrics-port` (two pool processes, beat embedded) sharing one METRICS_DIR, on PostgreSQL and Redis, the fake
upstream and two real webhook receivers — takes real traffic: submissions of both roles, a synchronous moderation, a
repeated text (cached), an upstream that answers 429 and then 500s until its circuit opens (degraded verdicts from
the fallback), a receiver that always fails (dead deliveries) and one that answers, and two texts sent to human
review (a reviewer decides one).

Then one scrape of the API's /metrics must show every metric the issue names with a non-trivial value, the worker's
own port must serve its processes' counters, every metric name the Grafana dashboard and the alert rules use must be
in the scrape, and `verdict status --json` must describe the same deployment (workers alive, circuit, budget, dead
deliveries, audit heads)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.db import Database
from tests.conftest import TenantKey, flush_redis, issue_key
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import FINAL, openai_worker_env, retire_leftovers, worker_env
from tests.integration.processes import free_port, stop_process_group, wait_healthy
from tests.lanes import integration_fixture
from tests.metric_names import PROMETHEUS_OWN, dashboard_expressions, metric_names_used, rule_expressions
from tests.webhook_receiver import WebhookReceiver

ROOT = Path(__file__).resolve().parents[2]
VERDICT = str(Path(sys.executable).parent / "verdict")

DEPLOYMENT_ENV = {
    "UPSTREAM_RPM": "600",
    "MODERATION_FALLBACK_PROVIDER": "local",
    "CIRCUIT_FAILURE_THRESHOLD": "2",
    "CIRCUIT_RESET_SECONDS": "2",
    "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
    "WEBHOOK_RETRY_SCHEDULE": "0.5,0.5",
    "WEBHOOK_SWEEP_INTERVAL_SECONDS": "0.5",
    "WEBHOOK_TIMEOUT_SECONDS": "2",
    "WEBHOOK_LEASE_SECONDS": "14",
}


@dataclass
class Deployment:
    api_url: str
    worker_metrics_url: str
    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def log_tail(self) -> str:
        return "\n".join(path.read_text(errors="replace")[-2000:] for path in self.logs if path.exists())


@integration_fixture(serial=True)
def deployment(database_url: str, redis_url: str, database: Database, fake_upstream: FakeUpstream,
               tmp_path: Path) -> Iterator[Deployment]:
    flush_redis(redis_url)
    retire_leftovers(database)
    env = worker_env(database_url, redis_url, **openai_worker_env(fake_upstream), **DEPLOYMENT_ENV,
                     METRICS_DIR=str(tmp_path / "metrics"))
    api_port, worker_port = free_port(), free_port()
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with worker_log.open("ab") as log:
            processes.append(subprocess.Popen(  # noqa: S603
                [VERDICT, "worker", "--metrics-port", str(worker_port), "--concurrency", "2", "--beat", "--schedule",
                 str(tmp_path / "beat.schedule"), "--without-gossip", "--without-mingle"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        with api_log.open("ab") as log:
            processes.append(subprocess.Popen(  # noqa: S603
                [VERDICT, "api", "--bind", f"127.0.0.1:{api_port}", "--workers", "2", "--threads", "4"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        api_url = f"http://127.0.0.1:{api_port}"
        wait_healthy(processes[1], api_url, api_log)
        deadline = time.monotonic() + 60
        while b" ready." not in worker_log.read_bytes():
            assert processes[0].poll() is None and time.monotonic() < deadline, worker_log.read_text()[-3000:]
            time.sleep(0.2)
        yield Deployment(api_url, f"http://127.0.0.1:{worker_port}/metrics", env, processes, [api_log, worker_log])
    finally:
        for process in processes:
            stop_process_group(process)


def samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def total(found: dict[str, Any], name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for key, v in found.get(name, {}).items() if wanted <= set(key))


def scrape(url: str) -> dict[str, Any]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return samples(response.text)


def until(condition: Callable[[], bool], what: str, deployment: Deployment, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen:\n{deployment.log_tail()}"
        time.sleep(0.3)


def submit(deployment: Deployment, tenant: TenantKey, body: dict[str, Any]) -> list[str]:
    response = httpx.post(f"{deployment.api_url}/v1/submissions", json=body, headers=tenant.headers, timeout=30)
    assert response.status_code == 202, response.text
    data = response.json()
    return [item["id"] for item in data["data"]] if "data" in data else [data["id"]]


def final(deployment: Deployment, tenant: TenantKey, submission_id: str) -> bool:
    response = httpx.get(f"{deployment.api_url}/v1/submissions/{submission_id}?wait=2", headers=tenant.headers,
                         timeout=30)
    return response.json()["status"] in FINAL


def test_a_scrape_after_real_traffic_shows_every_metric(deployment: Deployment, tenant: TenantKey, database: Database,
                                                         fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    api = deployment.api_url
    good, bad = WebhookReceiver().start(), WebhookReceiver().start()
    bad.status = 500
    try:
        for receiver in (good, bad):
            response = httpx.post(f"{api}/v1/webhooks", headers=tenant.headers, timeout=30, json={
                "url": receiver.url, "events": ["submission.completed", "submission.flagged", "submission.failed"]})
            assert response.status_code == 201, response.text

        # A 429, then outages until the circuit opens: retried, then decided by the fallback (degraded).
        fake_upstream.fail_next(429, retry_after=0.2)
        fake_upstream.fail_next(500, count=2)
        ids = submit(deployment, tenant, {"input": "the upstream is having a bad day", "role": "output"})
        until(lambda: final(deployment, tenant, ids[0]), "the degraded verdict", deployment)

        # Once the circuit half-opens again, a refusal (400) fails a submission outright.
        time.sleep(2.5)
        fake_upstream.fail_next(400)
        ids = submit(deployment, tenant, {"input": "refused by the provider"})
        until(lambda: final(deployment, tenant, ids[0]), "the failed submission", deployment)

        # A slow upstream keeps a batch queued long enough to be seen waiting.
        fake_upstream.latency = 1.5
        ids = submit(deployment, tenant, {"items": [{"input": f"plain text number {n}", "role": role}
                                                    for n in range(6) for role in ("input", "output")]})
        busy = scrape(f"{api}/metrics")
        assert total(busy, "verdict_queue_depth") > 0  # queued or processing, read at scrape time
        assert "verdict_queue_oldest_age_seconds" in busy
        fake_upstream.latency = 0
        ids += submit(deployment, tenant, {"items": [{"input": "you are an idiot", "role": "output"},
                                                     {"input": "I will kill you", "role": "input"}]})
        for submission_id in ids:
            until(lambda sid=submission_id: final(deployment, tenant, sid), f"{submission_id} final", deployment)
        # The same text again: its scores come from the cache.
        repeat = submit(deployment, tenant, {"input": "plain text number 0", "role": "input"})
        until(lambda: final(deployment, tenant, repeat[0]), "the cached verdict", deployment)
        sync = httpx.post(f"{api}/v1/moderations", json={"input": "a synchronous text"}, headers=tenant.headers,
                          timeout=30)
        assert sync.status_code == 200, sync.text

        # Two texts in the review band: a reviewer decides one, the other stays pending.
        reviewed = submit(deployment, tenant, {"items": [{"input": "that was a stupid answer"},
                                                         {"input": "what a stupid question"}]})
        for submission_id in reviewed:
            until(lambda sid=submission_id: final(deployment, tenant, sid), f"{submission_id} final", deployment)
        reviewer = issue_key(database, tenant_name=tenant.tenant_name, scopes=("review",), key_name="Ann")
        claimed = httpx.post(f"{api}/v1/reviews/claim-next", headers=reviewer.headers, timeout=30)
        assert claimed.status_code == 200, claimed.text
        decided = httpx.post(f"{api}/v1/reviews/{claimed.json()['id']}/decision", headers=reviewer.headers,
                             json={"decision": "allow", "reason": "blunt, not abusive"}, timeout=30)
        assert decided.status_code == 200, decided.text

        until(lambda: total(scrape(f"{api}/metrics"), "verdict_webhook_deliveries_total", outcome="dead") > 0,
              "a dead delivery", deployment)
        found = scrape(f"{api}/metrics")
    finally:
        good.stop()
        bad.stop()

    nonzero = {
        "verdict_http_requests_total": {"route": "/v1/submissions", "status": "202"},
        "verdict_http_request_duration_seconds_count": {"route": "/v1/submissions"},
        "verdict_submissions_received_total": {"role": "output"},
        "verdict_verdicts_total": {"decision": "block"},
        "verdict_submit_to_verdict_seconds_count": {"source": "async"},
        "verdict_submit_to_verdict_seconds_bucket": {"source": "sync", "le": "+Inf"},
        "verdict_upstream_requests_total": {"outcome": "ok"},
        "verdict_upstream_request_duration_seconds_count": {"outcome": "ok"},
        "verdict_moderation_retries_total": {"code": "upstream_rate_limited"},
        "verdict_moderation_failures_total": {"code": "upstream_refused"},
        "verdict_upstream_circuit_transitions_total": {"state": "open"},
        "verdict_upstream_budget_limit": {"kind": "requests"},
        "verdict_webhook_deliveries_total": {"outcome": "succeeded"},
        "verdict_webhook_delivery_duration_seconds_count": {"outcome": "retry"},
        "verdict_webhook_dead_deliveries": {},
        "verdict_audit_events_total": {"action": "verdict.decided"},
    }
    for name, labels in nonzero.items():
        assert total(found, name, **labels) > 0, (name, labels, found.get(name))
    for labels in ({"role": "input", "source": "async"}, {"role": "input", "source": "sync"}):
        assert total(found, "verdict_submissions_received_total", **labels) > 0, labels
    for labels in ({"decision": "allow"}, {"cached": "true"}, {"degraded": "true"}):
        assert total(found, "verdict_verdicts_total", **labels) > 0, labels
    for outcome in ("rate_limited", "server_error"):
        assert total(found, "verdict_upstream_requests_total", outcome=outcome) > 0, outcome
    assert total(found, "verdict_upstream_budget_limit", kind="requests") == 600
    # Calls made within the last minute used some of it.
    assert 0 <= total(found, "verdict_upstream_budget_remaining", kind="requests") < 600
    assert "verdict_upstream_circuit_state" in found
    assert total(found, "verdict_webhook_deliveries_total", outcome="dead") > 0
    assert "verdict_webhook_backlog" in found
    # Human review: the queue by status, the oldest pending item's wait, and the time to a decision.
    assert total(found, "verdict_review_queue_depth", status="pending") >= 1
    assert total(found, "verdict_review_queue_depth", status="decided") >= 1
    assert total(found, "verdict_review_oldest_pending_age_seconds") > 0
    assert total(found, "verdict_review_decision_seconds_count", decision="allow") == 1
    # Both gunicorn processes answer with everything: each scrape adds up every process's files.
    assert total(found, "verdict_http_requests_total") >= len(ids)

    # The worker's own port serves its processes' counters (for a worker on another host).
    own = scrape(deployment.worker_metrics_url)
    # (The API recorded the synchronous verdict itself; the worker every asynchronous one.)
    assert total(own, "verdict_submit_to_verdict_seconds_count", source="async") == total(
        found, "verdict_submit_to_verdict_seconds_count", source="async") > 0
    assert "verdict_http_requests_total" not in own and "verdict_queue_depth" not in own

    # The dashboard and the alert rules are built on metrics that exist.
    names = set(found)
    for source, expressions in (("dashboard", dashboard_expressions()), ("alert rules", rule_expressions())):
        used = metric_names_used(expressions)
        assert used, source
        missing = sorted(used - names - PROMETHEUS_OWN)
        assert missing == [], f"the {source} use metrics no scrape shows: {missing}"

    # `verdict status` sees the same deployment, through PostgreSQL, Redis and Celery's ping.
    result = subprocess.run([VERDICT, "status", "--json", "--timeout", "5"], env=deployment.env, cwd=tmp_path,  # noqa: S603
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["workers"]["alive"] >= 1, status
    assert status["upstream"]["provider"] == "openai"
    assert status["upstream"]["circuit"] in {"closed", "half-open", "open"}
    assert status["upstream"]["budget"]["requests_limit"] == 600
    assert status["webhooks"]["dead"] >= 1
    assert status["reviews"]["pending"] >= 1 and status["reviews"]["oldest_pending_age_seconds"] > 0
    assert status["queue"]["queued"] >= 0 and "postgresql" in status["database"]
    heads = {entry["tenant"]: entry["last_seq"] for entry in status["audit"]}
    assert heads[tenant.tenant_name] > 0
    assert tenant.plaintext not in result.stdout and "sk-upstream-test" not in result.stdout
    human = subprocess.run([VERDICT, "status"], env=deployment.env, cwd=tmp_path,  # noqa: S603
                           capture_output=True, text=True, timeout=120, check=False)
    assert human.returncode == 0, human.stderr
    assert "workers:  1 alive" in human.stdout and "circuit" in human.stdout, human.stdout
    assert "pending" in next(line for line in human.stdout.splitlines() if line.startswith("reviews:")), human.stdout
