"""app/moderation/circuit.py: the guarded provider asks the provider unguarded when the breaker's shared state is out
of reach (Redis down at the moment the breaker is first built), and builds the breaker again on the next call."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence

import pytest
import redis

from app.config import Settings
from app.moderation.circuit import Breaker, GuardedProvider, shared_breaker
from app.moderation.providers import ModelInfo, ProviderResult, TextScores, TransientProviderError
from tests.conftest import TEST_REDIS_URL


class _Counting:
    name = "counting"
    max_batch = 8

    def __init__(self) -> None:
        self.calls = 0

    def moderate(self, texts: Sequence[str], model: str | None = None) -> ProviderResult:
        self.calls += 1
        return ProviderResult(provider="counting", model="counting-1", results=[TextScores(scores={})] * len(texts),
                              judged=frozenset(), latency_ms=1)

    def models(self) -> list[ModelInfo]:
        return []

    def warm_up(self) -> None:
        return None


def test_a_breaker_that_cannot_reach_redis_does_not_fail_the_call() -> None:
    builds: list[int] = []

    def unreachable() -> Breaker:
        builds.append(1)
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    primary = _Counting()
    guarded = GuardedProvider(primary, breaker=unreachable, fallback=None, reset_seconds=30)  # type: ignore[arg-type]
    assert len(guarded.moderate(["a", "b"]).results) == 2
    assert len(guarded.moderate(["c"]).results) == 1
    assert primary.calls == 2 and len(builds) == 2  # asked each time, and the breaker tried again each time


class _Meeting(_Counting):
    """Answers only once `parties` calls are inside it at the same time."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=10)

    def moderate(self, texts: Sequence[str], model: str | None = None) -> ProviderResult:
        self.barrier.wait()  # BrokenBarrierError if the other call cannot get in meanwhile
        return super().moderate(texts, model)


def test_threads_of_one_process_call_the_provider_side_by_side() -> None:
    # pybreaker holds its breaker's lock for the whole call: with one breaker shared by the API's request threads,
    # the second call would wait for the first, which waits for the second.
    settings = Settings(_env_file=None, broker_url="sqla+sqlite:///:memory:")  # type: ignore[call-arg]
    assert settings.shared_redis_url is None
    primary = _Meeting(parties=2)
    guarded = GuardedProvider(primary, breaker=shared_breaker(settings, "test"), fallback=None, reset_seconds=30)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            guarded.moderate(["a"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and primary.calls == 2
    # One state for the process, whichever thread's breaker is asked.
    assert guarded.breaker().storage is shared_breaker_storage(guarded)


def shared_breaker_storage(guarded: GuardedProvider) -> object:
    seen: list[object] = []
    thread = threading.Thread(target=lambda: seen.append(guarded.breaker().storage))
    thread.start()
    thread.join()
    return seen[0]


class _Failing(_Counting):
    def moderate(self, texts: Sequence[str], model: str | None = None) -> ProviderResult:
        raise TransientProviderError("upstream_error", "down")


def test_the_shared_state_counts_failures_and_a_success_clears_them_in_one_round_trip_per_call() -> None:
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    settings = Settings(_env_file=None, broker_url=TEST_REDIS_URL, circuit_failure_threshold=3)  # type: ignore[call-arg]
    client = redis.Redis.from_url(TEST_REDIS_URL)
    failing = GuardedProvider(_Failing(), breaker=shared_breaker(settings, namespace), fallback=None,
                              reset_seconds=30)
    working = GuardedProvider(_Counting(), breaker=shared_breaker(settings, namespace), fallback=None,
                              reset_seconds=30)
    counter = f"{namespace}:pybreaker:fail_counter"
    sent: list[object] = []
    original = redis.Redis.execute_command

    def counting(self: redis.Redis, *args: object, **options: object) -> object:
        sent.append(args[0])
        return original(self, *args, **options)

    try:
        working.moderate(["a"])
        for _ in range(2):
            with pytest.raises(TransientProviderError):
                failing.moderate(["a"])
        assert client.get(counter) == b"2"  # counted in Redis, where every process sees them
        working.moderate(["a"])
        assert client.get(counter) == b"0"  # a success clears the failures counted before it
        redis.Redis.execute_command = counting  # type: ignore[method-assign]
        working.moderate(["a"])
        redis.Redis.execute_command = original  # type: ignore[method-assign]
        assert sent == ["MGET"]  # nothing counted: the state read is the call's one round trip
        for _ in range(3):
            with pytest.raises(TransientProviderError):
                failing.moderate(["a"])
        assert working.circuit_state() == "open"  # failures counted across breakers open the shared circuit
    finally:
        redis.Redis.execute_command = original  # type: ignore[method-assign]
        client.delete(*client.keys(f"{namespace}:*"))
        client.close()
