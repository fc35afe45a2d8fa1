"""The OpenAI-compatible HTTP provider (`POST {base_url}/moderations` or `/moderate`), under the upstream's shared
budget, tolerant of label spelling and strict about what would make a verdict wrong. See docs/moderation.md."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import httpx

from app import metrics
from app.moderation.providers import (
    ModelInfo,
    PermanentProviderError,
    ProviderResult,
    TextScores,
    TransientProviderError,
)
from app.moderation.taxonomy import CATEGORIES, canonical_category
from app.moderation.tokens import estimate_tokens
from app.moderation.upstream_budget import (
    BudgetState,
    NoCapacity,
    OverTokenLimit,
    Permit,
    RateLimitUnavailable,
    SharedRateLimiter,
)


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
        limiter: SharedRateLimiter | None = None,
        capacity_wait: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.path = path
        self.max_batch = max_batch
        self._api_key = api_key
        self._timeout = timeout
        self._client: httpx.Client | None = None
        # Parsed once, not from a string on every call (httpx parses a string URL per request).
        self._url = httpx.URL(f"{self.base_url}{self.path}")
        self._limiter = limiter
        # How long one call may wait for rate-limit capacity before it gives its texts back to the queue.
        self._capacity_wait = capacity_wait

    def _http(self) -> httpx.Client:
        # Created on first use, so a forked worker process never shares its parent's sockets.
        if self._client is None:
            headers = {"User-Agent": "verdict/0.1", "Content-Type": "application/json"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            self._client = httpx.Client(timeout=self._timeout, headers=headers, follow_redirects=False)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def warm_up(self) -> None:
        """Nothing to load; the HTTP client is created in each process on first use."""

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=self.model, provider=self.name, judged_categories=list(CATEGORIES),
                          max_batch=self.max_batch)]

    def moderate(self, texts: Sequence[str], model: str | None = None) -> ProviderResult:
        if not texts:
            raise PermanentProviderError("empty_input", "nothing to moderate")
        if len(texts) > self.max_batch:
            raise PermanentProviderError("batch_too_large", f"at most {self.max_batch} texts per upstream call")
        requested_model = model or self.model
        # The body serialized here (compact, as httpx's `json=` would) and sent as content: the client's headers
        # carry its Content-Type, so no per-request headers are merged.
        body = json.dumps({"model": requested_model, "input": list(texts)}, ensure_ascii=False,
                          separators=(",", ":"), allow_nan=False).encode()
        permit = self._wait_for_capacity(texts)
        started = time.monotonic()
        try:
            response = self._http().post(self._url, content=body)
        except httpx.TimeoutException as exc:
            _count_call("timeout", started)
            raise TransientProviderError("upstream_timeout", "the moderation provider timed out") from exc
        except httpx.TransportError as exc:
            _count_call("unreachable", started)
            raise TransientProviderError("upstream_unreachable", "the moderation provider is unreachable") from exc
        latency_ms = int((time.monotonic() - started) * 1000)
        self._learn(response)

        status = response.status_code
        _count_call(_outcome(status), started)
        if status == 429:
            retry_after = _retry_after(response)
            if self._limiter is not None:
                self._limiter.pause(retry_after if retry_after is not None else 1.0)
            raise TransientProviderError(
                "upstream_rate_limited", "the moderation provider rate-limited the request",
                retry_after=retry_after,
            )
        if status >= 500:
            raise TransientProviderError("upstream_error", f"the moderation provider answered {status}",
                                         retry_after=_retry_after(response))
        if status >= 400:
            raise PermanentProviderError(
                "upstream_refused", f"the moderation provider refused the request ({status}{_error_code(response)})"
            )
        if status != 200:
            raise TransientProviderError("upstream_malformed", f"unexpected status {status} from the provider")

        try:
            payload = response.json()
        except ValueError as exc:
            raise TransientProviderError("upstream_malformed", "the provider's answer is not JSON") from exc
        usage = payload.get("usage") if isinstance(payload, dict) else None
        tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
        tokens = tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0 else None
        if permit is not None and tokens is not None:
            self._settle(permit, tokens)
        results, judged, defective = parse_batch(payload, expected=len(texts))
        reported_model = payload.get("model") if isinstance(payload.get("model"), str) else None
        return ProviderResult(
            provider=self.name,
            model=reported_model or requested_model,
            results=results,
            judged=judged,
            latency_ms=latency_ms,
            usage_tokens=tokens,
            defective=defective,
        )

    def budget_state(self) -> BudgetState | None:
        """The shared budget's limits and use now; None without a shared limiter (no Redis)."""
        return None if self._limiter is None else self._limiter.state()

    def _wait_for_capacity(self, texts: Sequence[str]) -> Permit | None:
        if self._limiter is None:
            return None
        try:
            return self._limiter.acquire(estimate_tokens(texts), max_wait=self._capacity_wait)
        except NoCapacity as exc:
            raise TransientProviderError("upstream_capacity_wait", "waiting for the provider's rate limit",
                                         retry_after=exc.wait) from exc
        except OverTokenLimit as exc:
            raise PermanentProviderError("upstream_token_limit", str(exc)) from exc
        except RateLimitUnavailable as exc:
            raise TransientProviderError("rate_limiter_unavailable", "the shared rate limit cannot be read") from exc

    def _learn(self, response: httpx.Response) -> None:
        # The call was made either way; if Redis is gone, the next call waits for the limiter to answer again.
        if self._limiter is not None:
            with contextlib.suppress(RateLimitUnavailable):
                self._limiter.learn(response.headers)

    def _settle(self, permit: Permit, tokens: int) -> None:
        if self._limiter is not None:
            with contextlib.suppress(RateLimitUnavailable):
                self._limiter.settle(permit, tokens)


def _outcome(status: int) -> str:
    """A call's outcome label, from its HTTP status (bounded: never the status itself)."""
    if status == 200:
        return "ok"
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "server_error"
    return "refused" if status >= 400 else "malformed"


def _count_call(outcome: str, started: float) -> None:
    metrics.UPSTREAM_CALLS.labels(outcome).inc()
    metrics.UPSTREAM_LATENCY.labels(outcome).observe(time.monotonic() - started)


def parse_batch(payload: Any, *, expected: int) -> tuple[list[TextScores], frozenset[str], frozenset[int]]:
    """The per-text scores in an OpenAI-shaped answer, matched to the inputs by position, and the categories judged.
    A result that is unusable on its own is reported by position (the third item) instead of spoiling the batch;
    the answer as a whole raises when it cannot be matched to the inputs, or when not one of its results is usable."""
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise TransientProviderError("upstream_malformed", "the provider's answer has no results list")
    raw_results: list[Any] = payload["results"]
    if len(raw_results) != expected:
        raise TransientProviderError(
            "upstream_malformed", f"the provider returned {len(raw_results)} results for {expected} inputs"
        )
    parsed: list[TextScores] = []
    judged: set[str] = set()
    defective: set[int] = set()
    problem = ""
    for position, raw in enumerate(raw_results):
        try:
            text_scores = _parse_one(raw)
        except ValueError as exc:
            defective.add(position)
            problem = str(exc)
            parsed.append(TextScores(scores={}))
            continue
        judged.update(text_scores.scores)
        parsed.append(text_scores)
    if defective and len(defective) == len(parsed):
        raise TransientProviderError("upstream_malformed", problem)
    return parsed, frozenset(judged), frozenset(defective)


def _parse_one(raw: Any) -> TextScores:
    if not isinstance(raw, dict):
        raise ValueError("a result is not an object")
    raw_scores = raw.get("category_scores", raw.get("scores"))
    if not isinstance(raw_scores, dict):
        raise ValueError("a result has no category scores")
    scores: dict[str, float] = {}
    for label, value in raw_scores.items():
        category = canonical_category(str(label))
        if category is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError("a category score is not a number")
        scores[category] = min(1.0, max(0.0, float(value)))
    flagged = raw.get("flagged")
    return TextScores(scores=scores, provider_flagged=flagged if isinstance(flagged, bool) else None)


def _error_code(response: httpx.Response) -> str:
    """The provider's own error code, if its answer has the OpenAI error shape (never its message: it may quote
    the input)."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return ""
    code = error.get("code") if isinstance(error, dict) else None
    return f", {code}" if isinstance(code, str) and code.isascii() and len(code) <= 64 else ""


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
