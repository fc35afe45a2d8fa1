"""Builds the configured moderation provider, once per process."""

from __future__ import annotations

from app.config import Settings
from app.moderation.local_engine import LocalEngine
from app.moderation.openai_compat import OpenAICompatibleProvider
from app.moderation.providers import ModerationProvider


def build_provider(settings: Settings) -> ModerationProvider:
    if settings.moderation_provider == "openai":
        key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        return OpenAICompatibleProvider(
            base_url=settings.upstream_base_url,
            api_key=key,
            model=settings.upstream_model,
            path=settings.upstream_path,
            timeout=settings.upstream_timeout_seconds,
        )
    return LocalEngine()
