"""The pure parts of human review (app/use_cases/reviews.py, app/models.py, app/use_cases/pagination.py): a claim's
status as the queue sees it, the priority-order cursor, the time-to-decision summary, and final_decision."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from app.models import ReviewItem
from app.schemas.submissions import final_decision
from app.use_cases.errors import InvalidInput
from app.use_cases.pagination import decode_ranked_cursor, encode_ranked_cursor
from app.use_cases.reviews import _summary

NOW = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)


def item(**fields: Any) -> ReviewItem:
    return ReviewItem(status="pending", claim_expires_at=None, decision=None, override_decision=None, **fields)


@pytest.mark.parametrize(("status", "expires", "seen"), [
    ("pending", None, "pending"),
    ("claimed", NOW + timedelta(seconds=1), "claimed"),
    ("claimed", NOW, "pending"),  # the claim ran out at this instant
    ("claimed", NOW - timedelta(minutes=5), "pending"),
    ("claimed", None, "pending"),
    ("decided", None, "decided"),
])
def test_an_expired_claim_is_pending_again(status: str, expires: datetime | None, seen: str) -> None:
    review = item()
    review.status, review.claim_expires_at = status, expires
    assert review.status_at(NOW) == seen


def test_the_final_decision_is_the_override_then_the_reviewers_then_the_machines() -> None:
    review = item()
    assert final_decision(None, review) is None  # waiting for a reviewer
    review.decision = "block"
    assert final_decision(None, review) == "block"
    review.override_decision = "allow"
    assert final_decision(None, review) == "allow"
    for machine, final in (("allow", "allow"), ("block", "block"), ("review", None)):
        assert final_decision(SimpleNamespace(decision=machine), None) == final  # type: ignore[arg-type]
    assert final_decision(None, None) is None


@pytest.mark.parametrize("rank", [0.0, 0.6, 0.1 + 0.2, 1.0, 1e-9])
def test_the_ranked_cursor_round_trips_exactly(rank: float) -> None:
    assert decode_ranked_cursor(encode_ranked_cursor(rank, NOW, "rev_abc")) == (rank, NOW, "rev_abc")


@pytest.mark.parametrize("raw", [
    [float("nan"), NOW.isoformat(), "rev_a"], [1e300, NOW.isoformat(), "rev_a"], [True, NOW.isoformat(), "rev_a"],
    ["0.5", NOW.isoformat(), "rev_a"], [0.5, "2026-12-03T08:00:00", "rev_a"], [0.5, NOW.isoformat(), "rev\x00"],
    [0.5, NOW.isoformat(), 7], [0.5, NOW.isoformat()], {"a": 1},
])
def test_a_forged_ranked_cursor_is_a_400(raw: Any) -> None:
    cursor = base64.urlsafe_b64encode(json.dumps(raw).encode()).decode().rstrip("=")
    with pytest.raises(InvalidInput) as refused:
        decode_ranked_cursor(cursor)
    assert refused.value.param == "cursor"


@pytest.mark.parametrize("cursor", ["", "!!!", "bm90IGpzb24", "W10"])
def test_a_mangled_ranked_cursor_is_a_400(cursor: str) -> None:
    with pytest.raises(InvalidInput):
        decode_ranked_cursor(cursor)


def test_the_summary_of_waits() -> None:
    assert _summary([]) == {"mean": None, "p50": None, "p90": None, "max": None}
    assert _summary([42.0]) == {"mean": 42.0, "p50": 42.0, "p90": 42.0, "max": 42.0}
    waits = [float(n) for n in range(1, 11)]  # 1..10 s
    assert _summary(waits) == {"mean": 5.5, "p50": 5.0, "p90": 9.0, "max": 10.0}
