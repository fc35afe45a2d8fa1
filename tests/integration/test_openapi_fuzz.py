"""The property-based API fuzzer: schemathesis generates requests from /openapi.json (valid and invalid ones) and
sends them to the app, in-process, against real PostgreSQL and Redis, with a key holding every scope.

It fails on any 5xx, any status, content type, header or body that the document does not describe, a keyed route
answering without its key, a request that violates the document but is accepted, and any crash.
Bounded (FUZZ_MAX_EXAMPLES per operation, default 50) so it stays a few minutes of CI; raise it locally to dig.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as hypothesis_strategies
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app import api, create_app
from app.api.openapi import build_document
from app.extensions import SETTINGS
from app.use_cases.authentication import SCOPES
from tests.conftest import TenantKey, issue_key, make_settings

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "50"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, ignored_auth, negative_data_rejection]


@pytest.fixture(scope="module")
def fuzz_app(database_url: str, redis_url: str) -> Flask:
    # Limits high enough that the fuzzer's own volume is never what it tests: its invalid-auth probes all come from
    # one address, and their throttling (tests/integration/test_auth_throttling.py) would turn its 401s into 429s.
    app = create_app(make_settings(database_url, redis_url, rate_limit_rpm=10**7, rate_limit_tpm=10**10,
                                   auth_failures_per_minute=10**7))
    app.config["TESTING"] = True
    return app


@pytest.fixture(scope="module")
def fuzz_key(fuzz_app: Flask) -> TenantKey:
    return issue_key(fuzz_app.extensions["verdict.db"], scopes=SCOPES)  # every scope: every operation is reached


def _document() -> dict[str, Any]:
    # Parametrizing happens at collection, before any fixture: the document of an app with Verdict's routes (no
    # database needed). test_the_fuzzed_document_is_the_served_one holds it equal to what the real app serves.
    app = Flask("verdict-openapi", static_folder=None)
    # The routes read their settings as they are registered (the key cache's lifetime); none of them is used here.
    app.extensions[SETTINGS] = make_settings("sqlite://", "memory://")
    api.init_app(app)
    return build_document(app)


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.generate])
def test_every_operation_answers_as_documented(case: Any, fuzz_app: Flask, fuzz_key: TenantKey) -> None:
    case.operation.schema.app = fuzz_app  # in-process, through WSGI
    case.call_and_validate(headers=fuzz_key.headers, checks=CHECKS, app=fuzz_app)


def test_the_fuzzed_document_is_the_served_one(fuzz_app: Flask) -> None:
    assert fuzz_app.test_client().get("/openapi.json").get_json() == DOCUMENT


def test_the_fuzzer_reaches_every_operation() -> None:
    # The guard against a fuzzer that silently tests nothing: every operation of the document is generated for.
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(methods) for methods in DOCUMENT["paths"].values()) >= 28


# ---- integers at and beyond 64-bit bounds (issue 17 item 6) ----------------------------------------------------
# The generator above keeps a cursor an opaque string and rarely reaches the bounds of an integer; these properties
# put such integers where they reach SQL: inside cursors of both shapes, and in every integer query parameter.

BOUNDS = [0, -1, 2**31, 2**53 + 1, 2**63 - 2, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**40]
# Hypothesis draws from both: every bound in turn, and any integer around them.
BOUNDARY_INTEGERS = hypothesis_strategies.one_of(
    hypothesis_strategies.sampled_from(BOUNDS),
    hypothesis_strategies.integers(min_value=2**62, max_value=2**65),
    hypothesis_strategies.integers(),
)
# The two cursor shapes the server encodes (audit: {"after": seq}; keyset: [created_at, id]), and wrong ones.
CURSOR_SHAPES = {
    "audit": lambda n: {"after": n},
    "keyset-id": lambda n: ["2026-01-01T00:00:00+00:00", n],
    "keyset-time": lambda n: [n, "sub_x"],
    "bare": lambda n: n,
    "audit-string": lambda n: {"after": str(n)},
}


def _get_parameters(kind: str | None) -> list[tuple[str, str]]:
    """(path, name) of every query parameter of the untemplated GET routes: `cursor`, or those of type integer."""
    found = []
    for path, methods in DOCUMENT["paths"].items():
        for parameter in methods.get("get", {}).get("parameters", []):
            if "{" in path or parameter.get("in") != "query":
                continue
            types = {parameter.get("schema", {}).get("type")} | {
                option.get("type") for option in parameter.get("schema", {}).get("anyOf", [])}
            if (kind is None and parameter["name"] == "cursor") or (kind is not None and kind in types):
                found.append((path, parameter["name"]))
    return found


def _encode(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def _assert_answered(fuzz_app: Flask, fuzz_key: TenantKey, path: str, params: dict[str, str]) -> None:
    response = fuzz_app.test_client().get(path, query_string=params, headers=fuzz_key.headers)
    assert response.status_code < 500, (path, params, response.get_data(as_text=True)[:300])
    if response.status_code >= 400:
        assert set(response.get_json()["error"]) >= {"type", "message", "code"}


def test_the_bound_properties_reach_cursors_and_integers() -> None:
    assert ("/v1/audit", "cursor") in _get_parameters(None) and ("/v1/submissions", "cursor") in _get_parameters(None)
    assert ("/v1/audit/verify", "start_seq") in _get_parameters("integer")


@pytest.mark.parametrize("shape", list(CURSOR_SHAPES))
@pytest.mark.parametrize(("path", "name"), _get_parameters(None))
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(number=BOUNDARY_INTEGERS)
def test_cursors_carrying_64_bit_bounds_never_fail(path: str, name: str, shape: str, number: int, fuzz_app: Flask,
                                                   fuzz_key: TenantKey) -> None:
    _assert_answered(fuzz_app, fuzz_key, path, {name: _encode(CURSOR_SHAPES[shape](number))})


@pytest.mark.parametrize(("path", "name"), _get_parameters("integer"))
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(number=BOUNDARY_INTEGERS)
def test_integer_parameters_at_64_bit_bounds_never_fail(path: str, name: str, number: int, fuzz_app: Flask,
                                                        fuzz_key: TenantKey) -> None:
    _assert_answered(fuzz_app, fuzz_key, path, {name: str(number)})


@pytest.mark.parametrize(("path", "name"), _get_parameters(None))
def test_cursors_at_every_bound_never_fail(path: str, name: str, fuzz_app: Flask, fuzz_key: TenantKey) -> None:
    # The bounds themselves, every one, whatever hypothesis happens to draw.
    for shape in CURSOR_SHAPES.values():
        for number in BOUNDS:
            _assert_answered(fuzz_app, fuzz_key, path, {name: _encode(shape(number))})
