"""Creating, listing and revoking API keys (and the tenant a first key creates), through two doors: the operator's
CLI (by tenant name) and `/v1/keys` (an `admin` key, within its own tenant). Checking a presented key is
app/use_cases/authentication.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import ApiKey, Tenant, utcnow
from app.use_cases.audit import SYSTEM_ACTOR, record_event
from app.use_cases.authentication import SCOPES, generate_key, hash_key
from app.use_cases.errors import NotFound


class KeyRequestError(Exception):
    """A key request that cannot be carried out; the message is for the operator (or the API client)."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_key_request") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class IssuedKey:
    key: ApiKey
    plaintext: str
    tenant_created: bool


@dataclass(frozen=True)
class KeyLimits:
    """A key's own requests and tokens per minute; None follows its tenant."""

    rpm: int | None = None
    tpm: int | None = None


def create_key(
    session: Session,
    *,
    tenant_name: str,
    scopes: Iterable[str],
    name: str | None = None,
    expires_at: datetime | None = None,
    limits: KeyLimits = KeyLimits(),  # noqa: B008 - frozen, so one shared default is safe
    actor: str = SYSTEM_ACTOR,
) -> IssuedKey:
    """The operator's door: a key for the tenant named, which is created if new."""
    scope_list = _checked_scopes(scopes)
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
    issued = _issue(session, tenant, scope_list, name=name, expires_at=expires_at, limits=limits, actor=actor,
                    request_id=None)
    return IssuedKey(key=issued.key, plaintext=issued.plaintext, tenant_created=tenant_created)


def create_tenant_key(
    session: Session,
    tenant_id: str,
    *,
    scopes: Iterable[str],
    name: str | None,
    expires_at: datetime | None,
    limits: KeyLimits,
    creator_key_id: str,
    request_id: str | None,
) -> IssuedKey:
    """The API's door: a key in the caller's own tenant, never stronger than the key creating it. The creator's own
    expiry and rate limits are the new key's ceiling, and its default where the request names none, so a short-lived,
    throttled admin key cannot mint a permanent, unthrottled one (docs/api.md#keys)."""
    if expires_at is not None and expires_at <= utcnow():
        raise KeyRequestError("must be in the future", param="expires_at")
    tenant = session.get(Tenant, tenant_id)
    creator = session.get(ApiKey, creator_key_id)
    if tenant is None or creator is None:  # pragma: no cover - the caller's key belongs to it
        raise NotFound("No such tenant.")
    expires_at, limits = _within_creator(creator, expires_at, limits)
    return _issue(session, tenant, _checked_scopes(scopes), name=name, expires_at=expires_at, limits=limits,
                  actor=creator.id, request_id=request_id, creator=creator)


def _within_creator(
    creator: ApiKey, expires_at: datetime | None, limits: KeyLimits,
) -> tuple[datetime | None, KeyLimits]:
    """The request's expiry and limits, capped by (and defaulting to) the creating key's own."""
    if creator.expires_at is not None:
        if expires_at is None:
            expires_at = creator.expires_at
        elif expires_at > creator.expires_at:
            raise KeyRequestError(
                f"may be no later than the creating key's own expiry, {creator.expires_at.isoformat()}",
                param="expires_at", code="above_creator_limit")
    capped: dict[str, int | None] = {}
    for param, asked, own in (("rate_limit_rpm", limits.rpm, creator.rate_limit_rpm),
                              ("rate_limit_tpm", limits.tpm, creator.rate_limit_tpm)):
        if own is not None and asked is not None and asked > own:
            raise KeyRequestError(f"may be at most the creating key's own limit, {own}", param=param,
                                  code="above_creator_limit")
        capped[param] = asked if asked is not None else own
    return expires_at, KeyLimits(rpm=capped["rate_limit_rpm"], tpm=capped["rate_limit_tpm"])


def _checked_scopes(scopes: Iterable[str]) -> list[str]:
    scope_list = sorted(set(scopes))
    unknown = [s for s in scope_list if s not in SCOPES]
    if unknown or not scope_list:
        raise KeyRequestError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {', '.join(scope_list)}",
                              param="scopes")
    return scope_list


def _issue(
    session: Session, tenant: Tenant, scopes: list[str], *, name: str | None, expires_at: datetime | None,
    limits: KeyLimits, actor: str, request_id: str | None, creator: ApiKey | None = None,
) -> IssuedKey:
    if "review" in scopes and not (name and name.strip()):
        raise KeyRequestError("a key with the review scope belongs to one reviewer: give it their name",
                              param="name", code="review_key_needs_name")
    for param, value in (("rate_limit_rpm", limits.rpm), ("rate_limit_tpm", limits.tpm)):
        if value is not None and value < 1:
            raise KeyRequestError(f"{param} must be at least 1", param=param)
    key_id, plaintext = generate_key()
    key = ApiKey(id=key_id, tenant_id=tenant.id, name=name, secret_hash=hash_key(plaintext), scopes=scopes,
                 expires_at=expires_at, rate_limit_rpm=limits.rpm, rate_limit_tpm=limits.tpm)
    session.add(key)
    details: dict[str, object] = {"scopes": scopes, "name": name}
    if expires_at is not None:
        details["expires_at"] = expires_at.isoformat()
    if limits != KeyLimits():
        details["rate_limits"] = {"rpm": limits.rpm, "tpm": limits.tpm}
    if creator is not None:  # what the new key was capped by (issue 17: a key never mints a stronger one)
        details["creator"] = {"key_id": creator.id,
                              "expires_at": creator.expires_at.isoformat() if creator.expires_at else None,
                              "rate_limits": {"rpm": creator.rate_limit_rpm, "tpm": creator.rate_limit_tpm}}
    record_event(session, tenant_id=tenant.id, action="key.created", actor=actor, subject_type="api_key",
                 subject_id=key_id, request_id=request_id, details=details)
    return IssuedKey(key=key, plaintext=plaintext, tenant_created=False)


def list_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    """The tenant's keys, newest first, revoked ones included (they say when)."""
    return list(session.scalars(
        select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
    ))


def revoke_key(session: Session, key_id: str, *, actor: str = SYSTEM_ACTOR) -> ApiKey:
    """The operator's door: revoke any key by its id."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise KeyRequestError(f"no key {key_id}")
    return _revoke(session, key, actor=actor, request_id=None)


def revoke_tenant_key(session: Session, tenant_id: str, key_id: str, *, actor: str, request_id: str | None) -> ApiKey:
    """The API's door: another tenant's key answers exactly as a missing one. Revoking twice changes nothing."""
    key = None if "\x00" in key_id else session.get(ApiKey, key_id)
    if key is None or key.tenant_id != tenant_id:
        raise NotFound("No such API key.", param="id")
    return _revoke(session, key, actor=actor, request_id=request_id)


def _revoke(session: Session, key: ApiKey, *, actor: str, request_id: str | None) -> ApiKey:
    # A conditional UPDATE: of two revocations racing, one revokes and audits, the other changes nothing.
    won = session.execute(
        update(ApiKey).where(ApiKey.id == key.id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
        .returning(ApiKey.id).execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if won is not None:
        record_event(session, tenant_id=key.tenant_id, action="key.revoked", actor=actor, subject_type="api_key",
                     subject_id=key.id, request_id=request_id)
    session.refresh(key)
    return key
