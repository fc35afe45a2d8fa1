"""The retry policy (`app.moderation.backoff`): Retry-After honoured, exponential backoff with jitter, always capped."""

from __future__ import annotations

import pytest

from app.moderation.backoff import retry_delay, sync_retrying
from app.moderation.providers import PermanentProviderError, TransientProviderError


def test_retry_after_is_honoured_and_capped() -> None:
    limited = TransientProviderError("upstream_rate_limited", "429", retry_after=7)
    assert retry_delay(1, limited, cap=300) == 7
    assert retry_delay(1, TransientProviderError("upstream_rate_limited", "429", retry_after=900), cap=300) == 300


def test_backoff_grows_with_jitter_and_never_passes_the_cap() -> None:
    error = TransientProviderError("upstream_error", "503")
    for attempt in range(1, 12):
        delays = {retry_delay(attempt, error, cap=60) for _ in range(50)}
        assert all(0 <= d <= min(60, 2 ** attempt) for d in delays), (attempt, delays)
        assert len(delays) > 1  # jittered, not one fixed value
    # By the 8th attempt the exponential part is past the cap: the waits spread over the whole capped range.
    assert max(retry_delay(8, error, cap=60) for _ in range(200)) > 30


def test_sync_retrying_retries_transient_errors_only() -> None:
    calls: list[str] = []

    def flaky() -> str:
        calls.append("call")
        if len(calls) < 3:
            raise TransientProviderError("upstream_error", "503", retry_after=0)
        return "answer"

    assert sync_retrying(attempts=3, budget_seconds=5, cap=0.01)(flaky) == "answer"
    assert len(calls) == 3

    def refused() -> str:
        calls.append("refused")
        raise PermanentProviderError("upstream_refused", "400")

    with pytest.raises(PermanentProviderError):
        sync_retrying(attempts=3, budget_seconds=5, cap=0.01)(refused)
    assert calls.count("refused") == 1
