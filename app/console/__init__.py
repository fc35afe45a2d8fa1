"""The review console at `/console/`: server-rendered pages for reviewers (Jinja templates, and CSS and JavaScript
shipped in this package, nothing from the internet). Sign in once with a `review` key; the browser then holds a
server-side session's random token in an HttpOnly, SameSite=Strict cookie, and every form carries the session's CSRF
token. The views are as thin as the API's: they call the same use cases. See docs/review.md ("The console")."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Flask, g, make_response, redirect, render_template, request, url_for
from pydantic import ValidationError
from werkzeug.wrappers import Response

from app.api.auth import count_failed_authentication
from app.api.request_context import current_request_id
from app.api.transactions import request_session
from app.extensions import current_settings
from app.models import ReviewItem, utcnow
from app.moderation.taxonomy import CATEGORIES
from app.schemas.reviews import ClaimNextIn, ReviewDecisionIn, ReviewListQuery
from app.schemas.submissions import final_decision
from app.use_cases import console_sessions, reviews
from app.use_cases.console_sessions import ConsoleUser
from app.use_cases.errors import AuthenticationFailed, Conflict, DomainError, InvalidInput, NotFound
from app.use_cases.reviews import ReviewFilter
from app.use_cases.submissions import get_submission

F = TypeVar("F", bound=Callable[..., Any])

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates", static_folder="static",
               static_url_path="/static")

SESSION_COOKIE = "verdict_console"
# The sign-in form's own CSRF token (there is no session yet): a cookie and a hidden field that must match.
SIGN_IN_COOKIE = "verdict_console_signin"
CSRF_FIELD = "csrf_token"
# The messages a redirect may ask a page to show (by code, so no text can be injected through the URL).
MESSAGES = {
    "decided": "Decision recorded.",
    "released": "Claim released; the item is back in the queue.",
    "queue_empty": "No item is waiting for review.",
    "signed_out": "You have signed out.",
    "expired": "Your session has ended; sign in again.",
    "extended": "Claim extended.",
    "claimed": "Item claimed: it is yours until the time shown.",
}
_SECURITY_HEADERS = {
    # Everything the pages use comes from this origin; no inline script or style, no framing, forms post here only.
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Pages show moderated text: no cache may keep them.
    "Cache-Control": "no-store",
}


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)


@bp.after_request
def _secure(response: Response) -> Response:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _cookie_secure() -> bool:
    return bool(current_settings().console_cookie_secure or request.is_secure)


def current_user() -> ConsoleUser:
    user: ConsoleUser = g.console_user
    return user


def signed_in(view: F) -> F:
    """A page for a signed-in reviewer: without a live session, a redirect to sign-in (a POST without the session's
    CSRF token, a 403). The view then runs in one transaction on the request's session."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        session = request_session()
        with session.begin():
            user = console_sessions.find_session(session, request.cookies.get(SESSION_COOKIE))
        if user is None:
            target = url_for("console.sign_in_page", msg="expired") if SESSION_COOKIE in request.cookies else url_for(
                "console.sign_in_page")
            response = redirect(target, code=303)
            response.delete_cookie(SESSION_COOKIE, path="/console")
            return response
        if request.method == "POST" and not console_sessions.csrf_matches(user, request.form.get(CSRF_FIELD)):
            return _page("error.html", 403, title="Refused", user=user,
                         message="This form is missing its security token (or it is stale). Reload the page and try "
                                 "again.")
        g.console_user = user
        with session.begin():
            return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _page(template: str, status: int = 200, **context: Any) -> Response:
    context.setdefault("user", getattr(g, "console_user", None))
    context.setdefault("csrf_field", CSRF_FIELD)
    context.setdefault("message", MESSAGES.get(request.args.get("msg", "")))
    response = make_response(render_template(f"console/{template}", **context), status)
    return response


# ---- signing in and out ----------------------------------------------------------------------------------------


@bp.get("/")
def index() -> Response:
    return redirect(url_for("console.queue"), code=303)


@bp.get("/sign-in")
def sign_in_page(error: str | None = None, status: int = 200) -> Response:
    token = secrets.token_urlsafe(32)
    response = _page("sign_in.html", status, title="Sign in", sign_in_token=token, error=error, user=None)
    response.set_cookie(SIGN_IN_COOKIE, token, max_age=3600, path="/console", httponly=True, samesite="Strict",
                        secure=_cookie_secure())
    return response


@bp.post("/sign-in")
def sign_in() -> Response:
    expected = request.cookies.get(SIGN_IN_COOKIE)
    presented = request.form.get(CSRF_FIELD)
    if not expected or not presented or not secrets.compare_digest(expected.encode(), presented.encode()):
        return _page("error.html", 403, title="Refused", user=None,
                     message="The sign-in form is missing its security token (or it is stale). Reload the page and "
                             "sign in again.")
    key = request.form.get("key", "")
    session = request_session()
    try:
        with session.begin():
            signed = console_sessions.sign_in(session, key, lifetime_seconds=current_settings().console_session_seconds,
                                              request_id=current_request_id())
    except AuthenticationFailed as exc:
        if exc.reason != "missing" and count_failed_authentication(exc, key) is not None:
            return sign_in_page(error="Too many failed sign-ins from here or for this key. Wait a minute, then try "
                                      "again.", status=429)
        return sign_in_page(error=exc.message, status=401)
    response = redirect(url_for("console.queue"), code=303)
    response.set_cookie(SESSION_COOKIE, signed.token, max_age=current_settings().console_session_seconds,
                        path="/console", httponly=True, samesite="Strict", secure=_cookie_secure())
    response.delete_cookie(SIGN_IN_COOKIE, path="/console")
    return response


@bp.post("/sign-out")
@signed_in
def sign_out() -> Response:
    console_sessions.sign_out(request_session(), request.cookies.get(SESSION_COOKIE), request_id=current_request_id())
    response = redirect(url_for("console.sign_in_page", msg="signed_out"), code=303)
    response.delete_cookie(SESSION_COOKIE, path="/console")
    return response


# ---- the queue -------------------------------------------------------------------------------------------------


@bp.get("/queue")
@signed_in
def queue() -> Response:
    args = {k: v for k, v in request.args.items() if v and k in ReviewListQuery.model_fields}
    args.setdefault("status", "pending")
    every_status = args["status"] == "all"  # the "All" tab: no status filter
    try:
        query = ReviewListQuery.model_validate({k: v for k, v in args.items() if not (k == "status" and every_status)})
    except ValidationError:  # a hand-edited URL: the default view
        query = ReviewListQuery(status="pending")
        args = {"status": "pending"}
    filters = ReviewFilter(status=query.status, category=query.category, role=query.role,
                           conversation_id=query.conversation_id)
    tenant_id = current_user().principal.tenant_id
    try:
        page = reviews.list_reviews(request_session(), tenant_id, filters, order=query.order, limit=query.limit,
                                    cursor=query.cursor)
    except InvalidInput:  # a cursor of another order, or mangled: the first page
        page = reviews.list_reviews(request_session(), tenant_id, filters, order=query.order, limit=query.limit,
                                    cursor=None)
    keep = {k: v for k, v in args.items() if k != "cursor"}
    return _page("queue.html", title="Review queue", page=page, query=query, categories=CATEGORIES, now=utcnow(),
                 next_url=_queue_url({**keep, "cursor": page.next_cursor}) if page.next_cursor else None,
                 tab_url=lambda status: _queue_url({**keep, "status": status}))


def _queue_url(values: dict[str, Any]) -> str:
    return url_for("console.queue", **values)


@bp.post("/claim-next")
@signed_in
def claim_next() -> Response:
    fields = {k: v for k, v in request.form.items() if v and k in ClaimNextIn.model_fields}
    try:
        body = ClaimNextIn.model_validate(fields)
    except ValidationError:
        body = ClaimNextIn()
    try:
        item = reviews.claim_next(request_session(), current_user().principal,
                                  ReviewFilter(category=body.category, role=body.role), order=body.order,
                                  claim_seconds=current_settings().review_claim_seconds,
                                  request_id=current_request_id())
    except NotFound:
        return redirect(url_for("console.queue", msg="queue_empty"), code=303)
    return redirect(url_for("console.item", review_id=item.id), code=303)


# ---- one item --------------------------------------------------------------------------------------------------


@bp.get("/reviews/<review_id>")
@signed_in
def item(review_id: str) -> Response:
    return _item_page(review_id)


def _item_page(review_id: str, *, error: str | None = None, status: int = 200, reason: str = "") -> Response:
    user = current_user()
    try:
        detail = reviews.read_review(request_session(), user.principal, review_id, request_id=current_request_id())
    except NotFound:
        return _page("error.html", 404, title="Not found", message="No such review item.")
    item = detail.item
    verdict = item.submission.verdict
    scores = [] if verdict is None else [
        (c, verdict.category_scores.get(c), verdict.thresholds.get(c, {}), c in item.categories) for c in CATEGORIES]
    now = utcnow()
    return _page("item.html", status, title="Review item", detail=detail, item=item, verdict=verdict, scores=scores,
                 now=now, mine=item.status_at(now) == "claimed" and item.claimed_by == user.principal.key_id,
                 status_now=item.status_at(now), error=error, reason=reason, categories=CATEGORIES)


def _act(review_id: str, action: Callable[[], ReviewItem], msg: str) -> Response:
    # A refused action wrote nothing (its conditional UPDATE matched no row), so the page is drawn in the same
    # transaction.
    try:
        action()
    except Conflict as exc:
        return _conflict_page(review_id, exc)
    except NotFound:
        return _page("error.html", 404, title="Not found", message="No such review item.")
    return redirect(url_for("console.item", review_id=review_id, msg=msg), code=303)


def _conflict_page(review_id: str, exc: DomainError) -> Response:
    return _item_page(review_id, error=_explain(exc), status=409, reason=request.form.get("reason", ""))


def _explain(exc: DomainError) -> str:
    if exc.code == "claim_expired":
        return ("Your claim on this item expired before you decided, so the decision was not recorded. Another "
                "reviewer may have it now; if it is still pending, claim it again and decide.")
    return exc.message


@bp.post("/reviews/<review_id>/claim")
@signed_in
def claim(review_id: str) -> Response:
    return _act(review_id, lambda: reviews.claim_review(
        request_session(), current_user().principal, review_id,
        claim_seconds=current_settings().review_claim_seconds, request_id=current_request_id()), "claimed")


@bp.post("/reviews/<review_id>/extend")
@signed_in
def extend(review_id: str) -> Response:
    return _act(review_id, lambda: reviews.extend_claim(
        request_session(), current_user().principal, review_id,
        claim_seconds=current_settings().review_claim_seconds, request_id=current_request_id()), "extended")


@bp.post("/reviews/<review_id>/release")
@signed_in
def release(review_id: str) -> Response:
    try:
        reviews.release_claim(request_session(), current_user().principal, review_id,
                              request_id=current_request_id())
    except Conflict as exc:
        return _conflict_page(review_id, exc)
    except NotFound:
        return _page("error.html", 404, title="Not found", message="No such review item.")
    return redirect(url_for("console.queue", msg="released"), code=303)


@bp.post("/reviews/<review_id>/decision")
@signed_in
def decide(review_id: str) -> Response:
    fields: dict[str, Any] = {"decision": request.form.get("decision"), "reason": request.form.get("reason", "")}
    corrected = request.form.getlist("categories")
    if request.form.get("correct_categories") == "on":
        fields["categories"] = corrected
    try:
        body = ReviewDecisionIn.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(p) for p in first["loc"]) or "form"
        message = "Give a reason for the decision." if field == "reason" else f"{field}: {first['msg']}"
        return _item_page(review_id, error=message, status=400, reason=fields["reason"])
    try:
        reviews.decide_review(request_session(), current_user().principal, review_id, decision=body.decision,
                              reason=body.reason, categories=body.categories, request_id=current_request_id())
    except Conflict as exc:
        return _conflict_page(review_id, exc)
    except NotFound:
        return _page("error.html", 404, title="Not found", message="No such review item.")
    if request.form.get("then") == "next":
        try:
            nxt = reviews.claim_next(request_session(), current_user().principal, ReviewFilter(), order="priority",
                                     claim_seconds=current_settings().review_claim_seconds,
                                     request_id=current_request_id())
        except NotFound:
            return redirect(url_for("console.queue", msg="queue_empty"), code=303)
        return redirect(url_for("console.item", review_id=nxt.id, msg="decided"), code=303)
    return redirect(url_for("console.item", review_id=review_id, msg="decided"), code=303)


# ---- a submission ----------------------------------------------------------------------------------------------


@bp.get("/submissions")
@signed_in
def find_submission() -> Response:
    submission_id = request.args.get("id", "").strip()
    if not submission_id:
        return redirect(url_for("console.queue"), code=303)
    return redirect(url_for("console.submission", submission_id=submission_id), code=303)


@bp.get("/submissions/<submission_id>")
@signed_in
def submission(submission_id: str) -> Response:
    session = request_session()
    tenant_id = current_user().principal.tenant_id
    try:
        found = get_submission(session, tenant_id, submission_id)
    except NotFound:
        return _page("error.html", 404, title="Not found", message="No such submission.")
    review = found.review
    return _page("submission.html", title="Submission", submission=found, verdict=found.verdict, review=review,
                 events=reviews.submission_events(session, tenant_id, found.id, review),
                 deliveries=reviews.submission_deliveries(session, tenant_id, found.id), now=utcnow(),
                 final=final_decision(found.verdict, review))
