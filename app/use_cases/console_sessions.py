"""The review console's server-side sessions: signing in with a `review` key once (the browser then holds only a
random session token, never the key), finding the session again on each request (the key is checked anew: a revoked
or expired key, or one that lost the scope, ends it), and signing out. See docs/review.md ("The console")."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session

from app.models import ApiKey, ConsoleSession, utcnow
from app.use_cases.audit import record_event
from app.use_cases.authentication import Principal, authenticate
from app.use_cases.errors import AuthenticationFailed

REVIEW_SCOPE = "review"


@dataclass(frozen=True)
class SignedIn:
    """A console session as the browser is given it: the token (cookie) and the CSRF token of its forms."""

    token: str
    csrf_token: str
    principal: Principal


@dataclass(frozen=True)
class ConsoleUser:
    principal: Principal
    csrf_token: str
    key_name: str | None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def sign_in(session: Session, key: str, *, lifetime_seconds: int, request_id: str | None) -> SignedIn:
    """A new session for a valid `review` key, in the caller's transaction; AuthenticationFailed otherwise (the
    caller audits that as it audits any failed key). Expired sessions are swept while here."""
    principal = authenticate(session, key.strip())
    if REVIEW_SCOPE not in principal.scopes:
        raise AuthenticationFailed("This key lacks the 'review' scope: the console is for reviewers.",
                                   reason="missing_scope", key_id=principal.key_id, tenant_id=principal.tenant_id)
    now = utcnow()
    session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at <= now)
                    .execution_options(synchronize_session=False))
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    session.add(ConsoleSession(token_hash=_digest(token), tenant_id=principal.tenant_id, api_key_id=principal.key_id,
                               csrf_token=csrf, created_at=now, expires_at=now + timedelta(seconds=lifetime_seconds)))
    record_event(session, tenant_id=principal.tenant_id, action="console.signed_in", actor=principal.key_id,
                 subject_type="api_key", subject_id=principal.key_id, request_id=request_id)
    return SignedIn(token=token, csrf_token=csrf, principal=principal)


def find_session(session: Session, token: str | None) -> ConsoleUser | None:
    """The signed-in reviewer a session token stands for, in the caller's transaction; None if the token is unknown,
    the session expired, or its key was revoked, expired or lost the `review` scope."""
    if not token or len(token) > 100:
        return None
    row = session.get(ConsoleSession, _digest(token))
    now = utcnow()
    if row is None or row.expires_at <= now:
        return None
    key = session.get(ApiKey, row.api_key_id)
    if (key is None or key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now)
            or REVIEW_SCOPE not in key.scopes):
        session.delete(row)
        return None
    principal = Principal(key_id=key.id, tenant_id=key.tenant_id, scopes=frozenset(key.scopes),
                          rate_limit_rpm=key.rate_limit_rpm or key.tenant.rate_limit_rpm,
                          rate_limit_tpm=key.rate_limit_tpm or key.tenant.rate_limit_tpm)
    return ConsoleUser(principal=principal, csrf_token=row.csrf_token, key_name=key.name)


def csrf_matches(user: ConsoleUser, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(user.csrf_token.encode(), presented.encode())


def sign_out(session: Session, token: str | None, *, request_id: str | None) -> None:
    """End the session (nothing if there is none)."""
    if not token or len(token) > 100:
        return
    row = session.get(ConsoleSession, _digest(token))
    if row is None:
        return
    session.delete(row)
    session.flush()
    record_event(session, tenant_id=row.tenant_id, action="console.signed_out", actor=row.api_key_id,
                 subject_type="api_key", subject_id=row.api_key_id, request_id=request_id)


