"""The official `openai` SDK, with strict response validation on, against `/v1/moderations` over real HTTP: every
input form OpenAI accepts, the exact response shape (13 categories, slash-and-hyphen names,
`category_applied_input_types`), and OpenAI's error classes for Verdict's errors."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from flask import Flask
from werkzeug.serving import make_server

from app.moderation.taxonomy import CATEGORIES
from tests.conftest import TenantKey
from tests.lanes import integration_fixture

ALL_13 = ["harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
          "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
          "violence/graphic"]


@integration_fixture(scope="module")
def base_url(app: Flask) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    thread.join(timeout=10)


def sdk(base_url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, _strict_response_validation=True)


def test_the_taxonomy_is_openais_13() -> None:
    assert sorted(CATEGORIES) == sorted(ALL_13) and len(CATEGORIES) == 13


@pytest.mark.parametrize(("given", "count"), [
    pytest.param("have a lovely day", 1, id="string"),
    pytest.param(["have a lovely day", "you are a stupid idiot"], 2, id="list-of-strings"),
    pytest.param([{"type": "text", "text": "have a lovely day"}, {"type": "text", "text": "shut up, moron"}], 2,
                 id="list-of-text-parts"),
])
def test_every_text_input_form_in_strict_mode(base_url: str, tenant: TenantKey, given: Any, count: int) -> None:
    with sdk(base_url, tenant.plaintext) as client:
        raw = client.moderations.with_raw_response.create(input=given, model="omni-moderation-latest")
        result = raw.parse()  # strict: any missing or mistyped field raises here
    assert raw.headers["X-Request-ID"] and "X-RateLimit-Remaining-RPM" in raw.headers
    assert result.id.startswith("modr-") and result.model and len(result.results) == count
    for moderation in result.results:
        dumped = moderation.model_dump(by_alias=True)
        # Every one of the 13, under OpenAI's own names (the SDK's aliases); JSON objects have no order.
        assert sorted(dumped["categories"]) == sorted(ALL_13)
        assert sorted(dumped["category_scores"]) == sorted(ALL_13)
        assert sorted(dumped["category_applied_input_types"]) == sorted(ALL_13)
        assert moderation.categories.model_extra == {} and moderation.category_scores.model_extra == {}
        assert all(isinstance(v, bool) for v in dumped["categories"].values())
        assert all(0.0 <= v <= 1.0 for v in dumped["category_scores"].values())
        assert all(v in ([], ["text"]) for v in dumped["category_applied_input_types"].values())
        assert isinstance(moderation.flagged, bool)
    if count == 2 and isinstance(given[1], str):
        assert result.results[1].flagged and result.results[1].categories.harassment
        assert not result.results[0].flagged


def test_an_image_part_is_refused_clearly(base_url: str, tenant: TenantKey) -> None:
    with sdk(base_url, tenant.plaintext) as client, pytest.raises(openai.BadRequestError) as raised:
        client.moderations.create(input=[{"type": "text", "text": "look"},
                                         {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}])
    error = raised.value.body
    assert isinstance(error, dict)
    assert error["code"] == "image_not_supported" and error["param"] == "input[1]"
    assert "image" in error["message"]


def test_verdicts_errors_arrive_as_openais_error_classes(base_url: str, tenant: TenantKey) -> None:
    with sdk(base_url, "vk_0000000000000000_" + "x" * 43) as client, pytest.raises(openai.AuthenticationError):
        client.moderations.create(input="hello")
    with sdk(base_url, tenant.plaintext) as client, pytest.raises(openai.BadRequestError) as raised:
        client.moderations.create(input="")
    assert isinstance(raised.value.body, dict) and raised.value.body["param"] == "input[0]"
    with sdk(base_url, tenant.plaintext) as client:
        created = client.post("/keys", cast_to=dict, body={"scopes": ["submit"], "rate_limit_rpm": 1})
    with sdk(base_url, created["secret"]) as client:
        client.moderations.create(input="one")
        with pytest.raises(openai.RateLimitError) as too_many:
            client.moderations.create(input="two")
    assert int(too_many.value.response.headers["Retry-After"]) >= 1
