"""`make chaos` in miniature (issue 11 item 9): the chaos run (ops/chaos/run.py) with a few hundred texts and one fault
of each kind — a worker SIGKILL, an API SIGKILL, a PostgreSQL restart, a Redis restart, and the upstream failing 30 %
of its calls — must end with nothing lost, nothing doubled, no idempotency key stuck and every audit chain verifying.
And the run's checker must be able to say otherwise: it is given a lost row, a duplicate and a broken chain."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from sqlalchemy import text, update

from app.db import Database
from app.models import Submission, SubmissionStatus
from app.use_cases.audit import record_event
from ops.chaos.check import check
from tests.conftest import TenantKey

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("accepted", "completed", "failed", "lost", "duplicates", "idempotency_stuck", "chain_ok", "max_recovery_s",
          "drain_s", "kills")


# The run starts its own PostgreSQL, Redis, API, workers and beat (grandchildren the lane guard does not see).
@pytest.mark.integration
@pytest.mark.serial
def test_a_short_chaos_run_loses_nothing_doubles_nothing_and_strands_no_key(tmp_path: Path) -> None:
    process = subprocess.run(  # noqa: S603
        [sys.executable, "ops/chaos/run.py", "--texts", "300", "--batch", "20", "--submit-seconds", "15",
         "--kill-interval", "8", "--max-kills", "1", "--api-kill-at", "4", "--pg-restart-at", "9",
         "--redis-restart-at", "17", "--outage", "4", "--lease", "20", "--drain-timeout", "240",
         "--log-dir", str(tmp_path / "logs"), "--report", str(tmp_path / "RESULTS.md")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    output = process.stdout + process.stderr
    last = process.stdout.strip().splitlines()[-1] if process.stdout.strip() else ""
    match = re.fullmatch("RESULT " + " ".join(f"{name}=(\\S+)" for name in FIELDS), last)
    assert match, output[-4000:]
    result = dict(zip(FIELDS, match.groups(), strict=True))
    assert result["accepted"] == "300", output[-4000:]
    assert (result["lost"], result["duplicates"], result["idempotency_stuck"], result["chain_ok"]) == \
        ("0", "0", "0", "true"), output[-4000:]
    assert int(result["completed"]) + int(result["failed"]) == 300
    assert result["kills"] == "1"
    # Each fault of a kind really happened.
    for fault in ("SIGKILL the API", "PostgreSQL stopped", "Redis SIGKILLed", "SIGKILL worker"):
        assert fault in output, (fault, output[-4000:])
    assert "random faults {}" not in output and process.returncode == 0, output[-4000:]
    assert (tmp_path / "RESULTS.md").read_text().count(last) == 1


def submit_three(client: FlaskClient, tenant: TenantKey) -> list[str]:
    response = client.post("/v1/submissions", headers=tenant.headers,
                           json={"items": [{"input": f"checker text {n}"} for n in range(3)]})
    assert response.status_code == 202, response.get_json()
    return [item["id"] for item in response.get_json()["data"]]


def test_the_checker_finds_lost_rows_duplicates_and_a_broken_chain(
    client: FlaskClient, tenant: TenantKey, database: Database,
) -> None:
    first, second, third = submit_three(client, tenant)
    chains = [tenant.tenant_id]

    # Nothing final yet: all lost; an id no row has is lost too.
    findings = check(database, tenant.tenant_id, [first, second, third, "sub_never_stored"], chains)
    assert sorted(findings.lost) == sorted([first, second, third, "sub_never_stored"])
    assert sorted(findings.unfinished) == sorted([first, second, third])
    assert findings.duplicates == [] and findings.chain_ok

    with database.transaction() as session:
        # `first` failed, yet was decided twice; `second` completed with no verdict at all.
        session.execute(update(Submission).where(Submission.id == first)
                        .values(status=SubmissionStatus.FAILED.value))
        session.execute(update(Submission).where(Submission.id == second)
                        .values(status=SubmissionStatus.COMPLETED.value))
        for _ in range(2):
            record_event(session, tenant_id=tenant.tenant_id, action="verdict.decided", actor="worker",
                         subject_type="submission", subject_id=first)
    # `third` was never handed to a client: a request that ran twice.
    findings = check(database, tenant.tenant_id, [first, second], chains)
    assert findings.lost == [second]
    assert sorted(findings.duplicates) == sorted([first, third])
    assert (findings.completed, findings.failed) == (0, 0)
    assert findings.chain_ok

    with database.transaction() as session:
        session.execute(text("UPDATE audit_events SET actor = 'someone else' WHERE chain_id = :c AND seq = 1"),
                        {"c": tenant.tenant_id})
    findings = check(database, tenant.tenant_id, [first, second], chains)
    assert findings.broken_chains == [tenant.tenant_id] and not findings.chain_ok
