"""The rules behind the rate limits: where the windows live, which limits are in force, how tokens are counted."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.api.rate_limits import Quota, quota_for
from app.config import Settings
from app.moderation.tokens import estimate_tokens


def settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(_env_file=None, var_dir=tmp_path, **values)  # type: ignore[call-arg]


def test_windows_live_in_redis_when_the_broker_is_redis(tmp_path: Path) -> None:
    assert settings(tmp_path, broker_url="redis://r:6379/0").rate_limit_storage == "redis://r:6379/0"
    assert settings(tmp_path).rate_limit_storage == "memory://"  # the embedded default: one process
    explicit = settings(tmp_path, broker_url="redis://r:6379/0", rate_limit_storage_url="redis://other:6379/3")
    assert explicit.rate_limit_storage == "redis://other:6379/3"


def test_the_key_or_tenant_limit_wins_over_the_deployments(tmp_path: Path) -> None:
    deployment = settings(tmp_path, rate_limit_rpm=600, rate_limit_tpm=1000)
    assert quota_for(None, None, deployment) == Quota(rpm=600, tpm=1000)
    assert quota_for(5, None, deployment) == Quota(rpm=5, tpm=1000)
    assert quota_for(None, 7, deployment) == Quota(rpm=600, tpm=7)


@pytest.mark.parametrize(("texts", "tokens"), [
    (["a"], 1), (["abcd"], 1), (["abcde"], 2), (["x" * 400], 100), (["", "ab"], 2), (["abcd", "abcd", "a"], 3),
])
def test_tokens_are_a_quarter_of_the_characters_at_least_one_per_text(texts: list[str], tokens: int) -> None:
    assert estimate_tokens(texts) == tokens


@pytest.mark.parametrize("name", ["rate_limit_rpm", "rate_limit_tpm", "idempotency_ttl_seconds"])
def test_limits_must_be_positive(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValidationError):
        settings(tmp_path, **{name: 0})
