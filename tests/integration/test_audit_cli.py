"""`verdict audit export|verify` and `verdict tenants configure`, run as subprocesses the way an operator runs them:
an export verifies offline, tampering with the file or the database is named, and the exit status says which."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select, text

from app.db import Database
from app.models import AuditChainHead, Tenant
from app.use_cases.audit import record_event
from tests.conftest import TenantKey
from tests.lanes import integration_fixture

VERDICT = str(Path(sys.executable).parent / "verdict")
_CONFIG_PREFIXES = ("DATABASE_URL", "BROKER_", "MODERATION_", "UPSTREAM_", "VAR_DIR", "CONTENT_", "MASK_")


class Verdict:
    def __init__(self, database_url: str, cwd: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(_CONFIG_PREFIXES)}
        self.env.update(DATABASE_URL=database_url, VAR_DIR=str(cwd / "var"))
        self.cwd = cwd

    def __call__(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([VERDICT, *args], cwd=self.cwd, env=self.env, capture_output=True, timeout=60,  # noqa: S603
                              input=stdin)


@integration_fixture
def verdict(database_url: str, tmp_path: Path) -> Verdict:
    return Verdict(database_url, tmp_path)


@pytest.fixture
def chained(database: Database, tenant: TenantKey) -> TenantKey:
    for number in range(6):
        with database.transaction() as session:
            record_event(session, tenant_id=tenant.tenant_id, action="verdict.decided", actor="worker",
                         subject_type="submission", subject_id=f"sub_{number}", conversation_id="conv-1",
                         decision="block" if number % 2 else "allow", categories=["violence"] if number % 2 else [],
                         details={"scores": {"violence": 0.97 if number % 2 else 0.01}})
    return tenant


def head_hash(database: Database, tenant_id: str) -> str:
    with database.transaction() as session:
        head = session.get(AuditChainHead, tenant_id)
        assert head is not None
        return head.hash


def test_export_then_offline_verify_round_trips(verdict: Verdict, database: Database, chained: TenantKey,
                                                tmp_path: Path) -> None:
    exported = verdict("audit", "export", "--tenant", chained.tenant_name)
    assert exported.returncode == 0, exported.stderr
    lines = exported.stdout.splitlines(keepends=True)
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, 9))
    path = tmp_path / "export.ndjson"
    path.write_bytes(exported.stdout)

    result = verdict("audit", "verify", "--file", str(path))
    assert result.returncode == 0, result.stdout
    assert result.stdout.decode().splitlines() == [
        f"ok: chain {chained.tenant_id}, 8 events (seq 1..8), head hash {head_hash(database, chained.tenant_id)}"]
    # The same, read from stdin, and checked against the tenant it should belong to.
    result = verdict("audit", "verify", "--file", "-", "--tenant", chained.tenant_name, stdin=exported.stdout)
    assert result.returncode == 0, result.stdout
    result = verdict("audit", "verify", "--tenant", chained.tenant_name)
    assert result.returncode == 0 and result.stdout.decode().startswith(f"ok: chain {chained.tenant_id}, 8 events")


@pytest.mark.parametrize(("tamper", "seq", "code"), [
    pytest.param(lambda ls: [ls[0], ls[1], ls[2].replace(b'"decision":"allow"', b'"decision":"block"'), *ls[3:]],
                 3, "hash_mismatch", id="altered-field"),
    pytest.param(lambda ls: [*ls[:4], *ls[5:]], 6, "missing", id="deleted-line"),
    pytest.param(lambda ls: [*ls[:3], ls[4], ls[3], *ls[5:]], 5, "missing", id="swapped-lines"),
    pytest.param(lambda ls: [*ls[:5], ls[5].replace(b'"seq":6', b'"seq":7'), *ls[6:]], 7, "missing",
                 id="renumbered"),
])
def test_a_tampered_export_is_caught(verdict: Verdict, chained: TenantKey, tmp_path: Path, tamper: object,
                                     seq: int, code: str) -> None:
    lines = verdict("audit", "export", "--tenant", chained.tenant_name).stdout.splitlines(keepends=True)
    path = tmp_path / "tampered.ndjson"
    path.write_bytes(b"".join(tamper(lines)))  # type: ignore[operator]
    result = verdict("audit", "verify", "--file", str(path), "--json")
    assert result.returncode == 1, result.stdout
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert (report["broken"]["seq"], report["broken"]["code"]) == (seq, code)


def test_a_tampered_database_is_caught_and_named(verdict: Verdict, database: Database, chained: TenantKey) -> None:
    with database.engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET subject_id = 'sub_forged' WHERE chain_id = :c AND seq = 5"),
                           {"c": chained.tenant_id})
    result = verdict("audit", "verify", "--tenant", chained.tenant_name)
    assert result.returncode == 1
    out = result.stdout.decode().splitlines()
    assert out[0].startswith(f"BROKEN: chain {chained.tenant_id} at seq 5: hash_mismatch: ")
    assert out[1] == "checked: 4 events held before it (seq 1..4)"
    assert verdict("audit", "verify", "--tenant", chained.tenant_name, "--end-seq", "4").returncode == 0


def test_the_system_chain_verifies(verdict: Verdict) -> None:
    result = verdict("audit", "verify", "--system")
    assert result.returncode == 0, result.stdout
    assert result.stdout.decode().startswith("ok: chain system")


def test_a_file_of_another_tenant_is_refused(verdict: Verdict, chained: TenantKey, other_tenant: TenantKey,
                                            tmp_path: Path) -> None:
    path = tmp_path / "theirs.ndjson"
    path.write_bytes(verdict("audit", "export", "--tenant", other_tenant.tenant_name).stdout)
    result = verdict("audit", "verify", "--file", str(path), "--tenant", chained.tenant_name)
    assert result.returncode == 2
    assert b"not " + chained.tenant_id.encode() in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    pytest.param(("audit", "verify"), b"--tenant NAME or --system", id="verify-nothing"),
    pytest.param(("audit", "verify", "--tenant", "no-such-tenant"), b"no tenant named", id="verify-unknown"),
    pytest.param(("audit", "verify", "--tenant", "x", "--system"), b"not both", id="verify-both"),
    pytest.param(("audit", "verify", "--file", "/nonexistent/export.ndjson"), b"export.ndjson", id="verify-no-file"),
    pytest.param(("audit", "export"), b"--tenant NAME or --system", id="export-nothing"),
    pytest.param(("audit", "export", "--tenant", "no-such-tenant"), b"no tenant named", id="export-unknown"),
    pytest.param(("audit", "export", "--system", "--start", "soon"), b"ISO 8601", id="export-bad-start"),
    pytest.param(("audit", "export", "--system", "--format", "xml"), b"xml", id="export-bad-format"),
    pytest.param(("audit", "export", "--system", "--start", "2026-02-01", "--end", "2026-01-01"), b"--end",
                 id="export-end-before-start"),
])
def test_operator_mistakes_exit_2_with_a_message(verdict: Verdict, args: tuple[str, ...], message: bytes) -> None:
    result = verdict(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr


def test_csv_export_and_time_range(verdict: Verdict, chained: TenantKey) -> None:
    result = verdict("audit", "export", "--tenant", chained.tenant_name, "--format", "csv")
    assert result.returncode == 0
    rows = result.stdout.decode().splitlines()
    assert rows[0].startswith("seq,occurred_at,action,actor,") and len(rows) == 9
    future = verdict("audit", "export", "--tenant", chained.tenant_name, "--start", "2999-01-01")
    assert future.returncode == 0 and future.stdout == b""


def test_tenants_configure_sets_and_audits_retention_and_masking(verdict: Verdict, database: Database,
                                                                 tenant: TenantKey) -> None:
    result = verdict("tenants", "configure", tenant.tenant_name, "--retention-days", "90", "--mask-by-default", "on")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [f"tenant: {tenant.tenant_name} ({tenant.tenant_id})",
                                                   "retention_days: 90", "mask_by_default: True",
                                                   "rate_limit_rpm: default", "rate_limit_tpm: default",
                                                   "failure_mode: default", "default_policy: default"]
    result = verdict("tenants", "configure", tenant.tenant_name, "--retention-days", "default",
                     "--failure-mode", "review")
    assert result.stdout.decode().splitlines()[1:] == ["retention_days: default", "mask_by_default: True",
                                                       "rate_limit_rpm: default", "rate_limit_tpm: default",
                                                       "failure_mode: review", "default_policy: default"]
    with database.transaction() as session:
        row = session.scalars(select(Tenant).where(Tenant.id == tenant.tenant_id)).one()
        assert (row.retention_days, row.mask_by_default, row.failure_mode) == (None, True, "review")
    assert verdict("tenants", "configure", tenant.tenant_name, "--failure-mode", "sometimes").returncode == 2
    result = verdict("tenants", "configure", tenant.tenant_name, "--failure-mode", "default")
    assert "failure_mode: default" in result.stdout.decode().splitlines()
    assert verdict("tenants", "configure", tenant.tenant_name, "--retention-days", "-3").returncode == 2
    assert verdict("tenants", "configure", "no-such-tenant", "--retention-days", "3").returncode == 1
    assert verdict("audit", "verify", "--tenant", tenant.tenant_name).returncode == 0
