"""The verdict cache (`app.moderation.cache`) against the real Redis: scoped keys, a TTL, and no text stored."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from app.moderation.cache import CacheScope, VerdictCache
from app.moderation.providers import TextScores
from tests.conftest import TEST_REDIS_URL


@pytest.fixture
def cache() -> Iterator[tuple[VerdictCache, redis.Redis, str]]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    prefix = f"test-cache-{uuid.uuid4().hex[:8]}:"
    yield VerdictCache(client, prefix=prefix, ttl_seconds=120), client, prefix
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


SCOPE = CacheScope(tenant_id="ten_a", provider="openai", model=None, policy_name="default", policy_version=1)


def test_hit_only_when_every_text_is_cached_in_the_same_scope(cache: tuple[VerdictCache, redis.Redis, str]) -> None:
    verdicts, client, prefix = cache
    secret = f"a private text {uuid.uuid4().hex}"
    verdicts.put(SCOPE, "openai", "omni-1", [(secret, TextScores(scores={"hate": 0.7}, provider_flagged=True))])

    (hit,) = verdicts.get_all(SCOPE, [secret]) or []
    assert (hit.provider, hit.model, hit.scores.scores, hit.scores.provider_flagged) == (
        "openai", "omni-1", {"hate": 0.7}, True)
    assert verdicts.get_all(SCOPE, [secret, "not cached"]) is None
    for other in (CacheScope("ten_b", "openai", None, "default", 1), CacheScope("ten_a", "openai", "m2", "default", 1),
                  CacheScope("ten_a", "openai", None, "default", 2), CacheScope("ten_a", "local", None, "default", 1)):
        assert verdicts.get_all(other, [secret]) is None, other

    (key,) = list(client.scan_iter(match=f"{prefix}*"))
    assert 0 < client.ttl(key) <= 120
    assert secret.encode() not in key and secret.encode() not in (client.get(key) or b"")


def test_an_unreachable_cache_is_a_miss_not_an_error() -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    verdicts = VerdictCache(client, prefix="x:", ttl_seconds=10)
    verdicts.put(SCOPE, "openai", "m", [("text", TextScores(scores={}))])
    assert verdicts.get_all(SCOPE, ["text"]) is None
