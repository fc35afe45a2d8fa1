"""The property-based API fuzzer: schemathesis generates requests from /openapi.json (valid and invalid ones) and
sends them to the app, in-process, against real PostgreSQL and Redis, with a key holding every scope.

It fails on any 5xx, any status, content type, header or body that the document does not describe, a keyed route
answering without its key, a request that violates the document but is accepted, and any crash.
Bounded (FUZZ_MAX_EXAMPLES per operation, default 50) so it stays a few minutes of CI; raise it locally to dig.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, Phase, settings
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
from tests.conftest import TenantKey, issue_key, make_settings

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "50"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, ignored_auth, negative_data_rejection]


@pytest.fixture(scope="module")
def fuzz_app(database_url: str, redis_url: str) -> Flask:
    # Limits high enough that the fuzzer's own volume is never what it tests.
    app = create_app(make_settings(database_url, redis_url, rate_limit_rpm=10**7, rate_limit_tpm=10**10))
    app.config["TESTING"] = True
    return app


@pytest.fixture(scope="module")
def fuzz_key(fuzz_app: Flask) -> TenantKey:
    return issue_key(fuzz_app.extensions["verdict.db"])


def _document() -> dict[str, Any]:
    # Parametrizing happens at collection, before any fixture: the document of an app with Verdict's routes (no
    # database needed). test_the_fuzzed_document_is_the_served_one holds it equal to what the real app serves.
    app = Flask("verdict-openapi", static_folder=None)
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
