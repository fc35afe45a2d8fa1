"""The chaos run's verdict on a database (ops/chaos/README.md): what the clients were given against what was stored.

Importable by the tests (tests/integration/test_chaos.py checks that it finds an injected duplicate, a lost row and
a broken chain), so the run's checks are themselves tested.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from sqlalchemy import func, select

from app.db import Database
from app.models import AuditChainHead, AuditEvent, Submission, SubmissionStatus, Verdict
from app.use_cases.audit import verify_chain

FINAL = frozenset({SubmissionStatus.COMPLETED.value, SubmissionStatus.FAILED.value})


@dataclass
class Findings:
    accepted: int = 0
    completed: int = 0
    failed: int = 0
    lost: list[str] = field(default_factory=list)
    # Of `lost`: rows that exist but are not final (the drain ran out of time), as against rows missing or incomplete.
    unfinished: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    broken_chains: list[str] = field(default_factory=list)
    chains_verified: int = 0

    @property
    def chain_ok(self) -> bool:
        return not self.broken_chains and self.chains_verified > 0


def check(database: Database, tenant_id: str, accepted_ids: Iterable[str],
          chains: Collection[str] | None = None) -> Findings:
    """Every id a client was given exists and is final (else `lost`); a completed one has exactly one verdict and one
    `verdict.decided` event, a failed one none (a completed one with none is `lost`, anything more is a duplicate);
    the tenant has no submission no client was given (a request that ran twice: a duplicate); every audit chain in
    `chains` (default: every chain in the database) verifies with the project's own `verify_chain`."""
    ids = set(accepted_ids)
    findings = Findings(accepted=len(ids))
    with database.transaction() as session:
        status = dict(session.execute(
            select(Submission.id, Submission.status).where(Submission.tenant_id == tenant_id)).tuples().all())
        verdicts = Counter(dict(session.execute(
            select(Verdict.submission_id, func.count()).where(Verdict.tenant_id == tenant_id)
            .group_by(Verdict.submission_id)).tuples().all()))
        decided = Counter(dict(session.execute(
            select(AuditEvent.subject_id, func.count())
            .where(AuditEvent.chain_id == tenant_id, AuditEvent.action == "verdict.decided")
            .group_by(AuditEvent.subject_id)).tuples().all()))
        for submission_id in sorted(ids):
            state = status.get(submission_id)
            if state not in FINAL:
                findings.lost.append(submission_id)
                if state is not None:
                    findings.unfinished.append(submission_id)
                continue
            expected = 1 if state == SubmissionStatus.COMPLETED.value else 0
            have = (verdicts[submission_id], decided[submission_id])
            if max(have) > expected:
                findings.duplicates.append(submission_id)
            elif min(have) < expected:
                findings.lost.append(submission_id)
            elif state == SubmissionStatus.COMPLETED.value:
                findings.completed += 1
            else:
                findings.failed += 1
        findings.duplicates += sorted(set(status) - ids)
        names = chains if chains is not None else session.scalars(select(AuditChainHead.chain_id)).all()
        for chain in names:
            findings.chains_verified += 1
            if not verify_chain(session, chain).ok:
                findings.broken_chains.append(chain)
    return findings
