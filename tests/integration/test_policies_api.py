"""`/v1/policies`, `/v1/blocklists`, `/v1/allowlists`, `/v1/default-policy`: documents validated strictly (400 naming
the field), immutable versions, If-Match (412), retirement, the tenant's default, audit events in the same
transaction, tenant isolation and scopes. In-process against real PostgreSQL and Redis."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from app.db import Database
from app.models import AuditEvent, PolicyVersion, Submission
from tests.conftest import TenantKey, issue_key
from tests.integration.test_api_auth import assert_envelope

KIDS: dict[str, Any] = {
    "name": "kids",
    "description": "A children's app",
    "defaults": {"review": 0.3, "block": 0.6},
    "input": {"violence": {"review": 0.4, "block": 0.7}},
    "output": {"violence": {"review": 0.2, "block": 0.5}, "sexual": {"enabled": False}},
}


def create(client: FlaskClient, tenant: TenantKey, document: dict[str, Any] = KIDS) -> dict[str, Any]:
    response = client.post("/v1/policies", json=document, headers=tenant.headers)
    assert response.status_code == 201, response.get_json()
    assert response.headers["Location"] == f"/v1/policies/{document['name']}"
    assert response.headers["ETag"] == '"1"'
    body: dict[str, Any] = response.get_json()
    return body


def events(database: Database, tenant: TenantKey, prefix: str) -> list[AuditEvent]:
    with database.transaction() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.tenant_id == tenant.tenant_id,
                                                             AuditEvent.action.like(f"{prefix}%"))
                                    .order_by(AuditEvent.seq)))


def test_create_read_change_and_every_version_stays(client: FlaskClient, tenant: TenantKey,
                                                    database: Database) -> None:
    created = create(client, tenant)
    assert created["version"] == 1 and created["builtin"] is False
    assert created["document"]["output"]["sexual"] == {"enabled": False}

    changed = {**KIDS, "output": {**KIDS["output"], "violence": {"review": 0.1, "block": 0.4}}}
    response = client.put("/v1/policies/kids", json=changed, headers={**tenant.headers, "If-Match": '"1"'})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["version"] == 2 and response.headers["ETag"] == '"2"'

    # The same document again makes no new version.
    again = client.put("/v1/policies/kids", json=changed, headers=tenant.headers)
    assert again.status_code == 200 and again.get_json()["version"] == 2

    current = client.get("/v1/policies/kids", headers=tenant.headers).get_json()
    assert current["version"] == 2 and current["document"]["output"]["violence"] == {"review": 0.1, "block": 0.4}
    old = client.get("/v1/policies/kids/versions/1", headers=tenant.headers)
    assert old.status_code == 200 and old.get_json()["document"]["output"]["violence"]["review"] == 0.2
    versions = client.get("/v1/policies/kids/versions", headers=tenant.headers).get_json()["data"]
    assert [v["version"] for v in versions] == [2, 1]
    assert client.get("/v1/policies/kids/versions/3", headers=tenant.headers).status_code == 404
    assert client.get("/v1/policies/kids/versions/x", headers=tenant.headers).status_code == 404

    listed = client.get("/v1/policies", headers=tenant.headers).get_json()["data"]
    assert [(p["name"], p["version"], p["builtin"]) for p in listed] == [("default", 1, True), ("kids", 2, False)]

    (created_event,) = events(database, tenant, "policy.created")
    assert created_event.details["version"] == 1 and created_event.actor == tenant.key_id
    (changed_event,) = events(database, tenant, "policy.changed")
    assert changed_event.details["from_version"] == 1 and changed_event.details["to_version"] == 2
    assert changed_event.details["changes"] == [
        {"field": "output.violence.block", "from": 0.5, "to": 0.4},
        {"field": "output.violence.review", "from": 0.2, "to": 0.1},
    ]


def test_a_lost_update_is_refused_with_412(client: FlaskClient, tenant: TenantKey) -> None:
    create(client, tenant)
    first = {**KIDS, "description": "first writer"}
    second = {**KIDS, "description": "second writer"}
    assert client.put("/v1/policies/kids", json=first, headers={**tenant.headers, "If-Match": '"1"'}).status_code \
        == 200
    lost = client.put("/v1/policies/kids", json=second, headers={**tenant.headers, "If-Match": '"1"'})
    assert_envelope(lost, 412, "precondition_failed", "precondition_failed")
    assert lost.get_json()["error"]["param"] == "If-Match"
    bad = client.put("/v1/policies/kids", json=second, headers={**tenant.headers, "If-Match": "yesterday"})
    assert_envelope(bad, 400, "invalid_request_error", "invalid_if_match")
    current = client.get("/v1/policies/kids", headers=tenant.headers).get_json()
    assert current["version"] == 2 and current["description"] == "first writer"


@pytest.mark.parametrize(("document", "param"), [
    ({**KIDS, "input": {"violense": {"review": 0.1, "block": 0.2}}}, "input.violense"),
    ({**KIDS, "output": {"hate": {"review": 0.9, "block": 0.5}}}, "output.hate"),
    ({**KIDS, "defaults": {"review": 1.5, "block": 2}}, "defaults.review"),
    ({**KIDS, "categories": {"violence": {"review": -0.1}}}, "categories.violence.review"),
    ({**KIDS, "input": {"violence": {"review": "0.4"}}}, "input.violence.review"),
    ({**KIDS, "input": {"violence": {}}}, "input.violence"),
    ({**KIDS, "name": "Kids App"}, "name"),
    ({**KIDS, "colour": "red"}, "colour"),
    ({**KIDS, "blocklists": [{"list": "slurs", "category": "hat"}]}, "blocklists[0].category"),
    ({**KIDS, "blocklists": [{"list": "nope", "category": "hate"}]}, "blocklists[0].list"),
    ({**KIDS, "allowlists": [{"list": "nope", "categories": ["sexual"]}]}, "allowlists[0].list"),
    ({**KIDS, "shadow": "kids"}, "shadow"),
    ({**KIDS, "shadow": "nonesuch"}, "shadow"),
    ({**KIDS, "description": "x" * 501}, "description"),
    ({"name": "kids", "input": ["violence"]}, "input"),
])
def test_invalid_documents_are_refused_naming_the_field(client: FlaskClient, tenant: TenantKey,
                                                        document: dict[str, Any], param: str) -> None:
    response = client.post("/v1/policies", json=document, headers=tenant.headers)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["param"] == param and error["message"].startswith(param), error


def test_hostile_and_malformed_bodies(client: FlaskClient, tenant: TenantKey) -> None:
    assert_envelope(client.post("/v1/policies", data="{", headers={**tenant.headers,
                                                                    "Content-Type": "application/json"}),
                    400, "invalid_request_error", "invalid_json")
    assert_envelope(client.post("/v1/policies", data="name=x", headers={**tenant.headers,
                                                                         "Content-Type": "text/plain"}),
                    415, "invalid_request_error", "unsupported_media_type")
    deep: Any = {"name": "deep"}
    for _ in range(200):
        deep = {"input": deep}
    assert client.post("/v1/policies", json=deep, headers=tenant.headers).status_code == 400
    assert client.post("/v1/policies", json={"name": "x\u0000y"}, headers=tenant.headers).status_code == 400
    huge = {**KIDS, "name": "huge", "description": "y" * 2_000_000}
    assert client.post("/v1/policies", json=huge, headers=tenant.headers).status_code == 413
    assert client.put("/v1/policies/kids", json=[1, 2], headers=tenant.headers).status_code == 404  # none yet
    create(client, tenant)
    assert_envelope(client.put("/v1/policies/kids", json=[1, 2], headers=tenant.headers), 400,
                    "invalid_request_error", "invalid_body")


def test_the_builtin_policy_is_read_only(client: FlaskClient, tenant: TenantKey) -> None:
    builtin = client.get("/v1/policies/default", headers=tenant.headers)
    assert builtin.status_code == 200 and builtin.get_json()["builtin"] is True
    assert builtin.get_json()["document"]["categories"]["sexual/minors"] == {"review": 0.2, "block": 0.5}
    for response in (client.post("/v1/policies", json={**KIDS, "name": "default"}, headers=tenant.headers),
                     client.put("/v1/policies/default", json={**KIDS, "name": "default"}, headers=tenant.headers),
                     client.delete("/v1/policies/default", headers=tenant.headers)):
        assert_envelope(response, 409, "conflict_error", "builtin_policy")
    create(client, tenant)
    assert_envelope(client.post("/v1/policies", json=KIDS, headers=tenant.headers), 409, "conflict_error",
                    "policy_exists")


def test_retire_keeps_versions_refuses_new_submissions(client: FlaskClient, tenant: TenantKey,
                                                       database: Database) -> None:
    create(client, tenant)
    response = client.delete("/v1/policies/kids", headers=tenant.headers)
    assert response.status_code == 200 and response.get_json()["retired_at"] is not None
    assert client.delete("/v1/policies/kids", headers=tenant.headers).status_code == 200  # twice: no change
    assert client.get("/v1/policies/kids/versions/1", headers=tenant.headers).status_code == 200
    refused = client.post("/v1/submissions", json={"input": "hello", "policy": "kids"}, headers=tenant.headers)
    assert_envelope(refused, 400, "invalid_request_error", "policy_retired")
    assert_envelope(client.put("/v1/policies/kids", json=KIDS, headers=tenant.headers), 409, "conflict_error",
                    "policy_retired")
    assert [e.action for e in events(database, tenant, "policy.")] == ["policy.created", "policy.retired"]


def test_the_tenant_default_policy(client: FlaskClient, tenant: TenantKey, database: Database) -> None:
    assert client.get("/v1/default-policy", headers=tenant.headers).get_json()["policy"] == "default"
    assert_envelope(client.put("/v1/default-policy", json={"policy": "kids"}, headers=tenant.headers), 400,
                    "invalid_request_error", "unknown_policy")
    create(client, tenant)
    response = client.put("/v1/default-policy", json={"policy": "kids"}, headers=tenant.headers)
    assert response.status_code == 200 and response.get_json()["policy"] == "kids"
    submitted = client.post("/v1/submissions", json={"input": "hello"}, headers=tenant.headers).get_json()
    named = client.post("/v1/submissions", json={"input": "hello", "policy": "default"},
                        headers=tenant.headers).get_json()
    with database.transaction() as session:
        assert session.get(Submission, submitted["id"]).policy_name == "kids"  # type: ignore[union-attr]
        assert session.get(Submission, named["id"]).policy_name == "default"  # type: ignore[union-attr]
    # The default cannot be retired while it is the default.
    assert_envelope(client.delete("/v1/policies/kids", headers=tenant.headers), 409, "conflict_error",
                    "policy_in_use")
    assert client.put("/v1/default-policy", json={"policy": None}, headers=tenant.headers).get_json()["policy"] \
        == "default"
    (event,) = [e for e in events(database, tenant, "tenant.updated")][-1:]
    assert event.details["changes"]["default_policy"] == {"from": "kids", "to": None}


def test_tenants_are_isolated_and_scopes_hold(client: FlaskClient, tenant: TenantKey, other_tenant: TenantKey,
                                              database: Database) -> None:
    create(client, tenant)
    for path in ("/v1/policies/kids", "/v1/policies/kids/versions", "/v1/policies/kids/versions/1",
                 "/v1/policies/kids/shadow-report"):
        assert_envelope(client.get(path, headers=other_tenant.headers), 404, "not_found_error", "not_found")
    assert_envelope(client.put("/v1/policies/kids", json=KIDS, headers=other_tenant.headers), 404,
                    "not_found_error", "not_found")
    # The other tenant may have its own "kids".
    create(client, other_tenant, {**KIDS, "description": "theirs"})
    assert client.get("/v1/policies/kids", headers=tenant.headers).get_json()["description"] == "A children's app"
    reader = issue_key(database, tenant_name=tenant.tenant_name, scopes=("read",))
    assert client.get("/v1/policies/kids", headers=reader.headers).status_code == 200
    assert_envelope(client.put("/v1/policies/kids", json=KIDS, headers=reader.headers), 403, "permission_error",
                    "missing_scope")
    assert_envelope(client.put("/v1/blocklists/x", json={"terms": ["a"]}, headers=reader.headers), 403,
                    "permission_error", "missing_scope")


def test_blocklists_are_versioned_validated_and_audited(client: FlaskClient, tenant: TenantKey,
                                                        database: Database) -> None:
    put = client.put("/v1/blocklists/slurs", json={"terms": ["badword", "Bad Phrase"], "patterns": [r"\bfoo+\b"]},
                     headers=tenant.headers)
    assert put.status_code == 200, put.get_json()
    assert put.get_json()["version"] == 1 and put.get_json()["object"] == "blocklist"
    same = client.put("/v1/blocklists/slurs", json={"terms": ["Bad Phrase", "badword"], "patterns": [r"\bfoo+\b"]},
                      headers=tenant.headers)
    assert same.get_json()["version"] == 1  # the same list in another order: no change
    changed = client.put("/v1/blocklists/slurs", json={"terms": ["badword"]}, headers=tenant.headers)
    assert changed.get_json()["version"] == 2
    assert client.get("/v1/blocklists", headers=tenant.headers).get_json()["data"][0]["name"] == "slurs"
    assert client.get("/v1/allowlists/slurs", headers=tenant.headers).status_code == 404  # another kind
    (first, second) = events(database, tenant, "blocklist.changed")
    assert (first.details["version"], second.details["version"]) == (1, 2)
    assert second.details["terms_removed"] == 1 and "badword" not in str(second.details)

    for body, param in (({"patterns": ["(a)\\1"]}, "patterns[0]"),  # a backreference: not RE2
                        ({"patterns": ["(?=a)"]}, "patterns[0]"),  # a lookahead
                        ({"patterns": ["("]}, "patterns[0]"),
                        ({"terms": ["..."]}, "terms[0]"),
                        ({"terms": [""]}, "terms[0]"),
                        ({"terms": "badword"}, "terms"),
                        ({"terms": ["x" * 101]}, "terms[0]"),
                        ({"terms": ["a"] * 1001}, "terms"),
                        ({"words": ["a"]}, "words")):
        response = client.put("/v1/blocklists/slurs", json=body, headers=tenant.headers)
        assert response.status_code == 400, (body, response.get_json())
        assert response.get_json()["error"]["param"] == param, (body, response.get_json())
    assert_envelope(client.put("/v1/blocklists/Bad%20Name", json={"terms": ["a"]}, headers=tenant.headers), 400,
                    "invalid_request_error", "invalid_name")


def test_versions_are_immutable_rows(client: FlaskClient, tenant: TenantKey, database: Database) -> None:
    create(client, tenant)
    client.put("/v1/policies/kids", json={**KIDS, "description": "v2"}, headers=tenant.headers)
    with database.transaction() as session:
        rows = session.scalars(select(PolicyVersion).order_by(PolicyVersion.id.desc()).limit(2)).all()
        assert [r.version for r in rows] == [2, 1]
        assert rows[1].document["description"] == "A children's app" and rows[0].digest != rows[1].digest
