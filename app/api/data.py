"""`DELETE /v1/data/{submission_id}`: erase a submission's content and personal data; a tombstone and the audit
trail stay. Needs the `audit` scope: erasure on request is a compliance officer's act, recorded in the trail that
scope reads."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from app.api.auth import current_principal, require_scope
from app.api.request_context import current_request_id
from app.api.submissions import submission_view
from app.api.transactions import request_session, transaction
from app.use_cases.erasure import erase_submission

bp = Blueprint("data", __name__)


@bp.delete("/v1/data/<submission_id>")
@require_scope("audit")
@transaction
def erase(submission_id: str) -> Response:
    principal = current_principal()
    submission = erase_submission(request_session(), principal.tenant_id, submission_id, actor=principal.key_id,
                                  request_id=current_request_id())
    return jsonify(submission_view(submission).model_dump(mode="json"))
