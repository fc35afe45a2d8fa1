"""The synchronous path (`POST /v1/moderations`) against the fake upstream over real HTTP: it reads and fills the
verdict cache, spends the upstream budget every worker shares, retries an unusable answer, and lets the fallback
answer when the provider stays unavailable (issue 15 item 3)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from app import create_app
from app.moderation.registry import build_rate_limiter
from tests.conftest import TenantKey, make_settings
from tests.fake_upstream import ONE_BAD_RESULT, FakeUpstream
from tests.lanes import integration_fixture

UPSTREAM_KEY = "sk-upstream-sync"
UPSTREAM_MODEL = "omni-moderation-latest"


@integration_fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY) as fake:
        yield fake


def openai_app(database_url: str, redis_url: str, upstream: FakeUpstream, **overrides: Any) -> Flask:
    # A short lease and timeout keep a wait for upstream capacity to a second (Settings.upstream_capacity_wait).
    values: dict[str, Any] = {"moderation_provider": "openai", "upstream_base_url": upstream.base_url,
                              "upstream_api_key": UPSTREAM_KEY, "upstream_model": UPSTREAM_MODEL,
                              "processing_lease_seconds": 10, "upstream_timeout_seconds": 2}
    values.update(overrides)
    flask_app = create_app(make_settings(database_url, redis_url, **values))
    flask_app.config["TESTING"] = True
    return flask_app


def moderate(client: FlaskClient, tenant: TenantKey, text: str) -> Any:
    return client.post("/v1/moderations", json={"input": text}, headers=tenant.headers)


def stored_verdict(client: FlaskClient, tenant: TenantKey, moderation_id: str) -> dict[str, Any]:
    submission_id = "sub_" + moderation_id.removeprefix("modr-")
    response = client.get(f"/v1/submissions/{submission_id}", headers=tenant.headers)
    assert response.status_code == 200, response.get_json()
    verdict: dict[str, Any] = response.get_json()["verdict"]
    return verdict


def moderation_calls(upstream: FakeUpstream) -> list[Any]:
    return [r for r in upstream.requests if r.path in ("/v1/moderations", "/v1/moderate")]


def test_a_text_moderated_once_is_answered_from_the_cache(database_url: str, redis_url: str, upstream: FakeUpstream,
                                                          tenant: TenantKey, other_tenant: TenantKey) -> None:
    client = openai_app(database_url, redis_url, upstream).test_client()
    first = moderate(client, tenant, "you are a stupid idiot")
    second = moderate(client, tenant, "you are a stupid idiot")
    assert first.status_code == second.status_code == 200, (first.get_json(), second.get_json())
    assert len(moderation_calls(upstream)) == 1
    assert first.get_json()["results"] == second.get_json()["results"]
    assert first.get_json()["results"][0]["flagged"] is True
    assert stored_verdict(client, tenant, first.get_json()["id"])["cached"] is False
    assert stored_verdict(client, tenant, second.get_json()["id"])["cached"] is True
    # The cache is per tenant: another tenant's same text goes upstream.
    assert moderate(client, other_tenant, "you are a stupid idiot").status_code == 200
    assert len(moderation_calls(upstream)) == 2


def test_without_a_cache_every_call_goes_upstream(database_url: str, redis_url: str, upstream: FakeUpstream,
                                                  tenant: TenantKey) -> None:
    client = openai_app(database_url, redis_url, upstream, cache_ttl_seconds=0).test_client()
    for _ in range(2):
        assert moderate(client, tenant, "have a lovely day").status_code == 200
    assert len(moderation_calls(upstream)) == 2


def test_an_unusable_result_is_asked_again_not_decided(database_url: str, redis_url: str, upstream: FakeUpstream,
                                                       tenant: TenantKey) -> None:
    client = openai_app(database_url, redis_url, upstream).test_client()
    upstream.malformed_next(ONE_BAD_RESULT)
    retried = {"code": "upstream_malformed", "source": "sync"}
    before = REGISTRY.get_sample_value("verdict_moderation_retries_total", retried) or 0.0
    response = client.post("/v1/moderations", json={"input": ["you idiot", "have a lovely day"]},
                           headers=tenant.headers)
    assert response.status_code == 200, response.get_json()
    assert len(moderation_calls(upstream)) == 2
    # The one retry is counted, as a synchronous one.
    assert REGISTRY.get_sample_value("verdict_moderation_retries_total", retried) == before + 1
    assert [r["flagged"] for r in response.get_json()["results"]] == [True, False]
    assert stored_verdict(client, tenant, response.get_json()["id"])["degraded"] is False


def test_the_fallback_answers_when_the_upstream_keeps_failing(database_url: str, redis_url: str,
                                                              upstream: FakeUpstream, tenant: TenantKey) -> None:
    client = openai_app(database_url, redis_url, upstream, moderation_fallback_provider="local").test_client()
    upstream.fail_next(500, count=3)
    response = moderate(client, tenant, "thank you so much")
    assert response.status_code == 200, response.get_json()
    assert len(moderation_calls(upstream)) == 3
    verdict = stored_verdict(client, tenant, response.get_json()["id"])
    assert verdict["degraded"] is True and verdict["provider"] == "local"
    # A degraded answer is never cached: the same text goes upstream again once it is back.
    assert moderate(client, tenant, "thank you so much").status_code == 200
    assert len(moderation_calls(upstream)) == 4
    submission_id = "sub_" + response.get_json()["id"].removeprefix("modr-")
    audit = client.get("/v1/audit", query_string={"subject": submission_id, "action": "moderation.completed"},
                       headers=tenant.headers)
    assert audit.status_code == 200, audit.get_json()
    [completed] = audit.get_json()["data"]
    assert completed["details"]["degraded"] is True
    assert completed["details"]["degraded_reason"] == "upstream_error"

def test_without_a_fallback_a_failing_upstream_is_503(database_url: str, redis_url: str, upstream: FakeUpstream,
                                                      tenant: TenantKey) -> None:
    client = openai_app(database_url, redis_url, upstream).test_client()
    upstream.fail_next(500, count=3)
    response = moderate(client, tenant, "thank you so much")
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "upstream_error"


@pytest.mark.parametrize("fallback", ["local", "none"])
def test_sync_calls_spend_the_shared_upstream_budget(database_url: str, redis_url: str, upstream: FakeUpstream,
                                                     tenant: TenantKey, fallback: str) -> None:
    # A budget of 1 a minute for this upstream key (unique to the test), with the upstream enforcing the same.
    key = f"{UPSTREAM_KEY}-{fallback}-{tenant.tenant_id[-6:]}"
    upstream.api_key, upstream.rpm = key, 1
    flask_app = openai_app(database_url, redis_url, upstream, upstream_api_key=key, upstream_rpm=1,
                           moderation_fallback_provider=fallback)
    client = flask_app.test_client()
    first = moderate(client, tenant, "text number 1: have a lovely day")
    assert first.status_code == 200, first.get_json()
    # The second finds no capacity within its wait, and is answered by the fallback (or refused): never sent, so
    # the upstream refuses nothing.
    second = moderate(client, tenant, "text number 2: have a lovely day")
    assert len(moderation_calls(upstream)) == 1 and upstream.rejected_429 == 0
    if fallback == "local":
        assert second.status_code == 200, second.get_json()
        assert stored_verdict(client, tenant, second.get_json()["id"])["degraded"] is True
    else:
        assert second.status_code == 503
        assert second.get_json()["error"]["code"] == "upstream_capacity_wait"
    # The call was counted where every worker's limiter reads it.
    limiter = build_rate_limiter(flask_app.extensions["verdict.settings"], key)
    assert limiter is not None
    assert limiter.state().requests_used == 1
