"""`GET /openapi.json` (OpenAPI 3.1) and `GET /docs` (Swagger UI), generated from the URL map, `require_scope` and the
schemas; this module adds only what the code cannot say (summaries, models per route, errors). See docs/api.md."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from flask import Blueprint, Flask, Response, current_app, jsonify, send_from_directory
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from app.schemas.audit import AuditExportQuery, AuditPage, AuditQuery, AuditVerificationOut, AuditVerifyQuery
from app.schemas.errors import ErrorResponse
from app.schemas.health import HealthOut, ReadinessOut
from app.schemas.keys import KeyCreateIn, KeyList, KeyOut, KeyWithSecret
from app.schemas.moderations import ModelList, ModerationRequest, ModerationResponse
from app.schemas.policies import (
    BacktestIn,
    BacktestOut,
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
from app.schemas.reviews import (
    ClaimNextIn,
    ReviewDecisionIn,
    ReviewDetailOut,
    ReviewItemOut,
    ReviewListQuery,
    ReviewOverrideIn,
    ReviewPage,
    ReviewStatsOut,
    ReviewStatsQuery,
)
from app.schemas.submissions import (
    SubmissionAccepted,
    SubmissionBatchAccepted,
    SubmissionBatchIn,
    SubmissionGetQuery,
    SubmissionIn,
    SubmissionListQuery,
    SubmissionOut,
    SubmissionPage,
)
from app.schemas.webhooks import (
    CallbackSecretOut,
    CallbackSecretWithSecret,
    DeliveryListQuery,
    DeliveryOut,
    DeliveryPage,
    EmptyBody,
    WebhookEndpointDeleted,
    WebhookEndpointIn,
    WebhookEndpointList,
    WebhookEndpointOut,
    WebhookEndpointWithSecret,
)

bp = Blueprint("openapi", __name__)

Content = type[BaseModel] | Literal["ndjson-or-csv", "html", "openapi", "prometheus"]


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    responses: dict[int, Content | tuple[type[BaseModel], ...]]
    body: tuple[type[BaseModel], ...] = ()
    # The body may be left out altogether (the webhook actions take none).
    body_optional: bool = False
    query: type[BaseModel] | None = None
    # Errors beyond those every route of its kind may answer (see `_errors`).
    errors: tuple[int, ...] = ()
    description: str = ""
    # Request headers beyond those every route takes (`If-Match`).
    headers: tuple[dict[str, Any], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    # Headers a success may carry (beyond those every response of its kind carries).
    success_headers: tuple[str, ...] = ()


_SUBMIT = "Submissions"
_MODERATE = "OpenAI-compatible moderation"
_WEBHOOKS = "Webhooks"
_AUDIT = "Audit"
_KEYS = "Keys"
_POLICIES = "Policies"
_IF_MATCH = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"},
             "description": "The version you read (the `ETag`, `\"3\"`): another version current is a lost "
                            "update, refused with 412."}
_REVIEW = "Human review"
_OPS = "Operations"

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", "/healthz"): Operation("Liveness: the process answers", _OPS, {200: HealthOut}),
    ("GET", "/readyz"): Operation("Readiness: the database and the broker answer", _OPS, {200: ReadinessOut},
                                  errors=(503,)),
    ("GET", "/metrics"): Operation(
        "Prometheus metrics: every process's counters and the deployment's gauges", _OPS, {200: "prometheus"},
        errors=(401,), description="With METRICS_TOKEN set, only `Authorization: Bearer <METRICS_TOKEN>` is "
        "answered; the metrics are listed in docs/operations.md."),
    ("GET", "/openapi.json"): Operation("This OpenAPI 3.1 document", _OPS, {200: "openapi"}),
    ("GET", "/docs"): Operation("This document, for people (Swagger UI)", _OPS, {200: "html"}),
    ("POST", "/v1/submissions"): Operation(
        "Submit content for asynchronous moderation: one submission, or up to 100 in `items`", _SUBMIT,
        {202: (SubmissionAccepted, SubmissionBatchAccepted)}, body=(SubmissionIn, SubmissionBatchIn)),
    ("GET", "/v1/submissions/<submission_id>"): Operation(
        "A submission's status and, once completed, its verdict (`?wait=` long-polls)", _SUBMIT,
        {200: SubmissionOut}, query=SubmissionGetQuery, success_headers=("Verdict-Wait",)),
    ("GET", "/v1/submissions"): Operation("The tenant's submissions, newest first, filtered and paginated", _SUBMIT,
                                          {200: SubmissionPage}, query=SubmissionListQuery),
    ("POST", "/v1/moderations"): Operation(
        "Synchronous moderation in OpenAI's request and response format", _MODERATE, {200: ModerationResponse},
        body=(ModerationRequest,), errors=(503,)),
    ("POST", "/v1/moderate"): Operation("The same as POST /v1/moderations", _MODERATE, {200: ModerationResponse},
                                        body=(ModerationRequest,), errors=(503,)),
    ("GET", "/v1/models"): Operation("The moderation models this deployment offers", _MODERATE, {200: ModelList}),
    ("GET", "/v1/audit"): Operation("The tenant's audit events in chain order, filtered and paginated", _AUDIT,
                                    {200: AuditPage}, query=AuditQuery),
    ("GET", "/v1/audit/export"): Operation("Stream the audit events out, as NDJSON (to verify) or CSV", _AUDIT,
                                           {200: "ndjson-or-csv"}, query=AuditExportQuery),
    ("GET", "/v1/audit/verify"): Operation("Recompute the tenant's audit hash chain", _AUDIT,
                                           {200: AuditVerificationOut}, query=AuditVerifyQuery),
    ("DELETE", "/v1/data/<submission_id>"): Operation(
        "Erase a submission's content and personal data; a tombstone and the audit trail stay", _AUDIT,
        {200: SubmissionOut}),
    ("POST", "/v1/webhooks"): Operation("Register a webhook endpoint; its secret is shown once", _WEBHOOKS,
                                        {201: WebhookEndpointWithSecret}, body=(WebhookEndpointIn,)),
    ("GET", "/v1/webhooks"): Operation("The tenant's webhook endpoints", _WEBHOOKS, {200: WebhookEndpointList}),
    ("GET", "/v1/webhooks/<webhook_id>"): Operation("One webhook endpoint (never its secret)", _WEBHOOKS,
                                                    {200: WebhookEndpointOut}),
    ("DELETE", "/v1/webhooks/<webhook_id>"): Operation("Delete a webhook endpoint and its delivery log", _WEBHOOKS,
                                                       {200: WebhookEndpointDeleted}),
    ("POST", "/v1/webhooks/<webhook_id>/rotate-secret"): Operation(
        "A new secret, shown once; the old one keeps signing for a grace period", _WEBHOOKS,
        {200: WebhookEndpointWithSecret}, body=(EmptyBody,), body_optional=True),
    ("POST", "/v1/webhooks/<webhook_id>/test"): Operation("Queue a signed `webhook.test` event", _WEBHOOKS,
                                                          {202: DeliveryOut}, body=(EmptyBody,), body_optional=True),
    ("GET", "/v1/webhooks/<webhook_id>/deliveries"): Operation(
        "An endpoint's deliveries with every attempt, newest first", _WEBHOOKS, {200: DeliveryPage},
        query=DeliveryListQuery),
    ("POST", "/v1/deliveries/<delivery_id>/redeliver"): Operation(
        "Send a delivery again now, with a fresh retry schedule", _WEBHOOKS, {202: DeliveryOut}, body=(EmptyBody,),
        body_optional=True),
    ("GET", "/v1/webhooks/callback-secret"): Operation("The tenant's callback signer (never its secret)", _WEBHOOKS,
                                                       {200: CallbackSecretOut}),
    ("POST", "/v1/webhooks/callback-secret"): Operation(
        "Create the tenant's secret for per-submission `callback_url`s, shown once", _WEBHOOKS,
        {201: CallbackSecretWithSecret}, body=(EmptyBody,), body_optional=True),
    ("POST", "/v1/webhooks/callback-secret/rotate"): Operation(
        "Rotate the callback secret; the new one is shown once", _WEBHOOKS, {200: CallbackSecretWithSecret},
        body=(EmptyBody,), body_optional=True),
    ("POST", "/v1/keys"): Operation("Create an API key in the caller's tenant; its secret is shown once", _KEYS,
                                    {201: KeyWithSecret}, body=(KeyCreateIn,)),
    ("GET", "/v1/keys"): Operation("The tenant's API keys (never a secret)", _KEYS, {200: KeyList}),
    ("DELETE", "/v1/keys/<key_id>"): Operation("Revoke an API key, at once (rotation: create, deploy, revoke)", _KEYS,
                                               {200: KeyOut}),
    ("GET", "/v1/policies"): Operation("The built-in policy and the tenant's policies (current versions)",
                                       _POLICIES, {200: PolicyList}),
    ("POST", "/v1/policies"): Operation("Create a policy (version 1)", _POLICIES, {201: PolicyOut},
                                        body=(PolicyDocument,)),
    ("GET", "/v1/policies/<name>"): Operation("A policy's current version (its `ETag`)", _POLICIES,
                                              {200: PolicyOut}),
    ("PUT", "/v1/policies/<name>"): Operation(
        "Change a policy: a new immutable version (none when the document is unchanged)", _POLICIES,
        {200: PolicyOut}, body=(PolicyDocument,), errors=(409, 412, 413, 415), headers=(_IF_MATCH,)),
    ("DELETE", "/v1/policies/<name>"): Operation(
        "Retire a policy: no new submissions under it; its versions stay readable", _POLICIES, {200: PolicyOut}),
    ("GET", "/v1/policies/<name>/versions"): Operation("Every version of a policy, newest first", _POLICIES,
                                                       {200: PolicyVersionList}),
    ("GET", "/v1/policies/<name>/versions/<version>"): Operation("One version of a policy, forever", _POLICIES,
                                                                 {200: PolicyVersionOut}),
    ("GET", "/v1/policies/<name>/shadow-report"): Operation(
        "How the policy's verdicts agreed with its shadow's decisions, with the disagreement matrix", _POLICIES,
        {200: ShadowReportOut}, query=ShadowReportQuery),
    ("POST", "/v1/policies/<name>/backtest"): Operation(
        "Re-decide stored verdicts under a candidate policy from their stored scores; 202 and a job when large",
        _POLICIES, {200: BacktestOut, 202: BacktestOut}, body=(BacktestIn,)),
    ("GET", "/v1/backtests/<backtest_id>"): Operation("A backtest job and, once completed, its result", _POLICIES,
                                                      {200: BacktestOut}),
    ("GET", "/v1/default-policy"): Operation("The tenant's default policy (for submissions that name none)",
                                             _POLICIES, {200: DefaultPolicyOut}),
    ("PUT", "/v1/default-policy"): Operation("Set the tenant's default policy", _POLICIES, {200: DefaultPolicyOut},
                                             body=(DefaultPolicyIn,), errors=(413, 415)),
    ("GET", "/v1/blocklists"): Operation("The tenant's blocklists", _POLICIES, {200: TermListList}),
    ("GET", "/v1/blocklists/<name>"): Operation("One blocklist with its terms and patterns", _POLICIES,
                                                {200: TermListOut}),
    ("PUT", "/v1/blocklists/<name>"): Operation(
        "Create or replace a blocklist (terms and RE2 patterns); its version rises on every change", _POLICIES,
        {200: TermListOut}, body=(TermListIn,), errors=(413, 415)),
    ("GET", "/v1/allowlists"): Operation("The tenant's allowlists", _POLICIES, {200: TermListList}),
    ("GET", "/v1/allowlists/<name>"): Operation("One allowlist with its terms and patterns", _POLICIES,
                                                {200: TermListOut}),
    ("PUT", "/v1/allowlists/<name>"): Operation(
        "Create or replace an allowlist (terms exempt from categories a policy names)", _POLICIES,
        {200: TermListOut}, body=(TermListIn,), errors=(413, 415)),
    ("GET", "/v1/reviews"): Operation(
        "The review queue, by priority or age, filtered and paginated, with counts per status", _REVIEW,
        {200: ReviewPage}, query=ReviewListQuery),
    ("GET", "/v1/reviews/stats"): Operation(
        "Queue depth and time from `review` to a human decision", _REVIEW, {200: ReviewStatsOut},
        query=ReviewStatsQuery),
    ("GET", "/v1/reviews/<review_id>"): Operation(
        "A review item with its text and conversation context (each read is audited as `review.viewed`)", _REVIEW,
        {200: ReviewDetailOut}),
    ("POST", "/v1/reviews/<review_id>/claim"): Operation(
        "Claim an item for REVIEW_CLAIM_SECONDS (one's own claim is extended); 409 if another reviewer holds it",
        _REVIEW, {200: ReviewItemOut}, body=(EmptyBody,), body_optional=True),
    ("POST", "/v1/reviews/claim-next"): Operation(
        "Claim the first pending item in the queue's order; 404 `queue_empty` when none is left", _REVIEW,
        {200: ReviewItemOut}, body=(ClaimNextIn,), body_optional=True, errors=(404,)),
    ("POST", "/v1/reviews/<review_id>/extend"): Operation(
        "Extend one's own live claim by REVIEW_CLAIM_SECONDS from now", _REVIEW, {200: ReviewItemOut},
        body=(EmptyBody,), body_optional=True),
    ("POST", "/v1/reviews/<review_id>/release"): Operation(
        "Give one's own claim back to the queue", _REVIEW, {200: ReviewItemOut}, body=(EmptyBody,),
        body_optional=True),
    ("POST", "/v1/reviews/<review_id>/decision"): Operation(
        "Decide a claimed item, `allow` or `block` with a reason: the claimant only, once", _REVIEW,
        {200: ReviewItemOut}, body=(ReviewDecisionIn,)),
    ("POST", "/v1/reviews/<review_id>/override"): Operation(
        "Override a decided item's decision (an appeal): a new, audited action", _REVIEW, {200: ReviewItemOut},
        body=(ReviewOverrideIn,)),
}

# Routes that serve the docs page's own files: not part of the API. Nor is the review console (pages for people,
# signed in with a session cookie, app/console/).
UNDOCUMENTED_ENDPOINTS = frozenset({"openapi.docs_asset"})
UNDOCUMENTED_BLUEPRINTS = frozenset({"console"})


def is_documented(endpoint: str) -> bool:
    return endpoint not in UNDOCUMENTED_ENDPOINTS and endpoint.partition(".")[0] not in UNDOCUMENTED_BLUEPRINTS

_ERROR_DESCRIPTIONS = {
    400: "Invalid request: the `param` names the field, query parameter or header.",
    401: "Missing, malformed, unknown, revoked or expired API key.",
    403: "The key lacks the route's scope.",
    404: "No such object (another tenant's object answers exactly so).",
    409: "Conflict: a request with this Idempotency-Key is still running, or the object's state forbids it.",
    412: "Precondition failed: the `If-Match` version is no longer current (a lost update refused).",
    413: "The request body is larger than MAX_REQUEST_BYTES.",
    415: "The body is not `application/json`.",
    422: "This Idempotency-Key was used with a different request.",
    429: ("Over the key's requests or tokens per minute, or too many failed authentications from this client "
          "address or for this key id; retry after `Retry-After` seconds."),
    500: "Internal error; quote the X-Request-ID.",
    503: "A dependency (database, broker or moderation provider) is unavailable.",
}
_HEADER_DEFINITIONS = {
    "X-Request-ID": ("The client's request id if well-formed, else a new one.", {"type": "string"}),
    "X-Processing-Time-Ms": ("Time spent on the request, in milliseconds.", {"type": "string"}),
    "X-RateLimit-Limit-RPM": ("Requests per minute allowed to this key.", {"type": "string", "pattern": "^[0-9]+$"}),
    "X-RateLimit-Remaining-RPM": ("Requests left in the current minute.", {"type": "string", "pattern": "^[0-9]+$"}),
    "X-RateLimit-Limit-TPM": ("Tokens per minute allowed to this key.", {"type": "string", "pattern": "^[0-9]+$"}),
    "X-RateLimit-Remaining-TPM": ("Tokens left in the current minute.", {"type": "string", "pattern": "^[0-9]+$"}),
    "Retry-After": ("Seconds to wait before retrying.", {"type": "string", "pattern": "^[0-9]+$"}),
    "WWW-Authenticate": ("`Bearer realm=\"verdict\"`.", {"type": "string"}),
    "Verdict-Wait": ("`refused`: the long-poll was not allowed to wait (too many open for this key, tenant or "
                     "process); the current state is answered at once. Absent when it waited, or had no need to.",
                     {"type": "string", "enum": ["refused"]}),
}
_ALWAYS = ("X-Request-ID", "X-Processing-Time-Ms")
# Present on every response to a request with a valid key (not on a 401, which had none).
_RATE_LIMITS = ("X-RateLimit-Limit-RPM", "X-RateLimit-Remaining-RPM", "X-RateLimit-Limit-TPM",
                "X-RateLimit-Remaining-TPM")
_PATH_PARAMETER = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(build_document(current_app))


@bp.get("/docs")
def docs() -> Response:
    return Response(_DOCS_PAGE, mimetype="text/html")


@bp.get("/docs/assets/<path:filename>")
def docs_asset(filename: str) -> Response:
    return send_from_directory(_swagger_ui_dir(), filename, max_age=86_400)


@cache
def _swagger_ui_dir() -> Path:
    # Only the package's files are used (Swagger UI 5, which reads OpenAPI 3.1), not its code.
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


_DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Verdict API</title>
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});
  </script>
</body>
</html>
"""


def build_document(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route `app` serves (the undocumented ones above apart)."""
    schemas = _component_schemas()
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if not is_documented(rule.endpoint):
            continue
        view = app.view_functions[rule.endpoint]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            operation = OPERATIONS.get((method, rule.rule))
            if operation is None:
                raise LookupError(f"{method} {rule.rule} has no entry in app.api.openapi.OPERATIONS")
            path = _PATH_PARAMETER.sub(r"{\1}", rule.rule)
            keyed = bool(getattr(view, "keyed", False))
            scope: str | None = getattr(view, "required_scope", None)
            paths.setdefault(path, {})[method.lower()] = _operation(
                operation, method, rule.arguments, keyed=keyed, scope=scope,
                operation_id=f"{method.lower()}_{rule.endpoint.replace('.', '_')}", schemas=schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Verdict",
            "version": "1",
            "description": "Self-hosted content-safety moderation. Every error has the shape "
                           "`{\"error\": {\"type\", \"message\", \"param\", \"code\"}}`. Any POST may carry an "
                           "`Idempotency-Key`.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.definitions,
            "headers": {name: {"description": text, "schema": schema}
                        for name, (text, schema) in _HEADER_DEFINITIONS.items()},
            "responses": {_error_name(status, keyed): _error_response(status, keyed, schemas)
                          for status in _ERROR_DESCRIPTIONS for keyed in (False, True)},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "An API key, `vk_<id>_<secret>`."}},
        },
    }


@dataclass(frozen=True)
class _Schemas:
    definitions: dict[str, Any]
    refs: dict[tuple[type[BaseModel], JsonSchemaMode], dict[str, Any]]

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return self.refs[(model, mode)]


@cache
def _component_schemas() -> _Schemas:
    inputs: set[type[BaseModel]] = set()
    outputs: set[type[BaseModel]] = {ErrorResponse}
    for operation in OPERATIONS.values():
        inputs.update(operation.body)
        for content in operation.responses.values():
            if isinstance(content, tuple):
                outputs.update(content)
            elif isinstance(content, type):
                outputs.add(content)
    models = [(m, "validation") for m in sorted(inputs, key=lambda m: m.__name__)]
    models += [(m, "serialization") for m in sorted(outputs, key=lambda m: m.__name__)]
    refs, top = models_json_schema(models, ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]
    return _Schemas(definitions=top.get("$defs", {}), refs=dict(refs))  # type: ignore[arg-type]


def _operation(
    operation: Operation, method: str, arguments: set[str], *, keyed: bool, scope: str | None, operation_id: str,
    schemas: _Schemas,
) -> dict[str, Any]:
    description = operation.description
    if keyed:
        description = (f"Scope: `{scope}`. " if scope else "Any valid key. ") + description
    out: dict[str, Any] = {"operationId": operation_id, "summary": operation.summary, "tags": [operation.tag],
                           "description": description.strip()}
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in sorted(arguments)
    ]
    if operation.query is not None:
        parameters += _query_parameters(operation.query)
    parameters.append({"name": "X-Request-ID", "in": "header", "required": False, "schema": {"type": "string"},
                       "description": "Your id for this request: 1–128 of `[A-Za-z0-9._:-]`, else one is made."})
    parameters += [dict(header) for header in operation.headers]
    if method == "POST" and keyed:
        parameters.append({"name": "Idempotency-Key", "in": "header", "required": False,
                           "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
                           "description": "Retry safely: the same key and body within 24 h get the first response."})
    out["parameters"] = parameters
    if operation.body:
        refs = [schemas.ref(model, "validation") for model in operation.body]
        out["requestBody"] = {"required": not operation.body_optional, "content": {
            "application/json": {"schema": refs[0] if len(refs) == 1 else {"oneOf": refs}}}}
    if keyed:
        out["security"] = [{"bearer": []}]
    responses: dict[str, Any] = {}
    for status, content in operation.responses.items():
        headers = _headers(keyed) | {name: _header_ref(name, required=False) for name in operation.success_headers}
        responses[str(status)] = {"description": "Success.", "headers": headers,
                                  "content": _content(content, schemas)}
    for status in _errors(operation, method, keyed, bool(arguments)):
        responses[str(status)] = {"$ref": f"#/components/responses/{_error_name(status, keyed)}"}
    out["responses"] = responses
    return out


def _error_name(status: int, keyed: bool) -> str:
    return f"{'Keyed' if keyed else ''}Error{status}"


def _error_response(status: int, keyed: bool, schemas: _Schemas) -> dict[str, Any]:
    # A 429 for failed authentications (app/api/auth.py) had no valid key, so no key's window to report.
    headers = _headers(keyed and status not in (401, 429))
    if status == 429:
        headers["Retry-After"] = _header_ref("Retry-After", required=True)
        if keyed:
            headers.update({name: _header_ref(name, required=False) for name in _RATE_LIMITS})
    if status == 401:
        headers["WWW-Authenticate"] = _header_ref("WWW-Authenticate", required=True)
    return {"description": _ERROR_DESCRIPTIONS[status], "headers": headers,
            "content": {"application/json": {"schema": schemas.ref(ErrorResponse, "serialization")}}}


def _header_ref(name: str, *, required: bool) -> dict[str, Any]:
    # A header object that is a $ref may not say `required` itself, so it is spelled out where required.
    text, schema = _HEADER_DEFINITIONS[name]
    if required:
        return {"description": text, "schema": schema, "required": True}
    return {"$ref": f"#/components/headers/{name}"}


def _errors(operation: Operation, method: str, keyed: bool, has_path_ids: bool) -> list[int]:
    # 503: every route may meet a database that is away for a moment (app/api/errors.py).
    statuses = {500, 503, *operation.errors}
    if operation.query is not None or operation.body:
        statuses.add(400)
    if keyed:
        statuses.update({400, 401, 403, 429})
    if has_path_ids:
        statuses.add(404)
    if method in ("POST", "DELETE") and keyed:
        statuses.add(409)  # a conflicting state (a delivery in flight, an idempotent request still running)
    if method == "POST" and keyed:
        statuses.update({413, 415, 422})
    if keyed and operation.tag == _WEBHOOKS:
        statuses.add(404)  # the callback signer not created yet
    return sorted(statuses)


def _headers(keyed: bool) -> dict[str, Any]:
    headers = {name: _header_ref(name, required=True) for name in _ALWAYS}
    if keyed:
        headers.update({name: _header_ref(name, required=True) for name in _RATE_LIMITS})
    return headers


def _content(content: Content | tuple[type[BaseModel], ...], schemas: _Schemas) -> dict[str, Any]:
    if content == "ndjson-or-csv":
        return {"application/x-ndjson": {"schema": {"type": "string"}}, "text/csv": {"schema": {"type": "string"}}}
    if content == "html":
        return {"text/html": {"schema": {"type": "string"}}}
    if content == "prometheus":
        return {"text/plain": {"schema": {"type": "string"}}}
    if content == "openapi":
        return {"application/json": {"schema": {"type": "object"}}}
    if isinstance(content, tuple):
        return {"application/json": {"schema": {"oneOf": [schemas.ref(m, "serialization") for m in content]}}}
    assert isinstance(content, type)
    return {"application/json": {"schema": schemas.ref(content, "serialization")}}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(mode="validation")
    required = set(schema.get("required", ()))
    parameters = []
    for name, field_schema in schema.get("properties", {}).items():
        field_schema = dict(field_schema)
        description = field_schema.pop("description", None)
        field_schema.pop("title", None)
        # A query parameter is present or absent; it is never JSON null.
        variants = [v for v in field_schema.pop("anyOf", []) if v.get("type") != "null"]
        if variants:
            field_schema = {**(variants[0] if len(variants) == 1 else {"anyOf": variants}), **field_schema}
            if field_schema.get("default", 0) is None:
                field_schema.pop("default")
        parameter: dict[str, Any] = {"name": name, "in": "query", "required": name in required,
                                     "schema": field_schema}
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters
