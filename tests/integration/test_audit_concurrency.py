"""Many OS processes appending to the same two audit chains at once, on PostgreSQL: the chains never fork and never
skip a seq, because each writer locks its chain's head row until it commits."""

from __future__ import annotations

import multiprocessing
from multiprocessing.synchronize import Event

import pytest
from sqlalchemy import func, select

from app.db import Database
from app.models import AuditEvent
from app.use_cases.audit import record_event, verify_chain
from tests.conftest import TenantKey

pytestmark = pytest.mark.integration  # the writers are OS processes

PROCESSES = 8
EVENTS_PER_PROCESS = 50


def write_events(database_url: str, tenant_ids: list[str], writer: int, go: Event) -> None:
    """One writer process: its own engine, then EVENTS_PER_PROCESS events over both tenants, one per transaction."""
    database = Database(database_url)
    go.wait(timeout=60)
    for number in range(EVENTS_PER_PROCESS):
        with database.transaction() as session:
            record_event(session, tenant_id=tenant_ids[(writer + number) % 2], action="test.concurrent",
                         actor=f"writer-{writer}", subject_type="thing", subject_id=f"{writer}-{number}",
                         details={"writer": writer, "number": number})
    database.engine.dispose()


def test_concurrent_writers_from_many_processes_keep_both_chains_gapless_and_valid(
    database_url: str, database: Database, tenant: TenantKey, other_tenant: TenantKey
) -> None:
    tenant_ids = [tenant.tenant_id, other_tenant.tenant_id]
    # spawn, not fork: each writer starts clean, with no connection or thread inherited from pytest.
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    writers = [context.Process(target=write_events, args=(database_url, tenant_ids, n, go))
               for n in range(PROCESSES)]
    for process in writers:
        process.start()
    go.set()  # all at once, once every interpreter is up and waiting
    for process in writers:
        process.join(timeout=240)
    assert [p.exitcode for p in writers] == [0] * PROCESSES

    per_tenant = PROCESSES * EVENTS_PER_PROCESS // 2
    with database.transaction() as session:
        for tenant_id in tenant_ids:
            seqs = list(session.scalars(select(AuditEvent.seq).where(AuditEvent.chain_id == tenant_id)
                                        .order_by(AuditEvent.seq)))
            # tenant.created and key.created, then every concurrent event: 1..N with no gap and no duplicate.
            assert seqs == list(range(1, per_tenant + 3))
            written = session.scalar(select(func.count()).select_from(AuditEvent).where(
                AuditEvent.chain_id == tenant_id, AuditEvent.action == "test.concurrent"))
            assert written == per_tenant
            result = verify_chain(session, tenant_id)
            assert result.ok, result.broken
            assert result.count == per_tenant + 2
