"""Query plans of the audit API's filtered queries on a large table, written to ops/AUDIT_QUERY_PLANS.md.

Creates a scratch PostgreSQL database, migrates it with Verdict's own migrations, fills `audit_events` with synthetic
rows using generate_series (one large tenant and many small ones), runs the application's own query code
(app/use_cases/audit.py) for each filter, captures the SQL it sends, and records EXPLAIN (ANALYZE, BUFFERS) of it.

    .venv/bin/python ops/audit_explain.py [--rows 2000000] [--admin-url postgresql+psycopg://postgres@127.0.0.1/postgres]
                                          [--output ops/AUDIT_QUERY_PLANS.md] [--keep]

The scratch database is dropped afterwards unless --keep is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.cli import migrate_database  # noqa: E402
from app.config import Settings  # noqa: E402
from app.db import Database  # noqa: E402
from app.use_cases.audit import AuditFilter, decode_cursor, encode_cursor, query_events, stream_events  # noqa: E402

BIG = "ten_big"
SMALL_TENANTS = 40
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)

FILL = """
INSERT INTO audit_events (tenant_id, chain_id, seq, prev_hash, hash, occurred_at, action, actor, subject_type,
                          subject_id, request_id, content_digest, conversation_id, turn_id, decision, categories,
                          details)
SELECT %(tenant)s, %(tenant)s, g,
       md5((g - 1)::text) || md5((g - 1)::text),
       md5(g::text) || md5(g::text),
       %(epoch)s::timestamptz + g * interval '1 second',
       (ARRAY['submission.received', 'moderation.completed', 'verdict.decided'])[k + 1],
       CASE WHEN k = 0 THEN 'key_' || lpad((sub %% 10)::text, 16, '0') ELSE 'worker' END,
       'submission', 'sub_' || sub, 'req_' || sub, md5(sub::text) || md5(sub::text),
       CASE WHEN sub %% 2 = 0 THEN 'conv-' || (sub / 4) END,
       CASE WHEN sub %% 2 = 0 THEN 't-' || (sub %% 4) END,
       CASE WHEN k = 2 THEN CASE WHEN r < 5 THEN 'block' WHEN r < 15 THEN 'review' ELSE 'allow' END END,
       CASE WHEN k = 2 THEN CASE WHEN r < 2 THEN '["harassment", "violence"]'::jsonb
                                 WHEN r < 5 THEN '["harassment"]'::jsonb
                                 WHEN r < 10 THEN '["hate"]'::jsonb
                                 WHEN r < 15 THEN '["sexual"]'::jsonb
                                 ELSE '[]'::jsonb END END,
       CASE WHEN k = 2 THEN '{"flagged": false, "policy": "default", "policy_version": 1}'::jsonb
            ELSE '{}'::jsonb END
FROM generate_series(1, %(rows)s) AS g,
     LATERAL (SELECT (g - 1) %% 3 AS k, (g - 1) / 3 AS sub) AS parts,
     LATERAL (SELECT (parts.sub::bigint * 7919) %% 100 AS r) AS chance
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="total audit events (default 2,000,000)")
    parser.add_argument("--admin-url", default=os.environ.get(
        "TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "AUDIT_QUERY_PLANS.md")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()

    admin = make_url(args.admin_url)
    admin_dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"verdict_audit_explain_{uuid.uuid4().hex[:8]}"
    url = admin.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        migrate_database(Settings(_env_file=None, database_url=url))  # type: ignore[call-arg]
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        facts = fill(dsn, args.rows)
        report = explain_all(Database(url), facts)
        args.output.write_text(report)
        print(f"wrote {args.output}")
    finally:
        if not args.keep:
            with psycopg.connect(admin_dsn, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fill(dsn: str, rows: int) -> dict[str, Any]:
    small_rows = rows // 5 // SMALL_TENANTS
    big_rows = rows - small_rows * SMALL_TENANTS
    tenants = [(BIG, big_rows)] + [(f"ten_small_{n:03d}", small_rows) for n in range(SMALL_TENANTS)]
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for tenant, count in tenants:
            conn.execute("INSERT INTO tenants (id, name, created_at) VALUES (%s, %s, now())", (tenant, tenant))
            conn.execute(FILL, {"tenant": tenant, "rows": count, "epoch": EPOCH})
            conn.execute("INSERT INTO audit_chain_heads (chain_id, seq, hash, occurred_at) "
                         "SELECT chain_id, seq, hash, occurred_at FROM audit_events WHERE chain_id = %s "
                         "ORDER BY seq DESC LIMIT 1", (tenant,))
        conn.execute("INSERT INTO audit_event_categories (chain_id, category, seq) "
                     "SELECT chain_id, jsonb_array_elements_text(categories), seq FROM audit_events "
                     "WHERE jsonb_typeof(categories) = 'array'")
        conn.execute("VACUUM ANALYZE audit_events")
        conn.execute("VACUUM ANALYZE audit_event_categories")
        sizes = conn.execute(
            "SELECT c.relname, pg_size_pretty(pg_relation_size(c.oid)), c.reltuples::bigint FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND (c.relname LIKE "
            "'audit_event%%' OR c.relname LIKE 'ix_audit%%' OR c.relname LIKE 'uq_audit%%' OR c.relname LIKE "
            "'pk_audit%%') ORDER BY c.relname").fetchall()
        version = conn.execute("SHOW server_version").fetchone()
    return {"rows": rows, "big_rows": big_rows, "small_rows": small_rows, "fill_seconds": time.monotonic() - started,
            "sizes": sizes, "server_version": version[0] if version else "?"}


Query = tuple[str, str, Callable[[Any], Any]]


def queries(facts: dict[str, Any]) -> list[Query]:
    big = facts["big_rows"]
    day = EPOCH + timedelta(days=10)
    deep = big - big // 20
    deep_cursor = encode_cursor(deep)
    middle_subject = f"sub_{big // 6}"
    conversation = f"conv-{big // 12}"

    def page(filters: AuditFilter, cursor: str | None = None) -> Callable[[Any], Any]:
        return lambda session: query_events(session, BIG, filters, limit=100, cursor=cursor)

    def export(session: Any) -> int:
        return sum(1 for _ in stream_events(session, BIG, start=day, end=day + timedelta(hours=1)))

    assert decode_cursor(deep_cursor) == deep
    return [
        ("First page, no filter", "`GET /v1/audit?limit=100`", page(AuditFilter())),
        ("A deep page, no filter", f"`GET /v1/audit?cursor=…` (after seq {deep:,})",
         page(AuditFilter(), deep_cursor)),
        ("By action", "`action=verdict.decided` (a third of all events)", page(AuditFilter(action="verdict.decided"))),
        ("By actor", "`actor=key_0000000000000003` (one key: 1 in 30 events)",
         page(AuditFilter(actor="key_0000000000000003"))),
        ("By subject", f"`subject={middle_subject}` (3 events)", page(AuditFilter(subject=middle_subject))),
        ("By decision", "`decision=block` (5% of decisions)", page(AuditFilter(decision="block"))),
        ("By category", "`category=violence` (2% of decisions)", page(AuditFilter(category="violence"))),
        ("By category and decision", "`category=harassment&decision=block`",
         page(AuditFilter(category="harassment", decision="block"))),
        ("By conversation", f"`conversation_id={conversation}` (2 submissions, 6 events)",
         page(AuditFilter(conversation_id=conversation))),
        ("Worst case: two filters that never meet", "`actor=key_0000000000000003&action=verdict.decided` (keys "
         "only submit; one index range is read to its end)",
         page(AuditFilter(actor="key_0000000000000003", action="verdict.decided"))),
        ("Time range", "`start=2026-01-11T00:00:00Z&end=2026-01-12T00:00:00Z`",
         page(AuditFilter(start=day, end=day + timedelta(days=1)))),
        ("Time range and decision", "one day, `decision=block`",
         page(AuditFilter(start=day, end=day + timedelta(days=1), decision="block"))),
        ("Time range and category", "one day, `category=violence`",
         page(AuditFilter(start=day, end=day + timedelta(days=1), category="violence"))),
        ("Export of one hour", "`GET /v1/audit/export?start=…&end=…` (3,600 events, server-side cursor)", export),
    ]


def explain_all(database: Database, facts: dict[str, Any]) -> str:
    captured: list[tuple[str, Any]] = []

    @event.listens_for(database.engine, "before_cursor_execute")
    def _capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "DECLARE")):
            captured.append((statement, parameters))

    sections: list[str] = []
    summary: list[str] = []
    for title, request, run in queries(facts):
        with database.transaction() as session:
            run(session)  # warm the cache once, as a busy server would have it
            captured.clear()
            run(session)
            statements = list(captured)
        plans: list[str] = []
        total_ms = 0.0
        for statement, parameters in statements:
            statement = statement.removeprefix("DECLARE ").split(" CURSOR ", 1)[-1] if statement.startswith(
                "DECLARE") else statement
            with database.engine.connect() as connection:
                rows = connection.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", parameters).fetchall()
            plan = "\n".join(r[0] for r in rows)
            total_ms += float(next(r[0] for r in rows if r[0].startswith("Execution Time")).split()[2])
            plans.append(f"```sql\n{_literal(statement, parameters)}\n```\n\n```\n{plan}\n```")
        main_plan = plans[-1]
        scan = next((line.strip() for line in main_plan.splitlines() if " on " in line and "Scan" in line), "")
        summary.append(f"| {title} | {request} | {len(statements)} | {total_ms:.2f} | {_index_of(scan)} |")
        sections.append(f"## {title}\n\n{request}\n\n" + "\n\n".join(plans))

    sizes = "\n".join(f"| `{relname}` | {size} | {tuples:,} |" for relname, size, tuples in facts["sizes"])
    return f"""# Audit query plans

Generated by `ops/audit_explain.py` on {datetime.now(UTC):%Y-%m-%d} (PostgreSQL {facts['server_version']},
{platform.machine()}, {os.cpu_count()} cores): a scratch database migrated with Verdict's migrations and filled with
{facts['rows']:,} synthetic audit events by `generate_series` ({facts['fill_seconds']:.0f} s): one tenant with
{facts['big_rows']:,} events (`{BIG}`, the one every query reads) and {SMALL_TENANTS} with {facts['small_rows']:,}
each. Events come in threes per submission (received, completed, decided); decisions are 85% allow, 10% review,
5% block; half the submissions belong to a conversation. Every query is the SQL the application itself sends
(app/use_cases/audit.py), captured and then run under `EXPLAIN (ANALYZE, BUFFERS)` with a warm cache, a page of
100 events. Reproduce with `.venv/bin/python ops/audit_explain.py` (`--rows`, `--admin-url`, `--keep`).

How the queries stay fast: every filter has an index that starts with `(chain_id, <filter>)` and ends with `seq`, so
a page is one ordered index range that stops after 101 rows, whatever the table size. A time range is turned into a
`seq` range first (two single-row probes of `(chain_id, occurred_at)`; time never goes backwards within a chain),
and the category filter joins `audit_event_categories`, whose primary key `(chain_id, category, seq)` is in `seq`
order too. Times are milliseconds on this machine and only indicative; the plans' shape (index, no sort, rows
read) is what matters.

| query | request | statements | total ms | main index |
|---|---|---|---|---|
{chr(10).join(summary)}

Table and index sizes:

| relation | size | rows (estimate) |
|---|---|---|
{sizes}

{chr(10).join(sections)}
"""


def _index_of(scan_line: str) -> str:
    if " using " in scan_line:
        return "`" + scan_line.split(" using ", 1)[1].split(" ", 1)[0] + "`"
    return scan_line.split("  (", 1)[0]


def _literal(statement: str, parameters: Any) -> str:
    text = " ".join(statement.split())
    if isinstance(parameters, dict):
        for key, value in sorted(parameters.items(), key=lambda kv: -len(kv[0])):
            shown = f"'{value}'" if isinstance(value, str | datetime) else str(value)
            text = text.replace(f"%({key})s", shown)
    return text


if __name__ == "__main__":
    main()
