"""`/v1/keys`: create (the secret shown once), list (never a secret), revoke. All need the `admin` scope and see only
the caller's tenant. Rotation is create-then-revoke: create the new key, deploy it, then revoke the old one."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from app.api.auth import current_key_cache, current_principal, require_scope
from app.api.body import read_json_object
from app.api.rate_limits import quota_for
from app.api.request_context import current_request_id
from app.api.transactions import request_session, transaction
from app.extensions import current_settings
from app.models import ApiKey, Tenant
from app.schemas.keys import KeyCreateIn, KeyList, KeyOut, KeyWithSecret
from app.use_cases.errors import InvalidInput, NotFound
from app.use_cases.keys import KeyLimits, KeyRequestError, create_tenant_key, list_keys, revoke_tenant_key

bp = Blueprint("keys", __name__)


@bp.post("/v1/keys")
@require_scope("admin")
@transaction
def create() -> tuple[Response, int, dict[str, str]]:
    body = KeyCreateIn.model_validate(read_json_object())
    session, principal = request_session(), current_principal()
    tenant = session.get(Tenant, principal.tenant_id)
    if tenant is None:  # pragma: no cover - the caller's key belongs to it
        raise NotFound("No such tenant.")
    # A tenant's admin may narrow a key's limits, never widen them past the tenant's.
    ceiling = quota_for(tenant.rate_limit_rpm, tenant.rate_limit_tpm, current_settings())
    for param, value, most in (("rate_limit_rpm", body.rate_limit_rpm, ceiling.rpm),
                               ("rate_limit_tpm", body.rate_limit_tpm, ceiling.tpm)):
        if value is not None and value > most:
            raise InvalidInput(f"{param}: may be at most the tenant's limit, {most}.", param=param,
                               code="above_tenant_limit")
    try:
        issued = create_tenant_key(
            session, principal.tenant_id, scopes=body.scopes, name=body.name, expires_at=body.expires_at,
            limits=KeyLimits(rpm=body.rate_limit_rpm, tpm=body.rate_limit_tpm), creator_key_id=principal.key_id,
            request_id=current_request_id(),
        )
    except KeyRequestError as exc:
        raise InvalidInput(f"{exc.param}: {exc}" if exc.param else str(exc), param=exc.param,
                           code=exc.code) from exc
    out = KeyWithSecret(**key_out(issued.key).model_dump(), secret=issued.plaintext)
    return jsonify(out.model_dump(mode="json")), 201, {"Location": out.links["self"]}


@bp.get("/v1/keys")
@require_scope("admin")
@transaction
def list_all() -> Response:
    keys = list_keys(request_session(), current_principal().tenant_id)
    return jsonify(KeyList(data=[key_out(k) for k in keys]).model_dump(mode="json"))


@bp.delete("/v1/keys/<key_id>")
@require_scope("admin")
@transaction
def revoke(key_id: str) -> Response:
    principal = current_principal()
    key = revoke_tenant_key(request_session(), principal.tenant_id, key_id, actor=principal.key_id,
                            request_id=current_request_id())
    # This process refuses it at once; the others within API_KEY_CACHE_SECONDS.
    current_key_cache().forget(key.id)
    return jsonify(key_out(key).model_dump(mode="json"))


def key_out(key: ApiKey) -> KeyOut:
    quota = quota_for(key.rate_limit_rpm or key.tenant.rate_limit_rpm, key.rate_limit_tpm or key.tenant.rate_limit_tpm,
                      current_settings())
    return KeyOut(
        id=key.id, prefix=f"vk_{key.id.removeprefix('key_')}", name=key.name, scopes=list(key.scopes),
        created_at=key.created_at, expires_at=key.expires_at, revoked_at=key.revoked_at,
        last_used_at=key.last_used_at, rate_limit_rpm=quota.rpm, rate_limit_tpm=quota.tpm,
        links={"self": f"/v1/keys/{key.id}"},
    )
