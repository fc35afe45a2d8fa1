"""API keys: how they are made, stored (SHA-256 digest only) and checked (constant-time), and the scope guard.

A key reads `vk_<id>_<secret>`. The id part is not secret: it finds the row and names the actor in logs and the
audit trail. The whole key is hashed and compared with `hmac.compare_digest`, so the time taken does not depend on
how much of a guess matches. Keys are 256-bit random, so a fast hash is the right one (no password stretching).

`require_scope` is the one gate of every keyed route, in this order: authenticate (401), count the request against
the key's rate limit (429, app/rate_limits.py), check the scope (403), and for a POST with an `Idempotency-Key`
replay or claim it (app/idempotency.py); only then does the view run.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import structlog
from flask import current_app, g, request
from sqlalchemy.orm import Session

from app import rate_limits
from app.config import Settings
from app.db import request_session
from app.errors import ApiError
from app.idempotency import IDEMPOTENCY_HEADER, run_once
from app.models import ApiKey, utcnow
from app.request_context import current_request_id
from app.use_cases.audit import record_failed_authentication

SCOPES = ("submit", "read", "audit", "admin")
_KEY_PATTERN = re.compile(r"^vk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant_id: str
    scopes: frozenset[str]
    # The key's own rate limits, else its tenant's; None: the deployment's (app/rate_limits.py).
    rate_limit_rpm: int | None = None
    rate_limit_tpm: int | None = None


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new (key id, plaintext key)."""
    id_part = secrets.token_hex(8)
    return f"key_{id_part}", f"vk_{id_part}_{secrets.token_urlsafe(32)}"


class AuthenticationFailed(ApiError):
    """401. `reason` says why, for the audit trail; `key` is the key the id part named, if it exists."""

    def __init__(self, message: str, *, reason: str, key: ApiKey | None = None) -> None:
        super().__init__(401, message, code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="verdict"'})
        self.reason = reason
        self.key_id = key.id if key is not None else None
        self.tenant_id = key.tenant_id if key is not None else None


def authenticate(session: Session, authorization: str | None) -> Principal:
    if not authorization:
        raise AuthenticationFailed("Missing API key. Send 'Authorization: Bearer <key>'.", reason="missing")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("Malformed Authorization header. Send 'Authorization: Bearer <key>'.",
                                   reason="malformed_header")
    match = _KEY_PATTERN.match(token.strip())
    if match is None:
        raise AuthenticationFailed("Invalid API key.", reason="malformed_key")
    key = session.get(ApiKey, f"key_{match.group(1)}")
    presented = hash_key(token.strip())
    # Compare even when the id is unknown, so a miss and a wrong secret take the same path.
    stored = key.secret_hash if key is not None else hash_key(secrets.token_hex(16))
    if not hmac.compare_digest(presented, stored) or key is None:
        raise AuthenticationFailed("Invalid API key.", reason="wrong_secret" if key else "unknown_key", key=key)
    now = utcnow()
    if key.revoked_at is not None:
        raise AuthenticationFailed("This API key has been revoked.", reason="revoked", key=key)
    if key.expires_at is not None and key.expires_at <= now:
        raise AuthenticationFailed("This API key has expired.", reason="expired", key=key)
    if key.last_used_at is None or now - key.last_used_at > _LAST_USED_RESOLUTION:
        key.last_used_at = now
        session.commit()
    return Principal(key_id=key.id, tenant_id=key.tenant_id, scopes=frozenset(key.scopes),
                     rate_limit_rpm=key.rate_limit_rpm or key.tenant.rate_limit_rpm,
                     rate_limit_tpm=key.rate_limit_tpm or key.tenant.rate_limit_tpm)


F = TypeVar("F", bound=Callable[..., Any])


def require_scope(scope: str | None) -> Callable[[F], F]:
    """Authenticate the request's key and require `scope` (None: any valid key); then see `current_principal()`."""
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            session = request_session()
            try:
                principal = authenticate(session, request.headers.get("Authorization"))
            except AuthenticationFailed as exc:
                # A presented credential that fails is audited; a request that sent none is simply refused.
                if exc.reason != "missing":
                    record_failed_authentication(
                        session, reason=exc.reason, key_id=exc.key_id, tenant_id=exc.tenant_id,
                        request_id=current_request_id(), method=request.method,
                        route=request.url_rule.rule if request.url_rule else None,
                    )
                raise
            g.principal = principal
            structlog.contextvars.bind_contextvars(tenant_id=principal.tenant_id, key_id=principal.key_id)
            # Every keyed request counts against the key's limit, refused ones included.
            rate_limits.check_request(principal.key_id, rate_limits.quota_for(
                principal.rate_limit_rpm, principal.rate_limit_tpm, current_settings()))
            if scope is not None and scope not in principal.scopes:
                raise ApiError(403, f"This API key lacks the '{scope}' scope.", code="missing_scope")
            if request.method == "POST" and IDEMPOTENCY_HEADER in request.headers:
                return run_once(principal, lambda: view(*args, **kwargs))
            return view(*args, **kwargs)

        # What the OpenAPI document says of the route (app/api/openapi.py): it needs a key, and which scope.
        wrapper.required_scope = scope  # type: ignore[attr-defined]
        wrapper.keyed = True  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator


def current_settings() -> Settings:
    settings: Settings = current_app.extensions["verdict.settings"]
    return settings


def current_principal() -> Principal:
    principal: Principal = g.principal
    return principal
