"""The shared upstream rate limit (`app.moderation.upstream_budget`) against the real Redis, and the OpenAI-compatible
provider using it against the fake upstream.

What must hold: limiters with the same key share one budget (and others do not); a call that does not fit waits or
is told how long until it would; requests are spaced over the window; tokens count with their estimate and then
with what the provider said they cost; the provider's headers lower the limit and add usage we did not see; a
Retry-After pauses everyone; and a provider limited by its headers alone is never called into a 429.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from app.moderation.openai_compat import OpenAICompatibleProvider
from app.moderation.providers import PermanentProviderError, TransientProviderError
from app.moderation.tokens import estimate_tokens
from app.moderation.upstream_budget import (
    BudgetState,
    NoCapacity,
    OverTokenLimit,
    ProviderLimits,
    SharedRateLimiter,
    limiter_key,
    parse_duration,
)
from tests.conftest import TEST_REDIS_URL
from tests.fake_upstream import FakeUpstream
from tests.lanes import integration_fixture

WINDOW = 61.0


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(TEST_REDIS_URL)
    yield connection
    connection.close()


@pytest.fixture
def key(client: redis.Redis) -> Iterator[str]:
    name = limiter_key(f"test-{uuid.uuid4().hex[:8]}:", "http://upstream", "/moderations", "sk")
    yield name
    client.delete(f"{name}:log", f"{name}:weights", f"{name}:state")


def limiter(client: redis.Redis, key: str, *, rpm: int | None = None, tpm: int | None = None,
            window: float = WINDOW, sleeps: list[float] | None = None) -> SharedRateLimiter:
    def sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)
        import time

        time.sleep(seconds)

    return SharedRateLimiter(client, key, requests_per_minute=rpm, tokens_per_minute=tpm, window_seconds=window,
                             sleep=sleep)


def test_limiters_with_one_key_share_one_budget(client: redis.Redis, key: str) -> None:
    other_host = redis.Redis.from_url(TEST_REDIS_URL)  # another connection, as another worker would have
    try:
        first = limiter(client, key, rpm=60)
        second = SharedRateLimiter(other_host, key, requests_per_minute=60, tokens_per_minute=None,
                                   window_seconds=WINDOW)
        first.acquire(10, max_wait=0)
        with pytest.raises(NoCapacity) as caught:
            second.acquire(10, max_wait=0)
        # One request every window/RPM seconds: the next slot is about a second away, never more.
        assert 0 < caught.value.wait <= WINDOW / 60
        # A different provider key has its own budget.
        unrelated = limiter(client, key + "-other", rpm=60)
        unrelated.acquire(10, max_wait=0)
    finally:
        client.delete(f"{key}-other:log", f"{key}-other:weights", f"{key}-other:state")
        other_host.close()


def test_a_call_waits_for_its_slot_instead_of_failing(client: redis.Redis, key: str) -> None:
    sleeps: list[float] = []
    limit = limiter(client, key, rpm=4, window=1.0, sleeps=sleeps)  # a slot every 0.25 s
    limit.acquire(1, max_wait=0)
    limit.acquire(1, max_wait=5)
    assert sleeps and all(0 < s <= 0.25 + 0.01 for s in sleeps)


def test_the_window_holds_no_more_requests_than_the_limit(client: redis.Redis, key: str) -> None:
    limit = limiter(client, key, rpm=3)
    # The provider already counts two calls we never made (another client on the key): they fill the window.
    limit.learn({"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "1"})
    limit.acquire(1, max_wait=0)
    with pytest.raises(NoCapacity) as caught:
        limit.acquire(1, max_wait=0)
    # Not the spacing (20 s) but the window: only when the oldest call leaves it, about a minute from now.
    assert caught.value.wait > WINDOW / 3


def test_headers_lower_the_configured_limit(client: redis.Redis, key: str) -> None:
    limit = limiter(client, key, rpm=600)  # a slot every 0.1 s as configured
    limit.learn({"X-RateLimit-Limit-Requests": "2", "X-RateLimit-Remaining-Requests": "2"})
    limit.acquire(1, max_wait=0)
    with pytest.raises(NoCapacity) as caught:
        limit.acquire(1, max_wait=0)
    assert caught.value.wait > 1  # spaced for 2 per window: about 30 s


def test_tokens_are_counted_and_corrected_from_usage(client: redis.Redis, key: str) -> None:
    limit = limiter(client, key, tpm=100)
    with pytest.raises(OverTokenLimit):
        limit.acquire(101, max_wait=0)
    permit = limit.acquire(10, max_wait=0)
    limit.settle(permit, 95)  # the provider said the call cost 95 tokens, not the 10 estimated
    with pytest.raises(NoCapacity) as caught:
        limit.acquire(10, max_wait=0)
    # 95 of 100 tokens are in the window: the next 10 fit only when that call leaves it (spacing alone, with the
    # estimate, would have said 10 * 61 / 100 = 6.1 s).
    assert caught.value.wait > WINDOW * 0.9


def test_pause_stops_every_worker(client: redis.Redis, key: str) -> None:
    limit = limiter(client, key, rpm=6000)
    limit.pause(7)
    with pytest.raises(NoCapacity) as caught:
        limiter(client, key, rpm=6000).acquire(1, max_wait=0)
    assert 1 < caught.value.wait <= 7  # what is left of the pause (however slow this machine is between calls)


def test_exhausted_remaining_with_a_reset_pauses(client: redis.Redis, key: str) -> None:
    limit = limiter(client, key)
    limit.learn({"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "0",
                 "x-ratelimit-reset-tokens": "6m0s"})
    with pytest.raises(NoCapacity) as caught:
        limit.acquire(1, max_wait=0)
    assert caught.value.wait > 300


def test_header_parsing() -> None:
    assert ProviderLimits.from_headers({}).empty
    parsed = ProviderLimits.from_headers({"X-RateLimit-Limit-Requests": "60", "x-ratelimit-remaining-requests": "x",
                                          "x-ratelimit-reset-requests": "1m30.5s"})
    assert (parsed.limit_requests, parsed.remaining_requests, parsed.reset_requests) == (60, None, 90.5)
    assert [parse_duration(v) for v in ("20ms", "2", "1h", "soon", None)] == [0.02, 2.0, 3600.0, None, None]
    assert estimate_tokens(["abcd", "abcde", ""]) == 1 + 2 + 1


# ---- the provider with the limiter, against the fake upstream --------------------------------------------------


@integration_fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(rpm=2) as server:
        yield server


def test_provider_learns_the_limit_and_waits_instead_of_being_refused(
    client: redis.Redis, key: str, upstream: FakeUpstream
) -> None:
    # No limit configured at all: the provider's headers are all the limiter knows.
    provider = OpenAICompatibleProvider(base_url=upstream.base_url, api_key=None, model="m",
                                        limiter=limiter(client, key), capacity_wait=0.5)
    try:
        provider.moderate(["one"])
        provider.moderate(["two"])  # the provider allows two a minute, and said so
        with pytest.raises(TransientProviderError) as caught:
            provider.moderate(["three"])
    finally:
        provider.close()
    assert caught.value.code == "upstream_capacity_wait"
    assert caught.value.retry_after is not None and caught.value.retry_after > 0.5
    assert len(upstream.requests) == 2 and upstream.rejected_429 == 0


def test_provider_429_pauses_the_shared_limit(client: redis.Redis, key: str, upstream: FakeUpstream) -> None:
    upstream.rpm = None
    upstream.fail_next(429, retry_after=9)
    provider = OpenAICompatibleProvider(base_url=upstream.base_url, api_key=None, model="m",
                                        limiter=limiter(client, key), capacity_wait=0)
    try:
        with pytest.raises(TransientProviderError) as first:
            provider.moderate(["one"])
        assert first.value.code == "upstream_rate_limited" and first.value.retry_after == 9
        with pytest.raises(NoCapacity) as caught:
            limiter(client, key).acquire(1, max_wait=0)  # any other worker on the same key
    finally:
        provider.close()
    assert 1 < caught.value.wait <= 9
    assert len(upstream.requests) == 1


def test_provider_refuses_a_call_over_the_token_limit(client: redis.Redis, key: str, upstream: FakeUpstream) -> None:
    provider = OpenAICompatibleProvider(base_url=upstream.base_url, api_key=None, model="m",
                                        limiter=limiter(client, key, tpm=5), capacity_wait=0)
    try:
        with pytest.raises(PermanentProviderError) as caught:
            provider.moderate(["a text well over five tokens long"])
    finally:
        provider.close()
    assert caught.value.code == "upstream_token_limit"
    assert upstream.requests == []


def test_the_budget_state_shows_the_limits_and_the_window_use(client: redis.Redis, key: str) -> None:
    budget = limiter(client, key, rpm=60, tpm=1000)
    assert budget.state() == BudgetState(requests_limit=60, requests_used=0, tokens_limit=1000, tokens_used=0)
    budget.acquire(120, max_wait=0)
    state = budget.state()
    assert (state.requests_left, state.tokens_left) == (59, 880)
    # The provider's headers tighten the limit in force, and the state says so.
    budget.learn({"x-ratelimit-limit-requests": "30", "x-ratelimit-remaining-requests": "29"})
    assert budget.state().requests_limit == 30
    unlimited = limiter(client, key + "-unlimited")
    assert unlimited.state().requests_left is None and unlimited.state().tokens_limit is None


def test_the_window_totals_follow_calls_in_and_out_of_the_window(client: redis.Redis, key: str) -> None:
    # The script keeps what the window holds as running totals (a call costs the same however full the window is):
    # they count each call and each correction, drop what leaves the window, and are rebuilt from the log if missing.
    import time

    budget = limiter(client, key, window=0.5)
    first = budget.acquire(10, max_wait=0)
    budget.acquire(5, max_wait=0)
    budget.settle(first, 30)
    budget.learn({"x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "97",
                  "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "955"})
    # Two calls of ours (30 + 5 tokens) and one the provider counted that we did not make (10 tokens).
    assert budget.state() == BudgetState(requests_limit=100, requests_used=3, tokens_limit=1000, tokens_used=45)
    client.hdel(f"{key}:weights", "#r", "#t")  # a log written before the totals were kept
    assert (budget.state().requests_used, budget.state().tokens_used) == (3, 45)
    time.sleep(0.3)
    budget.acquire(7, max_wait=0)
    time.sleep(0.3)  # the first three have left the window, the last is still in it
    assert (budget.state().requests_used, budget.state().tokens_used) == (1, 7)
    time.sleep(0.5)
    assert (budget.state().requests_used, budget.state().tokens_used) == (0, 0)
    assert client.exists(f"{key}:weights") == 0  # an empty window keeps nothing
