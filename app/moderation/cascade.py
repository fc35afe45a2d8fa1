"""The cascade provider (MODERATION_PROVIDER=cascade): the local engine answers when it is confident, and only the
uncertain texts are sent upstream, to save the upstream's cost.

A text is uncertain when its highest local score lies in the band [CASCADE_BAND_LOW, CASCADE_BAND_HIGH): below it
the engine allows with confidence, at or above it the engine flags with confidence. Each text's scores say which
provider decided it (`TextScores.decided_by`); `make eval` reports what share of the dev data a band sends upstream
and how many harmful texts the engine alone lets through (ops/engine/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from app.moderation.local_engine import LocalEngine
from app.moderation.providers import ModelInfo, ModerationProvider, ProviderResult, TextScores

CASCADE = "cascade"


class CascadeProvider:
    name = CASCADE

    def __init__(self, local: LocalEngine, upstream: ModerationProvider, *, band_low: float, band_high: float) -> None:
        if not 0.0 <= band_low <= band_high <= 1.0:
            raise ValueError("the cascade band needs 0 <= low <= high <= 1")
        self.local = local
        self.upstream = upstream
        self.band_low = band_low
        self.band_high = band_high
        # Every text of a batch may turn out uncertain, so a batch is never larger than the upstream takes.
        self.max_batch = min(local.max_batch, upstream.max_batch)

    def warm_up(self) -> None:
        self.local.warm_up()
        self.upstream.warm_up()

    def models(self) -> list[ModelInfo]:
        return self.local.models() + self.upstream.models()

    def uncertain(self, scores: TextScores) -> bool:
        top = max(scores.scores.values(), default=0.0)
        return self.band_low <= top < self.band_high

    def moderate(self, texts: Sequence[str], model: str | None = None) -> ProviderResult:
        started = time.monotonic()
        local = self.local.moderate(texts)
        results = [dataclasses.replace(r, decided_by=local.provider) for r in local.results]
        unsure = [i for i, r in enumerate(local.results) if self.uncertain(r)]
        if not unsure:
            return dataclasses.replace(local, provider=self.name, results=results,
                                       latency_ms=int((time.monotonic() - started) * 1000))
        upstream = self.upstream.moderate([texts[i] for i in unsure], model)
        for position, answer in zip(unsure, upstream.results, strict=True):
            results[position] = dataclasses.replace(answer, decided_by=upstream.provider)
        everything_upstream = len(unsure) == len(texts)
        return ProviderResult(
            provider=self.name,
            model=upstream.model if everything_upstream else f"{local.model}+{upstream.model}",
            results=results,
            judged=local.judged | upstream.judged,
            latency_ms=int((time.monotonic() - started) * 1000),
            usage_tokens=upstream.usage_tokens,
            defective=frozenset(unsure[i] for i in upstream.defective),
            degraded=upstream.degraded,
        )
