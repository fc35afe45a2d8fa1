"""The verdict cache: a provider's scores per text, keyed by a hash of tenant, provider, model, policy and text (never
the text), in Redis for CACHE_TTL_SECONDS; unreachable means skipped. See docs/moderation.md."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis
import structlog

from app.config import Settings
from app.moderation.providers import ProviderResult, TextScores

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CachedScores:
    provider: str
    model: str
    scores: TextScores


@dataclass(frozen=True)
class CacheScope:
    """What a cached answer is valid for besides the text itself."""

    tenant_id: str
    provider: str
    model: str | None
    policy_name: str
    policy_version: int
    # The term lists the policy uses, with their versions: a list change is a new key (docs/moderation.md).
    lists_version: str = ""


class VerdictCache:
    def __init__(self, client: redis.Redis, *, prefix: str, ttl_seconds: int) -> None:
        self._client = client
        self._prefix = f"{prefix}verdict:cache:"
        self._ttl = ttl_seconds

    def _key(self, scope: CacheScope, text: str) -> str:
        parts = [scope.tenant_id, scope.provider, scope.model or "", scope.policy_name, str(scope.policy_version),
                 *([scope.lists_version] if scope.lists_version else []), text]
        return self._prefix + hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def get_all(self, scope: CacheScope, texts: Sequence[str]) -> list[CachedScores] | None:
        """The cached answer of every one of `texts`, or None unless all of them are cached."""
        try:
            # redis-py types a sync client's answers as "Awaitable | Any" in some releases: it is a list here.
            raw = cast(list[bytes | None], self._client.mget([self._key(scope, text) for text in texts]))
        except redis.RedisError as exc:
            log.warning("cache_unavailable", error_type=type(exc).__name__)
            return None
        found: list[CachedScores] = []
        for value in raw:
            if value is None:
                return None
            entry = json.loads(value)
            found.append(CachedScores(provider=entry["provider"], model=entry["model"],
                                      scores=TextScores(scores=entry["scores"], provider_flagged=entry["flagged"],
                                                        decided_by=entry.get("decided_by"))))
        return found

    def answer(self, scope: CacheScope, texts: Sequence[str]) -> ProviderResult | None:
        """The provider's answer for all of `texts` from the cache (a call that took no time), or None unless every
        one of them is cached: what the worker's batches and the synchronous endpoint both ask first."""
        cached = self.get_all(scope, texts)
        if cached is None:
            return None
        results = [hit.scores for hit in cached]
        return ProviderResult(provider=cached[0].provider, model=cached[0].model, results=results,
                              judged=frozenset().union(*(r.scores for r in results)), latency_ms=0)

    def put(self, scope: CacheScope, provider: str, model: str, answers: Sequence[tuple[str, TextScores]]) -> None:
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for text, scores in answers:
                    entry = {"provider": provider, "model": model, "scores": scores.scores,
                             "flagged": scores.provider_flagged, "decided_by": scores.decided_by}
                    pipe.set(self._key(scope, text), json.dumps(entry), ex=self._ttl)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("cache_unavailable", error_type=type(exc).__name__)


def build_cache(settings: Settings) -> VerdictCache | None:
    url = settings.shared_redis_url
    if url is None or settings.cache_ttl_seconds == 0:
        return None
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    return VerdictCache(client, prefix=settings.broker_key_prefix, ttl_seconds=settings.cache_ttl_seconds)
