"""`/v1/audit`: query the tenant's audit trail, stream it out (NDJSON or CSV), and verify its hash chain. All three
need the `audit` scope and see only the caller's tenant chain."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, jsonify, request, stream_with_context

from app.api.auth import current_principal, require_scope
from app.api.transactions import request_session, transaction
from app.audit_chain import canonical_fields, chain_of, csv_lines, export_line
from app.extensions import current_database
from app.models import AuditEvent
from app.schemas.audit import (
    AuditEventOut,
    AuditExportQuery,
    AuditPage,
    AuditQuery,
    AuditVerificationOut,
    AuditVerifyQuery,
    ChainBreakOut,
)
from app.use_cases.audit import AuditFilter, query_events, stream_events, verify_chain

bp = Blueprint("audit", __name__)


@bp.get("/v1/audit")
@require_scope("audit")
@transaction
def list_events() -> Response:
    query = AuditQuery.model_validate(request.args.to_dict())
    filters = AuditFilter(start=query.start, end=query.end, action=query.action, actor=query.actor,
                          subject=query.subject, decision=query.decision, category=query.category,
                          conversation_id=query.conversation_id)
    page = query_events(request_session(), current_principal().tenant_id, filters, limit=query.limit,
                        cursor=query.cursor)
    body = AuditPage(data=[event_out(e) for e in page.events], has_more=page.next_cursor is not None,
                     next_cursor=page.next_cursor)
    return jsonify(body.model_dump(mode="json"))


@bp.get("/v1/audit/export")
@require_scope("audit")
def export_events() -> Response:
    query = AuditExportQuery.model_validate(request.args.to_dict())
    chain_id = chain_of(current_principal().tenant_id)
    database = current_database()

    def events() -> Iterator[AuditEvent]:
        # The stream's own session and transaction, open while the rows are sent and ended with the stream.
        with database.transaction() as session:
            yield from stream_events(session, chain_id, start=query.start, end=query.end)

    body: Iterator[str] | Iterator[bytes]
    if query.format == "csv":
        body, mimetype = csv_lines(events()), "text/csv"
    else:
        body, mimetype = (export_line(e) for e in events()), "application/x-ndjson"
    # stream_with_context keeps the request open until the last row is sent.
    response = Response(stream_with_context(body), mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="audit-{chain_id}.{query.format}"'
    return response


@bp.get("/v1/audit/verify")
@require_scope("audit")
@transaction
def verify() -> Response:
    query = AuditVerifyQuery.model_validate(request.args.to_dict())
    result = verify_chain(request_session(), chain_of(current_principal().tenant_id), start_seq=query.start_seq,
                          end_seq=query.end_seq)
    broken = result.broken
    body = AuditVerificationOut(
        ok=result.ok, chain=result.chain or "", count=result.count, first_seq=result.first_seq,
        last_seq=result.last_seq, head_hash=result.head_hash, notes=result.notes,
        broken=None if broken is None else ChainBreakOut(seq=broken.seq, code=broken.code, reason=broken.reason),
    )
    return jsonify(body.model_dump(mode="json"))


def event_out(event: AuditEvent) -> AuditEventOut:
    return AuditEventOut(hash=event.hash, **canonical_fields(event))
