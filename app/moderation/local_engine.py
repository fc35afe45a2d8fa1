"""The local engine: moderation inside Verdict with no network, a multi-label model over the taxonomy shipped as package
data (app/moderation/engine/), loaded once per process. Model card: docs/engine.md."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from app.moderation.engine.model import EngineModel
from app.moderation.providers import ModelInfo, ProviderResult, TextScores
from app.moderation.taxonomy import CATEGORIES


class LocalEngine:
    name = "local"
    # Scoring is vectorised over a batch: batches are as large as the API allows.
    max_batch = 100

    def __init__(self) -> None:
        self._model: EngineModel | None = None
        self._lock = threading.Lock()

    def engine(self) -> EngineModel:
        with self._lock:
            if self._model is None:
                self._model = EngineModel.load()
            return self._model

    def warm_up(self) -> None:
        self.engine()

    @property
    def model_id(self) -> str:
        return str(self.engine().artifact.metadata["model"])

    @property
    def judged(self) -> tuple[str, ...]:
        return self.engine().heads

    def models(self) -> list[ModelInfo]:
        judged = self.judged
        return [ModelInfo(
            id=self.model_id,
            provider=self.name,
            judged_categories=[c for c in CATEGORIES if c in judged],
            not_judged_categories=[c for c in CATEGORIES if c not in judged],
            max_batch=self.max_batch,
        )]

    def moderate(self, texts: Sequence[str], model: str | None = None) -> ProviderResult:
        started = time.monotonic()
        engine = self.engine()
        probabilities = engine.probabilities(list(texts))
        results = [TextScores(scores={head: round(float(p), 6) for head, p in zip(engine.heads, row, strict=True)})
                   for row in probabilities]
        return ProviderResult(
            provider=self.name,
            model=self.model_id,
            results=results,
            judged=frozenset(engine.heads),
            latency_ms=int((time.monotonic() - started) * 1000),
        )
