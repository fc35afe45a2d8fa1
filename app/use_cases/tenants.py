"""Tenant settings an operator changes: how long content is kept, whether submissions are masked by default, and
the rate limits of the tenant's keys, and what happens when no moderation provider can answer (fail, or a degraded
verdict)."""

from __future__ import annotations

import enum

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Tenant
from app.use_cases.audit import SYSTEM_ACTOR, record_event


class TenantRequestError(Exception):
    """A tenant request that cannot be carried out; the message is for the operator."""


class Keep(enum.Enum):
    """Leave the setting as it is."""

    KEEP = "keep"


KEEP = Keep.KEEP
# What happens when no provider can answer: fail the submission, or a degraded verdict (fail closed or open).
FAILURE_MODES = ("fail", "review", "block", "allow")


def configure_tenant(
    session: Session,
    tenant_name: str,
    *,
    retention_days: int | None | Keep = KEEP,
    mask_by_default: bool | None | Keep = KEEP,
    rate_limit_rpm: int | None | Keep = KEEP,
    rate_limit_tpm: int | None | Keep = KEEP,
    failure_mode: str | None | Keep = KEEP,
    actor: str = SYSTEM_ACTOR,
) -> Tenant:
    """Change the tenant's settings (None: follow the deployment's default) and audit what changed, in the caller's
    transaction."""
    tenant = session.scalars(select(Tenant).where(Tenant.name == tenant_name)).one_or_none()
    if tenant is None:
        raise TenantRequestError(f"no tenant named {tenant_name!r}")
    if isinstance(retention_days, int) and retention_days < 0:
        raise TenantRequestError("retention days must be 0 (keep forever) or more")
    for label, limit in (("requests", rate_limit_rpm), ("tokens", rate_limit_tpm)):
        if isinstance(limit, int) and not 1 <= limit < 2**31:
            raise TenantRequestError(f"a {label} per minute limit must be from 1 to {2**31 - 1}")
    if isinstance(failure_mode, str) and failure_mode not in FAILURE_MODES:
        raise TenantRequestError(f"failure mode must be one of {', '.join(FAILURE_MODES)}")
    changes: dict[str, dict[str, int | bool | str | None]] = {}
    requested = {"retention_days": retention_days, "mask_by_default": mask_by_default,
                 "rate_limit_rpm": rate_limit_rpm, "rate_limit_tpm": rate_limit_tpm, "failure_mode": failure_mode}
    for field, value in requested.items():
        current = getattr(tenant, field)
        if value is not KEEP and value != current:
            changes[field] = {"from": current, "to": value}
            setattr(tenant, field, value)
    if changes:
        record_event(session, tenant_id=tenant.id, action="tenant.updated", actor=actor, subject_type="tenant",
                     subject_id=tenant.id, details={"changes": changes})
    return tenant
