"""`OpenAICompatibleProvider` over real HTTP against `tests.fake_upstream.FakeUpstream`, and `parse_batch` on
hand-built answers.

What must hold: scores come back per input in order; the model and the Bearer key are sent; 429 and 5xx and timeouts
and unreachable hosts and garbled answers are transient (worth retrying), other 4xx are permanent; a batch over the
provider's limit is refused before anything is sent; unknown labels are ignored, missing categories are not judged,
non-numeric scores are refused and scores are clamped to [0, 1].
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app.moderation.openai_compat import OpenAICompatibleProvider, parse_batch
from app.moderation.providers import PermanentProviderError, TransientProviderError
from app.moderation.taxonomy import CATEGORIES
from tests.fake_upstream import MALFORMED_KINDS, ONE_BAD_RESULT, TRIGGERS, UNTRIGGERED_SCORE, FakeUpstream
from tests.lanes import integration_fixture

API_KEY = "sk-test-provider"
MODEL = "omni-moderation-latest"

MakeProvider = Callable[..., OpenAICompatibleProvider]


@integration_fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=API_KEY) as server:
        yield server


@pytest.fixture
def make_provider(upstream: FakeUpstream) -> Iterator[MakeProvider]:
    made: list[OpenAICompatibleProvider] = []

    def _make(**overrides: Any) -> OpenAICompatibleProvider:
        options: dict[str, Any] = {"base_url": upstream.base_url, "api_key": API_KEY, "model": MODEL,
                                   "timeout": 5.0}
        options.update(overrides)
        provider = OpenAICompatibleProvider(**options)
        made.append(provider)
        return provider

    yield _make
    for provider in made:
        provider.close()


def test_scores_each_input_in_order(make_provider: MakeProvider, upstream: FakeUpstream) -> None:
    texts = ["a calm sentence", "I will kill you", "you idiot", "nothing here", "hate speech"]
    result = make_provider().moderate(texts)

    assert result.provider == "openai"
    assert result.model == MODEL
    assert result.judged == frozenset(CATEGORIES)
    assert len(result.results) == len(texts)
    violence = [r.scores["violence"] for r in result.results]
    assert violence == [UNTRIGGERED_SCORE, TRIGGERS["kill"]["violence"], UNTRIGGERED_SCORE, UNTRIGGERED_SCORE,
                        UNTRIGGERED_SCORE]
    assert result.results[2].scores["harassment"] == TRIGGERS["idiot"]["harassment"]
    assert result.results[4].scores["hate"] == TRIGGERS["hate"]["hate"]
    assert [r.provider_flagged for r in result.results] == [False, True, True, False, True]
    assert result.usage_tokens is not None and result.usage_tokens > 0
    assert upstream.texts_seen() == texts


def test_sends_model_and_bearer_key_in_one_request(make_provider: MakeProvider, upstream: FakeUpstream) -> None:
    make_provider().moderate(["one", "two"])
    (request,) = upstream.requests
    assert request.method == "POST"
    assert request.path == "/v1/moderations"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.json == {"model": MODEL, "input": ["one", "two"]}


def test_sends_texts_as_utf8_json(make_provider: MakeProvider, upstream: FakeUpstream) -> None:
    make_provider().moderate(["café ☕", 'a "quoted" line\n'])
    (request,) = upstream.requests
    assert request.json == {"model": MODEL, "input": ["café ☕", 'a "quoted" line\n']}


def test_per_call_model_is_sent_and_reported(make_provider: MakeProvider, upstream: FakeUpstream) -> None:
    result = make_provider().moderate(["text"], model="text-moderation-stable")
    assert upstream.requests[0].json["model"] == "text-moderation-stable"
    assert result.model == "text-moderation-stable"


def test_moderate_path(make_provider: MakeProvider, upstream: FakeUpstream) -> None:
    result = make_provider(path="/moderate").moderate(["go kill"])
    assert upstream.requests[0].path == "/v1/moderate"
    assert result.results[0].scores["violence"] == TRIGGERS["kill"]["violence"]


def test_429_is_transient_with_retry_after(make_provider: MakeProvider, upstream: FakeUpstream) -> None:
    upstream.fail_next(429, retry_after=7)
    with pytest.raises(TransientProviderError) as caught:
        make_provider().moderate(["text"])
    assert caught.value.code == "upstream_rate_limited"
    assert caught.value.retry_after == 7.0


def test_429_without_retry_after(make_provider: MakeProvider, upstream: FakeUpstream) -> None:
    upstream.fail_next(429)
    with pytest.raises(TransientProviderError) as caught:
        make_provider().moderate(["text"])
    assert caught.value.retry_after is None


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_transient(make_provider: MakeProvider, upstream: FakeUpstream, status: int) -> None:
    upstream.fail_next(status)
    with pytest.raises(TransientProviderError) as caught:
        make_provider().moderate(["text"])
    assert caught.value.code == "upstream_error"
    assert caught.value.transient is True


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_4xx_is_permanent(make_provider: MakeProvider, upstream: FakeUpstream, status: int) -> None:
    upstream.fail_next(status)
    with pytest.raises(PermanentProviderError) as caught:
        make_provider().moderate(["text"])
    assert caught.value.code == "upstream_refused"
    assert caught.value.transient is False
    assert len(upstream.requests) == 1


def test_wrong_key_is_permanent(make_provider: MakeProvider) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        make_provider(api_key="sk-wrong").moderate(["text"])
    assert caught.value.code == "upstream_refused"
    assert "401" in caught.value.message


def test_no_key_sends_no_authorization(make_provider: MakeProvider, upstream: FakeUpstream) -> None:
    with pytest.raises(PermanentProviderError):
        make_provider(api_key=None).moderate(["text"])
    assert "authorization" not in upstream.requests[0].headers


def test_unknown_path_is_permanent(make_provider: MakeProvider) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        make_provider(path="/no-such-path").moderate(["text"])
    assert "404" in caught.value.message


def test_timeout_is_transient(make_provider: MakeProvider, upstream: FakeUpstream) -> None:
    upstream.hang_next(5)
    with pytest.raises(TransientProviderError) as caught:
        make_provider(timeout=0.3).moderate(["text"])
    assert caught.value.code == "upstream_timeout"


def test_connection_refused_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The socket is closed and was never listening: nothing accepts on that port.
    provider = OpenAICompatibleProvider(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, model=MODEL,
                                        timeout=2.0)
    try:
        with pytest.raises(TransientProviderError) as caught:
            provider.moderate(["text"])
    finally:
        provider.close()
    assert caught.value.code == "upstream_unreachable"


@pytest.mark.parametrize("kind", sorted(MALFORMED_KINDS))
def test_malformed_answers_are_transient(make_provider: MakeProvider, upstream: FakeUpstream, kind: str) -> None:
    upstream.malformed_next(kind)
    with pytest.raises(TransientProviderError) as caught:
        make_provider().moderate(["first text", "second text"])
    assert caught.value.code == "upstream_malformed"


def test_recovers_after_a_failure(make_provider: MakeProvider, upstream: FakeUpstream) -> None:
    provider = make_provider()
    upstream.fail_next(503)
    with pytest.raises(TransientProviderError):
        provider.moderate(["kill"])
    assert provider.moderate(["kill"]).results[0].scores["violence"] == TRIGGERS["kill"]["violence"]


def test_more_texts_than_max_batch_sends_nothing(make_provider: MakeProvider, upstream: FakeUpstream) -> None:
    provider = make_provider(max_batch=3)
    with pytest.raises(PermanentProviderError) as caught:
        provider.moderate(["a", "b", "c", "d"])
    assert caught.value.code == "batch_too_large"
    assert upstream.requests == []
    assert len(provider.moderate(["a", "b", "c"]).results) == 3


def test_empty_input_sends_nothing(make_provider: MakeProvider, upstream: FakeUpstream) -> None:
    with pytest.raises(PermanentProviderError):
        make_provider().moderate([])
    assert upstream.requests == []


def test_models_reports_every_category_and_the_batch_limit(make_provider: MakeProvider) -> None:
    (info,) = make_provider(max_batch=16).models()
    assert info.id == MODEL
    assert info.judged_categories == list(CATEGORIES)
    assert info.max_batch == 16


# ---- parse_batch on hand-built payloads -----------------------------------------------------------------------


def payload(*scores: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"results": [{"category_scores": s} for s in scores], **extra}


def test_unknown_labels_are_ignored_and_missing_categories_not_judged() -> None:
    results, judged, defective = parse_batch(
        payload({"harassment": 0.4, "toxicity": 0.99, "Violence_Graphic": 0.2}, {"self_harm": 0.3}), expected=2
    )
    assert defective == frozenset()
    assert judged == frozenset({"harassment", "violence/graphic", "self-harm"})
    assert results[0].scores == {"harassment": 0.4, "violence/graphic": 0.2}
    assert results[1].scores == {"self-harm": 0.3}


def test_scores_key_is_accepted_and_flagged_kept() -> None:
    results, _, _ = parse_batch({"results": [{"scores": {"hate": 0.7}, "flagged": True}]}, expected=1)
    assert results[0].scores == {"hate": 0.7}
    assert results[0].provider_flagged is True


@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.5", True, None, [0.1], {"v": 1}])
def test_non_numeric_scores_are_malformed(bad: Any) -> None:
    with pytest.raises(TransientProviderError) as caught:
        parse_batch(payload({"harassment": 0.1, "violence": bad}), expected=1)
    assert caught.value.code == "upstream_malformed"


def test_non_numeric_score_of_an_unknown_label_is_ignored() -> None:
    results, _, _ = parse_batch(payload({"harassment": 0.1, "toxicity": "high"}), expected=1)
    assert results[0].scores == {"harassment": 0.1}


def test_scores_are_clamped_to_unit_interval() -> None:
    results, _, _ = parse_batch(payload({"harassment": 1.7, "hate": -0.3, "violence": 1, "sexual": 0}), expected=1)
    assert results[0].scores == {"harassment": 1.0, "hate": 0.0, "violence": 1.0, "sexual": 0.0}


@pytest.mark.parametrize("bad", [
    None, [], "results", {"data": []}, {"results": {}}, {"results": ["x"]}, {"results": [{"flagged": True}]},
    {"results": [{"category_scores": [0.1]}]},
])
def test_malformed_shapes(bad: Any) -> None:
    with pytest.raises(TransientProviderError) as caught:
        parse_batch(bad, expected=1)
    assert caught.value.code == "upstream_malformed"


@pytest.mark.parametrize("count", [0, 1, 3])
def test_result_count_must_match_inputs(count: int) -> None:
    with pytest.raises(TransientProviderError):
        parse_batch(payload(*[{"hate": 0.1}] * count), expected=2)


def test_one_unusable_result_spoils_only_its_own_text(make_provider: MakeProvider, upstream: FakeUpstream) -> None:
    upstream.malformed_next(ONE_BAD_RESULT)
    result = make_provider().moderate(["I will kill you", "you idiot", "calm"])
    assert result.defective == frozenset({0})
    assert result.results[1].scores["harassment"] == TRIGGERS["idiot"]["harassment"]
    assert result.results[2].scores["violence"] == UNTRIGGERED_SCORE


def test_partly_defective_payload_is_reported_by_position() -> None:
    results, judged, defective = parse_batch(
        {"results": [{"category_scores": {"hate": 0.4}}, "garbage", {"category_scores": {"hate": "x"}}]}, expected=3)
    assert defective == frozenset({1, 2})
    assert results[0].scores == {"hate": 0.4} and judged == frozenset({"hate"})
    with pytest.raises(TransientProviderError):
        parse_batch({"results": ["garbage"]}, expected=1)  # nothing usable at all: the whole call failed


def test_refusal_names_the_status_and_the_providers_code(make_provider: MakeProvider, upstream: FakeUpstream) -> None:
    upstream.max_batch = 1
    with pytest.raises(PermanentProviderError) as caught:
        make_provider().moderate(["a", "b"])
    assert caught.value.code == "upstream_refused"
    assert "400" in caught.value.message and "batch_too_large" in caught.value.message
