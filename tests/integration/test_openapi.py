"""`/openapi.json` and `/docs`: an OpenAPI 3.1 document of every route, built from the pydantic schemas that validate
requests, and a docs page that needs no network. (tests/integration/test_openapi_fuzz.py holds the app to it.)"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from app.api.openapi import is_documented
from app.schemas.keys import KeyCreateIn
from app.schemas.moderations import ModerationRequest
from app.schemas.submissions import SubmissionIn


def document(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    body: dict[str, Any] = response.get_json()
    return body


def test_it_is_openapi_3_1_and_describes_every_route(app: Flask, client: FlaskClient) -> None:
    doc = document(client)
    assert doc["openapi"] == "3.1.0"
    served = {(method.lower(), re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule))
              for rule in app.url_map.iter_rules() if is_documented(rule.endpoint)
              for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}}
    described = {(method, path) for path, methods in doc["paths"].items() for method in methods}
    assert described == served
    assert ("post", "/v1/keys") in described and ("delete", "/v1/keys/{key_id}") in described


def test_keyed_operations_say_their_scope_and_errors(app: Flask, client: FlaskClient) -> None:
    doc = document(client)
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            view = app.view_functions[app.url_map.bind("").match(
                re.sub(r"\{[a-z_]+\}", "x", path), method=method.upper())[0]]
            if getattr(view, "keyed", False):
                assert operation["security"] == [{"bearer": []}], path
                assert {"401", "403", "429", "500"} <= set(operation["responses"]), (method, path)
                scope = view.required_scope  # type: ignore[attr-defined]
                assert operation["description"].startswith(f"Scope: `{scope}`" if scope else "Any valid key"), path
            else:
                assert "security" not in operation, path
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert response["$ref"].endswith(f"Error{status}"), (path, status)


def test_request_schemas_are_the_validating_models(client: FlaskClient) -> None:
    schemas = document(client)["components"]["schemas"]
    for model in (SubmissionIn, ModerationRequest, KeyCreateIn):
        own = model.model_json_schema(mode="validation", ref_template="#/components/schemas/{model}")
        own.pop("$defs", None)
        assert schemas[model.__name__] == own, model.__name__
    body = document(client)["paths"]["/v1/submissions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"oneOf": [{"$ref": "#/components/schemas/SubmissionIn"},
                                        {"$ref": "#/components/schemas/SubmissionBatchIn"}]}
    error = schemas["ErrorResponse"]
    assert error["required"] == ["error"]
    assert set(schemas["ErrorDetail"]["required"]) == {"type", "message", "param", "code"}


def test_every_response_documents_the_request_id_and_timing(client: FlaskClient) -> None:
    doc = document(client)
    for name, response in doc["components"]["responses"].items():
        assert {"X-Request-ID", "X-Processing-Time-Ms"} <= set(response["headers"]), name
        if name.startswith("Keyed") and name != "KeyedError401":
            assert "X-RateLimit-Remaining-RPM" in response["headers"], name
    assert doc["components"]["responses"]["KeyedError429"]["headers"]["Retry-After"]["required"] is True


def test_docs_page_is_served_without_any_cdn(client: FlaskClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "/openapi.json" in html and "https://" not in html and "http://" not in html
    for asset in re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', html):
        with client.get(asset) as response:
            assert response.status_code == 200 and len(response.data) > 1000, asset
    assert client.get("/docs/assets/../../../etc/passwd").status_code == 404
