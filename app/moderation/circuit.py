"""The circuit breaker around the upstream provider (pybreaker, its state shared in Redis) and the fallback that
answers while it is open. See docs/moderation.md."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import pybreaker
import redis
import structlog

from app import metrics
from app.config import Settings
from app.moderation.providers import (
    ModelInfo,
    ModerationProvider,
    ProviderError,
    ProviderResult,
    TransientProviderError,
)

log = structlog.get_logger(__name__)

# Transient, but the provider is up: it is busy (429), or we are waiting for our own limit.
NOT_OUTAGES = frozenset({"upstream_rate_limited", "upstream_capacity_wait", "rate_limiter_unavailable"})


def _not_an_outage(error: BaseException) -> bool:
    return isinstance(error, ProviderError) and (not error.transient or error.code in NOT_OUTAGES)


class _LogTransitions(pybreaker.CircuitBreakerListener):
    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: pybreaker.CircuitBreakerState | None,
                     new_state: pybreaker.CircuitBreakerState) -> None:
        log.warning("upstream_circuit", name=cb.name, old=old_state.name if old_state else None,
                    new=new_state.name)
        metrics.CIRCUIT_TRANSITIONS.labels(str(new_state.name)).inc()


class GuardedProvider:
    """The primary provider behind the shared circuit breaker, with the fallback for when the circuit is open."""

    def __init__(self, primary: ModerationProvider, *, breaker: Callable[[], Breaker],
                 fallback: ModerationProvider | None, reset_seconds: float) -> None:
        self.primary = primary
        self.fallback = fallback
        self.name = primary.name
        self.max_batch = primary.max_batch if fallback is None else min(primary.max_batch, fallback.max_batch)
        self._make_breaker = breaker
        # One breaker object per thread over the one shared state: pybreaker holds its breaker's lock for the whole
        # call, so an API process's request threads sharing one would wait in line for each other's upstream calls.
        self._local = threading.local()
        self._reset_seconds = reset_seconds

    def breaker(self) -> Breaker:
        made: Breaker | None = getattr(self._local, "breaker", None)
        if made is None:
            made = self._local.breaker = self._make_breaker()
        return made

    def warm_up(self) -> None:
        self.primary.warm_up()
        if self.fallback is not None:
            self.fallback.warm_up()

    def models(self) -> list[ModelInfo]:
        return self.primary.models() + (self.fallback.models() if self.fallback is not None else [])

    def circuit_state(self) -> str:
        """`closed`, `open` or `half-open`: the shared state (in Redis), or this process's own without Redis."""
        return str(self.breaker().storage.state)

    def moderate(self, texts: Sequence[str], model: str | None = None) -> ProviderResult:
        try:
            breaker = self.breaker()
        except redis.RedisError as exc:
            # The breaker's shared state is out of reach (Redis is down or restarting; issue 11 item 4): ask the
            # provider unguarded, like the rate limits do, rather than fail the task. The next call builds it again.
            log.warning("circuit_unavailable", error_type=type(exc).__name__)
            unguarded: ProviderResult = self.primary.moderate(texts, model)
            return unguarded
        try:
            result: ProviderResult = breaker.circuit.call(self.primary.moderate, texts, model)
            return result
        except pybreaker.CircuitBreakerError as exc:
            if self.fallback is None:
                raise TransientProviderError("upstream_circuit_open", "the moderation provider is failing; its "
                                             "circuit is open", retry_after=self._cooldown_left()) from exc
            return degrade(self.fallback.moderate(texts, None))

    def _cooldown_left(self) -> float:
        opened_at = self.breaker().storage.opened_at
        if opened_at is None:
            return self._reset_seconds
        elapsed = (datetime.now(UTC) - opened_at.astimezone(UTC)).total_seconds()
        return max(1.0, self._reset_seconds - elapsed)


def guarded_upstream(provider: ModerationProvider) -> GuardedProvider | None:
    """The upstream behind its circuit breaker in the configured provider (itself, or a cascade's second stage);
    None when the provider is the local engine alone."""
    if isinstance(provider, GuardedProvider):
        return provider
    upstream = getattr(provider, "upstream", None)
    return upstream if isinstance(upstream, GuardedProvider) else None


def fallback_of(provider: ModerationProvider) -> ModerationProvider | None:
    """The provider that answers when `provider`'s upstream stayed unavailable through its retries, if any."""
    return provider.fallback if isinstance(provider, GuardedProvider) else None


def degrade(result: ProviderResult) -> ProviderResult:
    """A fallback's answer: kept, and marked as decided without the primary provider."""
    return dataclasses.replace(result, degraded=True)


@dataclasses.dataclass(frozen=True)
class Breaker:
    circuit: pybreaker.CircuitBreaker
    storage: pybreaker.CircuitBreakerStorage  # where the state lives (Redis), read for the cool-down left


class SharedCircuitStorage(pybreaker.CircuitRedisStorage):
    """pybreaker's Redis storage with one round trip per successful call instead of two: the state is read with the
    failure count (one MGET), and a success resets the count only if that read found failures counted (pybreaker
    writes the zero on every success). A failure counted elsewhere between the read and the success is then left for
    the next success to clear, a window as narrow as the one pybreaker's own read-then-write leaves."""

    def __init__(self, state: str, redis_object: redis.Redis, namespace: str) -> None:
        super().__init__(state, redis_object, namespace=namespace)
        self._keys = [self._namespace("state"), self._namespace("fail_counter")]
        self._read = threading.local()  # what this thread's last read of the state found counted

    @property
    def state(self) -> str:
        self._read.failures = None
        try:
            state, failures = self._redis.mget(self._keys)
        except redis.RedisError:
            self.logger.exception("RedisError: falling back to default circuit state")
            return self._fallback_circuit_state
        if state is None:
            self._initialize_redis_state(self._fallback_circuit_state)
            return self._fallback_circuit_state
        self._read.failures = failures
        return state.decode("utf-8") if isinstance(state, bytes) else str(state)

    @state.setter
    def state(self, state: str) -> None:
        pybreaker.CircuitRedisStorage.state.fset(self, state)  # type: ignore[attr-defined]

    def reset_counter(self) -> None:
        failures = getattr(self._read, "failures", None)
        self._read.failures = None
        if failures is not None and failures in (b"0", b""):
            return  # nothing counted when this call began
        super().reset_counter()


def shared_breaker(settings: Settings, namespace: str) -> Callable[[], Breaker]:
    """A builder of breakers over one state: in Redis (every process on every host), or in this process without it.
    Each call makes a new breaker object (one per thread, see GuardedProvider) over the state made the first time."""
    made: list[pybreaker.CircuitBreakerStorage] = []
    lock = threading.Lock()

    def shared_storage() -> pybreaker.CircuitBreakerStorage:
        with lock:
            if not made:
                url = settings.shared_redis_url
                if url is None:
                    made.append(pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED))
                else:
                    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
                    made.append(SharedCircuitStorage(pybreaker.STATE_CLOSED, client, namespace))
            return made[0]

    def build() -> Breaker:
        storage = shared_storage()
        circuit = pybreaker.CircuitBreaker(
            fail_max=settings.circuit_failure_threshold, reset_timeout=settings.circuit_reset_seconds,
            exclude=[_not_an_outage], state_storage=storage, name=namespace, listeners=[_LogTransitions()],
            throw_new_error_on_trip=False,
        )
        return Breaker(circuit, storage)

    return build
