"""How long to wait before asking a provider again (tenacity's strategies): `Retry-After` honoured, else exponential
backoff with full jitter, capped below the broker's visibility timeout. See docs/moderation.md."""

from __future__ import annotations

from collections.abc import Callable

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from app.moderation.providers import ProviderError


class wait_retry_after(wait_base):  # noqa: N801 - named like tenacity's own strategies
    """The provider's `Retry-After` when it sent one (capped), else `fallback`."""

    def __init__(self, fallback: wait_base, cap: float) -> None:
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        if isinstance(error, ProviderError) and error.retry_after is not None:
            return min(self.cap, error.retry_after)
        return min(self.cap, self.fallback(retry_state))


def provider_wait(cap: float) -> wait_base:
    return wait_retry_after(wait_random_exponential(multiplier=1, max=cap), cap)


def retry_delay(attempt: int, error: ProviderError, cap: float) -> float:
    """The countdown before queued work that failed its `attempt`-th try is tried again."""
    state = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    state.set_exception((type(error), error, error.__traceback__))
    return float(provider_wait(cap)(state))


def _transient(error: BaseException) -> bool:
    return isinstance(error, ProviderError) and error.transient


def sync_retrying(*, attempts: int, budget_seconds: float, cap: float,
                  before_sleep: Callable[[RetryCallState], None] | None = None) -> Retrying:
    """In-place retries for a caller that waits for the answer: transient errors only, within `budget_seconds`;
    `before_sleep` is told of each retry before its wait."""
    return Retrying(
        retry=retry_if_exception(_transient),
        stop=stop_after_attempt(attempts) | stop_before_delay(budget_seconds),
        wait=provider_wait(cap),
        before_sleep=before_sleep,
        reraise=True,
    )
