"""The gate of every keyed route (`require_scope`), in this order: authenticate the bearer key (401), count the
request against the key's rate limit (429), check the scope (403), and for a POST with an `Idempotency-Key` replay
or claim it; only then does the view run. The key check itself is app/use_cases/authentication.py."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from flask import Flask, current_app, g, request

from app.api import rate_limits
from app.api.errors import ApiError
from app.api.idempotency import IDEMPOTENCY_HEADER, run_once
from app.api.request_context import current_request_id
from app.api.transactions import request_session
from app.extensions import SETTINGS, current_settings
from app.use_cases.audit import record_failed_authentication
from app.use_cases.authentication import SCOPES, KeyCache, Principal, authenticate, presented_key_id
from app.use_cases.errors import AuthenticationFailed

F = TypeVar("F", bound=Callable[..., Any])

_KEY_CACHE = "verdict.key_cache"


def init_app(app: Flask) -> None:
    # The keys this process checked lately (API_KEY_CACHE_SECONDS): most requests then read nothing to authenticate.
    app.extensions[_KEY_CACHE] = KeyCache(app.extensions[SETTINGS].api_key_cache_seconds)


def current_key_cache() -> KeyCache:
    cache: KeyCache = current_app.extensions[_KEY_CACHE]
    return cache


def bearer_token(authorization: str | None) -> str:
    """The key an `Authorization: Bearer <key>` header presents; AuthenticationFailed if there is none."""
    if not authorization:
        raise AuthenticationFailed("Missing API key. Send 'Authorization: Bearer <key>'.", reason="missing")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("Malformed Authorization header. Send 'Authorization: Bearer <key>'.",
                                   reason="malformed_header")
    return token.strip()


def require_scope(scope: str | None, *, charges_tokens: bool = False) -> Callable[[F], F]:
    """Authenticate the request's key and require `scope` (None: any valid key); then see `current_principal()`.

    `charges_tokens`: the view calls `rate_limits.charge_tokens` before it writes anything; the request is then
    counted against the key's RPM in the same round trip as its tokens (unless it has an Idempotency-Key, whose
    claim must come after the count), or when the view ends if it charged none, with the same answers."""
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            principal = _authenticated()
            g.principal = principal
            structlog.contextvars.bind_contextvars(tenant_id=principal.tenant_id, key_id=principal.key_id)
            quota = rate_limits.quota_for(principal.rate_limit_rpm, principal.rate_limit_tpm, current_settings())
            allowed = scope is None or scope in principal.scopes
            idempotent = request.method == "POST" and IDEMPOTENCY_HEADER in request.headers
            if charges_tokens and allowed and not idempotent:
                rate_limits.defer_request(principal.key_id, quota)
                try:
                    result = view(*args, **kwargs)
                except BaseException:
                    rate_limits.settle_request()  # counted now if it was not: over the RPM, its 429 wins
                    raise
                rate_limits.settle_request()
                return result
            # Every keyed request counts against the key's limit, refused ones included.
            rate_limits.check_request(principal.key_id, quota)
            if not allowed:
                raise ApiError(403, f"This API key lacks the '{scope}' scope.", code="missing_scope")
            if idempotent:
                return run_once(principal, lambda: view(*args, **kwargs))
            return view(*args, **kwargs)

        # What the OpenAPI document says of the route (app/api/openapi.py): it needs a key, and which scope.
        wrapper.required_scope = scope  # type: ignore[attr-defined]
        wrapper.keyed = True  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator


def _authenticated() -> Principal:
    """The request's principal, in a transaction of its own (it records the key's last use; it sends nothing when the
    key was checked lately, app/use_cases/authentication.py's KeyCache); a presented key that
    fails is counted against its client address and key id (429 past AUTH_FAILURES_PER_MINUTE, else 401) and
    audited, in another, before the answer goes out. A request that sent no key is simply refused."""
    session = request_session()
    token: str | None = None
    try:
        token = bearer_token(request.headers.get("Authorization"))
        with session.begin():
            return authenticate(session, token, cache=current_key_cache())
    except AuthenticationFailed as exc:
        if exc.reason == "missing":
            raise
        throttled = count_failed_authentication(exc, token)
        if throttled is not None:
            raise throttled from exc
        raise


def count_failed_authentication(exc: AuthenticationFailed, token: str | None) -> ApiError | None:
    """Count a presented key that failed against its client address and key id, and audit it, in a transaction of
    its own; the 429 to answer instead of the 401 when past AUTH_FAILURES_PER_MINUTE. The API's gate and the console's
    sign-in both come here, so one throttle covers both doors."""
    settings = current_settings()
    session = request_session()
    # Throttled or not, the failure is counted and audited alike (summarised per window: app/use_cases/audit.py),
    # so a flood of bad keys is answered 429 and writes a bounded number of events.
    throttled: ApiError | None = None
    try:
        rate_limits.check_failed_authentication(request.remote_addr, presented_key_id(token) if token else None,
                                                settings.auth_failures_per_minute)
    except ApiError as refusal:
        throttled = refusal
    with session.begin():
        record_failed_authentication(
            session, reason=exc.reason, key_id=exc.key_id, tenant_id=exc.tenant_id,
            client_address=request.remote_addr, request_id=current_request_id(), method=request.method,
            route=request.url_rule.rule if request.url_rule else None,
            window_seconds=settings.auth_failure_window_seconds,
        )
    return throttled


def current_principal() -> Principal:
    principal: Principal = g.principal
    return principal
