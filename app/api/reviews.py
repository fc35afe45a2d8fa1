"""`/v1/reviews`: the human review queue (scope `review`): list it, read an item (its text, each read audited), claim,
claim the next, extend, release, decide; an admin's override (scope `admin`); the queue's figures. See
docs/review.md."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from app.api.auth import current_principal, require_scope
from app.api.body import read_json_object
from app.api.request_context import current_request_id
from app.api.transactions import request_session, transaction
from app.extensions import current_settings
from app.models import ReviewItem, utcnow
from app.schemas.reviews import (
    ClaimNextIn,
    ContextTurnOut,
    ReviewCounts,
    ReviewDecisionIn,
    ReviewDetailOut,
    ReviewItemOut,
    ReviewListQuery,
    ReviewOverrideIn,
    ReviewPage,
    ReviewStatsOut,
    ReviewStatsQuery,
    TimeToDecision,
)
from app.schemas.submissions import submission_out
from app.schemas.webhooks import EmptyBody
from app.use_cases import reviews
from app.use_cases.reviews import ReviewDetail, ReviewFilter

bp = Blueprint("reviews", __name__)


@bp.get("/v1/reviews")
@require_scope("review")
@transaction
def list_all() -> Response:
    query = ReviewListQuery.model_validate(request.args.to_dict())
    page = reviews.list_reviews(
        request_session(), current_principal().tenant_id,
        ReviewFilter(status=query.status, category=query.category, role=query.role,
                     conversation_id=query.conversation_id, created_before=query.created_before,
                     created_after=query.created_after),
        order=query.order, limit=query.limit, cursor=query.cursor)
    body = ReviewPage(data=[item_out(i) for i in page.items], has_more=page.next_cursor is not None,
                      next_cursor=page.next_cursor, counts=ReviewCounts(**page.counts))
    return jsonify(body.model_dump(mode="json"))


@bp.get("/v1/reviews/stats")
@require_scope("review")
@transaction
def stats() -> Response:
    query = ReviewStatsQuery.model_validate(request.args.to_dict())
    figures = reviews.review_stats(request_session(), current_principal().tenant_id, window_seconds=query.window)
    oldest = figures.oldest_pending_at
    body = ReviewStatsOut(
        counts=ReviewCounts(**figures.counts), oldest_pending_at=oldest,
        oldest_pending_age_seconds=None if oldest is None else round((utcnow() - oldest).total_seconds(), 3),
        window_seconds=figures.window_seconds, decided_in_window=figures.decided_in_window,
        time_to_decision_seconds=TimeToDecision(**figures.time_to_decision))
    return jsonify(body.model_dump(mode="json"))


@bp.get("/v1/reviews/<review_id>")
@require_scope("review")
@transaction
def get_one(review_id: str) -> Response:
    detail = reviews.read_review(request_session(), current_principal(), review_id, request_id=current_request_id())
    response = jsonify(detail_out(detail).model_dump(mode="json"))
    response.headers["Cache-Control"] = "no-store"  # it carries moderated text
    return response


@bp.post("/v1/reviews/<review_id>/claim")
@require_scope("review")
@transaction
def claim(review_id: str) -> Response:
    _no_fields()
    item = reviews.claim_review(request_session(), current_principal(), review_id,
                                claim_seconds=current_settings().review_claim_seconds, request_id=current_request_id())
    return jsonify(item_out(item).model_dump(mode="json"))


@bp.post("/v1/reviews/claim-next")
@require_scope("review")
@transaction
def claim_next() -> Response:
    body = ClaimNextIn.model_validate(read_json_object()) if request.get_data(cache=True) else ClaimNextIn()
    item = reviews.claim_next(
        request_session(), current_principal(),
        ReviewFilter(category=body.category, role=body.role, conversation_id=body.conversation_id),
        order=body.order, claim_seconds=current_settings().review_claim_seconds, request_id=current_request_id())
    return jsonify(item_out(item).model_dump(mode="json"))


@bp.post("/v1/reviews/<review_id>/extend")
@require_scope("review")
@transaction
def extend(review_id: str) -> Response:
    _no_fields()
    item = reviews.extend_claim(request_session(), current_principal(), review_id,
                                claim_seconds=current_settings().review_claim_seconds, request_id=current_request_id())
    return jsonify(item_out(item).model_dump(mode="json"))


@bp.post("/v1/reviews/<review_id>/release")
@require_scope("review")
@transaction
def release(review_id: str) -> Response:
    _no_fields()
    item = reviews.release_claim(request_session(), current_principal(), review_id, request_id=current_request_id())
    return jsonify(item_out(item).model_dump(mode="json"))


@bp.post("/v1/reviews/<review_id>/decision")
@require_scope("review")
@transaction
def decide(review_id: str) -> Response:
    # Another tenant's item answers 404 whatever the body, exactly as a missing one.
    reviews.get_review(request_session(), current_principal().tenant_id, review_id)
    body = ReviewDecisionIn.model_validate(read_json_object())
    item = reviews.decide_review(request_session(), current_principal(), review_id, decision=body.decision,
                                 reason=body.reason, categories=body.categories, request_id=current_request_id())
    return jsonify(item_out(item).model_dump(mode="json"))


@bp.post("/v1/reviews/<review_id>/override")
@require_scope("admin")
@transaction
def override(review_id: str) -> Response:
    reviews.get_review(request_session(), current_principal().tenant_id, review_id)
    body = ReviewOverrideIn.model_validate(read_json_object())
    item = reviews.override_review(request_session(), current_principal(), review_id, decision=body.decision,
                                   reason=body.reason, categories=body.categories, request_id=current_request_id())
    return jsonify(item_out(item).model_dump(mode="json"))


def _no_fields() -> None:
    # The claim actions take no parameters; an empty body is fine, and so is `{}`, but nothing else.
    if request.get_data(cache=True):
        EmptyBody.model_validate(read_json_object())


def item_out(item: ReviewItem) -> ReviewItemOut:
    now = utcnow()
    status = item.status_at(now)
    return ReviewItemOut(
        id=item.id, status=status, submission_id=item.submission_id,
        priority=item.priority, role=item.role, conversation_id=item.conversation_id,
        categories=list(item.categories), created_at=item.created_at,
        claimed_by=item.claimed_by if status == "claimed" else None,
        claim_expires_at=item.claim_expires_at if status == "claimed" else None,
        decision=item.decision, reason=item.reason, corrected_categories=item.corrected_categories,
        decided_by=item.decided_by, decided_at=item.decided_at,
        override_decision=item.override_decision, override_reason=item.override_reason,
        overridden_by=item.overridden_by, overridden_at=item.overridden_at,
        final_decision=item.final_decision,
        links={"self": f"/v1/reviews/{item.id}", "submission": f"/v1/submissions/{item.submission_id}"},
    )


def detail_out(detail: ReviewDetail) -> ReviewDetailOut:
    item = detail.item
    submission = item.submission
    return ReviewDetailOut(
        **item_out(item).model_dump(),
        text=None if submission.content is None else list(submission.content),
        submission=submission_out(submission, submission.verdict, item),
        context=[ContextTurnOut(
            submission_id=turn.submission.id, role=turn.submission.role,
            turn_id=turn.submission.turn_id, created_at=turn.submission.created_at,
            text=None if turn.submission.content is None else list(turn.submission.content),
            decision=turn.submission.verdict.decision if turn.submission.verdict else None,
            led_to_this=turn.led_to_this) for turn in detail.context],
    )
