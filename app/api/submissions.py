"""`/v1/submissions`: submit content for asynchronous review, read one back (optionally long-polling), list them."""

from __future__ import annotations

from contextlib import nullcontext

from flask import Blueprint, Response, jsonify, request, url_for

from app.api.auth import current_principal, require_scope
from app.api.body import current_limits, read_json_object
from app.api.long_polls import current_long_polls
from app.api.rate_limits import charge_tokens
from app.api.request_context import current_request_id
from app.api.transactions import commit_in_group, request_session, submissions_committer, transaction
from app.extensions import current_database, current_settings
from app.masking import Masker
from app.models import Submission
from app.schemas.submissions import (
    SubmissionAccepted,
    SubmissionBatchAccepted,
    SubmissionBatchIn,
    SubmissionGetQuery,
    SubmissionIn,
    SubmissionListQuery,
    SubmissionOut,
    SubmissionPage,
    submission_out,
)
from app.use_cases.submissions import (
    SubmissionFilter,
    await_submission,
    list_submissions,
    prepare_submissions,
    submission_is_final,
)
from app.use_cases.webhook_endpoints import check_callback_urls

bp = Blueprint("submissions", __name__)


@bp.post("/v1/submissions")
@require_scope("submit", charges_tokens=True)
@transaction
def create_submissions() -> tuple[Response, int, dict[str, str]]:
    body = read_json_object()
    context = {"limits": current_limits()}
    batch = "items" in body
    items = (SubmissionBatchIn.model_validate(body, context=context).items if batch
             else [SubmissionIn.model_validate(body, context=context)])
    charge_tokens([text for item in items for text in item.input])
    session, principal, settings = request_session(), current_principal(), current_settings()
    check_callback_urls(session, principal.tenant_id, [item.callback_url for item in items], settings=settings)
    prepared = prepare_submissions(session, principal, items, request_id=current_request_id(),
                                   masker=Masker.from_settings(settings))
    # Stored with the other requests' of this moment, in one transaction, once this view returns; their moderation
    # messages are sent once it commits, and the answer goes out only then.
    commit_in_group(submissions_committer(), prepared)
    submission_ids = prepared.ids
    accepted = [SubmissionAccepted(id=submission_id, links={"self": _self_link(submission_id)})
                for submission_id in submission_ids]
    if batch:
        return jsonify(SubmissionBatchAccepted(data=accepted).model_dump(mode="json")), 202, {}
    return jsonify(accepted[0].model_dump(mode="json")), 202, {"Location": accepted[0].links["self"]}


@bp.get("/v1/submissions/<submission_id>")
@require_scope("read")
def get_submission(submission_id: str) -> Response:
    query = SubmissionGetQuery.model_validate(request.args.to_dict())
    principal = current_principal()
    # A long-poll holds this request's thread: past the bounds on open ones it answers the current state at once.
    slot = current_long_polls().slot(principal.key_id, principal.tenant_id, query.wait) if query.wait else nullcontext()
    with slot as refused:
        # A command with a short transaction per look, so a long-poll holds no connection while it waits.
        submission = await_submission(current_database(), principal.tenant_id, submission_id,
                                      wait_seconds=query.wait if refused is None else 0)
    response = jsonify(submission_view(submission).model_dump(mode="json"))
    if refused is not None and not submission_is_final(submission):
        response.headers["Verdict-Wait"] = "refused"
    return response


@bp.get("/v1/submissions")
@require_scope("read")
@transaction
def list_all() -> Response:
    query = SubmissionListQuery.model_validate(request.args.to_dict())
    page = list_submissions(
        request_session(), current_principal().tenant_id,
        SubmissionFilter(status=query.status, decision=query.decision, role=query.role),
        limit=query.limit, cursor=query.cursor,
    )
    body = SubmissionPage(data=[submission_view(s) for s in page.submissions],
                          has_more=page.next_cursor is not None, next_cursor=page.next_cursor)
    return jsonify(body.model_dump(mode="json"))


def _self_link(submission_id: str) -> str:
    return url_for("submissions.get_submission", submission_id=submission_id)


def submission_view(submission: Submission) -> SubmissionOut:
    return submission_out(submission, submission.verdict, submission.review)
