"""Writing audit events. Callers add events inside their own transaction, so a state change and its record commit
together or not at all."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from app.models import AuditEvent

SYSTEM_ACTOR = "system"


def content_digest(texts: Sequence[str]) -> str:
    """SHA-256 over the texts as a JSON list: identifies content in the audit trail without holding it."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def record_event(
    session: Session,
    *,
    tenant_id: str | None,
    action: str,
    actor: str,
    subject_type: str | None = None,
    subject_id: str | None = None,
    request_id: str | None = None,
    content_digest: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    event = AuditEvent(
        tenant_id=tenant_id,
        action=action,
        actor=actor,
        subject_type=subject_type,
        subject_id=subject_id,
        request_id=request_id,
        content_digest=content_digest,
        details=details or {},
    )
    session.add(event)
    return event
