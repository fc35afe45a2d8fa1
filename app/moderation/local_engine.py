"""The local engine: moderation inside Verdict with no network (`alt-profanity-check`'s shipped model, reported as
`harassment`; every other category not judged). See docs/moderation.md."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from app.moderation.providers import ModelInfo, ProviderResult, TextScores
from app.moderation.taxonomy import CATEGORIES

LOCAL_MODEL = "verdict-local-profanity-1"
JUDGED = ("harassment",)


class LocalEngine:
    name = "local"
    # One prediction over many texts costs little more than over one: batches are as large as the API allows.
    max_batch = 100

    def __init__(self) -> None:
        self._predict: Callable[[list[str]], Sequence[float]] | None = None
        self._lock = threading.Lock()

    def _predictor(self) -> Callable[[list[str]], Sequence[float]]:
        # Loading the model costs ~100 ms and some memory; do it on first use, once per process.
        with self._lock:
            if self._predict is None:
                from profanity_check import predict_prob

                self._predict = predict_prob
            return self._predict

    def warm_up(self) -> None:
        self._predictor()

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(
            id=LOCAL_MODEL,
            provider=self.name,
            judged_categories=list(JUDGED),
            not_judged_categories=[c for c in CATEGORIES if c not in JUDGED],
        )]

    def moderate(self, texts: Sequence[str], model: str | None = None) -> ProviderResult:
        started = time.monotonic()
        probabilities = self._predictor()(list(texts))
        results = [TextScores(scores={"harassment": round(float(p), 6)}) for p in probabilities]
        return ProviderResult(
            provider=self.name,
            model=LOCAL_MODEL,
            results=results,
            judged=frozenset(JUDGED),
            latency_ms=int((time.monotonic() - started) * 1000),
        )
