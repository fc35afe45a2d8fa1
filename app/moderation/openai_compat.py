"""The OpenAI-compatible HTTP provider: `POST {base_url}/moderations` (or `/moderate`) with an array `input`.

Parsing is tolerant of what compatible servers vary in (label spelling, extra fields, missing categories) and strict
about what would make a verdict wrong (result count, non-numeric scores).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import httpx

from app.moderation.providers import (
    ModelInfo,
    PermanentProviderError,
    ProviderResult,
    TextScores,
    TransientProviderError,
)
from app.moderation.taxonomy import CATEGORIES, canonical_category


class OpenAICompatibleProvider:
    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        model: str,
        path: str = "/moderations",
        timeout: float = 10.0,
        max_batch: int = 32,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.path = path
        self.max_batch = max_batch
        self._api_key = api_key
        self._timeout = timeout
        self._client: httpx.Client | None = None

    def _http(self) -> httpx.Client:
        # Created on first use, so a forked worker process never shares its parent's sockets.
        if self._client is None:
            headers = {"User-Agent": "verdict/0.1"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            self._client = httpx.Client(timeout=self._timeout, headers=headers, follow_redirects=False)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=self.model, provider=self.name, judged_categories=list(CATEGORIES),
                          max_batch=self.max_batch)]

    def moderate(self, texts: Sequence[str], model: str | None = None) -> ProviderResult:
        if not texts:
            raise PermanentProviderError("empty_input", "nothing to moderate")
        if len(texts) > self.max_batch:
            raise PermanentProviderError("batch_too_large", f"at most {self.max_batch} texts per upstream call")
        requested_model = model or self.model
        body = {"model": requested_model, "input": list(texts)}
        started = time.monotonic()
        try:
            response = self._http().post(f"{self.base_url}{self.path}", json=body)
        except httpx.TimeoutException as exc:
            raise TransientProviderError("upstream_timeout", "the moderation provider timed out") from exc
        except httpx.TransportError as exc:
            raise TransientProviderError("upstream_unreachable", "the moderation provider is unreachable") from exc
        latency_ms = int((time.monotonic() - started) * 1000)

        status = response.status_code
        if status == 429:
            raise TransientProviderError(
                "upstream_rate_limited", "the moderation provider rate-limited the request",
                retry_after=_retry_after(response),
            )
        if status >= 500:
            raise TransientProviderError("upstream_error", f"the moderation provider answered {status}",
                                         retry_after=_retry_after(response))
        if status >= 400:
            raise PermanentProviderError("upstream_refused", f"the moderation provider refused the request ({status})")
        if status != 200:
            raise TransientProviderError("upstream_malformed", f"unexpected status {status} from the provider")

        try:
            payload = response.json()
        except ValueError as exc:
            raise TransientProviderError("upstream_malformed", "the provider's answer is not JSON") from exc
        results, judged = parse_results(payload, expected=len(texts))
        reported_model = payload.get("model") if isinstance(payload.get("model"), str) else None
        usage = payload.get("usage")
        tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
        return ProviderResult(
            provider=self.name,
            model=reported_model or requested_model,
            results=results,
            judged=judged,
            latency_ms=latency_ms,
            usage_tokens=tokens if isinstance(tokens, int) else None,
        )


def parse_results(payload: Any, *, expected: int) -> tuple[list[TextScores], frozenset[str]]:
    """The per-text scores in an OpenAI-shaped answer, matched to the inputs by position."""
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise TransientProviderError("upstream_malformed", "the provider's answer has no results list")
    raw_results: list[Any] = payload["results"]
    if len(raw_results) != expected:
        raise TransientProviderError(
            "upstream_malformed", f"the provider returned {len(raw_results)} results for {expected} inputs"
        )
    parsed: list[TextScores] = []
    judged: set[str] = set()
    for raw in raw_results:
        if not isinstance(raw, dict):
            raise TransientProviderError("upstream_malformed", "a result is not an object")
        raw_scores = raw.get("category_scores", raw.get("scores"))
        if not isinstance(raw_scores, dict):
            raise TransientProviderError("upstream_malformed", "a result has no category scores")
        scores: dict[str, float] = {}
        for label, value in raw_scores.items():
            category = canonical_category(str(label))
            if category is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise TransientProviderError("upstream_malformed", "a category score is not a number")
            scores[category] = min(1.0, max(0.0, float(value)))
        judged.update(scores)
        flagged = raw.get("flagged")
        parsed.append(TextScores(scores=scores, provider_flagged=flagged if isinstance(flagged, bool) else None))
    return parsed, frozenset(judged)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
