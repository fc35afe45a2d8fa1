"""Bounds on open long-polls (`GET /v1/submissions/{id}?wait=`), which each hold a request thread while they wait.

Three bounds, all checked before a request may wait:

- per process (LONG_POLL_MAX_PER_PROCESS, by default half the server's threads): counted in the process, because the
  threads it protects are the process's own; the other threads always serve everything else, `/healthz` included;
- per key and per tenant (LONG_POLL_MAX_PER_KEY, LONG_POLL_MAX_PER_TENANT): counted in Redis when there is one, so
  they hold across every API process and host, else in the process. A Redis slot carries an expiry (the wait plus a
  margin), so a process that dies holding one frees it by itself.

Past any bound the request does not wait: it is answered the submission's current state at once, with
`Verdict-Wait: refused` (docs/api.md, "Long-polling"). If Redis does not answer, only the process bound holds, and
that is logged.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
import structlog
from flask import Flask, current_app

from app.config import Settings

log = structlog.get_logger(__name__)

EXTENSION = "verdict.long_polls"
# Without a server that says its threads (the Flask test client, a hand-made gunicorn command line).
DEFAULT_PER_PROCESS = 4
# A Redis slot outlives its wait by this much, then frees itself (a process that died holding it).
SLOT_MARGIN_SECONDS = 5.0

# KEYS: the key's and the tenant's sorted sets of slots (member: a random token, score: its expiry in ms).
# ARGV: token, ttl ms, most per key, most per tenant. Answers 0 (taken), 1 (key full) or 2 (tenant full).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, max_key, max_tenant = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= max_key then return 1 end
if redis.call('ZCARD', KEYS[2]) >= max_tenant then return 2 end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
-- The set lives as long as its longest slot: a shorter wait never shortens it.
for _, name in ipairs(KEYS) do
  if redis.call('PTTL', name) < ttl then redis.call('PEXPIRE', name, ttl) end
end
return 0
"""


@dataclass(frozen=True)
class Bounds:
    per_process: int
    per_key: int
    per_tenant: int


def process_bound(settings: Settings, server_threads: int | None) -> int:
    """LONG_POLL_MAX_PER_PROCESS, else half the server's threads, else DEFAULT_PER_PROCESS."""
    if settings.long_poll_max_per_process is not None:
        return settings.long_poll_max_per_process
    return server_threads // 2 if server_threads is not None else DEFAULT_PER_PROCESS


class _LocalCounts:
    """Per-key and per-tenant counts in this process (no Redis)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: Counter[str] = Counter()
        self._tenants: Counter[str] = Counter()

    def acquire(self, key_id: str, tenant_id: str, bounds: Bounds) -> str | None:
        with self._lock:
            if self._keys[key_id] >= bounds.per_key:
                return "key"
            if self._tenants[tenant_id] >= bounds.per_tenant:
                return "tenant"
            self._keys[key_id] += 1
            self._tenants[tenant_id] += 1
            return None

    def release(self, key_id: str, tenant_id: str) -> None:
        with self._lock:
            self._keys[key_id] -= 1
            self._tenants[tenant_id] -= 1
            if self._keys[key_id] <= 0:
                del self._keys[key_id]
            if self._tenants[tenant_id] <= 0:
                del self._tenants[tenant_id]


class _RedisCounts:
    """Per-key and per-tenant slots in Redis, shared by every API process; each slot expires by itself."""

    def __init__(self, client: redis.Redis, *, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._script = client.register_script(_ACQUIRE)

    def _names(self, key_id: str, tenant_id: str) -> tuple[str, str]:
        return f"{self._prefix}key:{key_id}", f"{self._prefix}tenant:{tenant_id}"

    def acquire(self, key_id: str, tenant_id: str, bounds: Bounds, token: str, hold_seconds: float) -> str | None:
        ttl_ms = math.ceil((hold_seconds + SLOT_MARGIN_SECONDS) * 1000)
        answer = self._script(keys=list(self._names(key_id, tenant_id)),
                              args=[token, ttl_ms, bounds.per_key, bounds.per_tenant])
        return {0: None, 1: "key", 2: "tenant"}[int(answer)]

    def release(self, key_id: str, tenant_id: str, token: str) -> None:
        key_slots, tenant_slots = self._names(key_id, tenant_id)
        with self._client.pipeline() as pipe:
            pipe.zrem(key_slots, token)
            pipe.zrem(tenant_slots, token)
            pipe.execute()


class LongPolls:
    """The open long-polls of this process, and (through Redis or locally) of each key and tenant."""

    def __init__(self, bounds: Bounds, *, redis_client: redis.Redis | None = None, prefix: str = "") -> None:
        self.bounds = bounds
        self._lock = threading.Lock()
        self._open = 0
        self._local = _LocalCounts()
        self._redis = _RedisCounts(redis_client, prefix=f"{prefix}verdict-longpoll:") if redis_client else None

    @property
    def open_here(self) -> int:
        return self._open

    @contextmanager
    def slot(self, key_id: str, tenant_id: str, wait_seconds: float) -> Iterator[str | None]:
        """Hold a slot for a wait of up to `wait_seconds`: yields None if the request may wait, else which bound
        refused it (`process`, `key` or `tenant`). The slot is given back when the block ends; a refused request
        holds none."""
        token = secrets.token_hex(8)
        refused, shared = self._take(key_id, tenant_id, wait_seconds, token)
        if refused is not None:
            yield refused
            return
        try:
            yield None
        finally:
            self._give_back(shared, key_id, tenant_id, token)
            with self._lock:
                self._open -= 1

    def _take(self, key_id: str, tenant_id: str, wait_seconds: float,
              token: str) -> tuple[str | None, _RedisCounts | None]:
        with self._lock:
            if self._open >= self.bounds.per_process:
                return "process", None
            self._open += 1
        shared = self._redis
        refused: str | None
        if shared is not None:
            try:
                refused = shared.acquire(key_id, tenant_id, self.bounds, token, wait_seconds)
            except redis.RedisError as exc:
                # The process bound still protects the threads; only the shared counts are missing.
                log.warning("long_poll_slots_unavailable", error_type=type(exc).__name__)
                refused, shared = None, None
        else:
            refused = self._local.acquire(key_id, tenant_id, self.bounds)
        if refused is not None:
            with self._lock:
                self._open -= 1
        return refused, shared

    def _give_back(self, shared: _RedisCounts | None, key_id: str, tenant_id: str, token: str) -> None:
        if self._redis is None:
            self._local.release(key_id, tenant_id)
        elif shared is not None:
            try:
                shared.release(key_id, tenant_id, token)
            except redis.RedisError as exc:  # the slot expires by itself
                log.warning("long_poll_slots_unavailable", error_type=type(exc).__name__)


def init_app(app: Flask, settings: Settings, *, server_threads: int | None) -> None:
    bounds = Bounds(per_process=process_bound(settings, server_threads), per_key=settings.long_poll_max_per_key,
                    per_tenant=settings.long_poll_max_per_tenant)
    storage = settings.rate_limit_storage
    client = (redis.Redis.from_url(storage, socket_timeout=2, socket_connect_timeout=2)
              if storage.startswith(("redis://", "rediss://")) else None)
    app.extensions[EXTENSION] = LongPolls(bounds, redis_client=client, prefix=settings.broker_key_prefix)


def current_long_polls() -> LongPolls:
    long_polls: LongPolls = current_app.extensions[EXTENSION]
    return long_polls
