"""app/moderation/circuit.py: the guarded provider asks the provider unguarded when the breaker's shared state is out
of reach (Redis down at the moment the breaker is first built), and builds the breaker again on the next call."""

from __future__ import annotations

from collections.abc import Sequence

import redis

from app.moderation.circuit import Breaker, GuardedProvider
from app.moderation.providers import ModelInfo, ProviderResult, TextScores


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
