"""The fake moderation upstream, exercised over real HTTP with httpx."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_upstream import (
    CATEGORIES,
    DEFAULT_MODEL,
    TRIGGERS,
    UNTRIGGERED_SCORE,
    FakeUpstream,
    estimate_tokens,
    score_text,
)
from tests.lanes import integration_fixture

REPO_ROOT = Path(__file__).resolve().parents[2]


@integration_fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def client(upstream: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upstream.base_url, timeout=5.0) as http:
        yield http


def moderate(http: httpx.Client, input_: Any, path: str = "/moderations", **extra: Any) -> httpx.Response:
    return http.post(path, json={"input": input_, **extra})


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "code" in error
    if code is not None:
        assert error["code"] == code
    return dict(error)


# -- response shape ----------------------------------------------------------------------------------------


def test_response_has_the_openai_shape_one_result_per_input_in_order(
    upstream: FakeUpstream, client: httpx.Client
) -> None:
    texts = ["hello there", "I will kill you", "a sunny day", "you idiot"]
    response = moderate(client, texts)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    body = response.json()
    assert set(body) == {"id", "model", "results", "usage"}
    assert body["id"].startswith("modr-") and len(body["id"]) > len("modr-")
    assert body["model"] == DEFAULT_MODEL
    tokens = sum(math.ceil(len(t) / 4) for t in texts)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    assert len(CATEGORIES) == 13
    assert [r["flagged"] for r in body["results"]] == [False, True, False, True]
    for result in body["results"]:
        assert set(result) == {"flagged", "categories", "category_scores", "category_applied_input_types"}
        assert list(result["categories"]) == list(CATEGORIES)
        assert list(result["category_scores"]) == list(CATEGORIES)
        assert result["category_applied_input_types"] == {c: ["text"] for c in CATEGORIES}
        assert all(isinstance(v, bool) for v in result["categories"].values())
        assert all(isinstance(v, float) for v in result["category_scores"].values())
    assert body["results"][1]["category_scores"]["violence"] == 0.97
    assert body["results"][3]["category_scores"]["harassment"] == 0.88
    assert upstream.texts_seen() == texts


def test_moderate_path_behaves_the_same_and_echoes_the_model(client: httpx.Client) -> None:
    response = moderate(client, "a bomb", path="/moderate", model="text-moderation-007")
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "text-moderation-007"
    assert len(body["results"]) == 1
    assert body["results"][0]["category_scores"]["illicit/violent"] == 0.93
    assert body["usage"]["total_tokens"] == estimate_tokens(["a bomb"]) == 2


def test_string_input_gives_one_result(client: httpx.Client) -> None:
    body = moderate(client, "nothing to see").json()
    assert len(body["results"]) == 1
    assert body["results"][0]["flagged"] is False


def test_every_category_can_be_triggered() -> None:
    triggered = {category for scores in TRIGGERS.values() for category in scores}
    assert triggered == set(CATEGORIES)


@pytest.mark.parametrize("word", sorted(TRIGGERS))
def test_trigger_words_give_the_table_scores(client: httpx.Client, word: str) -> None:
    # Case-insensitive, and punctuation around the word does not matter.
    text = f"well... {word.upper()}! said someone"
    result = moderate(client, [text]).json()["results"][0]

    expected = TRIGGERS[word]
    for category in CATEGORIES:
        score = result["category_scores"][category]
        assert score == expected.get(category, UNTRIGGERED_SCORE)
        assert result["categories"][category] is (score >= 0.5)
    assert result["flagged"] is any(score >= 0.5 for score in expected.values())


def test_scores_combine_by_maximum_and_match_whole_words_only(client: httpx.Client) -> None:
    results = moderate(client, ["stupid idiot", "skill and bombastic killer", "Stupid"]).json()["results"]
    assert results[0]["category_scores"]["harassment"] == 0.88
    assert results[1]["flagged"] is False
    assert set(results[1]["category_scores"].values()) == {UNTRIGGERED_SCORE}
    # The mild word: flagged, but at a score a policy can send to review.
    assert results[2]["category_scores"]["harassment"] == 0.6
    assert results[2]["categories"]["harassment"] is True
    assert score_text("I hate gore")["violence/graphic"] == 0.9


# -- scripted failures -------------------------------------------------------------------------------------


def test_fail_next_429_with_retry_after_then_success(upstream: FakeUpstream, client: httpx.Client) -> None:
    upstream.fail_next(429, retry_after=2)

    first = moderate(client, ["kill"])
    error = assert_openai_error(first, 429, "rate_limit_exceeded")
    assert error["type"] == "requests"
    assert first.headers["retry-after"] == "2"
    assert first.headers["x-request-id"]

    second = moderate(client, ["kill"])
    assert second.status_code == 200
    assert "retry-after" not in second.headers
    assert upstream.texts_seen() == ["kill"]  # the failed request's texts are not counted
    assert upstream.rejected_429 == 0  # scripted, not the rate limiter


def test_fail_next_count_fractional_retry_after_and_raw_body(
    upstream: FakeUpstream, client: httpx.Client
) -> None:
    upstream.fail_next(503, count=2, retry_after=0.5)
    upstream.fail_next(500, body="upstream exploded")
    upstream.fail_next(400)

    for _ in range(2):
        response = moderate(client, "x")
        assert_openai_error(response, 503, "service_unavailable")
        assert response.headers["retry-after"] == "0.5"
    raw = moderate(client, "x")
    assert raw.status_code == 500
    assert raw.text == "upstream exploded"
    assert raw.headers["content-type"].startswith("text/plain")
    assert "retry-after" not in raw.headers
    error = assert_openai_error(moderate(client, "x"), 400)
    assert error["type"] == "invalid_request_error"
    assert moderate(client, "x").status_code == 200


@pytest.mark.parametrize("kind", ["not_json", "wrong_shape", "short", "bad_scores"])
def test_malformed_next(upstream: FakeUpstream, client: httpx.Client, kind: str) -> None:
    upstream.malformed_next(kind)
    response = moderate(client, ["kill", "hello"])
    assert response.status_code == 200

    if kind == "not_json":
        assert response.headers["content-type"].startswith("text/html")
        with pytest.raises(ValueError):
            response.json()
    else:
        body = response.json()
        if kind == "wrong_shape":
            assert "results" not in body
        elif kind == "short":
            assert len(body["results"]) == 1
        else:
            assert len(body["results"]) == 2
            scores = body["results"][0]["category_scores"]
            assert all(isinstance(v, str) for v in scores.values())
            assert float(scores["violence"]) == 0.97
    assert upstream.texts_seen() == []

    healthy = moderate(client, ["kill", "hello"])
    assert healthy.status_code == 200 and len(healthy.json()["results"]) == 2
    assert upstream.texts_seen() == ["kill", "hello"]


def test_scripted_actions_run_in_order_and_bad_arguments_are_refused(
    upstream: FakeUpstream, client: httpx.Client
) -> None:
    upstream.malformed_next("short")
    upstream.fail_next(502)
    assert len(moderate(client, ["a", "b"]).json()["results"]) == 1
    assert moderate(client, ["a", "b"]).status_code == 502
    assert moderate(client, ["a", "b"]).status_code == 200

    with pytest.raises(ValueError):
        upstream.malformed_next("truncated")
    with pytest.raises(ValueError):
        upstream.fail_next(42)
    with pytest.raises(ValueError):
        upstream.fail_next(500, count=0)
    with pytest.raises(ValueError):
        upstream.hang_next(-1.0)
    with pytest.raises(ValueError):
        upstream.latency = -0.1


def test_hang_next_triggers_a_client_timeout_then_recovers(upstream: FakeUpstream) -> None:
    upstream.hang_next(0.6)
    with httpx.Client(base_url=upstream.base_url, timeout=0.15) as http:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            moderate(http, "slow")
        assert time.monotonic() - started < 0.5
    with httpx.Client(base_url=upstream.base_url, timeout=5.0) as http:
        assert moderate(http, "fast").status_code == 200


def test_latency_delays_answers_and_concurrent_requests_overlap(upstream: FakeUpstream) -> None:
    upstream.latency = 0.2
    assert upstream.latency == 0.2
    with httpx.Client(base_url=upstream.base_url, timeout=5.0) as http:
        started = time.monotonic()
        assert moderate(http, "one").status_code == 200
        assert time.monotonic() - started >= 0.2

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(lambda i: moderate(http, f"text {i}").status_code, range(8)))
        elapsed = time.monotonic() - started
    assert statuses == [200] * 8
    assert elapsed < 0.2 * 8 / 2, f"requests did not run concurrently ({elapsed:.2f}s)"
    assert sorted(upstream.texts_seen()) == sorted(["one"] + [f"text {i}" for i in range(8)])


# -- authentication, validation, routing -------------------------------------------------------------------


@pytest.mark.integration
def test_api_key_is_enforced() -> None:
    with FakeUpstream(api_key="sk-test") as upstream, httpx.Client(base_url=upstream.base_url) as http:
        missing = moderate(http, "hi")
        assert_openai_error(missing, 401, "invalid_api_key")
        assert missing.json()["error"]["type"] == "invalid_request_error"
        wrong = http.post("/moderations", json={"input": "hi"}, headers={"Authorization": "Bearer sk-nope"})
        assert_openai_error(wrong, 401, "invalid_api_key")
        right = http.post("/moderations", json={"input": "hi"}, headers={"Authorization": "Bearer sk-test"})
        assert right.status_code == 200
        assert upstream.texts_seen() == ["hi"]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"model": "m"}',
        b'{"input": 3}',
        b'{"input": ["ok", 3]}',
        b'{"input": []}',
        b'{"input": "x", "model": 7}',
    ],
)
def test_invalid_requests_get_400(upstream: FakeUpstream, client: httpx.Client, content: bytes) -> None:
    response = client.post("/moderations", content=content, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)
    assert upstream.texts_seen() == []


def test_unknown_paths_get_404_and_wrong_methods_405(client: httpx.Client) -> None:
    missing = client.post("/embeddings", json={"input": "x"})
    assert_openai_error(missing, 404)
    assert missing.headers["x-request-id"]
    assert_openai_error(client.get("/nowhere"), 404)
    wrong_method = client.get("/moderations")
    assert_openai_error(wrong_method, 405)
    assert wrong_method.headers["allow"] == "POST"
    # The connection is still usable after errors (keep-alive, bodies fully read).
    assert moderate(client, "still fine").status_code == 200


@pytest.mark.integration
def test_max_batch() -> None:
    with FakeUpstream(max_batch=2) as upstream, httpx.Client(base_url=upstream.base_url) as http:
        too_many = moderate(http, ["a", "b", "c"])
        error = assert_openai_error(too_many, 400, "batch_too_large")
        assert error["param"] == "input"
        assert moderate(http, ["a", "b"]).status_code == 200
        assert upstream.texts_seen() == ["a", "b"]


# -- rate limits -------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_rpm_limit_rejects_the_third_request_in_the_window() -> None:
    with FakeUpstream(rpm=2) as upstream, httpx.Client(base_url=upstream.base_url) as http:
        first = moderate(http, "one")
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert "x-ratelimit-limit-tokens" not in first.headers
        assert moderate(http, "two").headers["x-ratelimit-remaining-requests"] == "0"

        third = moderate(http, "three")
        error = assert_openai_error(third, 429, "rate_limit_exceeded")
        assert error["type"] == "requests"
        retry_after = int(third.headers["retry-after"])
        assert 55 <= retry_after <= 60
        assert third.headers["x-ratelimit-limit-requests"] == "2"
        assert third.headers["x-ratelimit-remaining-requests"] == "0"
        assert upstream.rejected_429 == 1
        assert upstream.texts_seen() == ["one", "two"]

        upstream.reset()  # clears the window and the counter
        assert upstream.rejected_429 == 0
        assert moderate(http, "four").status_code == 200


@pytest.mark.integration
def test_tpm_limit_counts_estimated_tokens() -> None:
    with FakeUpstream(tpm=10) as upstream, httpx.Client(base_url=upstream.base_url) as http:
        ok = moderate(http, ["x" * 20, "y" * 9])  # 5 + 3 tokens
        assert ok.status_code == 200
        assert ok.headers["x-ratelimit-limit-tokens"] == "10"
        assert ok.headers["x-ratelimit-remaining-tokens"] == "2"
        assert moderate(http, "z" * 8).status_code == 200  # 2 more: exactly at the limit

        over = moderate(http, "z")
        error = assert_openai_error(over, 429, "rate_limit_exceeded")
        assert error["type"] == "tokens"
        assert 1 <= int(over.headers["retry-after"]) <= 60
        assert over.headers["x-ratelimit-remaining-tokens"] == "0"
        assert upstream.rejected_429 == 1


# -- request log, reset, lifecycle -------------------------------------------------------------------------


def test_requests_are_recorded_and_reset_clears_them(upstream: FakeUpstream, client: httpx.Client) -> None:
    before = time.monotonic()
    client.post("/moderations", json={"input": ["a", "b"]}, headers={"X-Custom": "Yes"})
    client.post("/moderate", content=b"garbage")
    client.get("/elsewhere?x=1")

    log = upstream.requests
    assert [(r.method, r.path) for r in log] == [
        ("POST", "/v1/moderations"),
        ("POST", "/v1/moderate"),
        ("GET", "/v1/elsewhere"),
    ]
    assert log[0].json == {"input": ["a", "b"]}
    assert log[0].headers["x-custom"] == "Yes"
    assert all(name == name.lower() for name in log[0].headers)
    assert log[1].json is None and log[1].body == b"garbage"
    assert log[2].query == "x=1"
    assert before <= log[0].received_at <= log[1].received_at <= log[2].received_at <= time.monotonic()
    assert upstream.texts_seen() == ["a", "b"]

    upstream.latency = 0.5
    upstream.fail_next(500, count=3)
    upstream.reset()
    assert upstream.requests == [] and upstream.texts_seen() == []
    assert upstream.latency == 0.0
    assert moderate(client, "after reset").status_code == 200


def test_a_request_answered_after_a_reset_is_not_counted_as_seen(upstream: FakeUpstream) -> None:
    # A hang the client gave up on still answers later: that text belongs to the test before the reset.
    upstream.hang_next(0.5)
    with httpx.Client(base_url=upstream.base_url, timeout=0.1) as http, pytest.raises(httpx.ReadTimeout):
        moderate(http, "from before the reset")
    upstream.reset()
    with httpx.Client(base_url=upstream.base_url, timeout=5.0) as http:
        time.sleep(0.6)  # the hung handler has answered by now
        assert moderate(http, "after the reset").status_code == 200
    assert upstream.texts_seen() == ["after the reset"]


@pytest.mark.integration
def test_base_url_needs_a_running_server_and_stop_is_clean() -> None:
    upstream = FakeUpstream()
    with pytest.raises(RuntimeError):
        _ = upstream.base_url
    upstream.start()
    try:
        assert upstream.base_url.startswith("http://127.0.0.1:") and upstream.base_url.endswith("/v1")
        with pytest.raises(RuntimeError):
            upstream.start()
        with httpx.Client(base_url=upstream.base_url, timeout=2.0) as http:
            assert moderate(http, "hi").status_code == 200
            # A hanging handler and an idle keep-alive connection must not hold stop() up.
            upstream.hang_next(30)
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(moderate, http, "hangs")
                deadline = time.monotonic() + 2
                while len(upstream.requests) < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                started = time.monotonic()
                upstream.stop()
                assert time.monotonic() - started < 1.0
                with pytest.raises(httpx.HTTPError):
                    pending.result().raise_for_status()
    finally:
        upstream.stop()
    assert not upstream.running
    upstream.stop()  # idempotent


@pytest.mark.integration
def test_runs_standalone_until_interrupted() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_upstream", "--port", "0", "--rpm", "5", "--api-key", "k"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert "serving on http://127.0.0.1:" in banner
        base_url = banner.split("serving on ", 1)[1].split()[0]
        with httpx.Client(base_url=base_url, headers={"Authorization": "Bearer k"}, timeout=5.0) as http:
            response = moderate(http, "kill")
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit-requests"] == "5"
        process.send_signal(signal.SIGINT)
        # A guard against a hang, not a time check: on a loaded CI machine stopping took over 5 s once.
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        assert "fake upstream stopped: requests=1 rejected_429=0" in out
        assert err == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


# -- random faults (the chaos run's flaky provider) --------------------------------------------------------


# Each starts a server of its own (a seeded one, so the share of faults is the same on every run).
@pytest.mark.integration
def test_fault_rate_fails_about_that_share_of_calls_with_the_whole_mix() -> None:
    with FakeUpstream(fault_rate=0.3, fault_hang=0.2, seed=11) as server, \
            httpx.Client(base_url=server.base_url, timeout=0.1) as http:
        answers: list[int | str] = []
        for index in range(400):
            try:
                answers.append(moderate(http, f"text {index}").status_code)
            except httpx.TimeoutException:
                answers.append("timeout")
        faults = server.faults
    failed = [a for a in answers if a != 200]
    assert 0.22 * 400 <= len(failed) <= 0.38 * 400, len(failed)
    assert set(faults) == {"429", "500", "502", "503", "timeout"}, faults
    assert sum(faults.values()) == len(failed)
    assert faults["timeout"] == answers.count("timeout")
    for status in (429, 500, 502, 503):
        assert answers.count(status) == faults[str(status)]


@pytest.mark.integration
def test_a_random_429_says_when_to_retry_and_no_fault_rate_means_no_faults() -> None:
    with FakeUpstream(fault_rate=1.0, seed=3) as server, httpx.Client(base_url=server.base_url, timeout=10) as http:
        server.fault_hang = 0
        statuses = set()
        for _ in range(30):
            response = moderate(http, "hello")
            statuses.add(response.status_code)
            if response.status_code == 429:
                assert response.headers["Retry-After"] == "1"
        assert 200 not in statuses and statuses <= {429, 500, 502, 503, 504}
        server.fault_rate = 0.0
        assert all(moderate(http, "hello").status_code == 200 for _ in range(20))


def test_fault_rate_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="fault_rate"):
        FakeUpstream(fault_rate=1.5)
