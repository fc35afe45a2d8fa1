"""Creating and revoking API keys (and the tenant a first key creates)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import SCOPES, generate_key, hash_key
from app.models import ApiKey, Tenant, utcnow
from app.use_cases.audit import SYSTEM_ACTOR, record_event


class KeyRequestError(Exception):
    """A key request that cannot be carried out; the message is for the operator."""


@dataclass(frozen=True)
class IssuedKey:
    key: ApiKey
    plaintext: str
    tenant_created: bool


def create_key(
    session: Session,
    *,
    tenant_name: str,
    scopes: Iterable[str],
    name: str | None = None,
    expires_at: datetime | None = None,
    actor: str = SYSTEM_ACTOR,
) -> IssuedKey:
    scope_list = sorted(set(scopes))
    unknown = [s for s in scope_list if s not in SCOPES]
    if unknown or not scope_list:
        raise KeyRequestError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {', '.join(scope_list)}")
    tenant_name = tenant_name.strip()
    if not tenant_name or len(tenant_name) > 100:
        raise KeyRequestError("tenant name must be 1 to 100 characters")

    tenant = session.scalars(select(Tenant).where(Tenant.name == tenant_name)).one_or_none()
    tenant_created = tenant is None
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
        record_event(session, tenant_id=tenant.id, action="tenant.created", actor=actor,
                     subject_type="tenant", subject_id=tenant.id)

    key_id, plaintext = generate_key()
    key = ApiKey(id=key_id, tenant_id=tenant.id, name=name, secret_hash=hash_key(plaintext), scopes=scope_list,
                 expires_at=expires_at)
    session.add(key)
    record_event(session, tenant_id=tenant.id, action="key.created", actor=actor, subject_type="api_key",
                 subject_id=key_id, details={"scopes": scope_list, "name": name})
    session.commit()
    return IssuedKey(key=key, plaintext=plaintext, tenant_created=tenant_created)


def revoke_key(session: Session, key_id: str, *, actor: str = SYSTEM_ACTOR) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise KeyRequestError(f"no key {key_id}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        record_event(session, tenant_id=key.tenant_id, action="key.revoked", actor=actor, subject_type="api_key",
                     subject_id=key.id)
        session.commit()
    return key
