"""Builds the configured moderation provider, once per process."""

from __future__ import annotations

import redis
import structlog

from app.config import Settings
from app.moderation.cascade import CascadeProvider
from app.moderation.circuit import GuardedProvider, shared_breaker
from app.moderation.local_engine import LocalEngine
from app.moderation.openai_compat import OpenAICompatibleProvider
from app.moderation.providers import ModerationProvider
from app.moderation.upstream_budget import WINDOW_MARGIN_SECONDS, SharedRateLimiter, limiter_key

log = structlog.get_logger(__name__)


def build_provider(settings: Settings) -> ModerationProvider:
    # One engine per process, whatever role it plays (provider, cascade's first stage, fallback): one model in memory.
    local = LocalEngine()
    if settings.moderation_provider == "openai":
        return build_upstream(settings, local)
    if settings.moderation_provider == "cascade":
        return CascadeProvider(local, build_upstream(settings, local), band_low=settings.cascade_band_low,
                               band_high=settings.cascade_band_high)
    return local


def build_upstream(settings: Settings, local: LocalEngine) -> GuardedProvider:
    key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    primary = OpenAICompatibleProvider(
        base_url=settings.upstream_base_url,
        api_key=key,
        model=settings.upstream_model,
        path=settings.upstream_path,
        timeout=settings.upstream_timeout_seconds,
        max_batch=settings.upstream_batch_size,
        limiter=build_rate_limiter(settings, key),
        capacity_wait=settings.upstream_capacity_wait,
    )
    namespace = limiter_key(settings.broker_key_prefix, settings.upstream_base_url, settings.upstream_path, key or "")
    return GuardedProvider(primary, breaker=shared_breaker(settings, namespace),
                           fallback=local if settings.moderation_fallback_provider == "local" else None,
                           reset_seconds=settings.circuit_reset_seconds)


def build_rate_limiter(settings: Settings, api_key: str | None) -> SharedRateLimiter | None:
    url = settings.shared_redis_url
    if url is None:
        log.warning("upstream_rate_limit_not_shared", reason="no Redis configured (REDIS_URL or a Redis BROKER_URL)")
        return None
    # The connection is opened on first use, so a forked worker process never shares its parent's socket.
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    return SharedRateLimiter(
        client,
        limiter_key(settings.broker_key_prefix, settings.upstream_base_url, settings.upstream_path, api_key or ""),
        requests_per_minute=settings.upstream_rpm,
        tokens_per_minute=settings.upstream_tpm,
        window_seconds=settings.upstream_rate_window_seconds + WINDOW_MARGIN_SECONDS,
    )
