"""Per-key API rate limits (requests and tokens per minute, shared by every API process through Redis), their
`X-RateLimit-*` headers and 429s. Not the upstream's budget (app/moderation/upstream_budget.py). See docs/api.md."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from flask import Flask, Response, current_app, g
from limits import RateLimitItem, RateLimitItemPerMinute
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import MovingWindowRateLimiter

from app.api.errors import ApiError
from app.config import Settings
from app.moderation.tokens import estimate_tokens

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Quota:
    rpm: int
    tpm: int


def quota_for(rpm: int | None, tpm: int | None, settings: Settings) -> Quota:
    """The limits in force: those given (a key's own, else its tenant's), else the deployment's."""
    return Quota(rpm=rpm or settings.rate_limit_rpm, tpm=tpm or settings.rate_limit_tpm)


class RateLimiter:
    """The requests and tokens windows of every key, in one store."""

    def __init__(self, storage_url: str, *, key_prefix: str = "") -> None:
        storage: Storage
        if storage_url.startswith("memory://"):
            storage = MemoryStorage()
        else:
            storage = RedisStorage(storage_url, key_prefix=f"{key_prefix}verdict-ratelimit",
                                   socket_connect_timeout=2, socket_timeout=2)
        self._limiter = MovingWindowRateLimiter(storage)

    def hit(self, key_id: str, window: str, limit: int, cost: int) -> tuple[bool, int, float]:
        """Take `cost` from the key's window; (allowed, remaining, seconds until there is room again)."""
        item = _item(window, limit)
        allowed = self._limiter.hit(item, key_id, cost=cost)
        stats = self._limiter.get_window_stats(item, key_id)
        return allowed, max(0, stats.remaining), max(0.0, stats.reset_time - time.time())

    def remaining(self, key_id: str, window: str, limit: int) -> int:
        return max(0, self._limiter.get_window_stats(_item(window, limit), key_id).remaining)


def _item(window: str, limit: int) -> RateLimitItem:
    # The namespace keeps the two windows of one key apart.
    return RateLimitItemPerMinute(limit, namespace=window)


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions["verdict.rate_limiter"] = RateLimiter(settings.rate_limit_storage,
                                                         key_prefix=settings.broker_key_prefix)

    @app.after_request
    def _headers(response: Response) -> Response:
        for name, value in g.get("rate_limit_headers", {}).items():
            response.headers[name] = value
        return response


def _limiter() -> RateLimiter:
    limiter: RateLimiter = current_app.extensions["verdict.rate_limiter"]
    return limiter


def check_request(key_id: str, quota: Quota) -> None:
    """Count one request against the key's RPM; 429 if over. Called for every keyed request, before its scope."""
    g.rate_limit_quota = quota
    g.rate_limit_key = key_id
    try:
        allowed, remaining, retry_in = _limiter().hit(key_id, "rpm", quota.rpm, 1)
        remaining_tokens = _limiter().remaining(key_id, "tpm", quota.tpm)
    except Exception as exc:  # noqa: BLE001 - any store failure: let the request through, say so in the log
        log.warning("rate_limit_unavailable", error_type=type(exc).__name__)
        return
    g.rate_limit_headers = {
        "X-RateLimit-Limit-RPM": str(quota.rpm), "X-RateLimit-Remaining-RPM": str(remaining),
        "X-RateLimit-Limit-TPM": str(quota.tpm), "X-RateLimit-Remaining-TPM": str(remaining_tokens),
    }
    if not allowed:
        raise _too_many(f"Rate limit reached: {quota.rpm} requests per minute for this key.", retry_in,
                        code="rate_limit_requests")


def check_failed_authentication(client_address: str | None, key_id: str | None, limit: int) -> None:
    """Count one failed authentication against the client address and against the key id it presented (known or
    not, so the answer says nothing of which ids exist); 429 if either is past `limit` in the last minute. Both are
    counted every time, so a throttled request takes the same path as any other failure."""
    waits: list[float] = []
    try:
        for window, subject in (("auth-failures-address", client_address), ("auth-failures-key", key_id)):
            if subject:
                allowed, _remaining, retry_in = _limiter().hit(subject, window, limit, 1)
                if not allowed:
                    waits.append(retry_in)
    except Exception as exc:  # noqa: BLE001 - as in check_request: the 401 still goes out
        log.warning("rate_limit_unavailable", error_type=type(exc).__name__)
        return
    if waits:
        raise _too_many(f"Too many failed authentications: at most {limit} per minute from one client address or "
                        "for one key id.", max(waits), code="rate_limit_auth_failures")


def charge_tokens(texts: Sequence[str]) -> None:
    """Count the request's texts against the key's TPM; 429 if over (nothing is stored or moderated then)."""
    quota: Quota | None = g.get("rate_limit_quota")
    key_id: str | None = g.get("rate_limit_key")
    if quota is None or key_id is None:
        return
    tokens = estimate_tokens(texts)
    try:
        allowed, remaining, retry_in = _limiter().hit(key_id, "tpm", quota.tpm, tokens)
    except Exception as exc:  # noqa: BLE001 - as in check_request
        log.warning("rate_limit_unavailable", error_type=type(exc).__name__)
        return
    headers: dict[str, str] = g.get("rate_limit_headers", {})
    headers["X-RateLimit-Remaining-TPM"] = str(remaining)
    if not allowed:
        if tokens > quota.tpm:
            # No wait makes room for it; Retry-After is still sent, as on every 429.
            raise ApiError(429, f"This request needs about {tokens} tokens, more than this key's {quota.tpm} tokens "
                           "per minute; send fewer or shorter texts.", code="rate_limit_tokens", param="input",
                           headers={"Retry-After": "60"})
        raise _too_many(f"Rate limit reached: {quota.tpm} tokens per minute for this key.", retry_in,
                        code="rate_limit_tokens")


def _too_many(message: str, retry_in: float, *, code: str) -> ApiError:
    return ApiError(429, message, code=code, headers={"Retry-After": str(max(1, math.ceil(retry_in)))})
