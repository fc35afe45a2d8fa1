"""The `verdict` console script, run as a subprocess exactly as an operator runs it.

Keys are created and revoked against the run's PostgreSQL database and then used (or refused) by the in-process API;
`verdict migrate` is run on a fresh embedded SQLite path.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.config import Settings
from tests.lanes import integration_fixture

VERDICT = str(Path(sys.executable).parent / "verdict")
KEY_RE = re.compile(r"^vk_[0-9a-f]{16}_[A-Za-z0-9_-]{43}$")
KEY_ANYWHERE_RE = re.compile(r"vk_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")

Run = Callable[..., subprocess.CompletedProcess[str]]


def base_env(**values: str) -> dict[str, str]:
    """This environment without any Verdict setting the machine may carry, plus `values`."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update(values)
    return env


@integration_fixture
def verdict(database_url: str, redis_url: str, tmp_path: Path) -> Run:
    """Run `verdict ARGS` against the test database; cwd is an empty directory, so no stray `.env` is read."""

    def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603
            [VERDICT, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60,
            env=env if env is not None else base_env(DATABASE_URL=database_url, BROKER_URL=redis_url,
                                                     VAR_DIR=str(tmp_path / "var")),
        )

    return _run


def create_key(verdict: Run, *args: str) -> tuple[str, str]:
    """(key id, plaintext) from `verdict keys create ARGS`."""
    result = verdict("keys", "create", *args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    plaintext = lines[-1]
    assert KEY_RE.match(plaintext), f"last line of stdout is not a key alone: {plaintext!r}"
    (id_line,) = [line for line in lines if line.startswith("key id:")]
    return id_line.split(":", 1)[1].strip(), plaintext


def bearer(plaintext: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {plaintext}"}


def test_help_lists_every_command(verdict: Run) -> None:
    result = verdict("--help")
    assert result.returncode == 0, result.stderr
    commands = result.stdout.split("Commands:", 1)[1]
    listed = {line.split()[0] for line in commands.splitlines() if line.strip()}
    assert {"dev", "api", "worker", "beat", "migrate", "keys"} <= listed


def test_keys_help_lists_create_and_revoke(verdict: Run) -> None:
    result = verdict("keys", "--help")
    assert result.returncode == 0, result.stderr
    assert "create" in result.stdout and "revoke" in result.stdout


def test_created_key_authenticates_against_the_api(verdict: Run, client: FlaskClient) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:10]}"
    key_id, plaintext = create_key(verdict, "--tenant", tenant, "--scopes", "submit,read")
    assert key_id == f"key_{plaintext[3:19]}"

    listed = client.get("/v1/submissions", headers=bearer(plaintext))
    assert listed.status_code == 200, listed.get_json()
    assert listed.get_json()["data"] == []
    submitted = client.post("/v1/submissions", json={"input": "hello"}, headers=bearer(plaintext))
    assert submitted.status_code == 202, submitted.get_json()


def test_scopes_given_are_the_scopes_held(verdict: Run, client: FlaskClient) -> None:
    _, plaintext = create_key(verdict, "--tenant", f"cli-{uuid.uuid4().hex[:10]}", "--scopes", "read")
    assert client.get("/v1/submissions", headers=bearer(plaintext)).status_code == 200
    refused = client.post("/v1/submissions", json={"input": "hello"}, headers=bearer(plaintext))
    assert refused.status_code == 403
    assert refused.get_json()["error"]["code"] == "missing_scope"


def test_second_key_for_a_tenant_sees_the_same_data(verdict: Run, client: FlaskClient) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:10]}"
    _, first = create_key(verdict, "--tenant", tenant, "--scopes", "submit,read")
    _, second = create_key(verdict, "--tenant", tenant, "--scopes", "read")
    submitted = client.post("/v1/submissions", json={"input": "hello"}, headers=bearer(first))
    assert submitted.status_code == 202
    seen = client.get(f"/v1/submissions/{submitted.get_json()['id']}", headers=bearer(second))
    assert seen.status_code == 200


@pytest.mark.parametrize("scopes", ["read,superuser", "", ",", "ADMIN"])
def test_bad_scopes_fail_without_a_key(verdict: Run, scopes: str) -> None:
    result = verdict("keys", "create", "--tenant", f"cli-{uuid.uuid4().hex[:10]}", "--scopes", scopes)
    assert result.returncode != 0
    assert "scopes must be a non-empty subset of submit, read, audit, review, admin" in result.stderr
    assert not KEY_ANYWHERE_RE.search(result.stdout + result.stderr)
    assert "Traceback" not in result.stderr


def test_empty_tenant_fails_without_a_key(verdict: Run) -> None:
    result = verdict("keys", "create", "--tenant", "  ")
    assert result.returncode != 0
    assert "tenant name" in result.stderr
    assert not KEY_ANYWHERE_RE.search(result.stdout + result.stderr)


def test_revoked_key_gets_401(verdict: Run, client: FlaskClient) -> None:
    key_id, plaintext = create_key(verdict, "--tenant", f"cli-{uuid.uuid4().hex[:10]}", "--scopes", "read")
    assert client.get("/v1/submissions", headers=bearer(plaintext)).status_code == 200

    result = verdict("keys", "revoke", key_id)
    assert result.returncode == 0, result.stderr
    assert key_id in result.stdout

    # The CLI is another process: an API process refuses the key within API_KEY_CACHE_SECONDS (test_key_cache.py).
    client.application.extensions["verdict.key_cache"].forget(key_id)
    refused = client.get("/v1/submissions", headers=bearer(plaintext))
    assert refused.status_code == 401
    assert refused.get_json()["error"]["code"] == "invalid_api_key"


def test_revoking_an_unknown_key_fails(verdict: Run) -> None:
    result = verdict("keys", "revoke", "key_0123456789abcdef")
    assert result.returncode != 0
    assert "key_0123456789abcdef" in result.stderr
    assert "Traceback" not in result.stderr


def test_migrate_creates_the_embedded_database(verdict: Run, tmp_path: Path) -> None:
    var = tmp_path / "fresh-var"
    env = base_env(VAR_DIR=str(var))
    result = verdict("migrate", env=env)
    assert result.returncode == 0, result.stderr
    database = var / "verdict.db"
    assert database.is_file()
    with closing(sqlite3.connect(database)) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        (version,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    assert {"tenants", "api_keys", "submissions", "verdicts", "audit_events", "alembic_version"} <= tables
    assert version

    again = verdict("migrate", env=env)
    assert again.returncode == 0, again.stderr


def test_keys_work_on_the_embedded_database(verdict: Run, tmp_path: Path) -> None:
    env = base_env(VAR_DIR=str(tmp_path / "embedded"))
    assert verdict("migrate", env=env).returncode == 0
    created = verdict("keys", "create", "--tenant", "demo", env=env)
    assert created.returncode == 0, created.stderr
    assert KEY_RE.match(created.stdout.splitlines()[-1])
    with closing(sqlite3.connect(tmp_path / "embedded" / "verdict.db")) as connection:
        (count,) = connection.execute("SELECT count(*) FROM api_keys").fetchone()
        (scopes,) = connection.execute("SELECT scopes FROM api_keys").fetchone()
    assert count == 1
    # Default scopes: all four.
    assert sorted(json.loads(scopes)) == ["admin", "audit", "read", "submit"]


def test_key_created_with_expiry_and_limits(verdict: Run, client: FlaskClient) -> None:
    _, plaintext = create_key(verdict, "--tenant", f"cli-{uuid.uuid4().hex[:10]}", "--scopes", "read",
                              "--expires-at", "2099-01-01T00:00:00", "--rate-limit-rpm", "7", "--rate-limit-tpm", "70")
    response = client.get("/v1/submissions", headers=bearer(plaintext))
    assert response.status_code == 200
    assert (response.headers["X-RateLimit-Limit-RPM"], response.headers["X-RateLimit-Limit-TPM"]) == ("7", "70")
    expired = verdict("keys", "create", "--tenant", f"cli-{uuid.uuid4().hex[:10]}", "--expires-at", "yesterday")
    assert expired.returncode != 0 and "ISO 8601" in expired.stderr


def test_tenant_rate_limits_are_configured(verdict: Run, client: FlaskClient) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:10]}"
    _, plaintext = create_key(verdict, "--tenant", tenant, "--scopes", "read")
    result = verdict("tenants", "configure", tenant, "--rate-limit-rpm", "5", "--rate-limit-tpm", "50")
    assert result.returncode == 0, result.stderr
    assert "rate_limit_rpm: 5" in result.stdout and "rate_limit_tpm: 50" in result.stdout
    assert client.get("/v1/submissions", headers=bearer(plaintext)).headers["X-RateLimit-Limit-RPM"] == "5"
    back = verdict("tenants", "configure", tenant, "--rate-limit-rpm", "default")
    assert back.returncode == 0 and "rate_limit_rpm: default" in back.stdout
    assert verdict("tenants", "configure", tenant, "--rate-limit-tpm", "0").returncode != 0


@pytest.mark.serial  # the guard sees `verdict worker` (here it only prints Celery's help)
@pytest.mark.parametrize(("command", "option"), [("beat", "--max-interval"), ("worker", "--concurrency")])
def test_celery_commands_pass_every_option_to_celery(verdict: Run, tmp_path: Path, command: str,
                                                     option: str) -> None:
    # `--help` after a Celery option reaches Celery's own command, which knows the option and lists its own.
    result = verdict(command, "--schedule" if command == "beat" else "--hostname",
                     str(tmp_path / "x"), "--help")
    assert result.returncode == 0, result.stderr
    assert f"celery {command}" in result.stdout + result.stderr, result.stdout
    assert option in result.stdout, result.stdout
    assert "No such option" not in result.stderr


@pytest.mark.integration
def test_beat_schedule_option_reaches_celery(database_url: str, redis_url: str, tmp_path: Path) -> None:
    # A real beat run with `--schedule PATH`: Celery writes its schedule there (the default would be in the cwd).
    schedule = tmp_path / "elsewhere" / "beat-schedule"
    schedule.parent.mkdir()
    env = base_env(DATABASE_URL=database_url, BROKER_URL=redis_url, VAR_DIR=str(tmp_path / "var"),
                   BROKER_KEY_PREFIX=f"beat-{uuid.uuid4().hex}:")
    log_path = tmp_path / "beat.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([VERDICT, "beat", "--schedule", str(schedule), "--max-interval", "1"],  # noqa: S603
                                   cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not list(schedule.parent.glob("beat-schedule*")) and time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text(errors="replace")
            time.sleep(0.2)
        assert list(schedule.parent.glob("beat-schedule*")), log_path.read_text(errors="replace")
        assert not list(tmp_path.glob("celerybeat-schedule*"))
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_webhooks_rotate_encryption_reencrypts_with_the_first_key(verdict: Run, tmp_path: Path, app: Flask) -> None:
    # `app`: this process's own key is installed, and put back after the test installs another.
    from cryptography.fernet import Fernet
    from sqlalchemy import text

    from app import secrets_at_rest
    from app.db import Database
    from app.models import Tenant, WebhookEndpoint
    from app.secrets_at_rest import SecretBox

    made = verdict("webhooks", "new-encryption-key")
    assert made.returncode == 0, made.stderr
    old, new = made.stdout.strip().encode(), Fernet.generate_key()
    Fernet(old)  # a real key
    url = f"sqlite:///{tmp_path / 'rotation.db'}"  # its own database: the run's holds other tests' secrets

    def env(keys: bytes) -> dict[str, str]:
        return base_env(DATABASE_URL=url, BROKER_URL="memory://", VAR_DIR=str(tmp_path / "var"),
                        WEBHOOK_SECRET_KEYS=keys.decode())

    assert verdict("migrate", env=env(old)).returncode == 0
    saved = secrets_at_rest.current_box()
    secrets_at_rest.configure(SecretBox([old]))
    database = Database(url)
    try:
        with database.transaction() as session:
            session.add(Tenant(id="ten_rot", name="rot"))
            session.flush()
            session.add(WebhookEndpoint(id="wh_rot", tenant_id="ten_rot", url="https://example.com/h",
                                        events=["submission.flagged"], secret="whsec_" + "C" * 43 + "="))
    finally:
        secrets_at_rest.configure(saved)

    def stored() -> str:
        with database.engine.connect() as connection:
            value: str = connection.execute(text("SELECT secret FROM webhook_endpoints")).scalar_one()
        return value

    rotated = verdict("webhooks", "rotate-encryption", env=env(new + b"," + old))
    assert rotated.returncode == 0, rotated.stderr
    assert "1 webhook endpoint" in rotated.stdout
    assert Fernet(new).decrypt(stored().encode()) == ("whsec_" + "C" * 43 + "=").encode()
    # Without the key it was made with, it refuses (exit 1) and says so, without printing any key or secret.
    stranger = Fernet.generate_key()
    refused = verdict("webhooks", "rotate-encryption", env=env(stranger))
    assert refused.returncode == 1 and "cannot be decrypted" in refused.stderr
    for secret in (stranger, new, old, b"whsec_"):
        assert secret.decode() not in refused.stdout + refused.stderr
    database.engine.dispose()
