"""API keys against the real PostgreSQL test database: their format, storage as a SHA-256 digest only, `authenticate`
(the right key in; wrong, unknown, revoked, expired and malformed keys out with 401), `create_key`'s checks, tenant
reuse, and the audit events key creation writes (without the plaintext)."""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.api.auth import bearer_token
from app.api.errors import ApiError, api_error
from app.db import Base, Database
from app.models import ApiKey, AuditEvent, Tenant, utcnow
from app.use_cases.authentication import Principal, authenticate, generate_key, hash_key
from app.use_cases.errors import AuthenticationFailed
from app.use_cases.keys import IssuedKey, KeyRequestError, create_key, revoke_key

KEY_RE = re.compile(r"^vk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
PREFIX_LEN = len("vk_") + 16 + len("_")  # the secret may itself contain "_", so split by position


def secret_of(plaintext: str) -> str:
    return plaintext[PREFIX_LEN:]


def tenant_name() -> str:
    return f"keys-test-{uuid.uuid4().hex[:12]}"


def issue(database: Database, name: str | None = None, scopes: tuple[str, ...] = ("submit", "read"),
          **kwargs: object) -> IssuedKey:
    with database.transaction() as session:
        return create_key(session, tenant_name=name or tenant_name(), scopes=scopes, **kwargs)  # type: ignore[arg-type]


def authenticate_header(session: Session, authorization: str | None) -> Principal:
    """What the API's gate does with an `Authorization` header: take the bearer key, then check it."""
    return authenticate(session, bearer_token(authorization))


def assert_unauthorized(database: Database, authorization: str | None) -> ApiError:
    with pytest.raises(AuthenticationFailed) as caught, database.transaction() as session:
        authenticate_header(session, authorization)
    answer = api_error(caught.value)  # as the API answers it
    assert answer.status == 401
    assert answer.code == "invalid_api_key"
    assert "WWW-Authenticate" in answer.headers
    return answer


# ---- format and hashing (no database) -------------------------------------------------------------------------


def test_generate_key_format() -> None:
    key_id, plaintext = generate_key()
    match = KEY_RE.match(plaintext)
    assert match is not None, plaintext
    assert key_id == f"key_{match.group(1)}"


def test_generated_keys_differ() -> None:
    keys = {generate_key()[1] for _ in range(50)}
    ids = {KEY_RE.match(k).group(1) for k in keys}  # type: ignore[union-attr]
    assert len(keys) == 50
    assert len(ids) == 50


def test_hash_key_is_sha256_hex() -> None:
    _, plaintext = generate_key()
    assert hash_key(plaintext) == hashlib.sha256(plaintext.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", hash_key(plaintext))
    assert hash_key(plaintext) != hash_key(plaintext + "x")


# ---- storage --------------------------------------------------------------------------------------------------


def test_only_the_digest_is_stored(database: Database) -> None:
    issued = issue(database)
    secret_part = secret_of(issued.plaintext)
    with database.transaction() as session:
        row = session.get(ApiKey, issued.key.id)
        assert row is not None
        assert row.secret_hash == hash_key(issued.plaintext)
        # Nowhere in the database: every row of every table, as text.
        for table in Base.metadata.sorted_tables:
            for (dumped,) in session.execute(text(f'SELECT CAST(t AS text) FROM "{table.name}" AS t')):
                assert issued.plaintext not in dumped, table.name
                assert secret_part not in dumped, table.name


def test_key_id_matches_the_plaintext(database: Database) -> None:
    issued = issue(database)
    match = KEY_RE.match(issued.plaintext)
    assert match is not None
    assert issued.key.id == f"key_{match.group(1)}"


# ---- authenticate ---------------------------------------------------------------------------------------------


def test_the_right_key_authenticates(database: Database) -> None:
    issued = issue(database, scopes=("read", "submit"))
    with database.transaction() as session:
        principal = authenticate_header(session, f"Bearer {issued.plaintext}")
    assert principal.key_id == issued.key.id
    assert principal.tenant_id == issued.key.tenant_id
    assert principal.scopes == frozenset({"read", "submit"})


def test_scheme_is_case_insensitive(database: Database) -> None:
    issued = issue(database)
    with database.transaction() as session:
        assert authenticate_header(session, f"bearer {issued.plaintext}").key_id == issued.key.id


def test_authenticating_records_last_use(database: Database) -> None:
    issued = issue(database)
    with database.transaction() as session:
        authenticate_header(session, f"Bearer {issued.plaintext}")
    with database.transaction() as session:
        row = session.get(ApiKey, issued.key.id)
        assert row is not None and row.last_used_at is not None


def test_wrong_secret_is_refused(database: Database) -> None:
    issued = issue(database)
    _, other = generate_key()
    forged = issued.plaintext[:PREFIX_LEN] + secret_of(other)
    assert KEY_RE.match(forged)
    assert_unauthorized(database, f"Bearer {forged}")


def test_unknown_key_is_refused(database: Database) -> None:
    _, plaintext = generate_key()
    assert_unauthorized(database, f"Bearer {plaintext}")


def test_revoked_key_is_refused(database: Database) -> None:
    issued = issue(database)
    with database.transaction() as session:
        revoke_key(session, issued.key.id)
    error = assert_unauthorized(database, f"Bearer {issued.plaintext}")
    assert "revoked" in error.message


def test_expired_key_is_refused(database: Database) -> None:
    issued = issue(database, expires_at=utcnow() - timedelta(seconds=1))
    error = assert_unauthorized(database, f"Bearer {issued.plaintext}")
    assert "expired" in error.message


def test_key_expiring_later_is_accepted(database: Database) -> None:
    issued = issue(database, expires_at=utcnow() + timedelta(days=1))
    with database.transaction() as session:
        assert authenticate_header(session, f"Bearer {issued.plaintext}").key_id == issued.key.id


@pytest.mark.parametrize("make_header", [
    lambda key: None,
    lambda key: "",
    lambda key: "Bearer",
    lambda key: "Bearer   ",
    lambda key: key,                          # no scheme
    lambda key: f"Basic {key}",
    lambda key: f"Token {key}",
    lambda key: f"Bearer {key}x",             # secret too long
    lambda key: f"Bearer {key[:-1]}",         # secret too short
    lambda key: f"Bearer {key.upper()}",      # id is lower-case hex
    lambda key: f"Bearer {key.replace('vk_', 'sk_', 1)}",
    lambda key: f"Bearer {key} {key}",
])
def test_malformed_authorization_is_refused(database: Database, make_header: object) -> None:
    issued = issue(database)
    assert_unauthorized(database, make_header(issued.plaintext))  # type: ignore[operator]


# ---- create_key -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scopes", [("root",), ("read", "write"), ("READ",), ()])
def test_create_key_refuses_unknown_or_no_scopes(database: Database, scopes: tuple[str, ...]) -> None:
    name = tenant_name()
    with pytest.raises(KeyRequestError, match="scopes"), database.transaction() as session:
        create_key(session, tenant_name=name, scopes=scopes)
    with database.transaction() as session:
        assert session.scalars(select(Tenant).where(Tenant.name == name)).first() is None


@pytest.mark.parametrize("name", ["", "   ", "x" * 101])
def test_create_key_refuses_bad_tenant_names(database: Database, name: str) -> None:
    with pytest.raises(KeyRequestError, match="tenant name"), database.transaction() as session:
        create_key(session, tenant_name=name, scopes=["read"])


def test_scopes_are_deduplicated_and_sorted(database: Database) -> None:
    issued = issue(database, scopes=("submit", "read", "submit"))
    assert issued.key.scopes == ["read", "submit"]


def test_second_key_for_a_tenant_reuses_it(database: Database) -> None:
    name = tenant_name()
    first = issue(database, name)
    second = issue(database, f"  {name} ")
    assert first.tenant_created is True
    assert second.tenant_created is False
    assert second.key.tenant_id == first.key.tenant_id
    assert second.key.id != first.key.id
    with database.transaction() as session:
        assert len(session.scalars(select(Tenant).where(Tenant.name == name)).all()) == 1
        created = session.scalars(select(AuditEvent).where(AuditEvent.tenant_id == first.key.tenant_id,
                                                           AuditEvent.action == "tenant.created")).all()
        assert len(created) == 1


def test_creation_writes_audit_events_without_the_plaintext(database: Database) -> None:
    issued = issue(database, scopes=("admin", "read"), name="ci key")
    tenant_id = issued.key.tenant_id
    with database.transaction() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.tenant_id == tenant_id)
                                 .order_by(AuditEvent.id)).all()
        assert [e.action for e in events] == ["tenant.created", "key.created"]
        tenant_event, key_event = events
        assert (tenant_event.subject_type, tenant_event.subject_id) == ("tenant", tenant_id)
        assert (key_event.subject_type, key_event.subject_id) == ("api_key", issued.key.id)
        assert key_event.details["scopes"] == ["admin", "read"]
        assert key_event.actor == "system"
        secret_part = secret_of(issued.plaintext)
        for event in events:
            dumped = repr({c.name: getattr(event, c.key) for c in AuditEvent.__mapper__.columns})
            assert issued.plaintext not in dumped
            assert secret_part not in dumped
            assert issued.key.secret_hash not in dumped


def test_revocation_is_audited_once(database: Database) -> None:
    issued = issue(database)
    with database.transaction() as session:
        revoke_key(session, issued.key.id)
        revoke_key(session, issued.key.id)
    with database.transaction() as session:
        revoked = session.scalars(select(AuditEvent).where(AuditEvent.subject_id == issued.key.id,
                                                           AuditEvent.action == "key.revoked")).all()
        assert len(revoked) == 1


def test_revoking_an_unknown_key_is_refused(database: Database) -> None:
    with pytest.raises(KeyRequestError), database.transaction() as session:
        revoke_key(session, "key_0000000000000000")
