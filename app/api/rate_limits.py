"""Per-key API rate limits (requests and tokens per minute, shared by every API process through Redis), their
`X-RateLimit-*` headers and 429s. Not the upstream's budget (app/moderation/upstream_budget.py). See docs/api.md."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
import structlog
from flask import Flask, Response, current_app, g

from app.api.errors import ApiError
from app.config import Settings
from app.moderation.tokens import estimate_tokens

log = structlog.get_logger(__name__)

# The windows are a minute long; a window's counter is kept for two, while it weighs on the next one.
PERIOD_SECONDS = 60


@dataclass(frozen=True)
class Quota:
    rpm: int
    tpm: int


def quota_for(rpm: int | None, tpm: int | None, settings: Settings) -> Quota:
    """The limits in force: those given (a key's own, else its tenant's), else the deployment's."""
    return Quota(rpm=rpm or settings.rate_limit_rpm, tpm=tpm or settings.rate_limit_tpm)


@dataclass(frozen=True)
class Charge:
    """`cost` taken from `subject`'s `window` (cost 0: only look) if it fits under `limit`."""

    window: str
    subject: str
    limit: int
    cost: int


@dataclass(frozen=True)
class Standing:
    """Where a subject's window stands after a charge: whether it was taken, what is left, and, when it was not,
    the seconds until it would fit."""

    allowed: bool
    remaining: int
    retry_in: float


# Each window is a sliding one-minute window over two counters, the current minute's and the previous one's: what
# counts is the current minute's total plus the previous minute's weighted by how much of it the sliding minute
# still covers (so the count never jumps to zero at a minute's start). A charge is taken only if it fits; one call
# takes or looks at several windows, in one round trip. KEYS: per charge, its current and previous counters. ARGV:
# the seconds into the current minute, the minute's length, whether the charges are chained (1: once one is refused,
# the ones after it are only looked at), then per charge its limit and cost. Per charge it answers allowed (1/0),
# the current and the previous counters.
_SCRIPT = """
local elapsed, period, chained = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
local weight = (period - elapsed) / period
local answer = {}
local refused = false
for i = 1, #KEYS / 2 do
  local limit, cost = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  if chained and refused then
    cost = 0
  end
  local current = tonumber(redis.call('get', KEYS[2 * i - 1]) or '0')
  local previous = tonumber(redis.call('get', KEYS[2 * i]) or '0')
  local allowed = math.floor(previous * weight) + current + cost <= limit
  if allowed and cost > 0 then
    current = redis.call('incrby', KEYS[2 * i - 1], cost)
    redis.call('expire', KEYS[2 * i - 1], 2 * period)
  end
  refused = refused or not allowed
  answer[#answer + 1] = allowed and 1 or 0
  answer[#answer + 1] = current
  answer[#answer + 1] = previous
end
return answer
"""


class RateLimiter:
    """The requests and tokens windows of every key (and the failed-authentication windows), in one store: Redis,
    shared by every API process, one round trip per call; or `memory://`, this process's own."""

    def __init__(self, storage_url: str, *, key_prefix: str = "", clock: Callable[[], float] = time.time) -> None:
        self._prefix = f"{key_prefix}verdict-ratelimit"
        self._clock = clock
        self._redis: redis.Redis | None = None
        self._counters: dict[tuple[str, str, int], int] = {}
        self._lock = threading.Lock()
        if not storage_url.startswith("memory://"):
            self._redis = redis.Redis.from_url(storage_url, socket_connect_timeout=2, socket_timeout=2)
            self._script = self._redis.register_script(_SCRIPT)

    def hit(self, *charges: Charge, chained: bool = False) -> list[Standing]:
        """Take each charge from its window if it fits (each on its own; `chained`: and only if every charge before
        it was taken, the later ones being only looked at once one is refused); where each window then stands."""
        now = self._clock()
        minute, elapsed = divmod(now, PERIOD_SECONDS)
        index = int(minute)
        counts = self._redis_counts(charges, index, elapsed, chained) if self._redis is not None else \
            self._memory_counts(charges, index, elapsed, chained)
        return [_standing(charge, allowed, current, previous, elapsed)
                for charge, (allowed, current, previous) in zip(charges, counts, strict=True)]

    def _redis_counts(self, charges: Sequence[Charge], index: int, elapsed: float,
                      chained: bool) -> list[tuple[bool, int, int]]:
        keys: list[str] = []
        args: list[float | int] = [elapsed, PERIOD_SECONDS, 1 if chained else 0]
        for charge in charges:
            keys += [self._key(charge, index), self._key(charge, index - 1)]
            args += [charge.limit, charge.cost]
        flat = self._script(keys=keys, args=args)
        return [(bool(flat[i]), int(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]

    def _key(self, charge: Charge, index: int) -> str:
        return f"{self._prefix}:{charge.window}:{charge.subject}:{index}"

    def _memory_counts(self, charges: Sequence[Charge], index: int, elapsed: float,
                       chained: bool) -> list[tuple[bool, int, int]]:
        weight = (PERIOD_SECONDS - elapsed) / PERIOD_SECONDS
        answers: list[tuple[bool, int, int]] = []
        refused = False
        with self._lock:
            for stale in [k for k in self._counters if k[2] < index - 1]:
                del self._counters[stale]
            for charge in charges:
                cost = 0 if chained and refused else charge.cost
                current = self._counters.get((charge.window, charge.subject, index), 0)
                previous = self._counters.get((charge.window, charge.subject, index - 1), 0)
                allowed = math.floor(previous * weight) + current + cost <= charge.limit
                if allowed and cost > 0:
                    current += cost
                    self._counters[(charge.window, charge.subject, index)] = current
                refused = refused or not allowed
                answers.append((allowed, current, previous))
        return answers


def _standing(charge: Charge, allowed: bool, current: int, previous: int, elapsed: float) -> Standing:
    weight = (PERIOD_SECONDS - elapsed) / PERIOD_SECONDS
    remaining = max(0, charge.limit - math.floor(previous * weight) - current)
    return Standing(allowed=allowed, remaining=remaining,
                    retry_in=0.0 if allowed else _wait(charge, current, previous, elapsed))


def _wait(charge: Charge, current: int, previous: int, elapsed: float) -> float:
    """Seconds until `charge` would fit, as the two counters decay (nothing else being taken meanwhile)."""
    room = charge.limit - charge.cost  # what the counted total must fall to
    if room < 0:
        return float(PERIOD_SECONDS)  # never fits
    if current <= room:
        # The previous minute's share must fall: previous * (1 - t / PERIOD) <= room - current, at t into the minute.
        at = PERIOD_SECONDS * (1 - (room - current) / previous) if previous else elapsed
        return max(0.0, at - elapsed)
    # This minute's total must become the previous one and fall in its turn.
    return min(float(PERIOD_SECONDS), PERIOD_SECONDS - elapsed + PERIOD_SECONDS * (1 - room / current))


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
    """Count one request against the key's RPM; 429 if over. Called for every keyed request, before its scope (or,
    for a view that charges tokens, with its tokens: `defer_request`)."""
    g.rate_limit_quota = quota
    g.rate_limit_key = key_id
    _count_request(key_id, quota, None)


def defer_request(key_id: str, quota: Quota) -> None:
    """Count the request with the tokens the view charges (`charge_tokens`), in the same round trip, instead of now;
    or, if the view ends before it charges any (a 400, a 404), when it ends (`settle_request`). The answers are the
    same as `check_request`'s now: the request is counted, and refused first, before its tokens."""
    g.rate_limit_quota = quota
    g.rate_limit_key = key_id
    g.rate_limit_deferred = True


def settle_request() -> None:
    """Count a deferred request that charged no tokens (429 if over the RPM, which then replaces the view's answer:
    a view that defers charges its tokens before it writes anything)."""
    if g.pop("rate_limit_deferred", False):
        _count_request(g.rate_limit_key, g.rate_limit_quota, None)


def _count_request(key_id: str, quota: Quota, tokens: int | None) -> Standing | None:
    """Take one request from the key's RPM window and, chained to it, `tokens` from its TPM window (None: only look
    at it, for its header); 429 if the request is over the RPM. Where the TPM window stands, unless the store failed."""
    try:
        # One round trip: the request taken from the RPM window; the tokens taken (only if the request was) from
        # the TPM window, or the TPM window looked at for its header.
        requests, standing = _limiter().hit(Charge("rpm", key_id, quota.rpm, 1),
                                            Charge("tpm", key_id, quota.tpm, tokens or 0), chained=True)
    except Exception as exc:  # noqa: BLE001 - any store failure: let the request through, say so in the log
        log.warning("rate_limit_unavailable", error_type=type(exc).__name__)
        return None
    g.rate_limit_headers = {
        "X-RateLimit-Limit-RPM": str(quota.rpm), "X-RateLimit-Remaining-RPM": str(requests.remaining),
        "X-RateLimit-Limit-TPM": str(quota.tpm), "X-RateLimit-Remaining-TPM": str(standing.remaining),
    }
    if not requests.allowed:
        raise _too_many(f"Rate limit reached: {quota.rpm} requests per minute for this key.", requests.retry_in,
                        code="rate_limit_requests")
    return standing


def check_failed_authentication(client_address: str | None, key_id: str | None, limit: int) -> None:
    """Count one failed authentication against the client address and against the key id it presented (known or
    not, so the answer says nothing of which ids exist); 429 if either is past `limit` in the last minute. Both are
    counted every time, so a throttled request takes the same path as any other failure."""
    charges = [Charge(window, subject, limit, 1) for window, subject in
               (("auth-failures-address", client_address), ("auth-failures-key", key_id)) if subject]
    try:
        standings = _limiter().hit(*charges) if charges else []
    except Exception as exc:  # noqa: BLE001 - as in check_request: the 401 still goes out
        log.warning("rate_limit_unavailable", error_type=type(exc).__name__)
        return
    waits = [standing.retry_in for standing in standings if not standing.allowed]
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
    standing: Standing | None
    if g.pop("rate_limit_deferred", False):
        # The request's own count, deferred to here (`defer_request`): both in one round trip.
        standing = _count_request(key_id, quota, tokens)
    else:
        try:
            (standing,) = _limiter().hit(Charge("tpm", key_id, quota.tpm, tokens))
        except Exception as exc:  # noqa: BLE001 - as in check_request
            log.warning("rate_limit_unavailable", error_type=type(exc).__name__)
            standing = None
        if standing is not None:
            headers: dict[str, str] = g.get("rate_limit_headers", {})
            headers["X-RateLimit-Remaining-TPM"] = str(standing.remaining)
    if standing is None:
        return
    if not standing.allowed:
        if tokens > quota.tpm:
            # No wait makes room for it; Retry-After is still sent, as on every 429.
            raise ApiError(429, f"This request needs about {tokens} tokens, more than this key's {quota.tpm} tokens "
                           "per minute; send fewer or shorter texts.", code="rate_limit_tokens", param="input",
                           headers={"Retry-After": "60"})
        raise _too_many(f"Rate limit reached: {quota.tpm} tokens per minute for this key.", standing.retry_in,
                        code="rate_limit_tokens")


def _too_many(message: str, retry_in: float, *, code: str) -> ApiError:
    return ApiError(429, message, code=code, headers={"Retry-After": str(max(1, math.ceil(retry_in)))})
