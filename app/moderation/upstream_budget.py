"""The upstream's budget: requests and tokens per minute shared by every worker through one Redis Lua script, and
tightened by the provider's `X-RateLimit-*` headers. See docs/moderation.md (also why not the `limits` library)."""

from __future__ import annotations

import hashlib
import random
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis
import structlog

log = structlog.get_logger(__name__)

PROVIDER_WINDOW_SECONDS = 60.0
# Added to the provider's window: covers the difference in delivery time between two calls a window apart.
WINDOW_MARGIN_SECONDS = 1.0

_SCRIPT = """
local log, weights, state = KEYS[1], KEYS[2], KEYS[3]
local op = ARGV[1]
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = math.ceil(window * 2000)

local function num(value) return tonumber(value) or 0 end

local function weight(w)
  local r, tk = string.match(w or '1 0', '(%d+) (%d+)')
  return tonumber(r), tonumber(tk)
end

-- The calls in the window, oldest first: {admitted at, requests, tokens}. Read only when a call does not fit (to find
-- when it would), or to rebuild the totals below.
local function entries()
  local raw = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
  local out, used_r, used_t = {}, 0, 0
  for i = 1, #raw, 2 do
    local r, tk = weight(redis.call('HGET', weights, raw[i]))
    out[#out + 1] = {tonumber(raw[i + 1]), r, tk}
    used_r, used_t = used_r + r, used_t + tk
  end
  return out, used_r, used_t
end

-- What the window holds, kept as running totals in the weights hash ('#r', '#t': no entry id starts with '#'), so
-- a call costs the same however many calls the window holds. Entries leaving the window are subtracted as they go;
-- totals missing (a log written before they were kept) are counted once from the log.
local old = redis.call('ZRANGEBYSCORE', log, '-inf', now - window)
local used_r, used_t
local totals = redis.call('HMGET', weights, '#r', '#t')
if totals[1] and totals[2] then
  used_r, used_t = tonumber(totals[1]), tonumber(totals[2])
  for i = 1, #old, 500 do
    local ids = {unpack(old, i, math.min(i + 499, #old))}
    local ws = redis.call('HMGET', weights, unpack(ids))
    for j = 1, #ids do
      local r, tk = weight(ws[j])
      used_r, used_t = used_r - r, used_t - tk
    end
  end
end
for i = 1, #old, 500 do
  redis.call('HDEL', weights, unpack(old, i, math.min(i + 499, #old)))
end
redis.call('ZREMRANGEBYSCORE', log, '-inf', now - window)
if used_r == nil or redis.call('ZCARD', log) == 0 then
  local _
  _, used_r, used_t = entries()
end

-- Kept while the log holds entries (the hash then has the log's expiry); an empty log holds nothing.
local function save_used()
  if redis.call('ZCARD', log) > 0 then
    redis.call('HSET', weights, '#r', used_r, '#t', used_t)
  else
    redis.call('HDEL', weights, '#r', '#t')
  end
end

local function add_used(r, tk)
  used_r, used_t = math.max(0, used_r + r), math.max(0, used_t + tk)
  save_used()
end

add_used(0, 0)

local function effective(configured, field)
  local learned = num(redis.call('HGET', state, field))
  configured = num(configured)
  if configured > 0 and learned > 0 then return math.min(configured, learned) end
  return math.max(configured, learned)
end

local function expire()
  redis.call('PEXPIRE', log, ttl)
  redis.call('PEXPIRE', weights, ttl)
  redis.call('PEXPIRE', state, ttl * 5)
end

if op == 'acquire' then
  local rpm, tpm = effective(ARGV[3], 'learned_rpm'), effective(ARGV[4], 'learned_tpm')
  local tokens, id = tonumber(ARGV[5]), ARGV[6]
  if tpm > 0 and tokens > tpm then return {-1, '0'} end
  local wait = math.max(0, num(redis.call('HGET', state, 'paused_until')) - now)
  local next_r, next_t = num(redis.call('HGET', state, 'next_request')), num(redis.call('HGET', state, 'next_token'))
  if rpm > 0 then wait = math.max(wait, next_r - now) end
  if tpm > 0 then wait = math.max(wait, next_t - now) end
  local list = {}
  if (rpm > 0 and used_r + 1 > rpm) or (tpm > 0 and used_t + tokens > tpm) then list = entries() end
  if rpm > 0 and used_r + 1 > rpm then
    local freed = 0
    for _, e in ipairs(list) do
      freed = freed + e[2]
      if used_r - freed + 1 <= rpm then wait = math.max(wait, e[1] + window - now) break end
    end
  end
  if tpm > 0 and used_t + tokens > tpm then
    local freed = 0
    for _, e in ipairs(list) do
      freed = freed + e[3]
      if used_t - freed + tokens <= tpm then wait = math.max(wait, e[1] + window - now) break end
    end
  end
  if wait > 0 then return {0, tostring(wait)} end
  redis.call('ZADD', log, now, id)
  redis.call('HSET', weights, id, '1 ' .. tokens)
  add_used(1, tokens)
  if rpm > 0 then redis.call('HSET', state, 'next_request', tostring(math.max(next_r, now) + window / rpm)) end
  if tpm > 0 then
    redis.call('HSET', state, 'next_token', tostring(math.max(next_t, now) + tokens * window / tpm))
  end
  expire()
  return {1, '0'}
elseif op == 'settle' then
  local id, tokens, tpm = ARGV[3], tonumber(ARGV[4]), effective(ARGV[5], 'learned_tpm')
  local w = redis.call('HGET', weights, id)
  if not w then return {0, '0'} end
  local estimated = tonumber(string.match(w, '%d+ (%d+)'))
  redis.call('HSET', weights, id, '1 ' .. tokens)
  add_used(0, tokens - estimated)
  if tpm > 0 then
    local next_t = num(redis.call('HGET', state, 'next_token'))
    redis.call('HSET', state, 'next_token', tostring(next_t + (tokens - estimated) * window / tpm))
  end
  return {1, '0'}
elseif op == 'learn' then
  -- ARGV: limit requests, remaining requests, limit tokens, remaining tokens ('' when not sent)
  local limit_r, left_r, limit_t, left_t = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  if limit_r and limit_r > 0 then redis.call('HSET', state, 'learned_rpm', limit_r) end
  if limit_t and limit_t > 0 then redis.call('HSET', state, 'learned_tpm', limit_t) end
  local extra_r, extra_t = 0, 0
  if limit_r and left_r then extra_r = math.max(0, limit_r - left_r - used_r) end
  if limit_t and left_t then extra_t = math.max(0, limit_t - left_t - used_t) end
  if extra_r > 0 or extra_t > 0 then
    local id = 'provider:' .. ARGV[7]
    redis.call('ZADD', log, now, id)
    redis.call('HSET', weights, id, string.format('%d %d', extra_r, extra_t))
    add_used(extra_r, extra_t)
  end
  expire()
  return {extra_r, tostring(extra_t)}
elseif op == 'pause' then
  local until_ = now + tonumber(ARGV[3])
  if until_ > num(redis.call('HGET', state, 'paused_until')) then
    redis.call('HSET', state, 'paused_until', tostring(until_))
  end
  expire()
  return {1, '0'}
elseif op == 'peek' then
  -- What `verdict status` and /metrics show: the limits in force and what the window holds (writes nothing but
  -- the pruning above and its totals).
  local rpm, tpm = effective(ARGV[3], 'learned_rpm'), effective(ARGV[4], 'learned_tpm')
  return {tostring(rpm), tostring(used_r), tostring(tpm), tostring(used_t)}
end
return redis.error_reply('unknown op ' .. op)
"""


class RateLimitUnavailable(Exception):
    """The shared limiter could not be asked (Redis unreachable): calling the provider blind risks its 429s."""


class NoCapacity(Exception):
    """No capacity within the time the caller may wait; `wait` is how long until there would be."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"no upstream capacity for {wait:.2f}s")
        self.wait = wait


class OverTokenLimit(Exception):
    """One call needs more tokens than the provider allows per minute: it can never be admitted."""


@dataclass(frozen=True)
class BudgetState:
    """The shared budget now: the limits in force (None: no limit) and what the current window has used."""

    requests_limit: int | None
    requests_used: int
    tokens_limit: int | None
    tokens_used: int

    @property
    def requests_left(self) -> int | None:
        return None if self.requests_limit is None else max(0, self.requests_limit - self.requests_used)

    @property
    def tokens_left(self) -> int | None:
        return None if self.tokens_limit is None else max(0, self.tokens_limit - self.tokens_used)


@dataclass(frozen=True)
class Permit:
    entry_id: str
    tokens: int


def limiter_key(prefix: str, *parts: str) -> str:
    """Workers that call the same provider with the same key share one limit; nothing else does."""
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
    return f"{prefix}verdict:upstream-limit:{digest}"


class SharedRateLimiter:
    """Waits for capacity under the provider's requests- and tokens-per-minute limit, shared through Redis."""

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        *,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        window_seconds: float = PROVIDER_WINDOW_SECONDS + WINDOW_MARGIN_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self._keys = [f"{key}:log", f"{key}:weights", f"{key}:state"]
        self._rpm = requests_per_minute or 0
        self._tpm = tokens_per_minute or 0
        self._window = window_seconds
        self._sleep = sleep
        self._script = client.register_script(_SCRIPT)

    def _run(self, *args: str | int | float) -> tuple[int, float]:
        try:
            status, value = self._script(keys=self._keys, args=list(args))
        except redis.RedisError as exc:
            raise RateLimitUnavailable(str(exc)) from exc
        return int(status), float(value)

    def acquire(self, tokens: int, *, max_wait: float) -> Permit:
        """Take one request and `tokens` from the shared budget, waiting up to `max_wait` seconds for them."""
        entry_id = secrets.token_hex(8)
        deadline = time.monotonic() + max_wait
        while True:
            status, wait = self._run("acquire", self._window, self._rpm, self._tpm, tokens, entry_id)
            if status == 1:
                return Permit(entry_id, tokens)
            if status == -1:
                raise OverTokenLimit(f"{tokens} tokens in one call exceed the provider's per-minute limit")
            if time.monotonic() + wait > deadline:
                raise NoCapacity(wait)
            # A little jitter, so workers woken for the same slot do not ask at the very same instant.
            self._sleep(wait + random.uniform(0, 0.01))  # noqa: S311 - not for security

    def settle(self, permit: Permit, used_tokens: int) -> None:
        """Replace the estimate with what the provider said the call cost (`usage`)."""
        if used_tokens != permit.tokens:
            self._run("settle", self._window, permit.entry_id, used_tokens, self._tpm)

    def learn(self, headers: Mapping[str, str]) -> None:
        """Tighten the shared limit from the provider's `X-RateLimit-*` headers, when it sends them."""
        limits = ProviderLimits.from_headers(headers)
        if limits.empty:
            return
        fields = (limits.limit_requests, limits.remaining_requests, limits.limit_tokens, limits.remaining_tokens)
        extra_requests, _ = self._run("learn", self._window, *("" if v is None else v for v in fields),
                                      secrets.token_hex(8))
        if extra_requests:
            log.info("upstream_usage_learned", extra_requests=extra_requests)
        reset = max((limits.reset_requests if limits.remaining_requests == 0 else None) or 0.0,
                    (limits.reset_tokens if limits.remaining_tokens == 0 else None) or 0.0)
        if reset > 0:
            self.pause(reset)

    def state(self) -> BudgetState:
        """The limits in force and the current window's use (RateLimitUnavailable when Redis cannot be asked)."""
        try:
            raw = self._script(keys=self._keys, args=["peek", self._window, self._rpm, self._tpm])
        except redis.RedisError as exc:
            raise RateLimitUnavailable(str(exc)) from exc
        rpm, used_r, tpm, used_t = (int(float(value)) for value in raw)
        return BudgetState(requests_limit=rpm or None, requests_used=used_r, tokens_limit=tpm or None,
                           tokens_used=used_t)

    def pause(self, seconds: float) -> None:
        """No worker calls the provider for `seconds` (its `Retry-After`)."""
        if seconds > 0:
            self._run("pause", self._window, seconds)


@dataclass(frozen=True)
class ProviderLimits:
    """What a provider said about its limits in one answer's headers (OpenAI's `x-ratelimit-*` names)."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.limit_requests, self.remaining_requests, self.limit_tokens,
                                       self.remaining_tokens))

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> ProviderLimits:
        lower = {k.lower(): v for k, v in headers.items()}
        return cls(
            limit_requests=_int(lower.get("x-ratelimit-limit-requests")),
            remaining_requests=_int(lower.get("x-ratelimit-remaining-requests")),
            limit_tokens=_int(lower.get("x-ratelimit-limit-tokens")),
            remaining_tokens=_int(lower.get("x-ratelimit-remaining-tokens")),
            reset_requests=parse_duration(lower.get("x-ratelimit-reset-requests")),
            reset_tokens=parse_duration(lower.get("x-ratelimit-reset-tokens")),
        )


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        return None
    return number if number >= 0 else None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | None) -> float | None:
    """OpenAI's reset durations ("1s", "6m0s", "20ms"), or plain seconds; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(n) * _UNIT[u] for n, u in parts)
