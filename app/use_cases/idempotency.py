"""The idempotency-key store: claim a key for a request, keep its first response, replay it, forget it after the TTL.

Each function is one short transaction of its own, apart from the request's: the claim must be visible to a racing
request before the first one has done anything, and a stored response must outlive a request that rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

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
          ttl_seconds: int) -> ClaimResult:
    now = utcnow()
    for _ in range(3):
        record = session.get(IdempotencyRecord, (tenant_id, key))
        if record is not None and record.expires_at <= now:
            # Expired: forget it (only if it is still the row we saw), then claim afresh.
            session.execute(delete(IdempotencyRecord).where(
                IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key,
                IdempotencyRecord.expires_at <= now))
            session.commit()
            record = None
        if record is not None:
            result = _judge(record, fingerprint)
            session.rollback()
            return result
        session.add(IdempotencyRecord(tenant_id=tenant_id, key=key, fingerprint=fingerprint, api_key_id=api_key_id,
                                      created_at=now, expires_at=now + timedelta(seconds=ttl_seconds)))
        try:
            session.commit()
        except IntegrityError:
            # A racing request inserted it first: look again.
            session.rollback()
            continue
        return Claimed()
    return InProgress()


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
    session.commit()


def release(session: Session, tenant_id: str, key: str) -> None:
    """Forget a claim whose request did not finish in a way worth replaying (a 5xx, a 429), so a retry can run."""
    session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.tenant_id == tenant_id,
                                                    IdempotencyRecord.key == key,
                                                    IdempotencyRecord.status_code.is_(None)))
    session.commit()


def purge_expired(session: Session) -> int:
    """Delete expired records (claims look past them anyway; this keeps the table small)."""
    result = session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.expires_at <= utcnow()))
    session.commit()
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
