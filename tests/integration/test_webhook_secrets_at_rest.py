"""Webhook signing secrets are encrypted at rest (issue 11 item 6): the database holds Fernet tokens, never the
secret; what the API showed once still signs and verifies; the keys rotate (new key first, re-encrypt, drop the old);
revision 0006 encrypts secrets stored before it; and the key file of the embedded default is made once, 0600."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import standardwebhooks
from alembic import command
from cryptography.fernet import Fernet, InvalidToken
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

from app import secrets_at_rest
from app.cli import _alembic_config
from app.config import Settings
from app.db import Database
from app.models import WebhookEndpoint, utcnow
from app.secrets_at_rest import SecretBox, SecretKeyMismatch, key_file, load_box
from app.use_cases.webhook_endpoints import reencrypt_secrets, signing_secrets
from app.webhooks.signing import signed_headers
from tests.conftest import TenantKey
from tests.integration.webhook_support import api_settings

__all__ = ["api_settings"]  # a fixture used by name below


@pytest.fixture
def used_keys(database: Database, settings: Settings) -> Iterator[list[bytes]]:
    """Keys a test installs; afterwards every endpoint of the run's database is re-encrypted with the process's own
    key again (the key file), which is put back."""
    own = key_file(settings).read_bytes().strip()
    saved = secrets_at_rest.current_box()
    keys: list[bytes] = []
    yield keys
    with database.transaction() as session:
        reencrypt_secrets(session, SecretBox([own, *keys]))
    secrets_at_rest.configure(saved)


def stored(database: Database, endpoint_id: str) -> tuple[str, str | None]:
    """The columns as the database holds them."""
    with database.engine.connect() as connection:
        row = connection.execute(text("SELECT secret, previous_secret FROM webhook_endpoints WHERE id = :id"),
                                 {"id": endpoint_id}).one()
    return row.secret, row.previous_secret


def create(client: FlaskClient, tenant: TenantKey) -> tuple[str, str]:
    # Nothing listens there: no delivery is made, the endpoint is only stored.
    response = client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": ["submission.flagged"]},
                           headers=tenant.headers)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    return body["id"], body["secret"]


def test_the_database_holds_a_token_not_the_secret_and_signing_verifies(client: FlaskClient, tenant: TenantKey,
                                                                       database: Database,
                                                                       api_settings: Settings) -> None:
    endpoint_id, secret = create(client, tenant)
    rotated = client.post(f"/v1/webhooks/{endpoint_id}/rotate-secret", headers=tenant.headers).get_json()["secret"]
    column, previous = stored(database, endpoint_id)
    for token, plain in ((column, rotated), (previous, secret)):
        assert token is not None and token.startswith("gAAAA")  # a Fernet token
        assert plain not in token and plain.removeprefix("whsec_") not in token
        assert secrets_at_rest.current_box().decrypt(token) == plain
    # A dump alone is not enough: without the server's key the token opens to nothing.
    with pytest.raises(InvalidToken):
        Fernet(Fernet.generate_key()).decrypt(column.encode())
    # What the process reads back signs, and the receiver's copy of the secret (shown once) verifies it.
    now = utcnow()
    with database.transaction() as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None and endpoint.secret == rotated
        headers = signed_headers(signing_secrets(endpoint, now), "msg_1", now, '{"type":"webhook.test"}')
    for receiver_secret in (rotated, secret):  # the old one, still in its grace period, too
        standardwebhooks.Webhook(receiver_secret).verify('{"type":"webhook.test"}', headers)


def test_keys_rotate_new_first_then_reencrypt_then_drop_the_old(client: FlaskClient, tenant: TenantKey,
                                                               database: Database, api_settings: Settings,
                                                               used_keys: list[bytes], settings: Settings) -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    used_keys.extend([old, new])
    own = key_file(settings).read_bytes().strip()  # the other tests' endpoints in this database
    secrets_at_rest.configure(SecretBox([old]))
    endpoint_id, secret = create(client, tenant)
    before, _ = stored(database, endpoint_id)
    # 1. The new key first, the old one kept: everything still reads, new writes use the new key.
    both = SecretBox([new, old, own])
    secrets_at_rest.configure(both)
    with database.transaction() as session:
        assert session.get(WebhookEndpoint, endpoint_id).secret == secret  # type: ignore[union-attr]
    # 2. Re-encrypt (what `verdict webhooks rotate-encryption` runs).
    with database.transaction() as session:
        assert reencrypt_secrets(session, both) >= 1
    after, _ = stored(database, endpoint_id)
    assert after != before and Fernet(new).decrypt(after.encode()).decode() == secret
    # 3. The old key dropped: still readable, and the API still works with the endpoint.
    secrets_at_rest.configure(SecretBox([new]))
    with database.transaction() as session:
        assert session.get(WebhookEndpoint, endpoint_id).secret == secret  # type: ignore[union-attr]
    assert client.post(f"/v1/webhooks/{endpoint_id}/rotate-secret", headers=tenant.headers).status_code == 200
    # Dropping a key before re-encrypting is refused loudly, never read as garbage.
    with database.transaction() as session:
        with pytest.raises(SecretKeyMismatch):
            reencrypt_secrets(session, SecretBox([Fernet.generate_key()]))
        session.rollback()


def test_settings_refuse_keys_that_are_not_fernet_keys() -> None:
    good = Fernet.generate_key().decode()
    assert Settings(_env_file=None, webhook_secret_keys=f" {good} ,{good}").webhook_secret_key_list == [  # type: ignore[call-arg]
        good.encode(), good.encode()]
    for bad in ("", " , ", "not-a-key", good[:-2], good + ",short"):
        with pytest.raises(ValueError, match="WEBHOOK_SECRET_KEYS") as caught:
            Settings(_env_file=None, webhook_secret_keys=bad)  # type: ignore[call-arg]
        assert good not in str(caught.value)  # a key never reaches an error message


def test_the_key_file_is_made_once_private_and_reused(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, var_dir=tmp_path / "var")  # type: ignore[call-arg]
    box = load_box(settings)
    path = tmp_path / "var" / "webhook-secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = box.encrypt("whsec_x")
    assert load_box(settings).decrypt(token) == "whsec_x"  # the second process reads the same key
    assert [p.name for p in path.parent.iterdir()] == ["webhook-secret.key"]  # no scratch file left behind
    # With WEBHOOK_SECRET_KEYS set, the file is not used.
    other = Settings(_env_file=None, var_dir=tmp_path / "var",  # type: ignore[call-arg]
                     webhook_secret_keys=Fernet.generate_key().decode())
    with pytest.raises(SecretKeyMismatch):
        load_box(other).decrypt(token)


def test_revision_0006_encrypts_secrets_stored_before_it_and_its_downgrade_decrypts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    settings = Settings(_env_file=None, database_url=url, var_dir=tmp_path / "var")  # type: ignore[call-arg]
    config = _alembic_config(settings)
    box = SecretBox([Fernet.generate_key()])
    config.attributes["webhook_secret_box"] = box
    command.upgrade(config, "0005")
    legacy, previous = "whsec_" + "A" * 43 + "=", "whsec_" + "B" * 43 + "="
    engine = create_engine(url)
    now = utcnow().isoformat()
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_1', 'acme', :now)"),
                           {"now": now})
        connection.execute(text(
            "INSERT INTO webhook_endpoints (id, tenant_id, kind, url, events, status, secret, previous_secret, "
            "previous_secret_expires_at, created_at, updated_at) VALUES ('wh_1', 'ten_1', 'endpoint', "
            "'https://example.com/h', '[]', 'enabled', :s, :p, :exp, :now, :now)"),
            {"s": legacy, "p": previous, "exp": (utcnow() + timedelta(hours=1)).isoformat(), "now": now})
    command.upgrade(config, "head")

    def columns() -> tuple[str, str]:
        with engine.connect() as connection:
            row = connection.execute(text("SELECT secret, previous_secret FROM webhook_endpoints")).one()
        return row.secret, row.previous_secret

    secret, prior = columns()
    assert legacy not in secret and previous not in prior
    assert (box.decrypt(secret), box.decrypt(prior)) == (legacy, previous)
    command.downgrade(config, "0005")
    assert columns() == (legacy, previous)
    engine.dispose()
