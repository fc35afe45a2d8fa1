"""`verdict policies apply/export/shadow-report/backtest` and `verdict tenants configure --default-policy`, run as
subprocesses against the run's PostgreSQL; what they wrote is read back through the in-process API."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from flask.testing import FlaskClient
from sqlalchemy import select

from app.db import Database
from app.models import AuditEvent
from tests.conftest import TenantKey
from tests.integration.test_cli import Run, verdict  # noqa: F401 - the fixture

BUNDLE = """
blocklists:
  banned:
    terms: [frobnicate]
    patterns: ['\\bzz+t\\b']
policies:
  - name: chat
    description: chat app
    output:
      harassment: {review: 0.4, block: 0.9}
    blocklists:
      - {list: banned, category: hate}
    shadow: strict
  - name: strict
    categories:
      harassment: {review: 0.3, block: 0.5}
"""


def test_apply_is_idempotent_and_export_round_trips(verdict: Run, tenant: TenantKey, client: FlaskClient,  # noqa: F811
                                                    tmp_path: Path, database: Database) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text(BUNDLE)
    first = verdict("policies", "apply", "--tenant", tenant.tenant_name, str(path))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["blocklist banned: version 1 (changed)",
                                         "policy strict: version 1 (created)", "policy chat: version 1 (created)"]
    again = verdict("policies", "apply", "--tenant", tenant.tenant_name, str(path))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["blocklist banned: version 1 (unchanged)",
                                         "policy strict: version 1 (unchanged)", "policy chat: version 1 (unchanged)"]

    chat = client.get("/v1/policies/chat", headers=tenant.headers).get_json()
    assert chat["version"] == 1 and chat["document"]["shadow"] == "strict"

    exported = verdict("policies", "export", "--tenant", tenant.tenant_name)
    assert exported.returncode == 0, exported.stderr
    bundle = yaml.safe_load(exported.stdout)
    assert {p["name"] for p in bundle["policies"]} == {"chat", "strict"}
    assert bundle["blocklists"]["banned"]["terms"] == ["frobnicate"]
    # The export applied again changes nothing; as JSON too.
    as_json = verdict("policies", "export", "--tenant", tenant.tenant_name, "--format", "json")
    (tmp_path / "export.json").write_text(as_json.stdout)
    assert json.loads(as_json.stdout) == bundle
    replay = verdict("policies", "apply", "--tenant", tenant.tenant_name, str(tmp_path / "export.json"))
    assert replay.returncode == 0 and "(changed)" not in replay.stdout and "(created)" not in replay.stdout

    # A change to one threshold: version 2, and policy.changed names it.
    path.write_text(BUNDLE.replace("review: 0.4", "review: 0.35"))
    changed = verdict("policies", "apply", "--tenant", tenant.tenant_name, str(path))
    assert "policy chat: version 2 (changed)" in changed.stdout, changed.stdout
    with database.transaction() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.tenant_id == tenant.tenant_id,
                                                         AuditEvent.action == "policy.changed")).one()
        assert event.details["changes"] == [{"field": "output.harassment.review", "from": 0.4, "to": 0.35}]
        assert event.actor == "system"


def test_apply_refuses_bad_files_naming_the_field(verdict: Run, tenant: TenantKey, tmp_path: Path) -> None:  # noqa: F811
    cases = {
        "bad.yaml": ("name: chat\ninput:\n  harassment: {review: 0.9, block: 0.5}\n", "input.harassment"),
        "unknown.yaml": ("name: chat\ninput:\n  harasment: {review: 0.1}\n", "input.harasment"),
        "list.yaml": ("- 1\n- 2\n", "a mapping"),
        "broken.yaml": ("name: [unclosed\n", "not YAML or JSON"),
        "nolist.yaml": ("name: chat\nblocklists: [{list: missing, category: hate}]\n", "blocklists[0].list"),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        result = verdict("policies", "apply", "--tenant", tenant.tenant_name, str(tmp_path / name))
        assert result.returncode == 1 and expected in result.stderr, (name, result.stderr)
    unknown = verdict("policies", "export", "--tenant", "no-such-tenant")
    assert unknown.returncode == 1 and "no-such-tenant" in unknown.stderr


def test_default_policy_shadow_report_and_backtest(verdict: Run, tenant: TenantKey, client: FlaskClient,  # noqa: F811
                                                   tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text(BUNDLE)
    assert verdict("policies", "apply", "--tenant", tenant.tenant_name, str(path)).returncode == 0
    configured = verdict("tenants", "configure", tenant.tenant_name, "--default-policy", "chat")
    assert configured.returncode == 0, configured.stderr
    assert "default_policy: chat" in configured.stdout
    assert client.get("/v1/default-policy", headers=tenant.headers).get_json()["policy"] == "chat"
    refused = verdict("tenants", "configure", tenant.tenant_name, "--default-policy", "nonesuch")
    assert refused.returncode == 1 and "Unknown policy" in refused.stderr

    report = verdict("policies", "shadow-report", "--tenant", tenant.tenant_name, "chat")
    assert report.returncode == 0, report.stderr
    body = json.loads(report.stdout)
    assert body["object"] == "shadow_report" and body["total"] == 0 and body["policy"] == "chat"

    candidate = tmp_path / "candidate.json"
    candidate.write_text(json.dumps({"name": "chat", "defaults": {"review": 0.1, "block": 0.2}}))
    result = verdict("policies", "backtest", "--tenant", tenant.tenant_name, "chat", "--file", str(candidate),
                     "--start", "2026-01-01T00:00:00", "--end", "2030-01-01T00:00:00")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total"] == 0 and json.loads(result.stdout)["skipped"] == 0
    neither = verdict("policies", "backtest", "--tenant", tenant.tenant_name, "chat", "--start",
                      "2026-01-01T00:00:00", "--end", "2030-01-01T00:00:00")
    assert neither.returncode == 1 and "document" in neither.stderr
