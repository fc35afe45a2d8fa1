"""The per-key windows themselves (`app.api.rate_limits.RateLimiter`), in Redis and in memory: a charge is taken only
if it fits, one call takes several charges in one Redis round trip, the window slides over a minute and empties after
two, concurrent clients (and two API processes' limiters) never get more than the limit between them."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.connection

from app.api.rate_limits import PERIOD_SECONDS, Charge, RateLimiter
from tests.conftest import TEST_REDIS_URL

MINUTE_START = 1_800_000_000.0 - 1_800_000_000.0 % PERIOD_SECONDS  # a moment a minute starts


class Clock:
    def __init__(self) -> None:
        self.now = MINUTE_START

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
        return
    yield TEST_REDIS_URL


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"test-limiter-{uuid.uuid4().hex[:8]}:"
    yield name
    client = redis.Redis.from_url(TEST_REDIS_URL)
    keys = list(client.scan_iter(match=f"{name}*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_a_charge_is_taken_only_while_it_fits(store: str, prefix: str) -> None:
    limiter = RateLimiter(store, key_prefix=prefix, clock=Clock())
    standings = [limiter.hit(Charge("rpm", "key_a", 3, 1))[0] for _ in range(4)]
    assert [s.allowed for s in standings] == [True, True, True, False]
    assert [s.remaining for s in standings] == [2, 1, 0, 0]
    assert standings[0].retry_in == 0 and 0 < standings[3].retry_in <= 2 * PERIOD_SECONDS
    # Another key, and another window of the same key, count apart.
    assert limiter.hit(Charge("rpm", "key_b", 3, 1))[0].remaining == 2
    tokens = limiter.hit(Charge("tpm", "key_a", 100, 60))[0]
    assert tokens.allowed and tokens.remaining == 40
    # What does not fit takes nothing; a look (cost 0) takes nothing either.
    refused, looked = limiter.hit(Charge("tpm", "key_a", 100, 41), Charge("tpm", "key_a", 100, 0))
    assert not refused.allowed and refused.remaining == 40 and looked.remaining == 40
    assert limiter.hit(Charge("tpm", "key_a", 100, 40))[0].allowed


def test_chained_charges_stop_taking_at_the_first_refused(store: str, prefix: str) -> None:
    limiter = RateLimiter(store, key_prefix=prefix, clock=Clock())
    # The request fits, so its tokens are taken too.
    requests, tokens = limiter.hit(Charge("rpm", "key_a", 1, 1), Charge("tpm", "key_a", 100, 30), chained=True)
    assert requests.allowed and tokens.allowed and (requests.remaining, tokens.remaining) == (0, 70)
    # The request does not fit: its tokens are only looked at, nothing is taken.
    requests, tokens = limiter.hit(Charge("rpm", "key_a", 1, 1), Charge("tpm", "key_a", 100, 30), chained=True)
    assert not requests.allowed and tokens.remaining == 70
    assert limiter.hit(Charge("tpm", "key_a", 100, 0))[0].remaining == 70
    # Unchained, each is taken on its own (a refused first charge does not stop the second).
    requests, tokens = limiter.hit(Charge("rpm", "key_a", 1, 1), Charge("tpm", "key_a", 100, 30))
    assert not requests.allowed and tokens.allowed and tokens.remaining == 40


def test_one_call_is_one_round_trip(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    limiter = RateLimiter(TEST_REDIS_URL, key_prefix=prefix, clock=Clock())
    limiter.hit(Charge("rpm", "key_a", 10, 1))  # the script is loaded on first use
    sent: list[object] = []
    original: Any = redis.connection.AbstractConnection.send_packed_command

    def counting(self: redis.connection.AbstractConnection, command: object, check_health: bool = True) -> None:
        sent.append(command)
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    requests, tokens = limiter.hit(Charge("rpm", "key_a", 10, 1), Charge("tpm", "key_a", 100, 0))
    assert len(sent) == 1
    assert (requests.remaining, tokens.remaining) == (8, 100)


def test_the_window_slides_over_a_minute_and_empties_after_two(store: str, prefix: str) -> None:
    clock = Clock()
    limiter = RateLimiter(store, key_prefix=prefix, clock=clock)
    charge = Charge("rpm", "key_a", 4, 1)
    assert all(limiter.hit(charge)[0].allowed for _ in range(4))
    clock.now = MINUTE_START + PERIOD_SECONDS - 1
    assert not limiter.hit(charge)[0].allowed  # the same minute
    clock.now = MINUTE_START + PERIOD_SECONDS
    refused = limiter.hit(charge)[0]
    assert not refused.allowed  # the previous minute still counts whole at the next one's start
    assert 0 < refused.retry_in <= PERIOD_SECONDS / 4 + 1  # a quarter of it has slid out a quarter minute later
    clock.now = MINUTE_START + PERIOD_SECONDS * 1.5  # half of the previous minute is still in the window
    assert [limiter.hit(charge)[0].allowed for _ in range(3)] == [True, True, False]
    clock.now = MINUTE_START + PERIOD_SECONDS * 3  # nothing taken in the last two minutes
    assert limiter.hit(charge)[0].remaining == 3


def test_concurrent_clients_never_get_more_than_the_limit(store: str, prefix: str) -> None:
    clock = Clock()
    # Redis: two limiters, as two API processes have; memory: one process's threads share one.
    limiters = [RateLimiter(store, key_prefix=prefix, clock=clock) for _ in range(2 if store != "memory://" else 1)]
    allowed: list[bool] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        limiter = limiters[number % len(limiters)]
        for _ in range(20):
            standing = limiter.hit(Charge("rpm", "key_a", 50, 1))[0]
            with lock:
                allowed.append(standing.allowed)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(allowed) == 160 and allowed.count(True) == 50


def test_a_charge_larger_than_the_limit_never_fits(store: str, prefix: str) -> None:
    limiter = RateLimiter(store, key_prefix=prefix, clock=Clock())
    standing = limiter.hit(Charge("tpm", "key_a", 10, 11))[0]
    assert not standing.allowed and standing.remaining == 10 and standing.retry_in == PERIOD_SECONDS
