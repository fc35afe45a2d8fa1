"""`/v1/policies` (versioned tenant policies, shadow reports, backtests), `/v1/blocklists` and `/v1/allowlists`
(term lists), `/v1/default-policy` and `/v1/backtests/{id}`. Writing needs `admin`, reading `read`; backtests
`admin`. See docs/api.md ("Policies") and docs/moderation.md ("Policies")."""

from __future__ import annotations

import re

from flask import Blueprint, Response, jsonify, request

from app.api.auth import current_key_cache, current_principal, require_scope
from app.api.body import read_json_object
from app.api.request_context import current_request_id
from app.api.transactions import request_session, transaction
from app.extensions import current_settings
from app.models import Backtest, TermList, utcnow
from app.schemas.policies import (
    BacktestIn,
    BacktestOut,
    BacktestResult,
    DefaultPolicyIn,
    DefaultPolicyOut,
    PolicyDocument,
    PolicyList,
    PolicyOut,
    PolicyVersionList,
    PolicyVersionOut,
    ShadowReportOut,
    ShadowReportQuery,
    TermListIn,
    TermListList,
    TermListOut,
)
from app.use_cases import policies
from app.use_cases.errors import InvalidInput, NotFound

bp = Blueprint("policies", __name__)

_LIST_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_IF_MATCH = re.compile(r'\s*(?:W/)?"?([0-9]{1,9})"?\s*')


def policy_out(view: policies.PolicyView) -> PolicyOut:
    return PolicyOut(name=view.name, version=view.version, builtin=view.builtin,
                     description=view.document.get("description"), document=view.document,
                     created_at=view.created_at, updated_at=view.updated_at, retired_at=view.retired_at,
                     links={"self": f"/v1/policies/{view.name}", "versions": f"/v1/policies/{view.name}/versions"})


def _version_out(view: policies.PolicyView) -> PolicyVersionOut:
    return PolicyVersionOut(name=view.name, version=view.version, document=view.document,
                            created_at=view.created_at if view.builtin else view.updated_at,
                            created_by=view.created_by)


def _with_etag(view: policies.PolicyView, status: int = 200) -> tuple[Response, int, dict[str, str]]:
    return jsonify(policy_out(view).model_dump(mode="json")), status, {"ETag": f'"{view.version}"'}


def _if_match() -> int | None:
    raw = request.headers.get("If-Match")
    if raw is None or raw.strip() == "*":
        return None
    found = _IF_MATCH.fullmatch(raw)
    if found is None:
        raise InvalidInput('If-Match: give the current version, as the ETag says ("3").', param="If-Match",
                           code="invalid_if_match")
    return int(found.group(1))


@bp.get("/v1/policies")
@require_scope("read")
@transaction
def list_policies() -> Response:
    views = policies.list_policies(request_session(), current_principal().tenant_id)
    return jsonify(PolicyList(data=[policy_out(v) for v in views]).model_dump(mode="json"))


@bp.post("/v1/policies")
@require_scope("admin")
@transaction
def create_policy() -> tuple[Response, int, dict[str, str]]:
    document = PolicyDocument.model_validate(read_json_object())
    principal = current_principal()
    view = policies.create_policy(request_session(), principal.tenant_id, document, actor=principal.key_id,
                                  request_id=current_request_id())
    body, status, headers = _with_etag(view, 201)
    return body, status, {**headers, "Location": f"/v1/policies/{view.name}"}


@bp.get("/v1/policies/<name>")
@require_scope("read")
@transaction
def get_policy(name: str) -> tuple[Response, int, dict[str, str]]:
    return _with_etag(policies.get_policy(request_session(), current_principal().tenant_id, name))


@bp.put("/v1/policies/<name>")
@require_scope("admin")
@transaction
def update_policy(name: str) -> tuple[Response, int, dict[str, str]]:
    principal = current_principal()
    # Another tenant's policy is missing whatever the body says: looked up first.
    policies.get_policy(request_session(), principal.tenant_id, name)
    if_match = _if_match()
    document = PolicyDocument.model_validate(read_json_object())
    view, _changed = policies.update_policy(request_session(), principal.tenant_id, name, document,
                                            if_match=if_match, actor=principal.key_id,
                                            request_id=current_request_id())
    return _with_etag(view)


@bp.delete("/v1/policies/<name>")
@require_scope("admin")
@transaction
def retire_policy(name: str) -> tuple[Response, int, dict[str, str]]:
    principal = current_principal()
    return _with_etag(policies.retire_policy(request_session(), principal.tenant_id, name, actor=principal.key_id,
                                             request_id=current_request_id()))


@bp.get("/v1/policies/<name>/versions")
@require_scope("read")
@transaction
def list_versions(name: str) -> Response:
    views = policies.list_versions(request_session(), current_principal().tenant_id, name)
    return jsonify(PolicyVersionList(data=[_version_out(v) for v in views]).model_dump(mode="json"))


@bp.get("/v1/policies/<name>/versions/<version>")
@require_scope("read")
@transaction
def get_version(name: str, version: str) -> Response:
    if not version.isascii() or not version.isdigit() or len(version) > 9:
        raise NotFound("No such policy version.", param="version")
    view = policies.get_policy(request_session(), current_principal().tenant_id, name, int(version))
    return jsonify(_version_out(view).model_dump(mode="json"))


@bp.get("/v1/policies/<name>/shadow-report")
@require_scope("read")
@transaction
def shadow_report(name: str) -> Response:
    query = ShadowReportQuery.model_validate(request.args.to_dict())
    report = policies.shadow_report(request_session(), current_principal().tenant_id, name, start=query.start,
                                    end=query.end)
    return jsonify(ShadowReportOut(**report).model_dump(mode="json"))


@bp.post("/v1/policies/<name>/backtest")
@require_scope("admin")
@transaction
def backtest(name: str) -> tuple[Response, int, dict[str, str]]:
    session, principal = request_session(), current_principal()
    policies.get_policy(session, principal.tenant_id, name)  # 404 before anything else, whatever the body
    body = BacktestIn.model_validate(read_json_object())
    limit = current_settings().backtest_sync_max_verdicts
    if limit and policies.count_backtest_verdicts(session, principal.tenant_id, name, body, limit=limit) <= limit:
        result = policies.run_backtest_now(session, principal.tenant_id, name, body)
        now = utcnow()
        out = BacktestOut(id=None, policy=name, candidate=_candidate(body), status="completed", start=body.start,
                          end=body.end, verdicts=body.verdicts, result=BacktestResult(**result), error=None,
                          created_at=now, completed_at=now, links={})
        return jsonify(out.model_dump(mode="json")), 200, {}
    job = policies.queue_backtest(session, principal.tenant_id, name, body, actor=principal.key_id)
    return jsonify(backtest_out(job).model_dump(mode="json")), 202, {"Location": f"/v1/backtests/{job.id}"}


def _candidate(body: BacktestIn) -> dict[str, object]:
    if body.version is not None:
        return {"version": body.version}
    assert body.document is not None  # noqa: S101 - the schema asks for one of them
    return {"document": body.document.canonical()}


def backtest_out(job: Backtest) -> BacktestOut:
    request_body = policies.backtest_request(job)
    return BacktestOut(
        id=job.id, policy=job.policy_name, candidate=_candidate(request_body), status=job.status,
        start=request_body.start, end=request_body.end, verdicts=request_body.verdicts,
        result=None if job.result is None else BacktestResult(**job.result), error=job.error,
        created_at=job.created_at, completed_at=job.completed_at, links={"self": f"/v1/backtests/{job.id}"})


@bp.get("/v1/backtests/<backtest_id>")
@require_scope("admin")
@transaction
def get_backtest(backtest_id: str) -> Response:
    job = policies.get_backtest(request_session(), current_principal().tenant_id, backtest_id)
    return jsonify(backtest_out(job).model_dump(mode="json"))


# ---- the tenant's default --------------------------------------------------------------------------------------


@bp.get("/v1/default-policy")
@require_scope("read")
@transaction
def get_default_policy() -> Response:
    name = policies.default_policy_name(request_session(), current_principal().tenant_id)
    return jsonify(DefaultPolicyOut(policy=name).model_dump(mode="json"))


@bp.put("/v1/default-policy")
@require_scope("admin")
@transaction
def set_default_policy() -> Response:
    body = DefaultPolicyIn.model_validate(read_json_object())
    principal = current_principal()
    name = policies.set_default_policy(request_session(), principal.tenant_id, body.policy, actor=principal.key_id,
                                       request_id=current_request_id())
    # The tenant's keys carry its default (app/use_cases/authentication.py): this process uses the new one at once,
    # the others within API_KEY_CACHE_SECONDS.
    current_key_cache().forget_tenant(principal.tenant_id)
    return jsonify(DefaultPolicyOut(policy=name).model_dump(mode="json"))


# ---- term lists ------------------------------------------------------------------------------------------------


def term_list_out(row: TermList) -> TermListOut:
    return TermListOut(object=row.kind, name=row.name, version=row.version,
                       description=row.description, terms=row.terms, patterns=row.patterns,
                       created_at=row.created_at, updated_at=row.updated_at,
                       links={"self": f"/v1/{row.kind}s/{row.name}"})


def _put_list(kind: str, name: str) -> Response:
    if not _LIST_NAME.fullmatch(name):
        raise InvalidInput("name: 1 to 64 of lower-case letters, digits, '.', '_', '-', starting with a letter or "
                           "digit.", param="name", code="invalid_name")
    body = TermListIn.model_validate(read_json_object())
    principal = current_principal()
    row, _changed = policies.put_term_list(request_session(), principal.tenant_id, kind, name, body,
                                           actor=principal.key_id, request_id=current_request_id())
    return jsonify(term_list_out(row).model_dump(mode="json"))


@bp.put("/v1/blocklists/<name>")
@require_scope("admin")
@transaction
def put_blocklist(name: str) -> Response:
    return _put_list("blocklist", name)


@bp.put("/v1/allowlists/<name>")
@require_scope("admin")
@transaction
def put_allowlist(name: str) -> Response:
    return _put_list("allowlist", name)


@bp.get("/v1/blocklists/<name>")
@require_scope("read")
@transaction
def get_blocklist(name: str) -> Response:
    row = policies.get_term_list(request_session(), current_principal().tenant_id, "blocklist", name)
    return jsonify(term_list_out(row).model_dump(mode="json"))


@bp.get("/v1/allowlists/<name>")
@require_scope("read")
@transaction
def get_allowlist(name: str) -> Response:
    row = policies.get_term_list(request_session(), current_principal().tenant_id, "allowlist", name)
    return jsonify(term_list_out(row).model_dump(mode="json"))


@bp.get("/v1/blocklists")
@require_scope("read")
@transaction
def list_blocklists() -> Response:
    rows = policies.list_term_lists(request_session(), current_principal().tenant_id, "blocklist")
    return jsonify(TermListList(data=[term_list_out(r) for r in rows]).model_dump(mode="json"))


@bp.get("/v1/allowlists")
@require_scope("read")
@transaction
def list_allowlists() -> Response:
    rows = policies.list_term_lists(request_session(), current_principal().tenant_id, "allowlist")
    return jsonify(TermListList(data=[term_list_out(r) for r in rows]).model_dump(mode="json"))
