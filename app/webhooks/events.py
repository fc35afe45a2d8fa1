"""The events Verdict sends and the exact body of each (the Standard Webhooks envelope around the submission as
`GET /v1/submissions/{id}` shows it; never moderated text). See docs/webhooks.md."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from app.models import ReviewItem, Submission, SubmissionStatus, Verdict
from app.schemas.submissions import submission_out

SUBMISSION_COMPLETED = "submission.completed"
SUBMISSION_FLAGGED = "submission.flagged"
SUBMISSION_FAILED = "submission.failed"
REVIEW_DECIDED = "review.decided"
WEBHOOK_TEST = "webhook.test"
# What an endpoint may subscribe to. `webhook.test` goes to whoever asks for it.
SUBSCRIBABLE_EVENTS = (SUBMISSION_COMPLETED, SUBMISSION_FLAGGED, SUBMISSION_FAILED, REVIEW_DECIDED)


def submission_event_types(submission: Submission, verdict: Verdict | None) -> list[str]:
    """The events a finished submission raises: completed (and flagged, if so), or failed."""
    if submission.status == SubmissionStatus.FAILED.value:
        return [SUBMISSION_FAILED]
    if submission.status == SubmissionStatus.COMPLETED.value and verdict is not None:
        return [SUBMISSION_COMPLETED, *([SUBMISSION_FLAGGED] if verdict.flagged else [])]
    return []


def envelope(event_type: str, data: dict[str, Any], occurred_at: datetime) -> str:
    """The body as sent, serialized once (ASCII-only JSON, so every receiver reads the same bytes it verifies)."""
    return json.dumps(
        {"type": event_type, "timestamp": occurred_at.isoformat().replace("+00:00", "Z"), "data": data},
        separators=(",", ":"),
    )


def submission_data(submission: Submission, verdict: Verdict | None,
                    review: ReviewItem | None = None) -> dict[str, Any]:
    """The submission as `GET /v1/submissions/{id}` shows it (the same function): metadata, verdict and human
    review, no text."""
    return submission_out(submission, verdict, review).model_dump(mode="json")


def webhook_test_data(endpoint_id: str) -> dict[str, Any]:
    return {"object": "webhook_test", "webhook_id": endpoint_id,
            "message": "A test event from Verdict: the endpoint is reachable and the signature verifies."}
