"""Taking content in and reading it back: submit, look up (or wait for), list. Every read is scoped to the caller's
tenant."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, and_, insert, or_, select
from sqlalchemy.orm import Session, selectinload

from app import metrics
from app.audit_chain import content_digest
from app.db import Database
from app.masking import DEFAULT_MASKER, Masker
from app.models import Submission, SubmissionStatus, Tenant, Verdict, new_id, utcnow
from app.outbox import send_after_commit
from app.schemas.submissions import SubmissionIn
from app.use_cases.audit import record_event
from app.use_cases.authentication import Principal
from app.use_cases.errors import NotFound
from app.use_cases.moderation import moderation_messages
from app.use_cases.pagination import decode_cursor, encode_cursor
from app.use_cases.policies import BUILTIN, check_usable, default_policy_name

_SUBMISSIONS: Table = Submission.__table__  # type: ignore[assignment]
_INSERT_SUBMISSIONS = insert(_SUBMISSIONS)
# The row key of each attribute set on a new submission (the attribute `client_metadata` is the column `metadata`).
_KEYS = {attribute: Submission.__mapper__.columns[attribute].key for attribute in (
    "id", "tenant_id", "api_key_id", "role", "content", "content_digest", "text_count", "conversation_id", "turn_id",
    "client_metadata", "policy_name", "model", "mask", "callback_url", "request_id", "created_at", "enqueued_at",
    "dispatched_at")}


@dataclass(frozen=True)
class SubmissionEvent:
    """The `submission.received` event of one new submission, recorded when its row is stored."""

    submission_id: str
    content_digest: str
    conversation_id: str | None
    turn_id: str | None
    details: dict[str, object]


@dataclass(frozen=True)
class PreparedSubmissions:
    """What one request submits, ready to store: its rows (their ids made here), their events and whose they are.
    Nothing of it is written until `store_submissions`."""

    tenant_id: str
    key_id: str
    request_id: str | None
    rows: list[dict[str, Any]]
    events: list[SubmissionEvent]
    roles: list[str]

    @property
    def ids(self) -> list[str]:
        return [event.submission_id for event in self.events]


def submit_content(
    session: Session,
    principal: Principal,
    items: Sequence[SubmissionIn],
    *,
    request_id: str | None,
    masker: Masker = DEFAULT_MASKER,
) -> list[str]:
    """Store the submissions and their `submission.received` events, in the caller's transaction, and return their
    ids (in the order of `items`); each is sent to the queue once it commits (the outbox), and the requeue sweep
    sends any that were not. `prepare_submissions` then `store_submissions`; the API hands the second step to the
    process's group committer instead (app/group_commit.py)."""
    prepared = prepare_submissions(session, principal, items, request_id=request_id, masker=masker)
    store_submissions(session, [prepared])
    return prepared.ids


def prepare_submissions(
    session: Session,
    principal: Principal,
    items: Sequence[SubmissionIn],
    *,
    request_id: str | None,
    masker: Masker = DEFAULT_MASKER,
) -> PreparedSubmissions:
    """Check what the items name (their policies: NotFound, InvalidInput) and build their rows and events, reading
    in the caller's transaction and writing nothing. Texts to be masked are masked here, so neither the database nor
    a provider ever sees the personal data, and the content digest is of the masked text."""
    # A submission that names no policy is decided under its tenant's default (the built-in one unless set).
    default_policy = default_policy_name(session, principal.tenant_id, principal.tenant_defaults) if any(
        item.policy is None for item in items) else BUILTIN
    policy_names = [item.policy or default_policy for item in items]
    checked: set[str] = set()
    for index, name in enumerate(policy_names):
        if name not in checked:
            check_usable(session, principal.tenant_id, name,
                         param="policy" if len(items) == 1 else f"items[{index}].policy")
            checked.add(name)

    now = utcnow()
    tenant_default = tenant_mask_default(session, principal) if any(item.mask is None for item in items) else None
    rows: list[dict[str, Any]] = []
    events: list[SubmissionEvent] = []
    for item, policy_name in zip(items, policy_names, strict=True):
        texts = list(item.input)
        mask = masker.applies(item.mask, tenant_default)
        counts: dict[str, int] | None = None
        if mask:
            texts, counts = masker.mask_all(texts)
        submission_id, digest = new_id("sub"), content_digest(texts)
        values: dict[str, Any] = {
            "id": submission_id,
            "tenant_id": principal.tenant_id,
            "api_key_id": principal.key_id,
            "role": item.role,
            "content": texts,
            "content_digest": digest,
            "text_count": len(texts),
            "conversation_id": item.conversation_id,
            "turn_id": item.turn_id,
            "client_metadata": item.metadata,
            "policy_name": policy_name,
            "model": item.model,
            "mask": mask,
            "callback_url": item.callback_url,
            "request_id": request_id,
            "created_at": now,
            "enqueued_at": now,
            "dispatched_at": now,  # its message leaves after the commit; cleared if the broker refuses it
        }
        rows.append({_KEYS[attribute]: value for attribute, value in values.items()})
        details: dict[str, object] = {"role": item.role, "text_count": len(texts), "policy": policy_name,
                                      "mask": mask}
        if counts is not None:
            details["masked"] = counts
        events.append(SubmissionEvent(submission_id=submission_id, content_digest=digest,
                                      conversation_id=item.conversation_id, turn_id=item.turn_id, details=details))
    return PreparedSubmissions(tenant_id=principal.tenant_id, key_id=principal.key_id, request_id=request_id,
                               rows=rows, events=events, roles=[item.role for item in items])


def store_submissions(session: Session, prepared: Sequence[PreparedSubmissions]) -> None:
    """Write prepared submissions (of one request, or of a group of requests: any tenants) in the caller's
    transaction: one INSERT of every row, their events (appended at commit, each chain's head locked once), and their
    moderation messages, sent once it commits: the doorbell rung, or as few as a provider call's worth allows.

    The rows are written as rows, not as objects of the session (nothing here reads them back: issue 15, the unit
    of work's flush was ~12 % of an intake's CPU); the columns not given take their defaults (status `queued`).
    """
    rows = [row for one in prepared for row in one.rows]
    if not rows:
        return
    session.connection().execute(_INSERT_SUBMISSIONS, rows)
    for one in prepared:
        for event in one.events:
            record_event(
                session, tenant_id=one.tenant_id, action="submission.received", actor=one.key_id,
                subject_type="submission", subject_id=event.submission_id, request_id=one.request_id,
                content_digest=event.content_digest, conversation_id=event.conversation_id, turn_id=event.turn_id,
                details=event.details,
            )
        metrics.submissions_received(session, one.tenant_id, one.roles, source="async")
    # With a Redis broker these ring the doorbell instead (one message for whatever is queued, sent only when none
    # is pending: app/doorbell.py). Without one, a provider call's worth of submissions per message: a worker
    # claims them together, none is left to be skipped.
    send_after_commit(session, *moderation_messages([(row["id"], row["text_count"]) for row in rows], ring=True))


def tenant_mask_default(session: Session, principal: Principal) -> bool | None:
    """Whether the caller's tenant masks by default (None: the deployment decides), as read with its key if it was."""
    if principal.tenant_defaults is not None:
        return principal.tenant_defaults.mask
    return session.scalar(select(Tenant.mask_by_default).where(Tenant.id == principal.tenant_id))


def get_submission(session: Session, tenant_id: str, submission_id: str) -> Submission:
    # A NUL cannot be sent to PostgreSQL at all (it would be a 500); no id contains one, so it is simply not found.
    # Its human review (if any) is loaded with it, as every reader of a submission shows it.
    submission = None if "\x00" in submission_id else session.get(
        Submission, submission_id, options=[selectinload(Submission.review)], populate_existing=True)
    # Another tenant's submission answers exactly as a missing one does.
    if submission is None or submission.tenant_id != tenant_id:
        raise NotFound("No such submission.", param="id")
    return submission


_FINAL = {SubmissionStatus.COMPLETED.value, SubmissionStatus.FAILED.value}


def submission_is_final(submission: Submission) -> bool:
    return submission.status in _FINAL


def await_submission(
    database: Database, tenant_id: str, submission_id: str, *, wait_seconds: float, poll_interval: float = 0.2
) -> Submission:
    """The submission (its verdict loaded), waiting up to `wait_seconds` for it to reach a final status (long-poll).

    A command: each look is a short read transaction of its own, so no connection is held while it sleeps.
    """
    deadline = time.monotonic() + wait_seconds
    while True:
        with database.transaction() as session:
            submission = get_submission(session, tenant_id, submission_id)
        if submission.status in _FINAL or time.monotonic() >= deadline:
            return submission
        time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))


@dataclass(frozen=True)
class SubmissionFilter:
    status: str | None = None
    decision: str | None = None
    role: str | None = None


@dataclass(frozen=True)
class Page:
    submissions: list[Submission]
    next_cursor: str | None


def list_submissions(
    session: Session, tenant_id: str, filters: SubmissionFilter, *, limit: int, cursor: str | None
) -> Page:
    """Newest first, keyset-paginated on (created_at, id) so pages stay stable while new rows arrive."""
    query = select(Submission).where(Submission.tenant_id == tenant_id)
    if filters.status:
        query = query.where(Submission.status == filters.status)
    if filters.role:
        query = query.where(Submission.role == filters.role)
    if filters.decision:
        query = query.join(Verdict, Verdict.submission_id == Submission.id).where(
            Verdict.decision == filters.decision
        )
    if cursor:
        created_at, last_id = decode_cursor(cursor)
        query = query.where(
            or_(Submission.created_at < created_at,
                and_(Submission.created_at == created_at, Submission.id < last_id))
        )
    rows = list(session.scalars(
        query.order_by(Submission.created_at.desc(), Submission.id.desc()).limit(limit + 1)
        .options(selectinload(Submission.review))
    ))
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if has_more and rows else None
    return Page(submissions=rows, next_cursor=next_cursor)
