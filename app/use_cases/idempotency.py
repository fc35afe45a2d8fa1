"""The idempotency-key store: claim a key, keep the first response, replay it, forget it after the TTL, each in the
caller's transaction, which the HTTP wrapper (app/api/idempotency.py) keeps apart from the request's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.db import insert_for
from app.models import IdempotencyRecord, utcnow


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Claimed:
    """This request holds the key: run it, then `store_response` (or `release` if it failed)."""


@dataclass(frozen=True)
class InProgress:
    """Another request with this key has not finished."""


@dataclass(frozen=True)
class Mismatch:
    """The key was used with a different request."""


ClaimResult = Claimed | InProgress | Mismatch | StoredResponse


def claim(session: Session, tenant_id: str, key: str, fingerprint: str, *, api_key_id: str,
          ttl_seconds: int, lease_seconds: int) -> ClaimResult:
    """Claim the key for this request, or say what became of the request that claimed it first. A claim with no
    stored answer is held for `lease_seconds` from when it was taken (`created_at`): after that no live request holds
    it (its process died mid-request), and the same request takes it over."""
    now = utcnow()
    # Expired: forget it, then claim afresh.
    session.execute(delete(IdempotencyRecord).where(
        IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key, IdempotencyRecord.expires_at <= now))
    # Abandoned: take it over. Of two retries racing here, the second's WHERE no longer matches once the first's
    # update is committed (PostgreSQL re-checks it after the row lock; SQLite runs one writer at a time).
    taken_over = session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key,
               IdempotencyRecord.fingerprint == fingerprint, IdempotencyRecord.status_code.is_(None),
               IdempotencyRecord.created_at <= now - timedelta(seconds=lease_seconds))
        .values(created_at=now, api_key_id=api_key_id, expires_at=now + timedelta(seconds=ttl_seconds))
        .returning(IdempotencyRecord.key)
    ).scalar_one_or_none()
    if taken_over is not None:
        return Claimed()
    # Of two requests racing here, the second waits for the first's row and then inserts nothing.
    claimed = session.execute(
        insert_for(session)(IdempotencyRecord)
        .values(tenant_id=tenant_id, key=key, fingerprint=fingerprint, api_key_id=api_key_id, created_at=now,
                expires_at=now + timedelta(seconds=ttl_seconds))
        .on_conflict_do_nothing(index_elements=["tenant_id", "key"])
        .returning(IdempotencyRecord.key)
    ).scalar_one_or_none()
    if claimed is not None:
        return Claimed()
    record = session.scalars(
        select(IdempotencyRecord).where(IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key)
        .execution_options(populate_existing=True)
    ).one_or_none()
    if record is None:  # pragma: no cover - the row that stopped the insert was deleted meanwhile
        return InProgress()
    return _judge(record, fingerprint)


def _judge(record: IdempotencyRecord, fingerprint: str) -> ClaimResult:
    if record.fingerprint != fingerprint:
        return Mismatch()
    if record.status_code is None or record.response_body is None:
        return InProgress()
    return StoredResponse(status_code=record.status_code, body=record.response_body,
                          headers=dict(record.response_headers or {}))


def store_response(session: Session, tenant_id: str, key: str, response: StoredResponse) -> None:
    session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key)
        .values(status_code=response.status_code, response_body=response.body, response_headers=response.headers)
    )


def release(session: Session, tenant_id: str, key: str) -> None:
    """Forget a claim whose request did not finish in a way worth replaying (a 5xx, a 429), so a retry can run."""
    session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.tenant_id == tenant_id,
                                                    IdempotencyRecord.key == key,
                                                    IdempotencyRecord.status_code.is_(None)))


def purge_expired(session: Session) -> int:
    """Delete expired records (claims look past them anyway; this keeps the table small)."""
    result = session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.expires_at <= utcnow()))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
