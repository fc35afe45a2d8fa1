"""Keyset cursors over (created_at, id), and over (rank, created_at, id) for the review queue's priority order: the
pages of submissions, webhook deliveries and review items stay stable while new rows arrive."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from datetime import datetime

from app.use_cases.errors import InvalidInput

_CURSOR_ID = re.compile(r"[\x21-\x7e]{1,64}")


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_raw, row_id = json.loads(raw)
        created_at = datetime.fromisoformat(created_raw)
        # The id goes into SQL: printable ASCII only (a NUL or a lone surrogate would fail in the driver, a 500).
        if created_at.tzinfo is None or not isinstance(row_id, str) or not _CURSOR_ID.fullmatch(row_id):
            raise ValueError("bad cursor")
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput("Invalid cursor.", param="cursor", code="invalid_cursor") from exc
    return created_at, row_id


def encode_ranked_cursor(rank: float, created_at: datetime, row_id: str) -> str:
    """A cursor over (rank, created_at, id): the review queue's priority order (highest score first, then oldest)."""
    raw = json.dumps([rank, created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_ranked_cursor(cursor: str) -> tuple[float, datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        rank, created_raw, row_id = json.loads(raw)
        created_at = datetime.fromisoformat(created_raw)
        if (isinstance(rank, bool) or not isinstance(rank, int | float) or not math.isfinite(rank)
                or not -1e9 < rank < 1e9 or created_at.tzinfo is None or not isinstance(row_id, str)
                or not _CURSOR_ID.fullmatch(row_id)):
            raise ValueError("bad cursor")
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput("Invalid cursor.", param="cursor", code="invalid_cursor") from exc
    return float(rank), created_at, row_id
