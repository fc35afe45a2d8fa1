"""Who is calling: API keys as made (`vk_<id>_<secret>`, stored as a SHA-256 digest only) and checked against the
database in constant time, giving the `Principal`; and the `KeyCache` of the keys a process checked lately. The HTTP
gate is app/api/auth.py."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from app.models import ApiKey, utcnow
from app.use_cases.errors import AuthenticationFailed

SCOPES = ("submit", "read", "audit", "review", "admin")
# What a key gets when no scopes are named (the CLI's default): every scope but `review`, whose keys are made for one
# person each, by name (docs/review.md).
DEFAULT_SCOPES = ("submit", "read", "audit", "admin")
_KEY_PATTERN = re.compile(r"^vk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant_id: str
    scopes: frozenset[str]
    # The key's own rate limits, else its tenant's; None: the deployment's (app/api/rate_limits.py).
    rate_limit_rpm: int | None = None
    rate_limit_tpm: int | None = None
    # The tenant's defaults, read with the key (its tenant row comes in the same query): what a submission that
    # names no policy or mask gets, without asking again. None: not read, the use case asks.
    tenant_defaults: TenantDefaults | None = None


@dataclass(frozen=True)
class TenantDefaults:
    policy: str | None  # None: the built-in policy
    mask: bool | None  # None: the deployment's MASK_BY_DEFAULT


def hash_key(plaintext: str) -> str:
    # Keys are 256-bit random, so a fast hash is the right one (no password stretching).
    return hashlib.sha256(plaintext.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new (key id, plaintext key). The id part is not secret: it finds the row and names the actor."""
    id_part = secrets.token_hex(8)
    return f"key_{id_part}", f"vk_{id_part}_{secrets.token_urlsafe(32)}"


def presented_key_id(token: str) -> str | None:
    """The key id a well-formed key names (`key_<16 hex>`), whether or not such a key exists; else None."""
    match = _KEY_PATTERN.match(token)
    return f"key_{match.group(1)}" if match is not None else None


@dataclass(frozen=True)
class _Checked:
    secret_hash: str
    expires_at: datetime | None
    principal: Principal
    fresh_until: float  # on the cache's (monotonic) clock


class KeyCache:
    """The keys this process checked against the database in the last `seconds`, by id: what a request with one of
    them needs (its stored digest, expiry and principal) without reading the database again. Only a key that passed
    is kept, and only the digest of its secret; a presented key is still compared with it in constant time, and any
    key that does not pass here (wrong secret, expired, not kept) is checked against the database as before. So a key
    revoked, deleted or changed elsewhere is seen within `seconds` (`forget` makes it at once in this process); its
    last use is recorded to the minute plus `seconds`. 0 seconds: nothing is kept."""

    def __init__(self, seconds: float, *, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._max_keys = max_keys
        self._clock = clock
        self._checked: dict[str, _Checked] = {}
        self._lock = threading.Lock()

    def principal_for(self, key_id: str, token: str) -> Principal | None:
        """The principal of key `key_id` if it was checked lately and `token` is its key; else None (ask the
        database)."""
        checked = self._checked.get(key_id)
        if checked is None or checked.fresh_until <= self._clock():
            return None
        if not hmac.compare_digest(hash_key(token), checked.secret_hash):
            return None
        if checked.expires_at is not None and checked.expires_at <= utcnow():
            return None
        return checked.principal

    def remember(self, key: ApiKey, principal: Principal) -> None:
        if self.seconds <= 0:
            return
        now = self._clock()
        with self._lock:
            if len(self._checked) >= self._max_keys:
                for stale in [k for k, c in self._checked.items() if c.fresh_until <= now] or list(self._checked):
                    del self._checked[stale]
            self._checked[key.id] = _Checked(secret_hash=key.secret_hash, expires_at=key.expires_at,
                                             principal=principal, fresh_until=now + self.seconds)

    def forget(self, key_id: str) -> None:
        with self._lock:
            self._checked.pop(key_id, None)

    def forget_tenant(self, tenant_id: str) -> None:
        """Forget every key of the tenant (its defaults or limits changed)."""
        with self._lock:
            for key_id in [k for k, c in self._checked.items() if c.principal.tenant_id == tenant_id]:
                del self._checked[key_id]


def authenticate(session: Session, token: str, *, cache: KeyCache | None = None) -> Principal:
    """The principal `token` (a whole key) stands for, in the caller's transaction, which also records the key's
    last use (to the minute); AuthenticationFailed if the key is malformed, unknown, wrong, revoked or expired. With a
    `cache`, a key it checked lately and that still passes is not read again (the transaction then sends nothing)."""
    match = _KEY_PATTERN.match(token)
    if match is None:
        raise AuthenticationFailed("Invalid API key.", reason="malformed_key")
    if cache is not None:
        cached = cache.principal_for(f"key_{match.group(1)}", token)
        if cached is not None:
            return cached
    key = session.get(ApiKey, f"key_{match.group(1)}")
    presented = hash_key(token)
    # Compare even when the id is unknown, so a miss and a wrong secret take the same path; compare_digest takes
    # the same time however much of a guess matches.
    stored = key.secret_hash if key is not None else hash_key(secrets.token_hex(16))
    if not hmac.compare_digest(presented, stored) or key is None:
        raise _refused("Invalid API key.", "wrong_secret" if key else "unknown_key", key)
    now = utcnow()
    if key.revoked_at is not None:
        raise _refused("This API key has been revoked.", "revoked", key)
    if key.expires_at is not None and key.expires_at <= now:
        raise _refused("This API key has expired.", "expired", key)
    if key.last_used_at is None or now - key.last_used_at > _LAST_USED_RESOLUTION:
        key.last_used_at = now
    principal = Principal(key_id=key.id, tenant_id=key.tenant_id, scopes=frozenset(key.scopes),
                          rate_limit_rpm=key.rate_limit_rpm or key.tenant.rate_limit_rpm,
                          rate_limit_tpm=key.rate_limit_tpm or key.tenant.rate_limit_tpm,
                          tenant_defaults=TenantDefaults(policy=key.tenant.default_policy,
                                                         mask=key.tenant.mask_by_default))
    if cache is not None:
        cache.remember(key, principal)
    return principal


def _refused(message: str, reason: str, key: ApiKey | None) -> AuthenticationFailed:
    return AuthenticationFailed(message, reason=reason, key_id=key.id if key is not None else None,
                                tenant_id=key.tenant_id if key is not None else None)
