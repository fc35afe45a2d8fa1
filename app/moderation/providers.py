"""The provider interface: what every moderation backend takes and returns, and the errors it may raise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class TextScores:
    """One text's scores. A category missing from `scores` was not judged by the provider."""

    scores: dict[str, float]
    provider_flagged: bool | None = None
    # Which provider's answer these scores are, when a provider combines several (the cascade); else the result's.
    decided_by: str | None = None


@dataclass(frozen=True)
class ProviderResult:
    provider: str
    model: str
    results: list[TextScores]
    judged: frozenset[str]
    latency_ms: int
    usage_tokens: int | None = None
    # Positions of results the provider answered but unusably: those texts have no scores and need asking again.
    defective: frozenset[int] = frozenset()
    # Decided without the configured provider's answer (by the fallback provider): the verdict says so.
    degraded: bool = False


@dataclass(frozen=True)
class ModelInfo:
    id: str
    provider: str
    judged_categories: list[str]
    not_judged_categories: list[str] = field(default_factory=list)
    max_batch: int | None = None


class ProviderError(Exception):
    """A provider could not answer. `code` is a stable, content-free reason for the verdict's error field."""

    transient = False

    def __init__(self, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class TransientProviderError(ProviderError):
    """Worth retrying: rate limited, 5xx, timeout, connection failure, a garbled answer."""

    transient = True


class PermanentProviderError(ProviderError):
    """Not worth retrying: the request itself is refused (4xx other than 429)."""


class ModerationProvider(Protocol):
    name: str
    # The most texts one `moderate` call takes: the size a worker fills a batch up to.
    max_batch: int

    def warm_up(self) -> None:
        """Load what the first call would otherwise load (a model), before any task runs."""
        ...

    def models(self) -> list[ModelInfo]: ...

    def moderate(self, texts: Sequence[str], model: str | None = None) -> ProviderResult: ...
