"""Audit hash chain, audit query columns and indexes, erasure tombstones, retention and masking settings.

Existing audit events are chained here, in Python: per tenant (or the `system` chain), in (occurred_at, id) order,
with the canonical form of app/use_cases/audit.py, copied below because a revision must not import application code
that changes after it is written. Fields that the audit API now filters on (conversation_id and turn_id of
`submission.received`, decision and categories of `verdict.decided`) move out of `details` into their columns first.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 19:10:00.000000
"""
import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import rfc8785
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
GENESIS_HASH = '0' * 64
SYSTEM_CHAIN = 'system'
NOT_NULL_DECISION = sa.text('decision IS NOT NULL')
NOT_NULL_CONVERSATION = sa.text('conversation_id IS NOT NULL')
NOT_ERASED = sa.text('erased_at IS NULL')


def upgrade() -> None:
    op.add_column('tenants', sa.Column('retention_days', sa.Integer(), nullable=True))
    op.add_column('tenants', sa.Column('mask_by_default', sa.Boolean(), nullable=True))

    op.add_column('submissions', sa.Column('erased_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_submissions_tenant_unerased', 'submissions', ['tenant_id', 'created_at'], unique=False,
                    postgresql_where=NOT_ERASED, sqlite_where=NOT_ERASED)

    op.drop_index('ix_audit_events_tenant_id_id', table_name='audit_events')
    op.drop_index('ix_audit_events_subject_id', table_name='audit_events')
    op.add_column('audit_events', sa.Column('chain_id', sa.String(length=40), nullable=True))
    op.add_column('audit_events', sa.Column('seq', sa.BigInteger(), nullable=True))
    op.add_column('audit_events', sa.Column('prev_hash', sa.String(length=64), nullable=True))
    op.add_column('audit_events', sa.Column('hash', sa.String(length=64), nullable=True))
    op.add_column('audit_events', sa.Column('conversation_id', sa.String(length=128), nullable=True))
    op.add_column('audit_events', sa.Column('turn_id', sa.String(length=128), nullable=True))
    op.add_column('audit_events', sa.Column('decision', sa.String(length=16), nullable=True))
    op.add_column('audit_events', sa.Column('categories', JSON, nullable=True))

    op.create_table('audit_chain_heads',
    sa.Column('chain_id', sa.String(length=40), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('chain_id', name=op.f('pk_audit_chain_heads'))
    )

    categories = _chain_existing_events()

    with op.batch_alter_table('audit_events') as batch:
        batch.alter_column('chain_id', existing_type=sa.String(length=40), nullable=False)
        batch.alter_column('seq', existing_type=sa.BigInteger(), nullable=False)
        batch.alter_column('prev_hash', existing_type=sa.String(length=64), nullable=False)
        batch.alter_column('hash', existing_type=sa.String(length=64), nullable=False)
        batch.create_unique_constraint('uq_audit_events_chain_seq', ['chain_id', 'seq'])
    op.create_index('ix_audit_events_chain_occurred', 'audit_events', ['chain_id', 'occurred_at'], unique=False)
    op.create_index('ix_audit_events_chain_action', 'audit_events', ['chain_id', 'action', 'seq'], unique=False)
    op.create_index('ix_audit_events_chain_actor', 'audit_events', ['chain_id', 'actor', 'seq'], unique=False)
    op.create_index('ix_audit_events_chain_subject', 'audit_events', ['chain_id', 'subject_id', 'seq'], unique=False)
    op.create_index('ix_audit_events_chain_decision', 'audit_events', ['chain_id', 'decision', 'seq'], unique=False,
                    postgresql_where=NOT_NULL_DECISION, sqlite_where=NOT_NULL_DECISION)
    op.create_index('ix_audit_events_chain_conversation', 'audit_events', ['chain_id', 'conversation_id', 'seq'],
                    unique=False, postgresql_where=NOT_NULL_CONVERSATION, sqlite_where=NOT_NULL_CONVERSATION)

    op.create_table('audit_event_categories',
    sa.Column('chain_id', sa.String(length=40), nullable=False),
    sa.Column('category', sa.String(length=64), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['chain_id', 'seq'], ['audit_events.chain_id', 'audit_events.seq'],
                            name=op.f('fk_audit_event_categories_chain_id_audit_events'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('chain_id', 'category', 'seq', name=op.f('pk_audit_event_categories'))
    )
    if categories:
        op.bulk_insert(sa.table('audit_event_categories', sa.column('chain_id', sa.String()),
                                sa.column('category', sa.String()), sa.column('seq', sa.BigInteger())),
                       categories)


def downgrade() -> None:
    op.drop_table('audit_event_categories')
    op.drop_index('ix_audit_events_chain_conversation', table_name='audit_events')
    op.drop_index('ix_audit_events_chain_decision', table_name='audit_events')
    op.drop_index('ix_audit_events_chain_subject', table_name='audit_events')
    op.drop_index('ix_audit_events_chain_actor', table_name='audit_events')
    op.drop_index('ix_audit_events_chain_action', table_name='audit_events')
    op.drop_index('ix_audit_events_chain_occurred', table_name='audit_events')
    with op.batch_alter_table('audit_events') as batch:
        batch.drop_constraint('uq_audit_events_chain_seq', type_='unique')
        for column in ('categories', 'decision', 'turn_id', 'conversation_id', 'hash', 'prev_hash', 'seq',
                       'chain_id'):
            batch.drop_column(column)
    op.drop_table('audit_chain_heads')
    op.create_index('ix_audit_events_subject_id', 'audit_events', ['subject_id'], unique=False)
    op.create_index('ix_audit_events_tenant_id_id', 'audit_events', ['tenant_id', 'id'], unique=False)
    op.drop_index('ix_submissions_tenant_unerased', table_name='submissions')
    op.drop_column('submissions', 'erased_at')
    op.drop_column('tenants', 'mask_by_default')
    op.drop_column('tenants', 'retention_days')


# ---- chaining the events written before this revision (canonical form version 1, as in app/use_cases/audit.py) --

_events = sa.table(
    'audit_events', sa.column('id', BIGINT_PK), sa.column('tenant_id', sa.String()), sa.column('chain_id', sa.String()),
    sa.column('seq', sa.BigInteger()), sa.column('prev_hash', sa.String()), sa.column('hash', sa.String()),
    sa.column('occurred_at', sa.DateTime(timezone=True)), sa.column('action', sa.String()),
    sa.column('actor', sa.String()), sa.column('subject_type', sa.String()), sa.column('subject_id', sa.String()),
    sa.column('request_id', sa.String()), sa.column('content_digest', sa.String()),
    sa.column('conversation_id', sa.String()), sa.column('turn_id', sa.String()), sa.column('decision', sa.String()),
    sa.column('categories', JSON), sa.column('details', JSON),
)
_heads = sa.table('audit_chain_heads', sa.column('chain_id', sa.String()), sa.column('seq', sa.BigInteger()),
                  sa.column('hash', sa.String()), sa.column('occurred_at', sa.DateTime(timezone=True)))


def _chain_existing_events() -> list[dict[str, Any]]:
    """Give every existing event its chain, seq and hashes; return the category index rows to insert."""
    bind = op.get_bind()
    heads: dict[str, tuple[int, str, datetime]] = {}
    updates: list[dict[str, Any]] = []
    categories: list[dict[str, Any]] = []
    rows = bind.execute(sa.select(_events).order_by(_events.c.occurred_at, _events.c.id)).mappings().all()
    for row in rows:
        chain = row['tenant_id'] if row['tenant_id'] is not None else SYSTEM_CHAIN
        seq, prev_hash, last = heads.get(chain, (0, GENESIS_HASH, None))
        occurred_at = row['occurred_at']
        if occurred_at.tzinfo is None:
            occurred_at = occurred_at.replace(tzinfo=UTC)
        if last is not None and occurred_at < last:
            occurred_at = last
        details = _plain_json(row['details'] or {})
        moved: dict[str, Any] = {'conversation_id': None, 'turn_id': None, 'decision': None, 'categories': None}
        if row['action'] == 'submission.received':
            moved['conversation_id'] = details.pop('conversation_id', None)
            moved['turn_id'] = details.pop('turn_id', None)
        if row['action'] == 'verdict.decided':
            moved['decision'] = details.pop('decision', None)
            found = details.pop('categories', None)
            moved['categories'] = sorted(set(found)) if found is not None else None
        fields = {
            'v': 1, 'chain': chain, 'tenant_id': row['tenant_id'], 'seq': seq + 1, 'prev_hash': prev_hash,
            'occurred_at': occurred_at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ'),
            'action': row['action'], 'actor': row['actor'], 'subject_type': row['subject_type'],
            'subject_id': row['subject_id'], 'request_id': row['request_id'],
            'content_digest': row['content_digest'], **moved, 'details': details,
        }
        event_hash = hashlib.sha256(rfc8785.dumps(fields)).hexdigest()
        updates.append({'row_id': row['id'], 'chain_id': chain, 'seq': seq + 1, 'prev_hash': prev_hash,
                        'hash': event_hash, 'occurred_at': occurred_at, 'details': details, **moved})
        categories.extend({'chain_id': chain, 'category': c, 'seq': seq + 1} for c in moved['categories'] or ())
        heads[chain] = (seq + 1, event_hash, occurred_at)
    if updates:
        bind.execute(
            _events.update().where(_events.c.id == sa.bindparam('row_id')).values(
                chain_id=sa.bindparam('chain_id'), seq=sa.bindparam('seq'), prev_hash=sa.bindparam('prev_hash'),
                hash=sa.bindparam('hash'), occurred_at=sa.bindparam('occurred_at', type_=sa.DateTime(timezone=True)),
                details=sa.bindparam('details', type_=JSON), conversation_id=sa.bindparam('conversation_id'),
                turn_id=sa.bindparam('turn_id'), decision=sa.bindparam('decision'),
                categories=sa.bindparam('categories', type_=JSON),
            ),
            updates,
        )
        bind.execute(_heads.insert(), [{'chain_id': chain, 'seq': seq, 'hash': event_hash, 'occurred_at': last}
                                       for chain, (seq, event_hash, last) in heads.items()])
    return categories


def _plain_json(details: dict[str, Any]) -> dict[str, Any]:
    # As app/use_cases/audit.py stores details: JSON types only, integral floats as integers.
    def as_float(literal: str) -> float | int:
        value = float(literal)
        return int(value) if value.is_integer() else value

    plain: dict[str, Any] = json.loads(json.dumps(details, allow_nan=False), parse_float=as_float)
    return plain
