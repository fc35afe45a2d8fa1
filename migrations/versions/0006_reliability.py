"""Reliability (issue 11): failed authentications counted per window instead of one audit event each; webhook
signing secrets encrypted at rest (Fernet tokens in wider columns).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 07:40:00.000000
"""
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_SECRET_COLUMNS = ('secret', 'previous_secret')
_endpoints = sa.table('webhook_endpoints', sa.column('id', sa.String), sa.column('secret', sa.String),
                      sa.column('previous_secret', sa.String))


def _secret_box() -> Any:
    """The deployment's key: `verdict migrate` hands it over; a bare `alembic upgrade` loads it from the settings."""
    box = op.get_context().config.attributes.get('webhook_secret_box') if op.get_context().config else None
    if box is None:
        from app.config import Settings
        from app.secrets_at_rest import load_box
        box = load_box(Settings())
    return box


def _convert(change: Callable[[Any, str], str], needs_change: Callable[[str], bool]) -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.select(_endpoints)).all()
    todo = [row for row in rows if any(getattr(row, c) and needs_change(getattr(row, c)) for c in _SECRET_COLUMNS)]
    if not todo:
        return  # no key needed (a new database)
    box = _secret_box()
    for row in todo:
        values = {c: change(box, getattr(row, c)) for c in _SECRET_COLUMNS
                  if getattr(row, c) and needs_change(getattr(row, c))}
        bind.execute(sa.update(_endpoints).where(_endpoints.c.id == row.id).values(**values))


def upgrade() -> None:
    # Rows queued before this revision count as never dispatched: the first sweep sends each once more.
    with op.batch_alter_table('submissions') as batch:
        batch.add_column(sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('webhook_endpoints') as batch:
        for column in _SECRET_COLUMNS:
            batch.alter_column(column, type_=sa.String(length=255), existing_type=sa.String(length=100))
    # Secrets stored as issued (`whsec_...`) become Fernet tokens.
    _convert(lambda box, value: box.encrypt(value), lambda value: value.startswith('whsec_'))
    op.create_table('auth_failure_windows',
    sa.Column('chain_id', sa.String(length=40), nullable=False),
    sa.Column('subject_type', sa.String(length=16), nullable=False),
    sa.Column('subject_id', sa.String(length=64), nullable=False),
    sa.Column('window_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=True),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('first_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('chain_id', 'subject_type', 'subject_id', 'window_start',
                            name=op.f('pk_auth_failure_windows'))
    )
    op.create_index('ix_auth_failure_windows_window_start', 'auth_failure_windows', ['window_start'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('submissions') as batch:
        batch.drop_column('dispatched_at')
    _convert(lambda box, value: box.decrypt(value), lambda value: not value.startswith('whsec_'))
    with op.batch_alter_table('webhook_endpoints') as batch:
        for column in _SECRET_COLUMNS:
            batch.alter_column(column, type_=sa.String(length=100), existing_type=sa.String(length=255))
    op.drop_index('ix_auth_failure_windows_window_start', table_name='auth_failure_windows')
    op.drop_table('auth_failure_windows')
