"""Taking content in and reading it back: submit, look up, list. Every read is scoped to the caller's tenant."""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app.auth import Principal
from app.errors import InvalidRequest, NotFound
from app.masking import DEFAULT_MASKER, Masker
from app.models import Submission, SubmissionStatus, Tenant, Verdict, utcnow
from app.moderation.policy import get_policy
from app.schemas import SubmissionIn
from app.use_cases.audit import content_digest, record_event

Dispatch = Callable[[Sequence[str]], None]


def submit_content(
    session: Session,
    principal: Principal,
    items: Sequence[SubmissionIn],
    *,
    request_id: str | None,
    dispatch: Dispatch,
    masker: Masker = DEFAULT_MASKER,
) -> list[Submission]:
    """Store the submissions and their `submission.received` events in one transaction, then dispatch them.

    Dispatch happens only after the commit, so a worker never looks for a row that is not there yet. If dispatch
    fails (broker down), the rows stay `queued` and the requeue sweep sends them later: nothing is lost. Texts to
    be masked are masked first, so neither the database nor a provider ever sees the personal data, and the content
    digest is of the masked text.
    """
    for index, item in enumerate(items):
        if get_policy(item.policy) is None:
            param = "policy" if len(items) == 1 else f"items[{index}].policy"
            raise InvalidRequest(f"Unknown policy '{item.policy}'.", param=param, code="unknown_policy")

    now = utcnow()
    tenant_default = _tenant_mask_default(session, principal.tenant_id) if any(
        item.mask is None for item in items) else None
    submissions: list[Submission] = []
    masked_counts: list[dict[str, int] | None] = []
    for item in items:
        texts = list(item.input)
        mask = masker.applies(item.mask, tenant_default)
        counts: dict[str, int] | None = None
        if mask:
            texts, counts = masker.mask_all(texts)
        masked_counts.append(counts)
        submission = Submission(
            tenant_id=principal.tenant_id,
            api_key_id=principal.key_id,
            role=item.role,
            content=texts,
            content_digest=content_digest(texts),
            text_count=len(texts),
            conversation_id=item.conversation_id,
            turn_id=item.turn_id,
            client_metadata=item.metadata,
            policy_name=item.policy,
            model=item.model,
            mask=mask,
            callback_url=item.callback_url,
            request_id=request_id,
            created_at=now,
            enqueued_at=now,
        )
        session.add(submission)
        submissions.append(submission)
    session.flush()
    for submission, counts in zip(submissions, masked_counts, strict=True):
        details: dict[str, object] = {"role": submission.role, "text_count": submission.text_count,
                                      "policy": submission.policy_name, "mask": submission.mask}
        if counts is not None:
            details["masked"] = counts
        record_event(
            session, tenant_id=principal.tenant_id, action="submission.received", actor=principal.key_id,
            subject_type="submission", subject_id=submission.id, request_id=request_id,
            content_digest=submission.content_digest, conversation_id=submission.conversation_id,
            turn_id=submission.turn_id, details=details,
        )
    session.commit()
    dispatch([s.id for s in submissions])
    return submissions


def _tenant_mask_default(session: Session, tenant_id: str) -> bool | None:
    return session.scalar(select(Tenant.mask_by_default).where(Tenant.id == tenant_id))


def get_submission(session: Session, tenant_id: str, submission_id: str) -> Submission:
    # A NUL cannot be sent to PostgreSQL at all (it would be a 500); no id contains one, so it is simply not found.
    submission = None if "\x00" in submission_id else session.get(Submission, submission_id)
    # Another tenant's submission answers exactly as a missing one does.
    if submission is None or submission.tenant_id != tenant_id:
        raise NotFound("No such submission.", param="id")
    return submission


_FINAL = {SubmissionStatus.COMPLETED.value, SubmissionStatus.FAILED.value}


def await_submission(
    session: Session, tenant_id: str, submission_id: str, *, wait_seconds: float, poll_interval: float = 0.2
) -> Submission:
    """The submission, waiting up to `wait_seconds` for it to reach a final status (long-poll)."""
    deadline = time.monotonic() + wait_seconds
    submission = get_submission(session, tenant_id, submission_id)
    while submission.status not in _FINAL and time.monotonic() < deadline:
        # Release the connection while sleeping; re-read fresh state afterwards.
        session.rollback()
        time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))
        session.expire_all()
        submission = get_submission(session, tenant_id, submission_id)
    return submission


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
    ))
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if has_more and rows else None
    return Page(submissions=rows, next_cursor=next_cursor)


def encode_cursor(created_at: datetime, submission_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), submission_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_CURSOR_ID = re.compile(r"[\x21-\x7e]{1,64}")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_raw, submission_id = json.loads(raw)
        created_at = datetime.fromisoformat(created_raw)
        # The id goes into SQL: printable ASCII only (a NUL or a lone surrogate would fail in the driver, a 500).
        if created_at.tzinfo is None or not isinstance(submission_id, str) or not _CURSOR_ID.fullmatch(submission_id):
            raise ValueError("bad cursor")
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidRequest("Invalid cursor.", param="cursor", code="invalid_cursor") from exc
    return created_at, submission_id
